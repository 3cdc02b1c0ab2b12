"""heads: small classifiers trained from an embstore store, swept over layers and heads.

Three products share one results format: ``heads.probe`` (heads on stored features: specs, features, modules,
estimator, solvers, sweep, predict), ``heads.finetune`` and ``heads.pretrain`` (backbone training, over what only
they share in ``heads.training``), with ``heads.protocol`` (split roles, carves, folds, early stopping),
``heads.evalset`` and ``heads.report`` (run directories, tables, plots, merged reports) used by all of them.

Public names are re-exported here lazily, so ``import heads`` stays light (no torch until a name is used).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # the probe engine
    "HeadConfig": "heads.probe.config",
    "HEADS": "heads.probe.config",
    "HeadClassifier": "heads.probe.estimator",
    "NotFittedError": "heads.probe.estimator",
    "HeadNotFoundError": "heads.probe.estimator",
    "Ragged": "heads.probe.modules",
    "Combo": "heads.probe.specs",
    "expand": "heads.probe.specs",
    "parse_combine": "heads.probe.specs",
    "FeatureBank": "heads.probe.features",
    "parse_memory": "heads.probe.features",
    "fit_linear_probes": "heads.probe.adamw",
    "fit_logistic_probes": "heads.probe.solvers",
    "SweepConfig": "heads.probe.sweep",
    "SweepResult": "heads.probe.sweep",
    "run_sweep": "heads.probe.sweep",
    "latest_store": "embstore.store.catalog",
    "load_head": "heads.probe.predict",
    "HeadCard": "heads.probe.card",
    "predict_texts": "heads.probe.predict",
    "predict_audio": "heads.probe.predict",
    # the shared evaluation protocol
    "split_roles": "heads.protocol",
    "carve": "heads.protocol",
    "validation_carve": "heads.protocol",
    "carve_with_copies": "heads.protocol",
    "fold_rounds": "heads.protocol",
    "BestTracker": "heads.protocol",
    "make_split": "heads.protocol",
    "eval_set": "heads.evalset",
    # backbone training
    "FinetuneConfig": "heads.finetune.config",
    "run_finetune": "heads.finetune.run",
    "FinetuneResult": "heads.finetune.run",
    "SequenceClassifier": "heads.finetune.model",
    "predict_finetuned": "heads.finetune.predict",
    "PretrainConfig": "heads.pretrain.config",
    "run_pretrain": "heads.pretrain.run",
    "PretrainResult": "heads.pretrain.run",
    "OptimConfig": "heads.training.optim",
    # run directories and reports
    "ResultRow": "heads.report.results",
    "RunWriter": "heads.report.results",
    "read_run": "heads.report.results",
    "write_report": "heads.report.merge",
    "classification_metrics": "heads.report.metrics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'heads' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
