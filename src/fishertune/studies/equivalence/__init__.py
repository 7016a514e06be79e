"""The equivalence study's report: NEFTune vs its matched curvature penalties, causes separated.

NEFTune adds uniform noise of half-width ``a = alpha / sqrt(L d)`` to the input embeddings ``X``;
to second order ``E_eps[CE(X + eps)] = CE(X) + (a^2 / 6) Tr(H_X)``. The grid (the shipped
``sharegpt-equivalence`` preset) trains, per noise level, four regularizers matched to the same
``alpha`` row by row (``lambda_b = alpha^2 / (6 L_b d)``), plus the baseline, over paired seeds.
Each adjacent pair differs by one cause:

* NEFTune vs **Hessian-trace** (``lambda Tr(H_X)``, the noise's own second-order term): the
  Taylor series' higher terms and the noise's gradient variance;
* Hessian-trace vs **token-F unbiased** (``lambda Tr(F_X)`` with an unbiased gradient): the
  Gauss-Newton gap ``Tr(H_X) - Tr(F_X)``;
* token-F unbiased vs **token-F paper** (the seed's estimator, ``y'`` held constant): the
  estimator's gradient bias (its dropped score-function term).

Statistics (:mod:`fishertune.statistics`), all on per-seed differences (runs of one
seed share the base and the data order):

* the question as an effect to reproduce: each regularizer's paired effect against the baseline
  over NEFTune's at the same level, a ratio with Fieller's 95% interval, and equivalence by TOST
  of the ratio inside ``1 ± ratio_margin`` (fixed in the preset), only where NEFTune's own effect
  is detected (its 95% CI excludes 0); elsewhere "no effect to match", never "equivalent";
* the cause chain: mean difference of validation and test loss with its 95% t interval, each
  step's share of NEFTune's effect (Fieller), and, with an absolute ``margin``, TOST against it;
* the ``a^2`` law as a prediction between levels: the effect at the largest level times
  ``(a_i / a_max)^2`` against the effect measured at level ``i``, seed by seed; the least-squares
  slope on ``a^2`` stays beside it;
* Holm over each family (reproduction, the chain per loss, the predictions): verdicts read the
  adjusted p-values, and the report lists those the correction changed;
* runaway runs (the last logged penalty negative, or training diverged) as their own outcome,
  left out of every interval;
* greedy answers (where generated): paired change of mean length and distinct-2;
* along training (where the runs evaluated validation loss every few steps): the last and the best
  validation loss per method, the baseline's rise after its best step (overfitting), and each
  regularizer's best against the baseline's, with its share of NEFTune's;
* practitioner's choice: each method at its best level by mean validation loss, its test-loss
  difference to the baseline, and its measured seconds per training step (the runs' own
  ``train_runtime / global_step``, mean over all its runs) against the baseline's.

Curvature (the ``measure`` stage, :mod:`fishertune.analysis.record`): ``Tr(F_X)``,
``Tr(H_X)``, the gap, per split measured, with their between-batch standard errors; the embedding
rms and the scale-free curvature ``rms^2 Tr`` of every measured run.

Written into the report folder: ``equivalence.md``, ``equivalence.json``,
``equivalence_pairs.png`` (the four comparisons per level with 95% intervals and the margin),
``equivalence_ratio.png`` (each regularizer's share of NEFTune's effect per level with Fieller's
interval and the equivalence band), ``equivalence_slope.png`` (effect vs ``a^2`` with the fitted
lines), ``equivalence_choice.png``
(test-loss change at the best level vs cost per step).
"""
