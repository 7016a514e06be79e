"""Fine-tuning saved models the way users do: `--model_name_or_path FOLDER` through the CLI.

The models are built from configs and saved with ``save_pretrained`` (Llama; Qwen2 with
grouped-query attention and tied embeddings; GPT-2 with learned positions), next to a tokenizer
with a chat template or one without (which gets the Tulu template). Each method trains, saves,
reloads, evaluates and analyzes; LoRA run folders are models everywhere; bf16-stored models train
with float32 master weights; the paper presets run with only model, data and sizes overridden.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fishertune.cli import main as cli_main
from fishertune.data.tokenizer import load_tiny_tokenizer
from fishertune.modeling import load_causal_lm, load_model_and_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PAPER_PRESETS = ("baseline", "neftune", "token-f", "logit-f")
METHODS = {  # name -> flags
    "baseline": {"method": "baseline"},
    "neftune": {"method": "neftune", "neftune_alpha": 5},
    "token-f-exact": {"method": "token-f", "penalty_grad": "exact"},
    "token-f-fd": {"method": "token-f", "penalty_grad": "fd"},
    "logit-f-exact": {"method": "logit-f", "penalty_grad": "exact"},
    "logit-f-fd": {"method": "logit-f", "penalty_grad": "fd"},
}
PENALTY = {"penalty_coef": 0.05, "penalty_warmup_steps": 0}


def build_model(arch: str, tokenizer: Any) -> Any:
    """A tiny randomly initialised model of the architecture, float32."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(0)
    vocab = len(tokenizer)
    if arch == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                             tie_word_embeddings=False, **ids)  # fmt: skip
        return LlamaForCausalLM(config)
    if arch == "qwen2":  # grouped-query attention (4 query heads share 2 key/value heads), tied
        config = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             tie_word_embeddings=True, **ids)  # fmt: skip
        return Qwen2ForCausalLM(config)
    if arch == "gpt2":  # learned absolute positions, Conv1D layers, tied
        config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                            **ids)  # fmt: skip
        return GPT2LMHeadModel(config)
    raise ValueError(arch)


