"""What the two backbone trainers (``heads finetune``, ``heads pretrain``) share, and nothing else.

``optim`` (``OptimConfig``, the trainer configs' flat keys, the AdamW parameter groups), ``schedule`` (the seeded
epoch sampler and the one learning-rate schedule of the code base, which the probe heads step per epoch too),
``session`` (the accelerate setup and the one training step, gradient clipping included) and ``checkpoint``
(pickle-free training state, the config fingerprint, the resume refusal). Nothing here is imported by
``import heads``.
"""
