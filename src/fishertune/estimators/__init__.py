"""Curvature estimators over matrix-vector products (torch only).

* :mod:`~fishertune.estimators.trace`: Hutchinson trace estimates and dense references.
* :mod:`~fishertune.estimators.curvature`: Hessian-vector products of a loss w.r.t. the input
  embeddings and Monte-Carlo Fisher traces from the token-F estimator.
"""

from fishertune.estimators.curvature import EmbeddingHVP, embedding_hvp, fisher_trace
from fishertune.estimators.trace import (
    Estimate,
    TraceEstimate,
    dense_matrix,
    dense_trace,
    hutchinson_trace,
    hutchinson_traces,
    sample_probe,
)

__all__ = [
    "EmbeddingHVP",
    "Estimate",
    "TraceEstimate",
    "dense_matrix",
    "dense_trace",
    "embedding_hvp",
    "fisher_trace",
    "hutchinson_trace",
    "hutchinson_traces",
    "sample_probe",
]
