"""Evaluation: the offline scorer (``offline``), the lm-eval bridge (``lmeval``), judge answer
files for AlpacaEval / MT-Bench (``export``) and ``fishertune evaluate`` (``cli``).

Submodules are imported on use so that reading results does not import lm-eval.
"""
