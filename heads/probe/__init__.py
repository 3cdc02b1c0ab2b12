"""The probe engine: heads trained on stored features.

``specs`` (what a sweep trains), ``features`` (the feature bank, row chunks and blocks), ``modules`` (head modules,
input standardisation), ``estimator`` (``HeadClassifier``), ``fitting`` (what every probe trainer shares: labels,
device, class weights, schedule, batches, marking a head fitted), ``solvers`` (logistic-regression probes by batched
L-BFGS, ``lbfgs``), ``adamw`` (batched AdamW linear probes), ``ensemble`` (stacked non-linear heads), ``plan`` and
``rounds`` (what a sweep trains on which rows, and how), ``sweep`` and ``predict``. Public names are re-exported
from :mod:`heads`.
"""
