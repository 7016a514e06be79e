"""``fishertune train --config FILE.yaml [--key value ...]``: fine-tune with a method.

Flags are TRL's (``trl sft``: ``--dataset_name``, ``--output_dir``, ``--max_steps``, ``--seed``,
``--model_name_or_path`` ...) plus the fields of :class:`FisherSFTConfig` and of
:class:`FisherScriptArguments` below; precedence is defaults < YAML < command line (``TrlParser``).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fishertune.data.tokenizer import TINY_TOKENIZER
from fishertune.errors import FishertuneError
from fishertune.files import write_json_atomic
from fishertune.modeling import TINY_MODEL

logger = logging.getLogger(__name__)

RUN_RECORD = "fishertune_run.json"
CHECKPOINT_RECORD = "fishertune_checkpoint.json"


def _script_arguments_class() -> type:
    from trl import ScriptArguments

    @dataclass
    class FisherScriptArguments(ScriptArguments):
        """Data, tokenizer, run-management and tiny-model options of ``fishertune train``."""

        dataset_fraction: float | None = field(
            default=None,
            metadata={"help": "Stratified (by `source`) subsample of the train split: (0, 1]."},
        )
        dataset_subsample_seed: int = field(
            default=0, metadata={"help": "Seed of the stratified subsample."}
        )
        tokenizer_name_or_path: str | None = field(
            default=None,
            metadata={
                "help": f"Tokenizer (default: the model's). {TINY_TOKENIZER} is the shipped one."
            },
        )
        resume: bool = field(
            default=False,
            metadata={"help": "Continue from the latest complete checkpoint in output_dir."},
        )
        overwrite_output_dir: bool = field(
            default=False,
            metadata={"help": "Delete an existing, non-empty output_dir before training."},
        )
        save_merged_model: bool = field(
            default=False,
            metadata={
                "help": "With use_peft: also save the base with the adapter merged in, in the "
                "loaded dtype, to OUTPUT_DIR/merged (a plain transformers model)."
            },
        )
        tiny_hidden_size: int = field(default=128, metadata={"help": f"{TINY_MODEL}: hidden size."})
        tiny_num_layers: int = field(default=2, metadata={"help": f"{TINY_MODEL}: layers."})
        tiny_num_heads: int = field(default=4, metadata={"help": f"{TINY_MODEL}: heads."})

    return FisherScriptArguments


def build_parser() -> Any:
    from trl import ModelConfig, TrlParser

    from fishertune.training.config import FisherSFTConfig

    return TrlParser(
        (_script_arguments_class(), FisherSFTConfig, ModelConfig), prog="fishertune train"
    )


def parse_args(argv: list[str]) -> tuple[Any, Any, Any]:
    """Parse YAML + overrides; bad values become a one-line ``FishertuneError``."""
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise FishertuneError("--config needs a YAML file")
        path = Path(argv[index + 1])
        if not path.is_file():
            raise FishertuneError(f"config file {path} does not exist")
        _check_config_keys(path)
    parser = build_parser()
    parser.exit_on_error = False  # argparse's usage dump + SystemExit becomes one line below
    try:
        return parser.parse_args_and_config(argv)
    except FishertuneError:
        raise
    except argparse.ArgumentError as err:
        raise FishertuneError(str(err)) from err
    except (ValueError, TypeError) as err:
        raise FishertuneError(str(err).splitlines()[0]) from err


def _check_config_keys(path: Path) -> None:
    """Name the unknown YAML key and its line instead of argparse's generic message."""
    import yaml

    from fishertune.training.config import FisherSFTConfig

    try:
        node = yaml.compose(path.read_text())
    except yaml.YAMLError as err:
        raise FishertuneError(f"{path}: invalid YAML ({err})") from err
    if node is None or not isinstance(node, yaml.MappingNode):
        raise FishertuneError(f"{path}: must be a YAML mapping of option: value")
    from dataclasses import fields

    from trl import ModelConfig

    known = {
        f.name
        for cls in (_script_arguments_class(), FisherSFTConfig, ModelConfig)
        for f in fields(cls)
    } | {"env"}
    for key_node, _ in node.value:
        if key_node.value not in known:
            raise FishertuneError(
                f"{path} line {key_node.start_mark.line + 1}: unknown option {key_node.value!r}"
            )


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The latest ``checkpoint-N`` whose save completed (it holds our record, written last)."""
    found = []
    for child in Path(output_dir).glob("checkpoint-*"):
        suffix = child.name.split("-", 1)[1]
        if suffix.isdigit() and (child / CHECKPOINT_RECORD).is_file():
            found.append((int(suffix), child))
    return max(found)[1] if found else None


def prepare_output_dir(output_dir: str, *, resume: bool, overwrite: bool) -> Path | None:
    """Refuse to overwrite a previous run silently; return the checkpoint to resume from."""
    path = Path(output_dir)
    non_empty = path.is_dir() and any(path.iterdir())
    if resume:
        checkpoint = latest_checkpoint(path)
        if checkpoint is None:
            raise FishertuneError(
                f"--resume: no complete checkpoint in {path} (set save_steps and run without "
                "--resume first)"
            )
        return checkpoint
    if non_empty:
        if not overwrite:
            raise FishertuneError(
                f"output_dir {path} exists and is not empty: pass --resume to continue it, "
                "--overwrite_output_dir to replace it, or choose another directory"
            )
        # Under torchrun / accelerate every rank runs this before the process group exists:
        # only the global main process deletes (the others would race it), and it writes the run.
        if os.environ.get("RANK", "0") == "0":
            shutil.rmtree(path, ignore_errors=True)
    return None


def load_tokenizer(script_args: Any, model_args: Any, training_args: Any = None) -> Any:
    """The tokenizer the data is tokenized with (``chat_template_path`` applied first)."""
    from fishertune.modeling import load_tokenizer as load

    return load(
        model_args.model_name_or_path or TINY_MODEL,
        script_args.tokenizer_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=bool(getattr(training_args, "trust_remote_code", False)),
        chat_template_path=getattr(training_args, "chat_template_path", None),
    )


def check_model_options(script_args: Any, model_args: Any) -> None:
    """Refuse, one line each, the ``trl sft`` model options ``fishertune train`` cannot honour."""
    for name in ("load_in_4bit", "load_in_8bit"):
        if getattr(model_args, name, False):
            raise FishertuneError(
                f"{name}: quantized (QLoRA) training is not supported (the penalties "
                "differentiate through every layer); use --use_peft true on a bf16 model"
            )
    if script_args.save_merged_model and not model_args.use_peft:
        raise FishertuneError("save_merged_model needs use_peft=true (no adapter to merge)")


def load_model(script_args: Any, training_args: Any, model_args: Any, tokenizer: Any) -> Any:
    """The model to fine-tune, in ``--dtype`` (the dtype it is saved back in).

    A LoRA run folder as ``--model_name_or_path`` is loaded with its adapter merged into its
    base: fine-tuning continues from the adapted model (fully, or with a new adapter under
    ``--use_peft``). Exact penalty gradients default to eager attention (double backward).
    """
    from fishertune.modeling import load_model as load

    exact = training_args.method in ("token-f", "logit-f") and training_args.penalty_grad == "exact"
    return load(
        model_args.model_name_or_path or TINY_MODEL,
        tokenizer,
        dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation or ("eager" if exact else None),
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        merge_adapter=True,
        tiny_sizes={
            "hidden_size": script_args.tiny_hidden_size,
            "num_layers": script_args.tiny_num_layers,
            "num_heads": script_args.tiny_num_heads,
        },
        seed=training_args.seed,
    )


def _save_unnamed_base(model: Any, tokenizer: Any, model_args: Any, training_args: Any) -> None:
    """Give a new adapter a base it can be reloaded from.

    An adapter records its base by name (``adapter_config.json``). The random tiny model and a
    LoRA run merged into its base exist under no name (the merged model would otherwise name the
    first base, and reloading would silently drop the first adapter), so they are saved to
    ``OUTPUT_DIR/base`` and the adapter names that folder.
    """
    from fishertune.modeling import is_adapter_folder

    name = model_args.model_name_or_path or TINY_MODEL
    if name != TINY_MODEL and not is_adapter_folder(name):
        return
    base = (Path(training_args.output_dir) / "base").resolve()
    if os.environ.get("RANK", "0") == "0":  # the others would race it (see prepare_output_dir)
        model.save_pretrained(base)
        tokenizer.save_pretrained(base)
    model.name_or_path = str(base)  # what PEFT writes as base_model_name_or_path


def save_merged_model(trainer: Any, folder: Path) -> None:
    """The trained adapter merged into its base (``merge_and_unload``), saved with the tokenizer
    in the dtype the base was loaded in."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    merged = model.merge_and_unload()
    if trainer.accelerator.is_main_process:
        merged.save_pretrained(folder)
        trainer.processing_class.save_pretrained(folder)


