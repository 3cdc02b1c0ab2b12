"""The probe engine: heads trained on stored features.

``specs`` (what a sweep trains), ``features`` (the feature bank and row chunks), ``modules`` (head modules),
``estimator`` (``HeadClassifier``), ``solvers`` (batched L-BFGS logistic regression), ``adamw`` (batched AdamW
linear probes), ``ensemble`` (stacked non-linear heads), ``sweep`` and ``predict``. Public names are re-exported
from :mod:`heads`.
"""
