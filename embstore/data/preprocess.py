"""``--preprocess MODULE:FUNCTION``: a text-to-text function applied to every text before tokenisation.

A study's normaliser (stopword removal, lemmatisation, a script's own spelling rules) stays the user's code: embstore
ships none. ``MODULE`` is an importable module (``mypkg.normalise``) or a path to a ``.py`` file
(``scripts/norm.py``); ``FUNCTION`` takes one ``str`` and returns one ``str``. What the function is (its name and the
sha256 of its module's source file) is part of the store id and of a run's fingerprint, so editing the function
makes another store instead of silently reusing one made with the old text.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from embstore.errors import ConfigError, DataError

__all__ = ["resolve_preprocess", "preprocess_identity", "apply_preprocess"]


def _split(spec: str) -> tuple[str, str]:
    module, sep, name = spec.rpartition(":")
    if not sep or not module or not name.isidentifier():
        raise ConfigError(
            f"The --preprocess option must be MODULE:FUNCTION (an importable module or a .py file, then the "
            f"function's name). Got {spec!r} instead."
        )
    return module, name


def _module(module: str) -> Any:
    if module.endswith(".py") or "/" in module:
        path = Path(module)
        if not path.is_file():
            raise ConfigError(f"--preprocess names the file {module}, which does not exist; check the path.")
        mod_spec = importlib.util.spec_from_file_location(f"_embstore_preprocess_{path.stem}", path)
        if mod_spec is None or mod_spec.loader is None:
            raise ConfigError(f"--preprocess cannot load {module} as Python; pass a .py file or a module name.")
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
        return mod
    if "" not in sys.path and str(Path.cwd()) not in sys.path:  # a module beside the data, as python -m finds it
        sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"--preprocess cannot import {module!r} ({exc}); pass an importable module or a path to a .py file."
        ) from None


def resolve_preprocess(spec: str) -> Callable[[str], str]:
    """The function ``spec`` (MODULE:FUNCTION) names; ConfigError naming what is wrong."""
    module, name = _split(spec)
    fn = getattr(_module(module), name, None)
    if not callable(fn):
        raise ConfigError(f"--preprocess {spec}: {module} has no function {name!r}; name a function of it.")
    return fn  # type: ignore[no-any-return]


def preprocess_identity(spec: str) -> dict[str, Any]:
    """{name, sha256 of the function's module source file (None when it has no file)}: what a store id records."""
    from embstore.store.fingerprint import file_sha256

    module, name = _split(spec)
    mod = _module(module)
    source = getattr(mod, "__file__", None)
    return {"function": f"{module}:{name}", "sha256": file_sha256(Path(source)) if source else None}


def apply_preprocess(fn: Callable[[str], str], texts: list[str], spec: str, where: str) -> list[str]:
    """``fn`` applied to every text; a result that is not a str is a DataError naming the row."""
    out = []
    for i, text in enumerate(texts):
        value = fn(text)
        if not isinstance(value, str):
            raise DataError(
                f"--preprocess {spec} returned {type(value).__name__} for row {i} of {where}; it must return a str."
            )
        out.append(value)
    return out
