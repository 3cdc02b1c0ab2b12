"""What the two backbone trainers (``heads finetune``, ``heads pretrain``) share, and nothing else.

``optim`` (``OptimConfig``, the trainer configs' flat keys, the AdamW parameter groups), ``session`` (the
accelerate setup and the one training step, gradient clipping included) and ``checkpoint`` (pickle-free training
state, the config fingerprint, the resume refusal). The schedule and the AdamW builder, which the probe heads use
too, are in :mod:`heads.protocol`. Nothing here is imported by ``import heads``.
"""
