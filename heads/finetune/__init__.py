"""``heads finetune``: train the backbone itself (optionally frozen, truncated or pruned) plus a small classifier.

``config`` (``FinetuneConfig``), ``data`` (which rows train, choose and are scored; token batches), ``loop``
(one round's accelerate loop and early stopping), ``run`` (``run_finetune``: surgery, rounds, the run directory)
and ``predict`` (a fine-tuned run on new texts). Public names are re-exported from :mod:`heads`.
"""
