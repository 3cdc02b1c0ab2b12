"""``heads finetune``: train the backbone itself (optionally frozen, truncated or pruned) plus a small classifier.

``config`` (``FinetuneConfig``), ``data`` (which rows train, choose and are scored, by :mod:`heads.protocol`; token
batches), ``audio`` (speech clips: on-the-fly crops and augmentation, batches by duration), ``model``
(``SequenceClassifier``, ``SpeechClassifier``, their model/ files, importance pruning), ``lora`` (peft LoRA
adapters, their merge and the saved adapter), ``scratch`` (``scratch:gru|lstm|rnn``: a word vocabulary of the
training rows and a recurrent classifier trained from nothing), ``loop`` (one round: its
session over :mod:`heads.training`, early stopping, checkpoints), ``run`` (``run_finetune``: surgery, rounds, the run
directory) and ``predict`` (a fine-tuned run on new texts). Public names are re-exported from :mod:`heads`.
"""
