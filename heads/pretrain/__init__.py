"""``heads pretrain``: masked-LM pretraining of a BERT from random initialisation.

``config`` (``PretrainConfig``), ``data`` (the corpus, its held-out rows and the tokenizer), ``tokenizer``
(WordPiece training), ``masking`` (pretraining batches and BERT's 80/10/10 masking), ``model`` (the BERT config,
the pretraining heads, held-out evaluation), ``report`` (the run directory's files) and ``run`` (``run_pretrain``,
over :mod:`heads.training`). Public names are re-exported from :mod:`heads`.
"""
