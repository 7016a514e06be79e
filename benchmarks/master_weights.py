"""What float32 master weights change for a bf16 checkpoint trained at the paper's learning rate.

    python benchmarks/master_weights.py               # tiny preset's Llama, 20 steps (~1 min CPU)
    python benchmarks/master_weights.py --steps 50 --lr 2e-5

The tiny preset's Llama (2 layers, 128 wide, random) is saved in bf16 with ``save_pretrained``
and fine-tuned through ``fishertune train`` three ways, all with ``--bf16 true`` (autocast):

* ``--dtype float32``: the checkpoint read in float32 (float32 weights from the start);
* ``--dtype bfloat16``: read in bf16, trained with float32 master weights (the default), saved
  back in bf16;
* ``--dtype bfloat16 --master_weights model``: pure bf16 training.

It prints the fraction of weights that differ from the checkpoint after training (in float32 for
the first run, as saved for the others) and whether the bf16 run's saved weights are the float32
run's rounded to bf16.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from fishertune.cli import main as fishertune
from fishertune.data.tokenizer import load_tiny_tokenizer
from fishertune.modeling import tiny_llama


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    moved = sum(int((after[k].float() != before[k].float()).sum()) for k in before)
    return moved / sum(t.numel() for t in before.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--method", default="baseline")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="master-weights-"))
    tokenizer = load_tiny_tokenizer()
    model = tiny_llama(len(tokenizer), hidden_size=128, num_layers=2, num_heads=4,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    model.to(torch.bfloat16).save_pretrained(root / "checkpoint")
    tokenizer.save_pretrained(root / "checkpoint")
    runs = {
        "float32 weights": ["--dtype", "float32"],
        "bf16 + float32 master": ["--dtype", "bfloat16"],
        "pure bf16": ["--dtype", "bfloat16", "--master_weights", "model"],
    }
    saved = {}
    for name, extra in runs.items():
        out = root / name.replace(" ", "-")
        argv = ["train", "--config", str(Path(__file__).parents[1] / "configs" / "tiny.yaml"),
                "--model_name_or_path", str(root / "checkpoint"), "--method", args.method,
                "--max_steps", str(args.steps), "--learning_rate", str(args.lr),
                "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--bf16", "true",
                "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
                "--output_dir", str(out), *extra]  # fmt: skip
        if fishertune(argv) != 0:
            raise SystemExit(f"{name}: training failed")
        saved[name] = load_file(out / "model.safetensors")
    initial = load_file(root / "checkpoint" / "model.safetensors")
    print(f"\n{args.steps} AdamW steps at lr {args.lr}, method {args.method}, bf16 autocast")
    print(f"{'run':<24} {'saved dtype':<12} weights changed")
    for name, weights in saved.items():
        dtype = str(next(iter(weights.values())).dtype).removeprefix("torch.")
        print(f"{name:<24} {dtype:<12} {changed(initial, weights):.1%}")
    reference, rounded = saved["float32 weights"], saved["bf16 + float32 master"]
    same = all(torch.equal(reference[k].to(torch.bfloat16), rounded[k]) for k in reference)
    print(f"bf16 run saved == float32 run rounded to bf16: {same}")


if __name__ == "__main__":
    main()
