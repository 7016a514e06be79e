"""Pieces shared by ``overhead.py`` and ``gpu_check.py``: the benchmark models, their data, a
``FisherSFTTrainer`` built as ``fishertune train`` builds it, step clocks and gradient capture as
trainer callbacks, and the fd-vs-exact gradient comparison.

Everything goes through the public API (``FisherSFTConfig``, ``FisherSFTTrainer.train`` and
transformers' ``TrainerCallback`` events), so a step is timed and a gradient read exactly where
the training loop produces them: ``on_step_begin`` .. ``on_pre_optimizer_step`` spans the
forward, the penalty and the backward of one optimizer step (plus gradient clipping), and
``on_step_end`` closes the whole step including the optimizer update.

Imports of torch / transformers are local to the functions: a driver process that only starts
workers stays light.
"""

from __future__ import annotations

import gc
import math
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

# name -> LlamaConfig fields
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "micro": dict(  # CPU tests of gpu_check.py (--quick): every code path, seconds
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True,
    ),
    "tiny": dict(  # the size of the project's CPU overhead measurements
        hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=8192, tie_word_embeddings=False,
    ),
    "vocab": dict(  # a Llama-3 vocabulary (128,256, untied) on the tiny trunk's width, 2 layers
        hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=128256, tie_word_embeddings=False,
    ),
    "small": dict(  # gpu_check.py's gradient-accuracy shape: Llama's layout (GQA, tied), 70M
        hidden_size=768, intermediate_size=3072, num_hidden_layers=6, num_attention_heads=12,
        num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=True,
    ),
    "1b": dict(  # Llama-3.2-1B's shape
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
    ),
}  # fmt: skip

PENALTY_KINDS = ("token-f", "logit-f")