def load_datasets(script_args: Any, training_args: Any, tokenizer: Any) -> tuple[Any, Any]:
    from fishertune.data.chat import load_conversations, stratified_subsample, tokenize_dataset

    if not script_args.dataset_name:
        raise FishertuneError("dataset_name is required (a hub name, a local file or folder)")
    max_length = training_args.max_length or 1024
    train = load_conversations(script_args.dataset_name, split=script_args.dataset_train_split)
    if script_args.dataset_fraction is not None:
        train = stratified_subsample(
            train, script_args.dataset_fraction, seed=script_args.dataset_subsample_seed
        )
    train = tokenize_dataset(train, tokenizer, max_length)
    evaluation = None
    if training_args.eval_strategy != "no":
        evaluation = load_conversations(
            script_args.dataset_name, split=script_args.dataset_test_split
        )
        evaluation = tokenize_dataset(evaluation, tokenizer, max_length)
    return train, evaluation


def build_trainer(script_args: Any, training_args: Any, model_args: Any) -> Any:
    """Tokenizer, data, model and trainer from parsed arguments (presets are checked with it)."""
    from trl import get_peft_config

    from fishertune.training.trainer import FisherSFTTrainer

    check_model_options(script_args, model_args)
    tokenizer = load_tokenizer(script_args, model_args, training_args)
    train, evaluation = load_datasets(script_args, training_args, tokenizer)
    if not training_args.assistant_only:  # TRL then scores every token, as the library does
        train, evaluation = (
            ds.remove_columns("assistant_masks") if ds is not None else None
            for ds in (train, evaluation)
        )
    model = load_model(script_args, training_args, model_args, tokenizer)
    if model_args.use_peft:
        _save_unnamed_base(model, tokenizer, model_args, training_args)
    trainer = FisherSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    _install_checkpoint_record(trainer)
    return trainer


