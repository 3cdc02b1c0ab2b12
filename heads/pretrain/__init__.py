"""``heads pretrain``: masked-LM pretraining of a BERT from random initialisation.

``config`` (``PretrainConfig``), ``data`` (the corpus, held-out rows, tokenizer and BERT config), ``tokenizer``
(WordPiece training), ``masking`` (pretraining batches and BERT's 80/10/10 masking), ``report`` (the run
directory's files) and ``run`` (``run_pretrain``). Public names are re-exported from :mod:`heads`.
"""
