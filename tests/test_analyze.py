"""``fishertune analyze``: the measurements against exact references, and the command end to end.

The measurement is checked on the micro model of ``micro.py`` (float64, enumerable vocabulary)
behind a transformers-like interface: the CE loss against a hand-written cross-entropy, the
Hutchinson traces against the dense ``torch.func.hessian``, ``Tr(F_X)`` against the vocabulary
enumeration, and the measured NEFTune loss increase against the exact second-order prediction at a
noise scale far below the embeddings' rms. The command runs on a tiny random Llama saved to disk.
"""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from fishertune.analysis.cli import parse_alphas
from fishertune.analysis.measure import analyze
from fishertune.analysis.results import combine_batches
from fishertune.cli import main as fishertune_main
from fishertune.data.collate import collate_tokenized
from fishertune.errors import FishertuneError
from fishertune.estimators import Estimate
from micro import CausalMix, cross_entropy, exact_fisher_trace, label_mask

DTYPE = torch.float64
ROWS = [  # pre-tokenized examples; -100 marks prompt tokens
    {"input_ids": [0, 3, 1, 4, 2], "labels": [-100, -100, 1, 4, 2]},
    {"input_ids": [5, 2, 2, 0], "labels": [-100, 2, 2, 0]},
]


class MicroLM(nn.Module):
    """:class:`micro.CausalMix` with the interface of a transformers causal LM."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.core = CausalMix(vocab=6, dim=3, hidden=4, seed=seed)
        self.embed_tokens = nn.Embedding.from_pretrained(self.core.embed.detach().clone())
        self.config = SimpleNamespace(_attn_implementation="eager")

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor, use_cache: bool = False):
        return SimpleNamespace(logits=self.core.logits(inputs_embeds, attention_mask))


def exact_references(model: MicroLM) -> dict[str, Tensor | float]:
    """Loss, ``Tr(H_X)``, ``diag(H_X)`` and ``Tr(F_X)`` of the batch of ``ROWS``, exactly."""
    batch = collate_tokenized(ROWS, pad_token_id=0)
    X = model.embed_tokens(batch["input_ids"]).detach()
    mask, labels = batch["attention_mask"], batch["labels"]

    def loss_fn(x: Tensor) -> Tensor:
        return cross_entropy(model.core.logits(x, mask), labels)

    hessian = torch.func.hessian(loss_fn)(X).reshape(X.numel(), X.numel()).detach()
    return {
        "X": X,
        "attention_mask": mask,
        "loss": float(loss_fn(X).detach()),
        "diag": torch.diagonal(hessian).reshape(X.shape),
        "trace_h": float(torch.trace(hessian)),
        "trace_f": exact_fisher_trace(lambda x: model.core.logits(x, mask), X, label_mask(labels)),
    }


def test_measurements_match_exact_references_on_a_micro_model():
    model = MicroLM(seed=2)  # Tr(H_X) = 1.48, Tr(F_X) = 1.84: both well away from 0
    exact = exact_references(model)
    X, mask, diag = exact["X"], exact["attention_mask"], exact["diag"]
    d = X.shape[-1]
    rms = float(X[mask.bool()].pow(2).mean().sqrt())
    lengths = mask.sum(-1)
    # NEFTune per sequence: a_b = alpha / sqrt(L_b d), so the prediction is
    # sum_b (a_b^2 / 6) Tr(H_X on sequence b) = (alpha^2 / 6) sum_i w_i H_ii, w_i = 1 / (L_b d).
    weight = (mask / (lengths[:, None] * d)).unsqueeze(-1)  # (B, L, 1)
    exact_weighted = float((weight * diag).sum())
    small = 0.02 * rms * math.sqrt(4 * d)  # a / rms ~ 0.02 for the shorter sequence
    result = analyze(
        model,
        None,
        ROWS,
        alphas=[small, 20 * small],
        batches=1,
        batch_size=2,
        probes=800,
        noise_samples=300,
        fisher_draws=800,
        seed=3,
        show_progress=False,
    )
    (batch,) = result.batches
    assert batch.loss == pytest.approx(exact["loss"], rel=1e-12)
    assert sorted(batch.lengths) == [4, 5] and batch.num_scored == 6
    for estimate, reference in ((batch.trace_h, exact["trace_h"]),
                                (batch.trace_h_weighted, exact_weighted),
                                (batch.trace_f, exact["trace_f"])):  # fmt: skip
        assert abs(estimate.mean - reference) < 4 * estimate.stderr
        assert estimate.stderr < 0.1 * abs(reference)
    # the gap is Tr(H_X) - Tr(F_X), and nonzero for this nonlinear model
    assert result.gap.mean == pytest.approx(batch.trace_h.mean - batch.trace_f.mean, rel=1e-12)
    assert abs(exact["trace_h"] - exact["trace_f"]) > 0.05 * abs(exact["trace_f"])

    # small noise: the measured increase matches the exact second-order prediction
    low, high = result.alphas
    predicted = small**2 / 6 * exact_weighted
    measured = batch.measured[small]
    assert abs(measured.mean - predicted) < 4 * measured.stderr + 0.02 * abs(predicted)
    assert low.agree and low.ratio.mean == pytest.approx(1.0, abs=0.1)
    # a / rms ~ 0.4: the higher orders of the expansion show. The same probes enter both ratios
    # and the same unit noise both measurements, so their quotient is free of most of the noise.
    assert abs(high.ratio.mean / low.ratio.mean - 1.0) > 0.05  # 0.91 measured
    assert batch.predicted(20 * small).mean == pytest.approx(
        (20 * small) ** 2 / 6 * batch.trace_h_weighted.mean, rel=1e-12
    )


def test_padded_length_mode_weights_every_real_token_alike():
    model = MicroLM(seed=1)
    result = analyze(
        model,
        None,
        ROWS,
        alphas=[1.0],
        batches=1,
        batch_size=2,
        probes=8,
        noise_samples=2,
        fisher_draws=2,
        length_mode="padded",
        show_progress=False,
    )
    (batch,) = result.batches
    padded_length, d = 5, 3
    # W = 1 / (L_pad d) on every real token: the same probes give Tr(W H) = Tr(H) / (L_pad d)
    assert batch.trace_h_weighted.mean == pytest.approx(
        batch.trace_h.mean / (padded_length * d),
        rel=1e-6,  # weights are float32
    )


def test_measurement_leaves_the_model_as_it_was():
    model = MicroLM()
    model.train()
    analyze(model, None, ROWS, alphas=[1.0], batches=1, batch_size=2, probes=2, noise_samples=2,
            show_progress=False)  # fmt: skip
    assert model.training
    assert all(p.requires_grad for p in model.parameters() if p is not model.embed_tokens.weight)


def test_batch_aggregate_is_an_estimate_with_both_errors():
    """The pooled estimate's stderr is the estimators' own error, sqrt(sum se_b^2) / n, so it
    works wherever an Estimate does; the between-batch error std_b / sqrt(n) rides beside it."""
    batches = [Estimate(1.0, 0.3), Estimate(2.0, 0.4), Estimate(4.5, 1.2)]
    pooled = combine_batches(batches)
    assert isinstance(pooled, Estimate)
    assert pooled.mean == pytest.approx(7.5 / 3)
    assert pooled.stderr == pooled.se_estimator == pytest.approx(1.3 / 3)  # sqrt(.09+.16+1.44)
    spread = math.sqrt(((1 - 2.5) ** 2 + (2 - 2.5) ** 2 + (4.5 - 2.5) ** 2) / 2)
    assert pooled.se_batches == pytest.approx(spread / math.sqrt(3))
    assert pooled.num_batches == 3
    # the report keys stay those of the analysis files
    assert pooled.to_dict() == pytest.approx(
        {
            "mean": 2.5,
            "se_estimator": 1.3 / 3,
            "se_batches": spread / math.sqrt(3),
            "ci95_estimator": 1.96 * 1.3 / 3,
            "ci95_batches": 1.96 * spread / math.sqrt(3),
            "num_batches": 3,
        }
    )
    halved = pooled.scaled(-0.5)
    assert (halved.mean, halved.stderr, halved.se_batches, halved.num_batches) == pytest.approx(
        (-1.25, 1.3 / 6, spread / math.sqrt(3) / 2, 3)
    )
    single = combine_batches([Estimate(1.0, 0.2)])
    assert single.stderr == pytest.approx(0.2) and math.isnan(single.se_batches)


def test_alphas_parsing_and_errors():
    assert parse_alphas("1, 5,10,15") == [1.0, 5.0, 10.0, 15.0]
    assert parse_alphas("0.25") == [0.25]
    for bad in ("1,x", "", "1,,2", "-1", "nan", "1,1"):
        with pytest.raises(FishertuneError, match="--alphas"):
            parse_alphas(bad)


# ---------------------------------------------------------------------------- the command


def _conversations(count: int) -> list[dict]:
    rows = []
    for i in range(count):
        rows.append({"messages": [
            {"role": "user", "content": f"What is {i} plus {i + 2}?"},
            {"role": "assistant", "content": f"{i} plus {i + 2} is {2 * i + 2}."},
        ]})  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """A tiny random Llama and the shipped tokenizer saved to a folder, and a conversation file."""
    from fishertune.data.tokenizer import load_tiny_tokenizer
    from fishertune.modeling import tiny_llama

    root = tmp_path_factory.mktemp("analyze")
    tokenizer = load_tiny_tokenizer()
    model = tiny_llama(
        len(tokenizer),
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in _conversations(8)))
    return root


def test_analyze_command_writes_consistent_reports(saved_llama, tmp_path, capsys):
    out = tmp_path / "report"
    alphas = [0.5, 5.0]
    code = fishertune_main([
        "analyze", "--model", str(saved_llama / "model"),
        "--data", str(saved_llama / "chats.jsonl"),
        "--alphas", "0.5,5", "--batches", "2", "--batch_size", "3", "--probes", "3",
        "--noise_samples", "2", "--max_length", "48", "--seed", "1", "--output", str(out),
        "--no_progress",
    ])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    for name in ("analysis.json", "analysis.csv", "analysis.png", "analysis.txt"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / "analysis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Tr(H_X)" in captured.out and "Tr(F_X)" in captured.out
    assert (out / "analysis.txt").read_text().strip() == captured.out.strip()

    report = json.loads((out / "analysis.json").read_text())
    d = report["hidden_size"]
    assert d == 16 and report["config"]["dtype"] == "float32"
    assert [row["alpha"] for row in report["alphas"]] == alphas
    batches = report["batches"]
    assert len(batches) == 2 and all(b["num_sequences"] == 3 for b in batches)
    for alpha, row in zip(alphas, report["alphas"], strict=True):
        key = str(alpha)
        for b in batches:
            # per-sequence NEFTune: predicted = (alpha^2 / 6) Tr(W H_X), W = 1/(L_b d)
            assert b["predicted"][key]["mean"] == pytest.approx(
                alpha**2 / 6 * b["trace_h_weighted"]["mean"], rel=1e-9
            )
        # aggregates are the means over batches; the interval is 1.96 standard errors
        assert row["predicted"]["mean"] == pytest.approx(
            sum(b["predicted"][key]["mean"] for b in batches) / 2, rel=1e-9
        )
        assert row["measured"]["mean"] == pytest.approx(
            sum(b["measured"][key]["mean"] for b in batches) / 2, rel=1e-9
        )
        assert row["measured"]["ci95_estimator"] == pytest.approx(
            1.96 * row["measured"]["se_estimator"]
        )
        assert row["ratio"]["mean"] == pytest.approx(
            row["measured"]["mean"] / row["predicted"]["mean"], rel=1e-9
        )
        agreeing = sum(
            abs(b["measured"][key]["mean"] - b["predicted"][key]["mean"])
            <= 1.96 * math.hypot(b["measured"][key]["stderr"], b["predicted"][key]["stderr"])
            for b in batches
        )
        assert row["batches_agreeing"] == agreeing
        length = report["typical_length"]
        assert length == round(report["median_length"])
        assert row["lambda_equiv"] == pytest.approx(alpha**2 / (6 * length * d), rel=1e-12)
        assert row["scale_at_median"] == pytest.approx(alpha / math.sqrt(length * d), rel=1e-12)
    assert report["trace_hessian"]["mean"] == pytest.approx(
        sum(b["trace_h"]["mean"] for b in batches) / 2, rel=1e-9
    )
    assert report["gauss_newton_gap"]["mean"] == pytest.approx(
        report["trace_hessian"]["mean"] - report["trace_fisher"]["mean"], rel=1e-9, abs=1e-12
    )
    assert report["trace_fisher"]["mean"] > 0
    for b in batches:
        assert math.isfinite(b["loss"]) and b["loss"] > 0

    with (out / "analysis.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * len(alphas) + len(alphas)
    summary = [r for r in rows if r["batch"] == "all"]
    assert [float(r["alpha"]) for r in summary] == alphas
    assert float(summary[1]["predicted"]) == pytest.approx(report["alphas"][1]["predicted"]["mean"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "{root}/missing", "--alphas", "1"], "--model {root}/missing: not a saved"),
        (["--model", "{root}/model", "--alphas", "1,five"], "--alphas"),
        (["--model", "{root}/model", "--probes", "1"], "--probes must be >= 2"),
        (["--model", "{root}/model", "--data", "{root}/nope.jsonl"], "data file not found"),
        (["--model", "{root}/model", "--target_noise_ratio", "-1"], "--target_noise_ratio"),
    ],
)
def test_bad_input_gives_one_line(saved_llama, tmp_path, capsys, args, message):
    argv = ["analyze", "--data", str(saved_llama / "chats.jsonl"), "--output", str(tmp_path)]
    argv += [arg.format(root=saved_llama) for arg in args]
    assert fishertune_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message.format(root=saved_llama) in err
    assert len(err.splitlines()) == 1


def test_target_noise_ratio_gives_the_alpha_at_that_ratio(saved_llama, tmp_path, capsys):
    """The printed alpha, fed back to analyze as an alpha, sits at the requested a/rms."""
    common = [
        "analyze", "--model", str(saved_llama / "model"),
        "--data", str(saved_llama / "chats.jsonl"), "--batches", "1", "--batch_size", "3",
        "--probes", "2", "--noise_samples", "2", "--max_length", "48", "--no_progress",
    ]  # fmt: skip
    assert fishertune_main([*common, "--target_noise_ratio", "0.3", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("target a/rms = 0.3:"))
    alpha = float(line.split("alpha = ")[1].split()[0])
    report = json.loads((tmp_path / "analysis.json").read_text())
    target = report["target_noise_ratio"]
    length, d, rms = report["typical_length"], report["hidden_size"], report["embedding_rms"]
    # independent arithmetic: a = alpha / sqrt(L d) = 0.3 rms, lambda_eq = a^2 / 6
    assert target["alpha"] == pytest.approx(0.3 * rms * math.sqrt(length * d), rel=1e-12)
    assert alpha == pytest.approx(target["alpha"], rel=1e-3)  # printed with 4 digits
    assert target["lambda_equiv"] == pytest.approx((0.3 * rms) ** 2 / 6, rel=1e-12)
    # the same data and seed measured at that alpha: analyze's own a/rms column reads 0.3
    again = tmp_path / "again"
    assert (
        fishertune_main([*common, "--alphas", repr(target["alpha"]), "--output", str(again)]) == 0
    )
    summary = json.loads((again / "analysis.json").read_text())["alphas"][0]
    assert summary["scale_over_rms"] == pytest.approx(0.3, rel=1e-9)


def test_record_holds_analyze_on_each_split_and_checkpoint(saved_llama, tmp_path, monkeypatch):
    """--record: the final model on every split and each complete checkpoint (by step, the one at
    the final step once) on the first; each entry is what analyze measures on that folder and
    split alone; no tables unless --output is given."""
    import shutil

    from fishertune.files import CHECKPOINT_RECORD, RunFolder
    from fishertune.modeling import tiny_llama

    run = tmp_path / "run"
    model = run / "model"
    shutil.copytree(saved_llama / "model", model)
    (model / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    for step in (2, 3, 4):
        other = tiny_llama(vocab, hidden_size=16, num_layers=1, num_heads=2, seed=step)
        other.save_pretrained(model / f"checkpoint-{step}")
        if step != 3:  # checkpoint-3 was never completed
            (model / f"checkpoint-{step}" / CHECKPOINT_RECORD).write_text("{}")
    data = tmp_path / "data"
    data.mkdir()
    for split, rows in (("train", _conversations(8)), ("validation", _conversations(14)[6:])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sizes = ["--batches", "2", "--batch_size", "3", "--probes", "3", "--fisher_draws", "2",
             "--alphas", "1", "--noise_samples", "2", "--max_length", "48",
             "--no_progress"]  # fmt: skip
    monkeypatch.chdir(tmp_path)
    record = run / "curvature.json"
    argv = ["analyze", "--model", str(model), "--data", str(data), "--split", "validation,train",
            "--checkpoints", "--record", str(record), *sizes]  # fmt: skip
    assert fishertune_main(argv) == 0
    assert not (tmp_path / "analysis").exists() and RunFolder(run).measured

    written = json.loads(record.read_text())
    assert (written["split"], written["probes"], written["fisher_draws"]) == ("validation", 3, 2)
    assert (written["batches"], written["batch_size"], written["max_length"]) == (2, 3, 48)
    trajectory = written["trajectory"]
    assert [(e["step"], e["folder"]) for e in trajectory] == [(2, "checkpoint-2"), (4, "model")]
    assert written["final"] == trajectory[-1] == written["splits"]["validation"]
    assert list(written["splits"]) == ["validation", "train"]
    keys = {"step", "folder", "loss", "trace_f", "trace_h", "gap", "embedding_rms",
            "median_length", "typical_length", "hidden_size"}  # fmt: skip
    assert all(set(e) == keys for e in [*trajectory, *written["splits"].values()])

    def alone(folder, split: str) -> dict:
        out = tmp_path / f"alone-{folder.name}-{split}"
        argv = ["analyze", "--model", str(folder), "--tokenizer", str(model), "--data", str(data),
                "--split", split, "--output", str(out), *sizes]  # fmt: skip
        assert fishertune_main(argv) == 0
        return json.loads((out / "analysis.json").read_text())

    for entry, folder, split in (
        (trajectory[0], model / "checkpoint-2", "validation"),
        (written["splits"]["validation"], model, "validation"),
        (written["splits"]["train"], model, "train"),
    ):
        report = alone(folder, split)
        for key, name in (("trace_f", "trace_fisher"), ("trace_h", "trace_hessian"),
                          ("gap", "gauss_newton_gap"), ("loss", "loss")):  # fmt: skip
            assert entry[key] == pytest.approx(report[name], rel=1e-12, abs=1e-15)
        assert entry["embedding_rms"] == pytest.approx(report["embedding_rms"], rel=1e-12)
        assert entry["typical_length"] == report["typical_length"]
    # another model, another split: the entries differ
    assert trajectory[0]["trace_h"]["mean"] != trajectory[1]["trace_h"]["mean"]
    assert written["splits"]["train"]["loss"]["mean"] != written["final"]["loss"]["mean"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--split", "validation,train"], "--split validation,train: measured only into a record"),
        (["--checkpoints"], "--checkpoints: measured only into a record; give --record FILE"),
        (["--split", "a, a"], "--split: repeated split in 'a, a'"),
        (["--split", ","], "--split: no split named in ','"),
        (["--record", "{tmp}"], "is a folder, not a file"),
    ],
)
def test_record_options_refused_in_one_line(saved_llama, tmp_path, capsys, args, message):
    argv = ["analyze", "--model", str(saved_llama / "model"), "--data", "builtin:tiny-tasks"]
    assert fishertune_main([*argv, *(a.format(tmp=tmp_path) for a in args)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
