"""FisherSFTTrainer and `fishertune train`, end to end on a tiny Llama, CPU."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fishertune.cli import main as cli_main
from fishertune.errors import FishertuneError
from fishertune.training.checks import check_supported
from fishertune.training.cli import build_trainer, latest_checkpoint, parse_args


def base_args(chat_file: Path, output_dir: Path, **overrides: object) -> list[str]:
    options = {
        "model_name_or_path": "builtin:tiny-llama",
        "tiny_hidden_size": 32,
        "tiny_num_layers": 2,
        "tiny_num_heads": 2,
        "dataset_name": str(chat_file),
        "max_length": 64,
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "bf16": "false",
        "activation_checkpointing": "false",
        "use_cpu": "true",
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": "true",
        "output_dir": str(output_dir),
        "seed": 0,
    }
    options.update(overrides)
    argv = []
    for key, value in options.items():
        values = value if isinstance(value, list) else [value]
        argv += [f"--{key}", *map(str, values)]
    return argv


def trainer_for(chat_file: Path, tmp_path: Path, **overrides: object):
    return build_trainer(*parse_args(base_args(chat_file, tmp_path / "out", **overrides)))


PENALTY = {"penalty_coef": 0.05, "penalty_warmup_steps": 0}


@pytest.mark.parametrize(
    "method, extra",
    [
        ("baseline", {}),
        ("neftune", {"neftune_alpha": 5}),
        ("token-f", PENALTY),
        ("logit-f", {**PENALTY, "penalty_grad": "fd"}),
    ],
)
def test_each_method_trains_logs_and_saves_a_loadable_model(chat_file, tmp_path, method, extra):
    out = tmp_path / "run"
    argv = ["train", *base_args(chat_file, out, method=method, **extra)]
    assert cli_main(argv) == 0
    record = json.loads((out / "fishertune_run.json").read_text())
    assert record["status"] == "completed" and record["method"] == method
    state = json.loads((out / "trainer_state.json").read_text())
    logs = [entry for entry in state["log_history"] if "ce_loss" in entry]
    assert len(logs) == 4
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    if method in ("token-f", "logit-f"):
        assert all(entry["penalty"] > 0 and entry["penalty_coef"] == 0.05 for entry in logs)
        # the logged loss is CE + lambda * R
        for entry in logs:
            assert entry["loss"] == pytest.approx(
                entry["ce_loss"] + 0.05 * entry["penalty"], rel=1e-3
            )
    else:
        assert all("penalty" not in entry for entry in logs)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (out / "model.safetensors").is_file()
    assert not model.get_input_embeddings()._forward_hooks
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "say something about maps"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def _step_gradient(trainer, method_batch) -> torch.Tensor:
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(method_batch))
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer._prepare_inputs(batch)


def _gradients_on_one_batch(*trainers) -> list[torch.Tensor]:
    """Each trainer's step gradient, all with the first one's weights on its first batch."""
    first = trainers[0]
    for other in trainers[1:]:
        other.model.load_state_dict(first.model.state_dict())
    batch = _batch(first)
    gradients = []
    for trainer in trainers:
        with trainer._capture.attached(trainer.model.get_input_embeddings()):
            gradients.append(_step_gradient(trainer, batch))
    return gradients


@pytest.mark.parametrize("kind", ["token-f", "logit-f"])
@pytest.mark.parametrize("scheme, tolerance", [("forward", 2e-2), ("central", 2e-3)])
def test_fd_gradient_matches_exact(chat_file, tmp_path, kind, scheme, tolerance):
    exact = trainer_for(
        chat_file,
        tmp_path,
        method=kind,
        penalty_coef=1.0,
        penalty_warmup_steps=0,
        penalty_grad="exact",
    )
    fd = trainer_for(
        chat_file,
        tmp_path,
        method=kind,
        penalty_coef=1.0,
        penalty_warmup_steps=0,
        penalty_grad="fd",
        penalty_fd_scheme=scheme,
    )
    baseline = trainer_for(chat_file, tmp_path, method="baseline")
    g_exact, g_fd, g_ce = _gradients_on_one_batch(exact, fd, baseline)
    # compare the penalty's part of the gradient, which the CE part would otherwise dominate
    pen_exact, pen_fd = g_exact - g_ce, g_fd - g_ce
    assert pen_exact.norm() > 0.1 * g_ce.norm()
    relative = (pen_fd - pen_exact).norm() / pen_exact.norm()
    assert relative < tolerance, f"fd {scheme} relative error {relative:.2e}"


def test_fd_runs_with_sdpa_kernels_and_activation_checkpointing(chat_file, tmp_path):
    """fd needs only first-order autograd: under non-reentrant activation checkpointing and SDPA
    (whose fused CPU kernel has no double backward) its gradient still matches exact double
    backward on the eager model without checkpointing."""
    common = {"method": "logit-f", "penalty_coef": 1.0, "penalty_warmup_steps": 0}
    exact = trainer_for(chat_file, tmp_path, penalty_grad="exact", **common)
    fd = trainer_for(chat_file, tmp_path, penalty_grad="fd", penalty_fd_scheme="central",
                     attn_implementation="sdpa", **common)  # fmt: skip
    baseline = trainer_for(chat_file, tmp_path, method="baseline")
    assert fd.model.config._attn_implementation == "sdpa"
    fd.model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False}
    )
    assert fd.model.is_activation_checkpointing
    g_exact, g_fd, g_ce = _gradients_on_one_batch(exact, fd, baseline)
    pen_exact, pen_fd = g_exact - g_ce, g_fd - g_ce
    assert (pen_fd - pen_exact).norm() / pen_exact.norm() < 2e-3


@pytest.mark.parametrize("scheme, tolerance", [("forward", 2e-2), ("central", 2e-3)])
def test_fd_with_lora_dropout_matches_exact(chat_file, tmp_path, scheme, tolerance):
    """fd differences g(X + h v) - g(X) come from separate forwards: with dropout (LoRA's
    default 0.05) they must share one dropout mask, else the difference is mask noise / h."""
    lora = {"use_peft": "true", "lora_r": 4, "lora_dropout": 0.05,
            "lora_target_modules": ["q_proj", "v_proj"]}  # fmt: skip
    common = {"method": "token-f", "penalty_coef": 1.0, "penalty_warmup_steps": 0, **lora}
    exact = trainer_for(chat_file, tmp_path, penalty_grad="exact", **common)
    fd = trainer_for(chat_file, tmp_path, penalty_grad="fd", penalty_fd_scheme=scheme, **common)
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at 0, which would switch its dropout off
        for name, param in exact.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    g_exact, g_fd = _gradients_on_one_batch(exact, fd)
    assert (g_fd - g_exact).norm() / g_exact.norm() < tolerance


def test_fd_with_a_penalized_fraction_logs_consistent_ce(chat_file, tmp_path):
    trainer = trainer_for(chat_file, tmp_path, method="token-f", penalty_coef=0.05,
                          penalty_warmup_steps=0, penalty_grad="fd", penalty_fraction=0.5,
                          max_steps=2)  # fmt: skip
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "penalty" in entry]
    assert len(logs) == 2
    for entry in logs:  # ce_loss is the per-token CE of the whole batch, not a mean of halves
        assert entry["loss"] == pytest.approx(entry["ce_loss"] + 0.05 * entry["penalty"], rel=1e-4)


def test_penalty_fraction_rescales_to_an_unbiased_estimate(chat_file, tmp_path):
    trainer = trainer_for(
        chat_file,
        tmp_path,
        method="token-f",
        penalty_coef=1.0,
        penalty_warmup_steps=0,
        penalty_grad="fd",
        penalty_fraction=0.5,
    )
    batch = _batch(trainer)
    values = []
    with trainer._capture.attached(trainer.model.get_input_embeddings()):
        trainer.model.train()
        for step in range(24):
            trainer.state.global_step = step
            trainer.compute_loss(trainer.model, dict(batch))
            trainer._check_step(trainer.model)  # the optimizer-step hook logs the step's sums
            trainer.model.zero_grad()
            values.append(trainer._train_metrics["penalty"][-1])
    full = trainer_for(
        chat_file,
        tmp_path,
        method="token-f",
        penalty_coef=1.0,
        penalty_warmup_steps=0,
        penalty_grad="fd",
    )
    full.model.load_state_dict(trainer.model.state_dict())
    full_values = []
    with full._capture.attached(full.model.get_input_embeddings()):
        full.model.train()
        for step in range(24):
            full.state.global_step = step
            full.compute_loss(full.model, dict(batch))
            full._check_step(full.model)  # the optimizer-step hook logs the step's sums
            full.model.zero_grad()
            full_values.append(full._train_metrics["penalty"][-1])
    half, whole = torch.tensor(values), torch.tensor(full_values)
    standard_error = (half.var() / len(half) + whole.var() / len(whole)).sqrt()
    assert abs(half.mean() - whole.mean()) < 4 * standard_error + 1e-6


PENALTY_LAYOUTS = {
    "baseline": {},
    "exact": {"method": "token-f", "penalty_coef": 0.05, "penalty_warmup_steps": 0},
    "fd": {"method": "token-f", "penalty_coef": 0.05, "penalty_warmup_steps": 0,
           "penalty_grad": "fd"},
}  # fmt: skip


def _training_update(trainer) -> torch.Tensor:
    """The change of every weight (flattened) made by ``trainer.train()``."""
    before = torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])
    trainer.train()
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()]) - before


def test_gradient_accumulation_gives_the_same_update(chat_file, tmp_path):
    """8 rows in one micro-batch or in 4 of 2 make the same SGD step (no clipping, which would
    hide a wrong normalizer). CE matches exactly; the penalty's draws differ between layouts, so
    its part of the update (penalized minus baseline) is compared by norm and direction: a wrong
    normalizer is off by the factor 4. fd mode accumulates part of its gradient by hand."""
    updates = {}
    for name, extra in PENALTY_LAYOUTS.items():
        for batch_size, accumulation in ((8, 1), (2, 4)):
            out = tmp_path / f"{name}-{batch_size}"
            argv = base_args(chat_file, out, max_steps=1, per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, optim="sgd",
                             learning_rate=1.0, max_grad_norm=0, dataloader_drop_last="true",
                             **{"method": "baseline", **extra})  # fmt: skip
            trainer = build_trainer(*parse_args(argv))
            updates[name, batch_size] = _training_update(trainer)
    torch.testing.assert_close(updates["baseline", 8], updates["baseline", 2], rtol=1e-4, atol=1e-6)
    for name in ("exact", "fd"):
        one = updates[name, 8] - updates["baseline", 8]
        four = updates[name, 2] - updates["baseline", 2]
        assert one.norm() > updates["baseline", 8].norm()  # the penalty's part is not negligible
        assert 0.8 < (four.norm() / one.norm()).item() < 1.25, name
        assert torch.nn.functional.cosine_similarity(one, four, dim=0) > 0.7, name
    # exact and fd agree with each other too (same layout, same draws)
    exact, fd = (updates[n, 8] - updates["baseline", 8] for n in ("exact", "fd"))
    assert torch.nn.functional.cosine_similarity(exact, fd, dim=0) > 0.99


@pytest.mark.numerics
def test_resume_reaches_the_same_weights(chat_file, tmp_path):
    common = {
        "method": "token-f",
        "penalty_coef": 0.05,
        "penalty_warmup_steps": 2,
        "max_steps": 6,
        "save_strategy": "steps",
        "save_steps": 3,
    }
    straight = tmp_path / "straight"
    assert cli_main(["train", *base_args(chat_file, straight, **common)]) == 0
    # a run that died after writing checkpoint-3, and while writing checkpoint-5 (no completion
    # record): resuming must pick checkpoint-3 and end with the uninterrupted run's weights
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(straight / "checkpoint-3", interrupted / "checkpoint-3")
    (interrupted / "checkpoint-5").mkdir()
    assert latest_checkpoint(interrupted).name == "checkpoint-3"
    argv = ["train", *base_args(chat_file, interrupted, **common), "--resume", "true"]
    assert cli_main(argv) == 0
    a = load_file(straight / "model.safetensors")
    b = load_file(interrupted / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    steps = json.loads((interrupted / "fishertune_run.json").read_text())["global_step"]
    assert steps == 6


def test_lora_and_activation_checkpointing_with_exact_penalty(chat_file, tmp_path):
    trainer = trainer_for(
        chat_file,
        tmp_path,
        method="token-f",
        penalty_coef=0.05,
        penalty_warmup_steps=0,
        use_peft="true",
        lora_r=4,
        lora_target_modules=["q_proj", "v_proj"],
        activation_checkpointing="true",
        max_steps=2,
    )
    before = {k: v.clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert any("lora" in k for k in before)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    penalties = [e["penalty"] for e in trainer.state.log_history if "penalty" in e]
    assert penalties and all(p > 0 for p in penalties)


def test_sdpa_model_runs_exact_mode_with_the_math_kernel(chat_file, tmp_path):
    trainer = trainer_for(
        chat_file,
        tmp_path,
        method="logit-f",
        penalty_coef=0.05,
        penalty_warmup_steps=0,
        attn_implementation="sdpa",
        max_steps=1,
    )
    assert trainer.model.config._attn_implementation == "sdpa"
    trainer.train()
    assert any("penalty" in e for e in trainer.state.log_history)


def test_hooks_are_removed_when_training_raises(chat_file, tmp_path):
    trainer = trainer_for(chat_file, tmp_path, method="neftune")
    embedding = trainer.model.get_input_embeddings()
    before = dict(embedding._forward_hooks)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    trainer.compute_loss = boom
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert dict(embedding._forward_hooks) == before


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"method": "dropout"}, "--method: invalid choice: 'dropout'"),
        ({"method": "token-f", "penalty_coef": -1}, "penalty_coef must be >= 0"),
        ({"method": "baseline", "penalty_coef": 0.1}, "penalty_coef given with method='baseline'"),
        ({"method": "baseline", "neftune_alpha": 5}, "neftune_alpha given with method='baseline'"),
        ({"method": "token-f", "packing": "true"}, "packing is not supported"),
        ({"method": "neftune", "neftune_noise_alpha": 5}, "neftune_noise_alpha"),
        ({"method": "token-f", "penalty_fraction": 0}, "penalty_fraction must be in"),
        (
            {
                "method": "token-f",
                "activation_checkpointing": "true",
                "activation_checkpointing_kwargs": '{"use_reentrant": true}',
            },
            "use_reentrant",
        ),
    ],
)
def test_bad_options_give_one_clear_error(chat_file, tmp_path, overrides, message):
    with pytest.raises(FishertuneError, match=message):
        parse_args(base_args(chat_file, tmp_path / "out", **overrides))


def test_a_train_run_folder_holds_train_log_and_tensorboard_events(chat_file, tmp_path):
    out = tmp_path / "run"
    argv = base_args(chat_file, out, max_steps=2, neftune_noise_alpha=5)
    index = argv.index("--report_to")
    del argv[index : index + 2]  # unset: tensorboard, as docs/training.md says
    assert cli_main(["train", *argv]) == 0
    log = (out / "train.log").read_text()
    assert "--neftune_noise_alpha 5 taken as --method neftune" in log  # said before the folder
    assert '"ce_loss"' in log and "step 2:" in log
    assert list(out.glob("runs/*/events.out.tfevents.*"))
    assert json.loads((out / "fishertune_run.json").read_text())["method"] == "neftune"


def test_cpu_runs_leave_bf16_and_checkpointing_off_unless_asked(tmp_path, monkeypatch):
    from fishertune.training import config as config_module

    monkeypatch.setattr(config_module, "accelerator_present", lambda: False)
    for use_cpu in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            args = config_module.FisherSFTConfig(output_dir=str(tmp_path), use_cpu=use_cpu)
        assert (args.bf16, args.activation_checkpointing, args.gradient_checkpointing) == (
            False, False, False)  # fmt: skip
        assert not [w for w in caught if "checkpointing" in str(w.message)]  # nobody set it
    # the user's own values are kept; bf16 with no GPU and no use_cpu is one line naming it
    args = config_module.FisherSFTConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=True, activation_checkpointing=True
    )
    assert args.bf16 and args.activation_checkpointing
    with pytest.raises(FishertuneError, match=r"^bf16=true needs a GPU and none is present"):
        config_module.FisherSFTConfig(output_dir=str(tmp_path), bf16=True)


def test_a_presets_gpu_settings_are_turned_off_on_the_cpu_in_one_line(tmp_path, monkeypatch):
    from fishertune.training import config as config_module

    monkeypatch.setattr(config_module, "accelerator_present", lambda: False)
    argv = ["--config", "paper/token-f", "--output_dir", str(tmp_path / "o")]
    notes: list[str] = []
    _, args, _ = parse_args(argv, notes)
    assert not args.bf16 and not args.activation_checkpointing
    assert notes == [
        "bf16 and activation checkpointing off: no GPU (token-f.yaml asks for them; "
        "--bf16 true --activation_checkpointing true keeps them)"
    ]
    notes.clear()
    _, args, _ = parse_args([*argv, "--use_cpu", "true", "--bf16", "true"], notes)
    assert args.bf16 and not args.activation_checkpointing
    assert notes == [
        "activation checkpointing off: use_cpu (token-f.yaml asks for it; "
        "--activation_checkpointing true keeps it)"
    ]
    monkeypatch.setattr(config_module, "accelerator_present", lambda: True)
    notes.clear()
    parse_args([*argv, "--use_cpu", "true"], notes)  # a GPU the run does not use
    assert notes[0].startswith("bf16 and activation checkpointing off: use_cpu")


def test_cli_errors_are_one_line_and_exit_2(chat_file, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("previous work")
    assert cli_main(["train", *base_args(chat_file, out)]) == 2
    assert (out / "keep.txt").read_text() == "previous work"
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: output_dir") and "\n" not in err
    assert cli_main(["train", *base_args(tmp_path / "missing.jsonl", tmp_path / "o")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    config = tmp_path / "bad.yaml"
    config.write_text("method: baseline\nlearning_rat: 0.1\n")
    assert cli_main(["train", "--config", str(config)]) == 2
    assert "bad.yaml line 2: unknown option 'learning_rat'" in capsys.readouterr().err
    assert cli_main(["train", "--resume", "true", *base_args(chat_file, tmp_path / "none")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def _check_supported(trainer) -> None:
    check_supported(trainer.args, trainer.accelerator, trainer.model, trainer.is_deepspeed_enabled)


def test_flash_attention_is_refused_for_exact_mode(chat_file, tmp_path):
    trainer = trainer_for(chat_file, tmp_path, method="baseline")
    trainer.model.config._attn_implementation = "flash_attention_2"
    trainer.args.method = "token-f"
    trainer.args.penalty_grad = "exact"
    with pytest.raises(FishertuneError, match="twice-differentiable attention"):
        check_supported(
            trainer.args, trainer.accelerator, trainer.model, trainer.is_deepspeed_enabled
        )
    trainer.args.penalty_grad = "fd"
    _check_supported(trainer)


@pytest.mark.parametrize("accepts_loss_kwargs", [True, False])
@pytest.mark.parametrize("declares_scaling", [True, None])
def test_loss_is_normalized_as_transformers_normalizes_it(
    chat_file, tmp_path, accepts_loss_kwargs, declares_scaling
):
    """The baseline's hand-written loss makes the update TRL's own loss makes, under gradient
    accumulation: normalized by the accumulated batch's tokens when the model takes loss kwargs
    (``num_items_in_batch``), otherwise a micro-batch mean that transformers divides by the
    accumulation steps (the trainer folds that division into its normalizer). With
    ``loss_is_scaled_for_ga`` unset (as on transformers < 5.19, which does not read it)
    transformers applies its own rule and the trainer compensates."""
    from trl import SFTTrainer

    updates = []
    for reference in (False, True):
        argv = base_args(chat_file, tmp_path / f"out-{reference}", max_steps=1,
                         per_device_train_batch_size=2, gradient_accumulation_steps=4,
                         optim="sgd", learning_rate=1.0, max_grad_norm=0,
                         dataloader_drop_last="true")  # fmt: skip
        trainer = build_trainer(*parse_args(argv))
        trainer.model_accepts_loss_kwargs = accepts_loss_kwargs
        trainer.loss_is_scaled_for_ga = declares_scaling
        if reference:  # TRL's loss and transformers' own accumulation rule
            trainer.compute_loss = SFTTrainer.compute_loss.__get__(trainer)
            trainer.loss_is_scaled_for_ga = None
        updates.append(_training_update(trainer))
    assert updates[0].norm() > 0
    torch.testing.assert_close(updates[0], updates[1], rtol=1e-4, atol=1e-7)


def test_penalized_update_is_the_same_whoever_divides_by_accumulation(chat_file, tmp_path):
    """fd's split backward passes run before transformers sees the loss: the update must not
    depend on whether transformers divides the returned loss by the accumulation steps (as
    before 5.19, ``loss_is_scaled_for_ga`` unset) or the trainer's normalizer does."""
    updates = []
    for declares_scaling in (True, None):
        argv = base_args(chat_file, tmp_path / f"out-{declares_scaling}", max_steps=1,
                         per_device_train_batch_size=2, gradient_accumulation_steps=4,
                         optim="sgd", learning_rate=1.0, max_grad_norm=0,
                         dataloader_drop_last="true", method="token-f", penalty_coef=0.05,
                         penalty_warmup_steps=0, penalty_grad="fd")  # fmt: skip
        trainer = build_trainer(*parse_args(argv))
        trainer.model_accepts_loss_kwargs = False  # no num_items_in_batch: a micro-batch mean
        trainer.loss_is_scaled_for_ga = declares_scaling
        updates.append(_training_update(trainer))
    assert updates[0].norm() > 0
    torch.testing.assert_close(updates[0], updates[1], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("method, extra", [("baseline", {}), ("neftune", {"neftune_alpha": 5})])
def test_ce_kernels_give_the_dense_gradient_and_metrics(chat_file, tmp_path, method, extra):
    """chunked, linear (no logits: the output projection fused with the CE) and auto (the
    default, linear on this model) against the dense log-softmax: the same step gradient and
    logged CE, entropy and accuracy."""
    trainers = [
        trainer_for(chat_file, tmp_path, method=method, ce_kernel=kernel, **extra)
        for kernel in ("dense", "chunked", "linear", "auto")
    ]
    assert trainers[-1].args.ce_kernel == trainer_for(chat_file, tmp_path).args.ce_kernel
    dense, *others = _gradients_on_one_batch(*trainers)
    for other in others:
        assert float((other - dense).norm() / dense.norm()) < 1e-5
    sums = [t._sums.vector for t in trainers]
    for other in sums[1:]:
        assert torch.allclose(other[:4], sums[0][:4], rtol=1e-5)
    assert trainers[-1]._fd_precision["linear_ce"] is True  # auto took the linear kernel


def test_bf16_training_takes_the_bf16_fd_step(chat_file, tmp_path, monkeypatch):
    """In training, accelerate autocasts inside the prepared model's forward and the Trainer
    opens no autocast around compute_loss: the fd step must still be bf16's (measured: the
    float32 step, 100x too small for bf16, before)."""
    import fishertune.training.loss as loss_module

    seen = []
    settings = loss_module.FDSettings

    def record(**kwargs):
        seen.append(kwargs["compute_dtype"])
        return settings(**kwargs)

    monkeypatch.setattr(loss_module, "FDSettings", record)
    trainer = trainer_for(chat_file, tmp_path, method="token-f", penalty_grad="fd", bf16="true",
                          max_steps=1, **PENALTY)  # fmt: skip
    trainer.train()
    assert seen and set(seen) == {torch.bfloat16}


def test_linear_ce_needs_a_forward_that_takes_logits_to_keep():
    """A model whose forward cannot be asked for no logits: auto takes the chunked kernel."""
    from types import SimpleNamespace

    from fishertune.training.checks import linear_ce_problem

    class NoKeep(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(4, 7, bias=False)

        def get_output_embeddings(self):
            return self.head

        def forward(self, input_ids, attention_mask=None):
            raise NotImplementedError

    class Keeps(NoKeep):
        def forward(self, input_ids, attention_mask=None, **kwargs):
            raise NotImplementedError

    args = SimpleNamespace(method="baseline")
    problem = linear_ce_problem(args, SimpleNamespace(), NoKeep(), deepspeed=False)
    assert problem == "its forward takes no logits_to_keep"
    assert linear_ce_problem(args, SimpleNamespace(), Keeps(), deepspeed=False) is None


def test_auto_ce_kernel_turns_to_chunked_where_linear_cannot_apply(chat_file, tmp_path, caplog):
    """auto: exact double backward and a non-Linear head are seen at set-up, logits that are not
    the projection of the hidden states at the first step; each run trains on, through the
    chunked kernel (the same gradient as ce_kernel=chunked), and says why in the log."""
    caplog.set_level("INFO", logger="fishertune")
    exact = trainer_for(chat_file, tmp_path, method="token-f", penalty_grad="exact", **PENALTY)
    assert exact._fd_precision["linear_ce"] is False
    assert "penalty_grad=exact differentiates the logits twice" in caplog.text

    class ScaledHead(torch.nn.Linear):  # a logit scale, as some models apply
        def forward(self, x):
            return 2.0 * super().forward(x)

    trainers = [trainer_for(chat_file, tmp_path, ce_kernel=k) for k in ("auto", "chunked")]
    for trainer in trainers:
        head = trainer.model.lm_head
        trainer.model.lm_head = ScaledHead(head.in_features, head.out_features, bias=False)
        trainer.model.lm_head.weight = head.weight
    # the head is swapped after set-up here: the first step's comparison catches it
    auto, chunked = _gradients_on_one_batch(*trainers)
    torch.testing.assert_close(auto, chunked, rtol=1e-6, atol=1e-9)
    assert trainers[0]._fd_precision["linear_ce"] is False
    assert "not a plain Linear" in caplog.text

    trainers = [trainer_for(chat_file, tmp_path, ce_kernel=k, **PENALTY, method="logit-f",
                            penalty_grad="fd") for k in ("auto", "chunked")]  # fmt: skip
    for trainer in trainers:  # a scale by a hook: the logits are not W h
        trainer.model.lm_head.register_forward_hook(lambda module, args, out: 1.5 * out)
    auto, chunked = _gradients_on_one_batch(*trainers)
    torch.testing.assert_close(auto, chunked, rtol=1e-6, atol=1e-9)
    assert trainers[0]._fd_precision["linear_ce"] is False
    assert "logits are not its last hidden state" in caplog.text


def test_linear_ce_is_refused_where_the_logits_are_not_a_plain_projection(chat_file, tmp_path):
    with pytest.raises(FishertuneError, match="ce_kernel=linear is for baseline and neftune"):
        trainer_for(chat_file, tmp_path, method="token-f", ce_kernel="linear")

    class ScaledHead(torch.nn.Linear):  # a logit scale, as some models apply
        def forward(self, x):
            return 2.0 * super().forward(x)

    trainer = trainer_for(chat_file, tmp_path, ce_kernel="linear")
    head = trainer.model.lm_head
    scaled = ScaledHead(head.in_features, head.out_features, bias=False)
    scaled.weight = head.weight
    trainer.model.lm_head = scaled
    with pytest.raises(FishertuneError, match="not a plain Linear"):
        _gradients_on_one_batch(trainer)

    trainer = trainer_for(chat_file, tmp_path, ce_kernel="linear")
    trainer.model.lm_head.register_forward_hook(lambda module, args, out: 1.5 * out)  # a scale
    with pytest.raises(FishertuneError, match="logits are not its last hidden state"):
        _gradients_on_one_batch(trainer)
