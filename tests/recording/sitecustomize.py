"""Imported at start-up by every Python process that has this folder on its PYTHONPATH: torchrun ranks and the
processes ``--num-processes`` spawns, which a test cannot monkeypatch. With $RECORD_TARGET set (``module:Class.method``
or ``module:function``) that function first logs each call: one line of the call's int and str arguments, appended
to $RECORD_LOG.<rank> ($RANK, or pid<process id> without it). Without $RECORD_TARGET nothing happens.

It lets a multi-process test assert that the workers ran and what each did (see ``factories.recording_env``).
"""

import os

_target = os.environ.get("RECORD_TARGET")
if _target:
    import importlib

    _module, _, _attr = _target.partition(":")
    _owner_name, _, _name = _attr.rpartition(".")
    _owner = importlib.import_module(_module)
    if _owner_name:
        _owner = getattr(_owner, _owner_name)
    _real = getattr(_owner, _name)

    def _recorded(*args, **kwargs):
        who = os.environ.get("RANK") or f"pid{os.getpid()}"
        with open(f"{os.environ['RECORD_LOG']}.{who}", "a") as fh:
            fh.write(" ".join(str(a) for a in args if isinstance(a, (int, str)) and not isinstance(a, bool)) + "\n")
        return _real(*args, **kwargs)

    setattr(_owner, _name, _recorded)
