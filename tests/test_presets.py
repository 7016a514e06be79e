"""The shipped presets parse and build a trainer; the paper's on a tiny stand-in model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fishertune.training.cli import build_trainer, parse_args

ROOT = Path(__file__).resolve().parents[1]
PAPER = {
    "baseline": {},
    "neftune": {"neftune_alpha": 5.0},
    "token-f": {"penalty_coef": 2e-6, "penalty_warmup_steps": 600},
    "logit-f": {"penalty_coef": 1e-6, "penalty_warmup_steps": 800},
}


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tulu.jsonl"
    rows = [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": f"what is {i} plus {i}?"},
                {"role": "assistant", "content": f"{2 * i}"},
            ],
            "source": f"source-{i % 3}",
        }
        for i in range(12)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


# the 8B model, the hub dataset, bf16 and the GPU-only settings swapped for a CPU stand-in
STAND_IN = [
    "--model_name_or_path", "builtin:tiny-llama", "--tiny_hidden_size", "32",
    "--tiny_num_heads", "2", "--dtype", "float32", "--bf16", "false", "--use_cpu", "true",
    "--max_steps", "1", "--report_to", "none", "--save_strategy", "no", "--max_length", "64",
]  # fmt: skip


@pytest.mark.parametrize("method", sorted(PAPER))
def test_paper_preset_builds_a_trainer_on_a_stand_in(method, chat_file, tmp_path):
    config = ROOT / "configs" / "paper" / f"{method}.yaml"
    argv = ["--config", str(config), *STAND_IN]
    argv += ["--dataset_name", str(chat_file), "--output_dir", str(tmp_path / "out")]
    script_args, training_args, model_args = parse_args(argv)
    # the recipe itself, as the YAML states it
    assert model_args.model_name_or_path == "builtin:tiny-llama"
    assert training_args.method == method
    assert training_args.learning_rate == 5e-6
    assert training_args.lr_scheduler_type == "linear"
    assert training_args.warmup_steps == 0.03
    assert training_args.num_train_epochs == 2
    assert training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    assert training_args.gradient_accumulation_steps * 8 == 128
    assert training_args.loss_reduction == "sum"
    assert training_args.seed == 123
    for key, value in PAPER[method].items():
        assert getattr(training_args, key) == value, key
    trainer = build_trainer(script_args, training_args, model_args)
    assert trainer.args.method == method
    trainer.train()
    assert trainer.state.global_step == 1


def test_paper_presets_name_the_recipe_model_and_data():
    for method in PAPER:
        text = (ROOT / "configs" / "paper" / f"{method}.yaml").read_text()
        assert "model_name_or_path: meta-llama/Llama-3.1-8B\n" in text
        assert "dataset_name: allenai/tulu-3-sft-olmo-2-mixture-0225\n" in text


def test_tiny_preset_parses_with_its_defaults():
    _, training_args, model_args = parse_args(["--config", str(ROOT / "configs" / "tiny.yaml")])
    assert model_args.model_name_or_path == "builtin:tiny-llama"
    assert training_args.use_cpu and not training_args.bf16
