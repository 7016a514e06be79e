"""The unbiased estimator, NEFTune matching and hessian-trace through FisherSFTTrainer (tiny Llama,
CPU, float32): fd against exact on the same draws or probes, the logged matched coefficient, and
the options' refusals."""

from __future__ import annotations

import logging

import pytest
import torch

from fishertune.errors import FishertuneError
from fishertune.training.checks import warmup_warning
from fishertune.training.cli import parse_args
from test_trainer import _batch, _gradients_on_one_batch, base_args, trainer_for

COMMON = {"penalty_coef": 1.0, "penalty_warmup_steps": 0}


def _penalty_parts(chat_file, tmp_path, configs):
    """Each config's step gradient minus the baseline's, all on one batch and one set of weights."""
    trainers = [trainer_for(chat_file, tmp_path, method="baseline")]
    trainers += [trainer_for(chat_file, tmp_path, **config) for config in configs]
    baseline, *others = _gradients_on_one_batch(*trainers)
    return [g - baseline for g in others], baseline


def _relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("backward", ["split", "joint"])
def test_unbiased_fd_matches_unbiased_exact_and_differs_from_paper(chat_file, tmp_path, backward):
    """Same draws (m = 2): fd's score-function term (in the CE backward at X) gives exact mode's
    gradient; the term itself is not negligible."""
    unbiased = {"method": "token-f", "penalty_estimator": "unbiased", **COMMON}
    (exact, fd, paper), _ = _penalty_parts(
        chat_file,
        tmp_path,
        [
            {**unbiased, "penalty_grad": "exact"},
            {**unbiased, "penalty_grad": "fd", "penalty_fd_scheme": "central",
             "penalty_fd_backward": backward},
            {"method": "token-f", "penalty_samples": 2, "penalty_grad": "exact", **COMMON},
        ],
    )  # fmt: skip
    assert _relative(fd, exact) < 1e-3, _relative(fd, exact)  # measured 1.4e-4
    assert _relative(paper, exact) > 0.05


@pytest.mark.parametrize("weighted", [False, True])
def test_hessian_trace_fd_matches_exact(chat_file, tmp_path, weighted):
    extra = {"penalty_match_neftune_alpha": 50.0, "penalty_coef": 1.0} if weighted else COMMON
    config = {"method": "hessian-trace", "penalty_warmup_steps": 0, **extra}
    (exact, fd), baseline = _penalty_parts(
        chat_file,
        tmp_path,
        [{**config, "penalty_grad": "exact"}, {**config, "penalty_grad": "fd"}],
    )
    assert exact.norm() > 1e-3 * baseline.norm()
    assert _relative(fd, exact) < 5e-3, _relative(fd, exact)  # measured 1.2e-3, 1.3e-3


def test_matched_coefficient_is_logged_and_scales_the_penalty(chat_file, tmp_path):
    """With penalty_match_neftune_alpha the step is CE + sum_b alpha^2/(6 L_b d) R_b: equal to a
    run whose one lambda is the rows' coefficient when the rows are made equally long, and the
    logged coefficient is the mean of alpha^2/(6 L_b d) over the rows."""
    alpha = 20.0
    matched = trainer_for(
        chat_file, tmp_path, method="token-f", penalty_match_neftune_alpha=alpha,
        penalty_warmup_steps=0, penalty_grad="exact", neftune_length="padded",
    )  # fmt: skip
    batch = _batch(matched)
    length, hidden = batch["labels"].shape[1], matched.model.config.hidden_size
    coef = alpha**2 / (6 * length * hidden)
    plain = trainer_for(
        chat_file, tmp_path, method="token-f", penalty_coef=coef, penalty_warmup_steps=0,
        penalty_grad="exact",
    )  # fmt: skip
    g_matched, g_plain = _gradients_on_one_batch(matched, plain)
    torch.testing.assert_close(g_matched, g_plain, rtol=1e-5, atol=1e-7)
    assert matched._train_metrics["penalty_coef"][-1] == pytest.approx(coef, rel=1e-6)
    per_sequence = trainer_for(
        chat_file, tmp_path, method="token-f", penalty_match_neftune_alpha=alpha,
        penalty_warmup_steps=0,
    )  # fmt: skip
    _gradients_on_one_batch(per_sequence)
    lengths = batch["attention_mask"].sum(-1).double()
    expected = float((alpha**2 / (6 * lengths * hidden)).mean())
    assert per_sequence._train_metrics["penalty_coef"][-1] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"method": "token-f", "penalty_estimator": "unbiased", "penalty_samples": 1},
         "needs penalty_samples >= 2"),
        ({"method": "token-f", "penalty_estimator": "unbiased", "penalty_sampling": "uniform"},
         "use paper"),
        ({"method": "token-f", "penalty_estimator": "exactish"}, "penalty_estimator="),
        ({"method": "hessian-trace"}, "needs penalty_coef or penalty_match_neftune_alpha"),
        ({"method": "hessian-trace", "penalty_coef": 1, "penalty_estimator": "unbiased"},
         "penalty_estimator given with method=hessian-trace"),
        ({"method": "token-f", "penalty_match_neftune_alpha": 0}, "must be > 0"),
        ({"method": "token-f", "neftune_length": "padded"}, "neftune_length given"),
        ({"method": "baseline", "penalty_estimator": "unbiased"}, "penalty_estimator given"),
    ],
)  # fmt: skip
def test_bad_estimator_options_give_one_clear_error(chat_file, tmp_path, overrides, message):
    with pytest.raises(FishertuneError, match=message):
        parse_args(base_args(chat_file, tmp_path / "out", **overrides))