def llama_config(model_size: str, seq_len: int, attention: str) -> Any:
    """``LlamaConfig`` of a named size, positions for ``seq_len``, the given attention kernel."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        **MODEL_SIZES[model_size],
        max_position_embeddings=max(seq_len, 256),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config._attn_implementation = attention
    return config


def build_model(options: dict[str, Any], attention: str) -> Any:
    """The benchmark model, identical for every method (same config, same seed), float32.

    Initialized directly on the device: a 1B model's random init on the CPU takes longer than
    its whole timing run on a GPU.
    """
    import torch
    from transformers import LlamaForCausalLM

    config = llama_config(options["model_size"], options["seq_len"], attention)
    torch.manual_seed(options["seed"])
    with torch.device(options["device"]):
        return LlamaForCausalLM(config)


def token_rows(options: dict[str, Any], batch_size: int) -> Any:
    """``batch_size`` random token rows of full length as a tokenized dataset (``input_ids``,
    ``assistant_masks``, as ``fishertune train`` tokenizes chats); the first quarter of each row
    is prompt (no loss)."""
    import torch
    from datasets import Dataset

    generator = torch.Generator().manual_seed(options["seed"] + 1)
    length = options["seq_len"]
    vocab = MODEL_SIZES[options["model_size"]]["vocab_size"]
    # ids from 3 on: no pad / bos / eos inside a row
    input_ids = torch.randint(3, vocab, (batch_size, length), generator=generator)
    mask = [0] * (length // 4) + [1] * (length - length // 4)
    return Dataset.from_dict(
        {"input_ids": input_ids.tolist(), "assistant_masks": [mask] * batch_size}
    )


_OUTPUT_DIRS: list[Any] = []


def build_trainer(
    options: dict[str, Any],
    overrides: dict[str, Any],
    model: Any,
    *,
    batch_size: int,
    max_steps: int,
    callbacks: list[Any] | None = None,
    **config: Any,
) -> Any:
    """A ``FisherSFTTrainer`` on ``model`` over ``batch_size`` token rows, one batch per step.

    ``options["dtype"]`` ``bf16`` is mixed precision as training runs it: float32 weights,
    bf16 autocast (``bf16=True``).
    """
    from fishertune.data.tokenizer import load_tiny_tokenizer
    from fishertune.training import FisherSFTConfig, FisherSFTTrainer

    if not _OUTPUT_DIRS:  # nothing is saved (save_strategy "no"); one folder per process
        _OUTPUT_DIRS.append(tempfile.TemporaryDirectory(prefix="fishertune-bench-"))
    fields = dict(
        output_dir=_OUTPUT_DIRS[0].name,
        per_device_train_batch_size=batch_size,
        max_steps=max_steps,
        max_length=options["seq_len"],
        bf16=options["dtype"] == "bf16",
        use_cpu=options["device"] == "cpu",
        activation_checkpointing=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        seed=options["seed"],
        data_seed=options["seed"],
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    fields.update(config)
    fields.update(overrides)
    return FisherSFTTrainer(
        model=model,
        args=FisherSFTConfig(**fields),
        train_dataset=token_rows(options, batch_size),
        processing_class=load_tiny_tokenizer(),
        callbacks=callbacks,
    )


def attention_for(overrides: dict[str, Any], default: str = "sdpa") -> str:
    """The CLI's choice: exact double backward needs eager attention (or SDPA's math kernel)."""
    return "eager" if overrides.get("penalty_grad") == "exact" else default


def free_memory() -> None:
    """Drop unreachable trainers (they hold their model through reference cycles) and return
    cached device memory, so the next measurement starts from what is live."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_memory_bytes(device: str) -> int:
    """``torch.cuda.max_memory_allocated`` on CUDA; the process's peak RSS on CPU."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def current_memory_bytes(device: str) -> int:
    import psutil
    import torch

    if device == "cuda":
        return torch.cuda.memory_allocated()
    return psutil.Process().memory_info().rss


# ---------------------------------------------------------------------- callbacks
def step_clock(
    device: str,
    before_step: Callable[[], None] | None = None,
    after_step: Callable[[dict[str, float]], None] | None = None,
) -> Any:
    """A ``TrainerCallback`` timing each optimizer step (CUDA-synchronized at both ends).

    ``clock.steps`` gets ``{"fwd_bwd_s", "step_s"}`` per step: step begin to the optimizer
    (forward, penalty, backward, clipping) and to the step's end (optimizer update included).
    ``clock.setup_bytes`` is the memory at train begin, where the peak counter is reset.
    ``before_step`` runs before the clock starts (a gate), ``after_step`` with each record.
    """
    import torch
    from transformers import TrainerCallback

    cuda = device == "cuda"

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[dict[str, float]] = []
            self.setup_bytes = 0
            self._start = self._mid = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self.setup_bytes = current_memory_bytes(device)

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if before_step is not None:
                before_step()
            self._start = now()

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._mid = now()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            end = now()
            record = {"fwd_bwd_s": self._mid - self._start, "step_s": end - self._start}
            self.steps.append(record)
            if after_step is not None:
                after_step(record)

    return StepClock()


def gradient_capture() -> Any:
    """A ``TrainerCallback`` that keeps the first step's parameter gradient, flattened, float32
    on the CPU (a 1B model's gradients would not fit a GPU several times over), as the optimizer
    is about to see it. Use with ``max_grad_norm=0`` (no clipping) and one step."""
    import torch
    from transformers import TrainerCallback

    class GradientCapture(TrainerCallback):
        def __init__(self) -> None:
            self.flat: Any = None

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.flat is None:
                params = [p for p in kw["model"].parameters() if p.requires_grad]
                grads = [
                    p.grad.detach().float().flatten().cpu()
                    if p.grad is not None
                    else torch.zeros(p.numel())
                    for p in params
                ]
                self.flat = torch.cat(grads)

    return GradientCapture()


def summarize_steps(steps: list[dict[str, float]], warmup: int) -> dict[str, float]:
    """Median and minimum of the timed steps (the first ``warmup`` are dropped)."""
    timed = steps[warmup:] or steps
    return {
        "step_s": statistics.median(s["step_s"] for s in timed),
        "fwd_bwd_s": statistics.median(s["fwd_bwd_s"] for s in timed),
        "min_fwd_bwd_s": min(s["fwd_bwd_s"] for s in timed),
        "timed_steps": len(timed),
    }


# ---------------------------------------------------------------------- batch-size search
def largest_batch(fits: Callable[[int], bool], cap: int, deadline: float = math.inf) -> int:
    """The largest batch ``b <= cap`` with ``fits(b)``, assuming fit is monotone: doubling from
    1 to the first failure, then bisection. 0 if batch 1 does not fit. Stops refining at
    ``deadline`` (``time.time()``) with the largest batch found so far."""
    good, bad = 0, None
    size = 1
    while time.time() < deadline:
        if not fits(size):
            bad = size
            break
        good = size
        if size >= cap:
            break
        size = min(2 * size, cap)
    while bad is not None and bad - good > 1 and time.time() < deadline:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


# ---------------------------------------------------------------------- gradient agreement
def run_for_gradient(options: dict[str, Any], overrides: dict[str, Any], attention: str) -> Any:
    """The parameter gradient of one training step of ``overrides`` on the benchmark model
    (built afresh: same weights for every call), on ``options["grad_batch_size"]`` rows."""
    capture = gradient_capture()
    model = build_model(options, attention)
    trainer = build_trainer(
        options,
        overrides,
        model,
        batch_size=options["grad_batch_size"],
        max_steps=1,
        callbacks=[capture],
        max_grad_norm=0.0,
    )
    trainer.train()
    del trainer, model
    free_memory()
    return capture.flat


def compare(a: Any, b: Any) -> tuple[float, float]:
    """Cosine and relative error ``|a - b| / |b|``, accumulated in float64 by chunks."""
    dot = aa = bb = diff = 0.0
    for x, y in zip(a.split(1 << 24), b.split(1 << 24), strict=True):
        x, y = x.double(), y.double()
        dot += float(x @ y)
        aa += float(x @ x)
        bb += float(y @ y)
        diff += float((x - y).pow(2).sum())
    return dot / max((aa * bb) ** 0.5, 1e-300), (diff / max(bb, 1e-300)) ** 0.5


def gradient_agreement(options: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """fd vs exact penalty gradients (same draws), float32 and bfloat16, forward and central.

    The penalty's gradient is ``(grad(CE + c R) - grad(CE)) / c`` with ``c`` large enough that the
    CE part cancels to rounding. Exact runs use eager attention; fd runs use
    ``options["fd_attention"]`` (default eager; the SDPA / flash kernels on GPU). Rows with
    ``fd_step`` None use the shipped default step (``DEFAULT_FD_STEP``); the extra float32 central
    row with 3e-4 shows the step that its h^2 error calls for on this model. ``draw_noise`` is the
    relative distance between exact gradients of two independent draws of ``y'``: the noise the
    penalty's gradient carries anyway, the yardstick for fd's error.
    """
    fd_attention = options.get("fd_attention", "eager")
    ce_cache: dict[str, Any] = {}

    def penalty_gradient(dtype: str, coef: float, draw: int = 0, **penalty: Any) -> Any:
        run = {**options, "dtype": dtype}
        if dtype not in ce_cache:
            ce_cache[dtype] = run_for_gradient(run, {"method": "baseline"}, "eager")
        overrides = {
            "method": kind,
            "penalty_coef": coef,
            "penalty_warmup_steps": 0,
            # the draws y' come from generators seeded by args.seed; the model's initialization
            # and the data order are seeded apart (build_model, data_seed): only the draws change
            "seed": options["seed"] + draw,
            **penalty,
        }
        attention = "eager" if penalty.get("penalty_grad") == "exact" else fd_attention
        return (run_for_gradient(run, overrides, attention) - ce_cache[dtype]) / coef

    # choose c so that c |grad R| = 1e3 |grad CE|: the CE part then cancels to rounding, also in
    # bf16 where the two CE gradients differ by bf16 rounding
    probe = penalty_gradient("fp32", 1.0, penalty_grad="exact")
    coef = 1e3 * float(ce_cache["fp32"].norm() / probe.norm())
    rows = []
    exact = {}
    for dtype in ("fp32", "bf16"):
        exact[dtype] = penalty_gradient(dtype, coef, penalty_grad="exact")
        other_draw = penalty_gradient(dtype, coef, draw=1, penalty_grad="exact")
        variants: list[tuple[str, float | None]] = [("forward", None), ("central", None)]
        if dtype == "fp32":
            variants.append(("central", 3e-4))
        for scheme, step in variants:
            fd = penalty_gradient(
                dtype, coef, penalty_grad="fd", penalty_fd_scheme=scheme, penalty_fd_step=step
            )
            cosine, error = compare(fd, exact[dtype])
            rows.append(
                {
                    "kind": kind,
                    "dtype": dtype,
                    "scheme": scheme,
                    "fd_step": step,
                    "fd_attention": fd_attention,
                    "cosine": cosine,
                    "rel_error": error,
                    "rel_error_vs_fp32_exact": compare(fd, exact["fp32"])[1],
                    "exact_vs_fp32_exact": compare(exact[dtype], exact["fp32"])[1],
                    "draw_noise": compare(other_draw, exact[dtype])[1],
                }
            )
    return rows
