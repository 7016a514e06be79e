"""``FisherSFTConfig``: TRL's ``SFTConfig`` plus the fields of the four methods."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from fishertune.errors import FishertuneError
from fishertune.training.numbers import check_numbers, check_ranges

METHODS = ("baseline", "neftune", "token-f", "logit-f", "hessian-trace")
PENALTY_METHODS = ("token-f", "logit-f", "hessian-trace")
FISHER_METHODS = ("token-f", "logit-f")

# The paper's settings (Llama-3.1-8B on Tulu 3), used when a penalty method is chosen without them.
PAPER_PENALTY = {"token-f": (2e-6, 600), "logit-f": (1e-6, 800)}
PAPER_NEFTUNE_ALPHA = 5.0

PENALTY_FIELDS = (
    "penalty_coef",
    "penalty_warmup_steps",
    "penalty_samples",
    "penalty_sampling",
    "penalty_grad",
    "penalty_fraction",
    "penalty_every",
    "penalty_fd_scheme",
    "penalty_fd_step",
    "penalty_fd_backward",
    "penalty_fd_fused_ce",
    "penalty_estimator",
    "penalty_match_neftune_alpha",
)
CE_KERNELS = ("auto", "chunked", "dense", "linear")
NEFTUNE_FIELDS = ("neftune_alpha", "neftune_length", "neftune_distribution")


def accelerator_present() -> bool:
    """Whether torch sees an accelerator (CUDA, XPU, MPS ...) that training would use."""
    import torch

    return bool(torch.accelerator.is_available())


def _bf16_supported() -> bool:
    from transformers.utils import is_torch_bf16_gpu_available

    return bool(is_torch_bf16_gpu_available())


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise FishertuneError(f"{name}={value!r} is not one of {', '.join(allowed)}")


@dataclass
class FisherSFTConfig(SFTConfig):
    """Configuration of :class:`~fishertune.training.trainer.FisherSFTTrainer`.

    Every field of TRL's ``SFTConfig`` applies. Options of a method that is not selected must stay
    unset (``None``): giving ``penalty_coef`` to ``baseline`` is an error, not a silent no-op.
    """

    method: str = field(
        default="baseline",
        metadata={
            "help": "baseline, neftune, token-f, logit-f or hessian-trace (the noise's own "
            "second-order term lambda * Tr(H_X), Hutchinson probes).",
            "choices": METHODS,
        },
    )
    loss_reduction: str = field(
        default="mean",
        metadata={
            "help": "CE reduction over response tokens: 'mean' (transformers, normalized by "
            "the number of items in the accumulated batch) or 'sum' (open-instruct's "
            "--reduce_loss sum). The penalty always uses the same reduction.",
            "choices": ("mean", "sum"),
        },
    )
    ce_kernel: str = field(
        default="auto",
        metadata={
            "help": "How the CE, the metrics and (fd) the penalty read the vocabulary: 'linear' "
            "(the output projection fused with them: no (N, V) logits; baseline, neftune and fd, "
            "for logits that are hidden states times the output embedding), 'chunked' (the "
            "model's logits chunk by chunk), 'dense' (log-softmax of the (N, V) logits), or "
            "'auto' (default: linear where it applies, else chunked; the choice is logged).",
            "choices": CE_KERNELS,
        },
    )
    master_weights: str = field(
        default="float32",
        metadata={
            "help": "Dtype of the weights the optimizer updates. 'float32' (default): trainable "
            "parameters are cast up to float32 whatever dtype the model was loaded in, bf16/fp16 "
            "act as autocast for compute (under DeepSpeed its engine keeps float32 masters), and "
            "the final save_model writes the loaded dtype again. 'model': keep the model's own "
            "dtype: pure bf16 training, where updates below bf16's resolution (2^-8 of a weight) "
            "are rounded away; warned at start.",
            "choices": ("float32", "model"),
        },
    )
    assistant_only: bool = field(
        default=True,
        metadata={
            "help": "A conversational dataset ('messages') given to the trainer is tokenized with "
            "its chat template and scored on assistant tokens only, each turn's end-of-turn "
            "token included (fishertune.data.chat.tokenize_dataset, as `fishertune train` does; "
            "works for any template). false: every token is scored (TRL's own processing; "
            "`fishertune train` drops its assistant mask). TRL's assistant_only_loss=true is "
            "taken as this option."
        },
    )
    penalty_coef: float | None = field(
        default=None,
        metadata={
            "help": "Penalty coefficient lambda (token-f/logit-f; paper: 2e-6 / 1e-6; "
            "hessian-trace: no default). With penalty_match_neftune_alpha: a multiplier of the "
            "matched coefficients (default 1)."
        },
    )
    penalty_estimator: str | None = field(
        default=None,
        metadata={
            "help": "token-f/logit-f gradient: 'paper' (y' held constant: unbiased in value, "
            "not in gradient) or 'unbiased' (adds the score-function term with a leave-one-out "
            "baseline; needs penalty_samples >= 2). Default 'paper'."
        },
    )
    penalty_match_neftune_alpha: float | None = field(
        default=None,
        metadata={
            "help": "Give each row the coefficient alpha^2 / (6 L_b d) of NEFTune at this alpha "
            "(L_b counted as neftune_length counts it), times penalty_coef, instead of one "
            "lambda for the batch."
        },
    )
    penalty_warmup_steps: int | None = field(
        default=None,
        metadata={
            "help": "Optimizer steps of linear coefficient warm-up from 0; 0 = none "
            "(paper: 600 for token-f, 800 for logit-f; none by default with "
            "penalty_match_neftune_alpha, as NEFTune has none). A warm-up that keeps the "
            "coefficient below half its target over the run is warned about at start."
        },
    )
    penalty_samples: int | None = field(
        default=None,
        metadata={
            "help": "Draws y' per scored position (default 1, as the paper; 2 with "
            "penalty_estimator=unbiased); hessian-trace: Hutchinson probes (default 1)."
        },
    )
    penalty_sampling: str | None = field(
        default=None,
        metadata={
            "help": "'model' (y' ~ softmax(z), unbiased for Tr F) or 'uniform' (ablation). "
            "Default 'model'."
        },
    )
    penalty_grad: str | None = field(
        default=None,
        metadata={
            "help": "'exact' (double backward; needs eager or SDPA-math attention) or 'fd' "
            "(finite differences, first-order autograd only). Default 'exact'."
        },
    )
    penalty_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Fraction of each batch's sequences that get the penalty, rescaled by "
            "B / k so its expectation is unchanged. Default 1."
        },
    )
    penalty_every: int | None = field(
        default=None,
        metadata={
            "help": "Apply the penalty every k-th optimizer step with the summed coefficients "
            "of that step and the k - 1 skipped ones (exact total, warm-up included). Default 1."
        },
    )
    penalty_fd_scheme: str | None = field(
        default=None,
        metadata={
            "help": "fd: 'forward' (one extra forward) or 'central' (two). Default: central under "
            "bf16/fp16 (forward differences are too coarse there), forward in float32."
        },
    )
    penalty_fd_step: float | None = field(
        default=None,
        metadata={
            "help": "fd mode: relative step h_rel, h = h_rel * ||X|| / ||v||. Default by dtype "
            "(fishertune.penalties.DEFAULT_FD_STEP)."
        },
    )
    penalty_fd_backward: str | None = field(
        default=None,
        metadata={
            "help": "fd mode: 'split' backpropagates each forward before the next (one graph in "
            "memory), 'joint' keeps both and backpropagates once (for DeepSpeed). Default: "
            "joint under DeepSpeed, split otherwise."
        },
    )
    penalty_fd_fused_ce: bool | None = field(
        default=None,
        metadata={
            "help": "fd mode: take the penalized rows' CE at the shifted points X + h v instead "
            "of at X (one backward pass fewer). Its gradient is then off by about h_rel times "
            "the CE's own, independent of penalty_coef: accurate only while the penalty's "
            "gradient is far larger than h_rel times the CE's. One process or DDP, no fp16. "
            "Default false."
        },
    )
    neftune_alpha: float | None = field(
        default=None,
        metadata={"help": "NEFTune alpha; noise U(-a, a), a = alpha / sqrt(L d). Default 5."},
    )
    neftune_length: str | None = field(
        default=None,
        metadata={
            "help": "'per_sequence' (L from each sequence's attention mask, no noise on padding: "
            "NEFTune's own code) or 'padded' (the batch's padded length: transformers). "
            "Default per_sequence."
        },
    )
    neftune_distribution: str | None = field(
        default=None,
        metadata={"help": "'uniform' (the paper) or 'gaussian' (same variance). Default uniform."},
    )

    # TRL turns both on by default, for GPUs; here they follow the hardware (__post_init__)
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Deprecated alias of activation_checkpointing (transformers). Unset, "
            "activation checkpointing is on where a GPU is used and off on the CPU."
        },
    )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 autocast (the weights the optimizer updates stay float32). Unset: on "
            "where a GPU with bf16 is used (unless fp16), off on the CPU."
        },
    )

    on_nonfinite: str = field(
        default="stop",
        metadata={
            "help": "A step with a non-finite loss, penalty or gradient norm: 'stop' training "
            "(status failed, the last checkpoint kept) or 'skip' the update (counted in the "
            "'skipped_steps' log).",
            "choices": ("stop", "skip"),
        },
    )
    divergence_max_ce: float | None = field(
        default=None,
        metadata={
            "help": "Stop when a step's CE per token exceeds this many nats (default 4 ln V, "
            "4x a uniform predictor's; 0 turns the check off)."
        },
    )

    def __post_init__(self) -> None:
        check_numbers(self)  # a type and finiteness the bounds below cannot see (NaN passes them)
        check_ranges(self)
        self._hardware_defaults()
        self.validate_method()
        _choice("on_nonfinite", self.on_nonfinite, ("stop", "skip"))
        if self.ddp_find_unused_parameters is None:
            # every trainable parameter of a causal LM gets a gradient in each step (also the
            # penalty's passes, and LoRA's adapters; frozen weights do not count): skip DDP's
            # extra graph traversal and its "found no unused parameters" warning. A model with
            # parameters outside the forward needs ddp_find_unused_parameters=true.
            self.ddp_find_unused_parameters = False
        _choice("master_weights", self.master_weights, ("float32", "model"))
        if self.assistant_only_loss:
            # TRL's own masking needs {% generation %} markers in the template (or its built-in
            # replacement for a few known templates); ours works on any template and is the one
            # the CLI uses, so the library and the CLI score the same tokens.
            self.assistant_only, self.assistant_only_loss = True, False
        super().__post_init__()
        if self.method in PENALTY_METHODS and self.activation_checkpointing:
            kwargs = dict(self.activation_checkpointing_kwargs or {})
            if kwargs.get("use_reentrant", False):
                raise FishertuneError(
                    "activation_checkpointing_kwargs.use_reentrant=true cannot differentiate the "
                    "penalty (torch.utils.checkpoint is incompatible with .grad()); use "
                    "use_reentrant=false"
                )
            kwargs["use_reentrant"] = False
            self.activation_checkpointing_kwargs = self.gradient_checkpointing_kwargs = kwargs

    def _hardware_defaults(self) -> None:
        """bf16 and activation checkpointing the user left unset: TRL's defaults (on) where a
        GPU is used, off on the CPU, where bf16 autocast and recomputation only cost time (2.9x
        for token-F) and TRL's default would warn about an option nobody set."""
        gpu = not self.use_cpu and accelerator_present()
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = gpu
        if self.bf16 is None:
            self.bf16 = not self.fp16 and gpu and _bf16_supported()
        elif self.bf16 and not self.use_cpu and not accelerator_present():
            # transformers' own message does not name the way out
            raise FishertuneError(
                "bf16=true needs a GPU and none is present: set bf16=false, or use_cpu=true "
                "for bf16 autocast on the CPU"
            )

    def validate_method(self) -> None:
        """Check the method's options and fill in their defaults; raise ``FishertuneError``."""
        _choice("method", self.method, METHODS)
        _choice("loss_reduction", self.loss_reduction, ("mean", "sum"))
        _choice("ce_kernel", self.ce_kernel, CE_KERNELS)
        is_penalty = self.method in PENALTY_METHODS
        if is_penalty and self.ce_kernel == "linear" and self.penalty_grad != "fd":
            raise FishertuneError(
                f"ce_kernel=linear is for baseline and neftune, and penalty_grad=fd: "
                f"method={self.method} with penalty_grad=exact differentiates the logits twice; "
                "use ce_kernel=chunked or penalty_grad=fd"
            )
        matched = is_penalty and self.penalty_match_neftune_alpha is not None
        for names, active, label in (
            (PENALTY_FIELDS, is_penalty, "token-f/logit-f/hessian-trace"),
            (NEFTUNE_FIELDS, self.method == "neftune", "neftune"),
        ):
            given = [name for name in names if getattr(self, name) is not None]
            if matched and names is NEFTUNE_FIELDS:
                # the matched noise's length convention
                given = [name for name in given if name != "neftune_length"]
            if given and not active:
                raise FishertuneError(
                    f"{', '.join(given)} given with method={self.method!r}: these options belong "
                    f"to {label}; remove them or choose that method"
                )
        if getattr(self, "neftune_noise_alpha", None) is not None:
            raise FishertuneError(
                "neftune_noise_alpha (transformers' own NEFTune) is not used by fishertune: set "
                "method=neftune and neftune_alpha instead, so noise is never added twice"
            )
        if is_penalty:
            self._penalty_defaults(matched)
            self.penalty_sampling = self.penalty_sampling or "model"
            self.penalty_grad = self.penalty_grad or "exact"
            self.penalty_fraction = 1.0 if self.penalty_fraction is None else self.penalty_fraction
            self.penalty_every = self.penalty_every or 1
            # bf16 resolves as TRL's config does later (None means "unless fp16"); forward
            # differences in half precision lose the gradient's direction (benchmarks/overhead.py)
            half = bool(self.fp16) or (self.bf16 is None or bool(self.bf16))
            self.penalty_fd_scheme = self.penalty_fd_scheme or ("central" if half else "forward")
            self.penalty_fd_backward = self.penalty_fd_backward or "auto"
            self.penalty_fd_fused_ce = bool(self.penalty_fd_fused_ce)
            if self.penalty_coef < 0:
                raise FishertuneError(f"penalty_coef must be >= 0, got {self.penalty_coef}")
            if self.penalty_warmup_steps < 0:
                raise FishertuneError(
                    f"penalty_warmup_steps must be >= 0, got {self.penalty_warmup_steps}"
                )
            if self.penalty_samples < 1:
                raise FishertuneError(f"penalty_samples must be >= 1, got {self.penalty_samples}")
            if not 0.0 < self.penalty_fraction <= 1.0:
                raise FishertuneError(
                    f"penalty_fraction must be in (0, 1], got {self.penalty_fraction}"
                )
            if self.penalty_every < 1:
                raise FishertuneError(f"penalty_every must be >= 1, got {self.penalty_every}")
            if self.penalty_fd_step is not None and self.penalty_fd_step <= 0:
                raise FishertuneError(f"penalty_fd_step must be > 0, got {self.penalty_fd_step}")
            _choice("penalty_sampling", self.penalty_sampling, ("model", "uniform"))
            _choice("penalty_grad", self.penalty_grad, ("exact", "fd"))
            _choice("penalty_fd_scheme", self.penalty_fd_scheme, ("forward", "central"))
            _choice("penalty_fd_backward", self.penalty_fd_backward, ("auto", "split", "joint"))
            _choice("penalty_estimator", self.penalty_estimator, ("paper", "unbiased"))
            self._check_estimator()
            if self.packing:
                raise FishertuneError(
                    f"packing is not supported with method={self.method}: with packed rows one "
                    "sequence's score would differentiate into its neighbours' embeddings; set "
                    "packing=false"
                )
        if self.method == "neftune":
            self.neftune_alpha = (
                PAPER_NEFTUNE_ALPHA if self.neftune_alpha is None else float(self.neftune_alpha)
            )
            if self.neftune_alpha < 0:
                raise FishertuneError(f"neftune_alpha must be >= 0, got {self.neftune_alpha}")
            self.neftune_length = self.neftune_length or "per_sequence"
            self.neftune_distribution = self.neftune_distribution or "uniform"
            _choice("neftune_length", self.neftune_length, ("per_sequence", "padded"))
            _choice("neftune_distribution", self.neftune_distribution, ("uniform", "gaussian"))

    def _penalty_defaults(self, matched: bool) -> None:
        """The coefficient, warm-up, draws, estimator and matching defaults of a penalty."""
        method = self.method
        if matched:
            alpha = float(self.penalty_match_neftune_alpha)
            if alpha <= 0:
                raise FishertuneError(f"penalty_match_neftune_alpha must be > 0, got {alpha}")
            self.penalty_match_neftune_alpha = alpha
            self.neftune_length = self.neftune_length or "per_sequence"
            _choice("neftune_length", self.neftune_length, ("per_sequence", "padded"))
            default_coef = 1.0  # a multiplier of the matched coefficients
        elif method == "hessian-trace":
            if self.penalty_coef is None:
                raise FishertuneError(
                    "method=hessian-trace needs penalty_coef or penalty_match_neftune_alpha "
                    "(it has no paper setting)"
                )
            default_coef = 0.0
        else:
            default_coef = PAPER_PENALTY[method][0]
        self.penalty_coef = default_coef if self.penalty_coef is None else float(self.penalty_coef)
        if self.penalty_warmup_steps is None:
            # NEFTune has no warm-up: a matched penalty with one would not be matched
            paper = PAPER_PENALTY.get(method, (0.0, 0))[1]
            self.penalty_warmup_steps = 0 if matched else paper
        self.penalty_estimator = self.penalty_estimator or "paper"
        unbiased = self.penalty_estimator == "unbiased"
        self.penalty_samples = self.penalty_samples or (2 if unbiased else 1)

    def _check_estimator(self) -> None:
        if self.method == "hessian-trace":
            given = [
                name
                for name, value in (
                    ("penalty_estimator", self.penalty_estimator != "paper"),
                    ("penalty_sampling", self.penalty_sampling != "model"),
                )
                if value
            ]
            if given:
                raise FishertuneError(
                    f"{', '.join(given)} given with method=hessian-trace: Hutchinson probes "
                    "draw nothing from the model (its gradient is unbiased as it is)"
                )
            return
        if self.penalty_estimator != "unbiased":
            return
        if self.penalty_samples < 2:
            raise FishertuneError(
                f"penalty_estimator=unbiased needs penalty_samples >= 2 (a leave-one-out "
                f"baseline over the draws), got {self.penalty_samples}"
            )
        if self.penalty_sampling != "model":
            raise FishertuneError(
                "penalty_estimator=unbiased corrects the gradient of model sampling; with "
                "penalty_sampling=uniform the draws do not depend on the model: use paper"
            )