def _install_checkpoint_record(trainer: Any) -> None:
    """Mark each checkpoint complete once transformers has written all of it."""
    save_checkpoint = trainer._save_checkpoint

    def save_and_record(model: Any, trial: Any) -> None:
        save_checkpoint(model, trial)
        # every rank has written its part (RNG state, optimizer shards) before the record says so
        trainer.accelerator.wait_for_everyone()
        if trainer.args.should_save:
            folder = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
            write_json_atomic(
                folder / CHECKPOINT_RECORD, {"step": trainer.state.global_step}, sort_keys=True
            )

    trainer._save_checkpoint = save_and_record


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(flag in argv for flag in ("-h", "--help")):
        build_parser().print_help()
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    script_args, training_args, model_args = parse_args(argv)
    checkpoint = prepare_output_dir(
        training_args.output_dir,
        resume=script_args.resume,
        overwrite=script_args.overwrite_output_dir,
    )
    from transformers import set_seed

    set_seed(training_args.seed)
    start = time.time()
    trainer = build_trainer(script_args, training_args, model_args)
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    metrics = dict(result.metrics)
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    if script_args.save_merged_model:
        save_merged_model(trainer, Path(training_args.output_dir) / "merged")
    if trainer.accelerator.is_main_process:
        trainer.processing_class.save_pretrained(training_args.output_dir)
        write_json_atomic(
            Path(training_args.output_dir) / RUN_RECORD,
            {
                "status": "completed",
                "method": training_args.method,
                "seed": training_args.seed,
                "global_step": trainer.state.global_step,
                "wall_time_s": round(time.time() - start, 2),
                "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                "argv": argv,
            },
            sort_keys=True,
        )
        print(f"saved to {training_args.output_dir}")
    return 0