def save_model(folder: Path, arch: str, *, dtype: torch.dtype, chat_template: bool) -> Path:
    tokenizer = load_tiny_tokenizer()
    if not chat_template:
        tokenizer.chat_template = None
    build_model(arch, tokenizer).to(dtype).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert (folder / "chat_template.jinja").exists() == chat_template
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved models: the architectures in bf16 (as checkpoints are shipped), tokenizers with and
    without a chat template."""
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": save_model(root / "llama", "llama", dtype=torch.bfloat16, chat_template=True),
        "qwen2": save_model(root / "qwen2", "qwen2", dtype=torch.bfloat16, chat_template=False),
        "gpt2": save_model(root / "gpt2", "gpt2", dtype=torch.bfloat16, chat_template=False),
        "llama32": save_model(root / "llama32", "llama", dtype=torch.float32, chat_template=True),
    }


def flags(options: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    return argv


def train_argv(model: Path | str, data: Path, out: Path, **overrides: Any) -> list[str]:
    options: dict[str, Any] = {
        "model_name_or_path": model,
        "dataset_name": data,
        "max_length": 64,
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "dtype": "bfloat16",
        "bf16": "true",
        "use_cpu": "true",
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": "true",
        "output_dir": out,
        "seed": 0,
    }
    options.update(overrides)
    return ["train", *flags(options)]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_trained_and_reloadable(initial: Path, out: Path, dtype: torch.dtype) -> None:
    record = json.loads((out / "fishertune_run.json").read_text())
    assert record["status"] == "completed"
    before, after = weights(initial), weights(out)
    assert set(after) == set(before)
    assert {t.dtype for t in after.values()} == {dtype}  # saved in the dtype it was loaded in
    assert json.loads((out / "config.json").read_text())["dtype"] == str(dtype).split(".")[1]
    # the layers move everywhere; embedding rows of tokens absent from the data do not (most of
    # an untied tiny model's weights are its two 1024-row tables)
    layers = [k for k in before if ".layers." in k or ".h." in k]
    changed = sum(int((after[k] != before[k]).sum()) for k in layers)
    assert changed > 0.9 * sum(before[k].numel() for k in layers)
    model = load_causal_lm(str(out), dtype="auto")
    assert model.dtype == dtype
    ids = torch.tensor([[1, 4, 30, 31, 5]])
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 8)


def evaluate_and_analyze(model: Path, tmp_path: Path, *extra: str) -> dict[str, float]:
    output = tmp_path / "eval.json"
    argv = ["evaluate", "--model", str(model), "--tasks", "offline", "--limit", "4",
            "--max_new_tokens", "4", "--batch_size", "4", "--output", str(output),
            *extra]  # fmt: skip
    assert cli_main(argv) == 0
    metrics = json.loads(output.read_text())["metrics"]
    assert metrics["offline/val_loss"] > 0 and metrics["offline/n_test"] == 4
    analysis = tmp_path / "analysis"
    argv = ["analyze", "--model", str(model), "--data", "builtin:tiny-tasks", "--batches", "1",
            "--batch_size", "2", "--probes", "2", "--noise_samples", "2", "--alphas", "1",
            "--max_length", "64", "--output", str(analysis), "--no_progress", *extra]  # fmt: skip
    assert cli_main(argv) == 0
    report = json.loads((analysis / "analysis.json").read_text())
    assert report["trace_fisher"]["mean"] > 0
    return metrics


CASES = [  # (architecture, method): every method and both gradients over the default run
    ("llama", "token-f-exact"),
    ("qwen2", "logit-f-fd"),
    ("gpt2", "neftune"),
    ("qwen2", "logit-f-exact"),
]  # baseline runs in the LoRA and precision tests; the rest of the product is marked slow
SLOW_CASES = [
    (arch, method)
    for arch in ("llama", "qwen2", "gpt2")
    for method in METHODS
    if (arch, method) not in CASES
]


def _train_save_reload_evaluate(models, chat_file, tmp_path, arch, method) -> None:
    options = dict(METHODS[method])
    if options["method"] in ("token-f", "logit-f"):
        options.update(PENALTY)
    out = tmp_path / "run"
    assert cli_main(train_argv(models[arch], chat_file, out, **options)) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    logs = [entry for entry in state["log_history"] if "ce_loss" in entry]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logs)
    if options["method"] in ("token-f", "logit-f"):
        assert all(entry["penalty"] > 0 for entry in logs)
    assert_trained_and_reloadable(models[arch], out, torch.bfloat16)
    evaluate_and_analyze(out, tmp_path)


@pytest.mark.parametrize(("arch", "method"), CASES)
def test_each_method_fine_tunes_a_saved_model(models, chat_file, tmp_path, arch, method):
    _train_save_reload_evaluate(models, chat_file, tmp_path, arch, method)


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "method"), SLOW_CASES)
def test_every_architecture_and_method(models, chat_file, tmp_path, arch, method):
    _train_save_reload_evaluate(models, chat_file, tmp_path, arch, method)


# ---------------------------------------------------------------------------------- precision
def _changed_fraction(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    changed = sum(int((a[k].float() != b[k].float()).sum()) for k in a)
    return changed / sum(t.numel() for t in a.values())


@pytest.mark.numerics
@pytest.mark.parametrize("method", ["token-f-fd", pytest.param("baseline", marks=pytest.mark.slow)])
def test_bf16_checkpoint_trains_like_float32_master_weights(models, chat_file, tmp_path, method):
    """Loaded in bf16 or in float32, the same bf16 checkpoint reaches the same weights (up to
    bf16 rounding of the save); pure bf16 training (master_weights=model) loses most updates."""
    options = dict(METHODS[method], learning_rate=5e-6, max_steps=6)
    if options["method"] == "token-f":
        options.update(PENALTY)
    runs = {
        "bf16": {"dtype": "bfloat16"},
        "fp32": {"dtype": "float32"},
        "pure": {"dtype": "bfloat16", "master_weights": "model"},
    }
    saved = {}
    for name, extra in runs.items():
        out = tmp_path / name
        assert cli_main(train_argv(models["llama"], chat_file, out, **options, **extra)) == 0
        saved[name] = weights(out)
    initial = weights(models["llama"])
    assert {t.dtype for t in saved["bf16"].values()} == {torch.bfloat16}
    assert {t.dtype for t in saved["fp32"].values()} == {torch.float32}
    for key, value in saved["fp32"].items():
        assert torch.equal(value.to(torch.bfloat16), saved["bf16"][key]), key
    # the float32 master weights moved wherever a gradient reached (embedding rows of tokens
    # absent from the data get none); at lr 5e-6 a bf16 weight rarely can move
    master = _changed_fraction(initial, saved["fp32"])
    pure = _changed_fraction(initial, saved["pure"])
    assert master > 0.5 and pure < 0.1, (master, pure)


@pytest.mark.numerics
def test_resume_of_a_bf16_model_continues_from_float32_master_weights(models, chat_file, tmp_path):
    """Checkpoints hold the float32 master weights (the final model is bf16): a resumed run ends
    exactly where an uninterrupted one does."""
    import shutil

    common = {"learning_rate": 5e-6, "max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    straight = tmp_path / "straight"
    assert cli_main(train_argv(models["llama"], chat_file, straight, **common)) == 0
    checkpoint = load_file(straight / "checkpoint-2" / "model.safetensors")
    assert {t.dtype for t in checkpoint.values()} == {torch.float32}
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    argv = train_argv(models["llama"], chat_file, resumed, **common)
    assert cli_main([*argv, "--resume", "true"]) == 0
    a, b = weights(straight), weights(resumed)
    assert {t.dtype for t in b.values()} == {torch.bfloat16}
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_pure_bf16_is_warned(models, chat_file, tmp_path, caplog):
    argv = train_argv(models["llama"], chat_file, tmp_path / "run", max_steps=1,
                      master_weights="model")  # fmt: skip
    with caplog.at_level("WARNING"):
        assert cli_main(argv) == 0
    assert "rounded away" in caplog.text


# ---------------------------------------------------------------------------------- LoRA
def test_lora_run_folder_is_a_model_everywhere(models, chat_file, tmp_path):
    base = models["llama32"]
    run = tmp_path / "lora"
    argv = train_argv(base, chat_file, run, method="token-f", penalty_grad="fd", dtype="float32",
                      use_peft="true", lora_target_modules="all-linear", lora_dropout=0.0,
                      save_merged_model="true", **PENALTY)  # fmt: skip
    assert cli_main(argv) == 0
    assert (run / "adapter_config.json").is_file() and not (run / "model.safetensors").exists()
    config = json.loads((run / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == base.resolve()
    # the merged model: base weights moved by the adapter, in the base's dtype
    merged = weights(run / "merged")
    assert {t.dtype for t in merged.values()} == {torch.float32}
    assert _changed_fraction(weights(base), merged) > 0.1  # the linear layers' weights

    # loaded as base + adapter, or merged, it computes what the merged folder computes
    ids = torch.tensor([[1, 4, 30, 31, 32, 5, 40]])
    reference = load_causal_lm(str(run / "merged")).eval()(ids).logits
    for merge in (False, True):
        model, tokenizer = load_model_and_tokenizer(str(run), merge_adapter=merge)
        assert hasattr(model, "peft_config") != merge
        torch.testing.assert_close(model.eval()(ids).logits, reference, rtol=1e-4, atol=1e-4)
        assert tokenizer.chat_template

    # evaluate and analyze take the run folder, adapter kept or merged
    plain = evaluate_and_analyze(run, tmp_path / "adapter")
    folded = evaluate_and_analyze(run, tmp_path / "folded", "--merge_adapter")
    assert plain["offline/val_loss"] == pytest.approx(folded["offline/val_loss"], rel=1e-4)

    # a later run fine-tunes from the adapted model (its base with the adapter merged in)
    argv = train_argv(run, chat_file, tmp_path / "next", dtype="float32", max_steps=1,
                      learning_rate=0.0)  # fmt: skip
    assert cli_main(argv) == 0
    after = weights(tmp_path / "next")
    for key, value in merged.items():
        torch.testing.assert_close(after[key], value, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("start", ["tiny", "lora-run"])
def test_an_adapter_on_an_unnamed_base_reloads(models, chat_file, tmp_path, start):
    """The random tiny model and a merged LoRA run exist under no name: a new adapter on them
    names a copy saved in its run folder, so the run reloads with both changes."""
    if start == "tiny":
        model = "builtin:tiny-llama"
        extra = {"tiny_hidden_size": 32, "tiny_num_heads": 2, "dtype": "float32"}
    else:
        first = tmp_path / "first"
        argv = train_argv(models["llama32"], chat_file, first, dtype="float32", use_peft="true",
                          save_merged_model="true")  # fmt: skip
        assert cli_main(argv) == 0
        model, extra = first, {"dtype": "float32"}
    run = tmp_path / "second"
    argv = train_argv(model, chat_file, run, use_peft="true", save_merged_model="true", **extra)
    assert cli_main(argv) == 0
    config = json.loads((run / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == (run / "base").resolve()
    if start == "lora-run":  # the saved base is the first run merged
        for key, value in weights(first / "merged").items():
            torch.testing.assert_close(weights(run / "base")[key], value)
    ids = torch.tensor([[1, 4, 30, 31, 32, 5, 40]])
    reference = load_causal_lm(str(run / "merged")).eval()(ids).logits
    reloaded = load_causal_lm(str(run)).eval()(ids).logits
    torch.testing.assert_close(reloaded, reference, rtol=1e-4, atol=1e-4)
    if start == "tiny":
        # replacing the run: the new adapter's base is the new run's, not the old folder's
        # (which is deleted once the new run is safe), and nothing is left beside the folder
        argv = [*argv, "--overwrite_output_dir", "true", "--seed", "1"]
        assert cli_main(argv) == 0
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
        reference = load_causal_lm(str(run / "merged")).eval()(ids).logits
        reloaded = load_causal_lm(str(run)).eval()(ids).logits
        torch.testing.assert_close(reloaded, reference, rtol=1e-4, atol=1e-4)


def test_lora_on_a_bf16_base_keeps_the_base_frozen_in_bf16(models, chat_file, tmp_path):
    from fishertune.training.cli import build_trainer, parse_args

    argv = train_argv(models["qwen2"], chat_file, tmp_path / "run", use_peft="true")[1:]
    trainer = build_trainer(*parse_args(argv))
    dtypes = {(p.requires_grad, p.dtype) for p in trainer.model.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}


# ---------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"load_in_4bit": "true"}, "load_in_4bit: quantized (QLoRA) training is not supported"),
        ({"save_merged_model": "true"}, "save_merged_model needs use_peft=true"),
        ({"model_name_or_path": "/no/such/model"}, "not a saved model folder"),
        ({"dtype": "int8"}, "dtype"),
        ({"attn_implementation": "flash_attention_2"}, "cannot load model"),
    ],
)
def test_model_options_refused_in_one_line(models, chat_file, tmp_path, capsys, overrides,
                                           message):  # fmt: skip
    argv = train_argv(models["llama"], chat_file, tmp_path / "run", **overrides)
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_remote_code_needs_trust_remote_code(chat_file, tmp_path, capsys):
    folder = save_model(tmp_path / "custom", "llama", dtype=torch.float32, chat_template=True)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_x.XConfig",
                          "AutoModelForCausalLM": "modeling_x.XForCausalLM"}  # fmt: skip
    config["model_type"] = "x-custom"
    (folder / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert cli_main(train_argv(folder, chat_file, tmp_path / "run", dtype="float32")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: ")
    assert "needs its own code" in errors[0] and "--trust_remote_code true" in errors[0]


def test_model_options_reach_the_model(models, chat_file, tmp_path):
    from fishertune.training.cli import build_trainer, parse_args

    argv = train_argv(models["gpt2"], chat_file, tmp_path / "run", dtype="float32",
                      attn_implementation="sdpa", model_revision="main",
                      trust_remote_code="true")[1:]  # fmt: skip
    trainer = build_trainer(*parse_args(argv))
    assert trainer.model.config._attn_implementation == "sdpa"
    assert trainer.model.dtype == torch.float32


# ---------------------------------------------------------------------------------- presets
PRESET_SIZES = {  # what a CPU run changes besides model and data: sizes, and the device
    "max_length": 64,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "max_steps": 2,
    "use_cpu": "true",  # bf16 on a machine without GPU needs it (and 2 CPU processes do)
}


def preset_argv(preset: str, model: Path, data: Path, out: Path) -> list[str]:
    config = ROOT / "configs" / "paper" / f"{preset}.yaml"
    options = {"model_name_or_path": model, "dataset_name": data, "output_dir": out}
    return ["--config", str(config), *flags({**options, **PRESET_SIZES})]


def _run_preset(preset: str, models: dict[str, Path], chat_file: Path, out: Path) -> None:
    shipped = yaml.safe_load((ROOT / "configs" / "paper" / f"{preset}.yaml").read_text())
    assert shipped["dtype"] == "bfloat16" and shipped["bf16"] is True  # as shipped
    assert cli_main(["train", *preset_argv(preset, models["llama"], chat_file, out)]) == 0
    record = json.loads((out / "fishertune_run.json").read_text())
    assert record["status"] == "completed" and record["global_step"] == 2
    state = json.loads((out / "trainer_state.json").read_text())
    assert all(math.isfinite(entry["loss"]) for entry in state["log_history"] if "loss" in entry)
    # saved in bf16 as loaded; one step at lr 5e-6 (the first is warm-up at lr 0) moves a weight
    # by about 1e-3 of its bf16 spacing, so only the weights near a rounding boundary show it
    assert {t.dtype for t in weights(out).values()} == {torch.bfloat16}
    assert _changed_fraction(weights(models["llama"]), weights(out)) > 0.001


@pytest.mark.parametrize("preset", ["token-f", "neftune"])
def test_paper_preset_fine_tunes_a_saved_model(models, chat_file, tmp_path, preset):
    _run_preset(preset, models, chat_file, tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["baseline", "logit-f"])
def test_other_paper_presets_fine_tune_a_saved_model(models, chat_file, tmp_path, preset):
    _run_preset(preset, models, chat_file, tmp_path / "run")


def _run_preset_two_processes(preset, models, chat_file, tmp_path) -> None:
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / "ddp_cpu.yaml"), "--main_process_port",
               str(29600 + os.getpid() % 300), "-m", "fishertune.cli", "train",
               *preset_argv(preset, models["llama"], chat_file, out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "fishertune_run.json").read_text())
    assert record["status"] == "completed" and record["global_step"] == 2
    assert {t.dtype for t in weights(out).values()} == {torch.bfloat16}


def test_paper_preset_under_two_processes(models, chat_file, tmp_path):
    _run_preset_two_processes("logit-f", models, chat_file, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["baseline", "neftune", "token-f"])
def test_other_paper_presets_under_two_processes(models, chat_file, tmp_path, preset):
    _run_preset_two_processes(preset, models, chat_file, tmp_path)


# ---------------------------------------------------------------------------------- library path
def _scored_text(tokenizer: Any, row: dict[str, Any]) -> list[str]:
    """The scored tokens of a row, decoded run by run."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        if label == -100:
            if current:
                runs.append(tokenizer.decode(current))
            current = []
        else:
            assert label == token
            current.append(token)
    if current:
        runs.append(tokenizer.decode(current))
    return runs


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # with and without a chat template
def test_library_scores_the_tokens_the_cli_scores(models, chat_file, tmp_path, arch):
    from fishertune.data.chat import load_conversations
    from fishertune.training import FisherSFTConfig, FisherSFTTrainer
    from fishertune.training.cli import build_trainer, parse_args

    cli = build_trainer(*parse_args(train_argv(models[arch], chat_file, tmp_path / "a")[1:]))
    model, tokenizer = load_model_and_tokenizer(str(models[arch]))
    conversations = load_conversations(str(chat_file))
    args = FisherSFTConfig(output_dir=str(tmp_path / "b"), max_length=64, report_to="none",
                           use_cpu=True)  # fmt: skip
    library = FisherSFTTrainer(model=model, args=args, train_dataset=conversations,
                               processing_class=tokenizer)  # fmt: skip
    # the command line's rows are tokenized when read (a short run): compare them row by row
    cli_rows = [cli.train_dataset[i] for i in range(len(cli.train_dataset))]
    assert library.train_dataset["labels"] == [row["labels"] for row in cli_rows]
    assert library.train_dataset["input_ids"] == [row["input_ids"] for row in cli_rows]
    # independently: what is scored is each assistant reply and its end-of-turn token
    for row, conversation in zip(library.train_dataset, conversations, strict=True):
        replies = [m["content"] for m in conversation["messages"] if m["role"] == "assistant"]
        assert _scored_text(tokenizer, row) == [r + tokenizer.eos_token for r in replies]

    # TRL's own processing (assistant_only=false) would score the prompt as well
    args = FisherSFTConfig(output_dir=str(tmp_path / "c"), max_length=64, report_to="none",
                           use_cpu=True, assistant_only=False)  # fmt: skip
    everything = FisherSFTTrainer(model=model, args=args, train_dataset=conversations,
                                  processing_class=tokenizer)  # fmt: skip
    assert all(-100 not in labels for labels in everything.train_dataset["labels"])
    argv = train_argv(models[arch], chat_file, tmp_path / "d", assistant_only="false")[1:]
    cli_everything = build_trainer(*parse_args(argv))
    rows = [cli_everything.train_dataset[i] for i in range(len(cli_everything.train_dataset))]
    assert all(row["labels"] == row["input_ids"] for row in rows)


