"""What the backbone trainers (``heads finetune``, ``heads pretrain``) share, and nothing else.

``optim`` (``OptimConfig`` and the AdamW parameter groups), ``schedule`` (the seeded epoch sampler and the
learning-rate schedule), ``checkpoint`` (pickle-free training state, the config fingerprint and the resume
refusal). Imports stay light: nothing here is imported by ``import heads``.
"""
