"""Experiments that win competitions: k-fold runs, stacking, sweeps and searches,
built on ``train()`` and the inference package.

=============== ==============================================================
``kfold``       ``train_folds(cfg, folds=K)``: a run folder per fold,
                ``oof.npz`` with out-of-fold probabilities, a fold ensemble
``oof``         gathering a k-fold run's folds: ``oof.npz``, the per-fold table
                and the hold-out scores
``stack``       ``stack_runs``: the meta-learner over several runs' out-of-fold
                probabilities, applied to their test probabilities
``sweep``       ``run_sweep``: one run per grid point, a results table and plot
``search``      ``tune``: an Optuna search (the ``[tune]`` extra), one run per
                trial, resumable from its SQLite study
=============== ==============================================================

Names are imported lazily, so importing this package does not start TensorFlow.
"""

from __future__ import annotations

from shopee_tpu.utils import lazy_exports

_EXPORTS = {
    "train_folds": "shopee_tpu.experiments.kfold",
    "KFoldResult": "shopee_tpu.experiments.kfold",
    "fold_assignment": "shopee_tpu.experiments.kfold",
    "stack_runs": "shopee_tpu.experiments.stack",
    "run_sweep": "shopee_tpu.experiments.sweep",
    "parse_grid": "shopee_tpu.experiments.sweep",
    "tune": "shopee_tpu.experiments.search",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