def test_unbiased_defaults_to_two_draws(chat_file, tmp_path):
    args = parse_args(
        base_args(chat_file, tmp_path / "out", method="logit-f", penalty_estimator="unbiased")
    )
    training = next(a for a in args if hasattr(a, "penalty_samples"))
    assert training.penalty_samples == 2 and training.penalty_estimator == "unbiased"


def _config(chat_file, tmp_path, **overrides):
    args = parse_args(base_args(chat_file, tmp_path / "out", **overrides))
    return next(a for a in args if hasattr(a, "penalty_warmup_steps"))


def test_matched_penalty_has_no_warm_up_unless_asked(chat_file, tmp_path):
    """NEFTune has no warm-up: the matched penalty gets none by default; the paper's otherwise."""
    matched = {"method": "token-f", "penalty_match_neftune_alpha": 5}
    assert _config(chat_file, tmp_path, **matched).penalty_warmup_steps == 0
    asked = _config(chat_file, tmp_path, **matched, penalty_warmup_steps=10)
    assert asked.penalty_warmup_steps == 10
    assert _config(chat_file, tmp_path, method="token-f").penalty_warmup_steps == 600
    assert _config(chat_file, tmp_path, method="logit-f").penalty_warmup_steps == 800


def test_a_warm_up_longer_than_the_run_is_warned_once_with_its_numbers(chat_file, tmp_path, caplog):
    """An epoch-based run of 2 optimizer steps (48 rows, 8 x 3 per step) under the paper's
    600-step warm-up: one warning naming both lengths and the coefficient's fractions."""
    trainer = trainer_for(
        chat_file, tmp_path, method="token-f", max_steps=-1, num_train_epochs=1,
        per_device_train_batch_size=8, gradient_accumulation_steps=3,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="fishertune.training.checks"):
        trainer.train()
    warned = [r.getMessage() for r in caplog.records if "penalty_warmup_steps" in r.getMessage()]
    assert trainer.state.max_steps == 2 and len(warned) == 1, warned
    # step 1 of 600: 0.17% of the target; mean over steps 0, 1: 0.08%
    assert "penalty_warmup_steps=600" in warned[0] and "run of 2 optimizer steps" in warned[0]
    assert "reaches 0.2%" in warned[0] and "averages 0.1%" in warned[0], warned[0]


@pytest.mark.parametrize(
    "steps, warmup, warned",
    [(30, 600, True), (60, 60, True), (200, 60, False), (30, 0, False), (1000, 900, False)],
)
def test_warm_up_warning_thresholds(chat_file, tmp_path, steps, warmup, warned):
    """Warned when the warm-up is longer than the run or the coefficient's mean over the run is
    below half its target (60 of 60: 49%); not for 900 of 1000 (55%, the warm-up ends in time)."""
    config = _config(
        chat_file, tmp_path, method="token-f", penalty_match_neftune_alpha=5,
        penalty_warmup_steps=warmup,
    )  # fmt: skip
    assert (warmup_warning(config, steps) is not None) is warned
    if warned and steps == 30:
        assert "reaches 4.8%" in warmup_warning(config, steps)  # 29 / 600


def _logged_step(trainer, batch) -> dict[str, float]:
    """One optimizer step's logged metrics on ``batch`` (the optimizer-step hook's sums)."""
    with trainer._capture.attached(trainer.model.get_input_embeddings()):
        trainer.model.train()
        trainer.compute_loss(trainer.model, dict(batch)).backward()
        trainer._check_step(trainer.model)
    return {k: v[-1] for k, v in trainer._train_metrics.items()}


@pytest.mark.parametrize("grad", ["exact", "fd"])
def test_matched_run_logs_r_as_penalty_and_the_weighted_term_apart(chat_file, tmp_path, grad):
    """Under matching `penalty` is R (a run with one lambda logs the same R on the same draws,
    and so does a run with a coefficient per sequence), `penalty_term` the coefficients times
    R."""
    alpha = 20.0
    common = {"method": "token-f", "penalty_warmup_steps": 0, "penalty_grad": grad}
    matched = trainer_for(
        chat_file, tmp_path, **common, penalty_match_neftune_alpha=alpha, neftune_length="padded"
    )
    batch = _batch(matched)
    coef = alpha**2 / (6 * batch["labels"].shape[1] * matched.model.config.hidden_size)
    plain = trainer_for(chat_file, tmp_path, **common, penalty_coef=coef)
    per_sequence = trainer_for(chat_file, tmp_path, **common, penalty_match_neftune_alpha=alpha)
    for other in (plain, per_sequence):
        other.model.load_state_dict(matched.model.state_dict())
    logged = [_logged_step(t, batch) for t in (matched, plain, per_sequence)]
    matched_log, plain_log, sequence_log = logged
    assert matched_log["penalty"] == pytest.approx(plain_log["penalty"], rel=1e-5)
    assert matched_log["penalty_term"] == pytest.approx(plain_log["penalty_term"], rel=1e-5)
    assert matched_log["penalty_term"] == pytest.approx(coef * matched_log["penalty"], rel=1e-5)
    assert matched_log["penalty_term"] < 0.1 * matched_log["penalty"]  # coef is about 0.05
    # R does not depend on the coefficients: per-sequence weights log the same R, and a term
    # that weights the rows apart (their mean coefficient times R only approximately)
    assert sequence_log["penalty"] == pytest.approx(plain_log["penalty"], rel=1e-5)
    assert sequence_log["penalty_term"] == pytest.approx(
        sequence_log["penalty_coef"] * sequence_log["penalty"], rel=0.05
    )