def test_trl_assistant_only_loss_is_taken_as_ours(tmp_path):
    from fishertune.training import FisherSFTConfig

    args = FisherSFTConfig(output_dir=str(tmp_path), assistant_only=False,
                           assistant_only_loss=True, use_cpu=True)  # fmt: skip
    assert args.assistant_only and not args.assistant_only_loss


def test_readme_library_example_runs_as_written(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use it as a library", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == trainer.args.max_steps
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert all(-100 in labels for labels in trainer.train_dataset["labels"][:20])


# ---------------------------------------------------------------------------------- experiments
def test_experiment_grid_fine_tunes_a_saved_model(models, tmp_path):
    """A grid whose runs fine-tune a saved folder, one of them with LoRA: each run trains and is
    scored (the LoRA run folder evaluated as a model)."""
    from fishertune.experiments.experiment_file import load_experiment
    from fishertune.experiments.runner import run_experiment

    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({
        "dataset_name": "builtin:tiny-tasks", "dataset_fraction": 0.02, "max_length": 64,
        "max_steps": 2, "per_device_train_batch_size": 4, "use_cpu": True, "bf16": True,
        "report_to": "none", "save_strategy": "no", "disable_tqdm": True,
    }))  # fmt: skip
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "base_config": str(base),
        "output_dir": str(tmp_path / "out"),
        "overrides": {"model_name_or_path": str(models["qwen2"]), "dtype": "bfloat16"},
        "methods": {
            "baseline": {"method": "baseline"},
            "lora-token-f": {"method": "token-f", "penalty_grad": "fd", "use_peft": True,
                             "penalty_coef": 0.05, "penalty_warmup_steps": 0},
        },
        "seeds": [0],
        "evaluation": {"tasks": ["offline"], "limit": 4, "batch_size": 4, "max_new_tokens": 4},
    }))  # fmt: skip

    def in_process(command: list[str], log_path: Path, env: dict[str, str]) -> int:
        assert command[:3] == [sys.executable, "-m", "fishertune.cli"]
        return cli_main(command[3:])

    config = load_experiment(grid)
    results = run_experiment(config, launcher=in_process, log=lambda _: None)
    assert [r.status for r in results] == ["completed", "completed"], results
    for run in ("baseline-seed0", "lora-token-f-seed0"):
        scores = json.loads((config.runs_dir / run / "evaluation.json").read_text())
        assert scores["metrics"]["offline/val_loss"] > 0
    lora_model = config.runs_dir / "lora-token-f-seed0" / "model"
    assert (lora_model / "adapter_config.json").is_file()
    assert scores["meta"]["model"] == str(lora_model.resolve())


