"""The probe engine: heads trained on stored features.

``specs`` (what a sweep trains), ``features`` (the feature bank, row chunks and blocks), ``modules`` (head modules,
input standardisation), ``estimator`` (``HeadClassifier``), ``fitting`` (what every probe trainer shares: labels,
device, class weights, schedule, batches, and ``FittedHead``, what a trainer returns), ``solvers``
(logistic-regression probes by batched L-BFGS along the C path: ``lbfgs`` the batched optimiser, ``objective`` the
loss and its row blocks, ``chunks`` what the solver reads and how ranks sum it, ``scoring`` what solutions say about
rows), ``adamw`` (batched AdamW linear probes), ``ensemble`` (stacked non-linear heads), ``sweep_setup`` (the
rows of every round, feature groups within the memory budget, the notes) and ``rounds`` (how each kind of head
trains a round), ``mdl`` (the online codelength), ``control`` (the control store's checks), ``sweep`` and
``predict`` (with ``card``, the ``HeadCard`` that describes a saved head). Public names are re-exported from
:mod:`heads`.
"""