@pytest.mark.slow  # lm-eval indexes its task registry: about 30 s
def test_lora_run_scored_by_lm_eval(models, chat_file, tmp_path):
    """lm-eval scores a LoRA run folder as the model in memory and, with --model_args, as its
    base with ``peft=`` the adapter (lm-eval loading it): both run, with the same accuracy."""
    run = tmp_path / "lora"
    argv = train_argv(models["llama32"], chat_file, run, dtype="float32", use_peft="true",
                      lora_target_modules="all-linear")  # fmt: skip
    assert cli_main(argv) == 0
    docs = [{"question": f"what is {i} plus {i}?", "choices": [str(2 * i), str(i), "seven"],
             "label": 0} for i in range(6)]  # fmt: skip
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    scores = []
    for extra in ([], ["--model_args", "dtype=float32"]):
        output = tmp_path / f"eval{len(scores)}.json"
        argv = ["evaluate", "--model", str(run), "--tasks", "tiny_mc", "--include_path",
                str(tasks), "--output", str(output), "--device", "cpu", *extra]  # fmt: skip
        assert cli_main(argv) == 0
        scores.append(json.loads(output.read_text())["metrics"])
    assert scores[0]["tiny_mc/acc"] == scores[1]["tiny_mc/acc"]


def test_chat_template_file_is_used_for_the_data(models, chat_file, tmp_path, capsys):
    """TRL's chat_template_path: the data is tokenized with that template (in the CLI and the
    library alike), and the saved tokenizer carries it."""
    from fishertune.training.cli import build_trainer, parse_args

    template = tmp_path / "template.jinja"
    template.write_text(
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'Q: ' + m['content'] + '\\nA: ' }}"
        "{% else %}{{ m['content'] + eos_token }}{% if not loop.last %}{{ '\\n' }}{% endif %}"
        "{% endif %}{% endfor %}"
    )
    argv = train_argv(models["llama"], chat_file, tmp_path / "run", chat_template_path=template)
    trainer = build_trainer(*parse_args(argv[1:]))
    tokenizer = trainer.processing_class
    first = tokenizer.decode(trainer.train_dataset[0]["input_ids"])
    assert first.startswith("Q: say something about") and "\nA: " in first
    scored = _scored_text(tokenizer, trainer.train_dataset[0])  # " apples" is one token here
    assert [text.strip() for text in scored] == ["apples are nice, 0 times over</s>"]
    assert tokenizer.chat_template == template.read_text()

    from fishertune.data.chat import load_conversations
    from fishertune.training import FisherSFTConfig, FisherSFTTrainer

    model, library_tokenizer = load_model_and_tokenizer(str(models["llama"]))
    args = FisherSFTConfig(output_dir=str(tmp_path / "lib"), max_length=64, report_to="none",
                           use_cpu=True, chat_template_path=str(template))  # fmt: skip
    library = FisherSFTTrainer(model=model, args=args, processing_class=library_tokenizer,
                               train_dataset=load_conversations(str(chat_file)))  # fmt: skip
    cli_rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    assert library.train_dataset["labels"] == [row["labels"] for row in cli_rows]

    argv = train_argv(models["llama"], chat_file, tmp_path / "bad", chat_template_path="gpt2")
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: chat_template_path gpt2: give a .jinja or .j2 template file")
