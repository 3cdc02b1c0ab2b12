"""What a store id is made of, computed from cheap inputs only.

A store is content-addressed: its id (fingerprint) is a hash of everything that can change a
stored value. Everything here is read without loading the model or tokenizing the data: config
files are parsed as JSON, and weight, tokenizer, data and audio files are hashed through a cache
keyed by (path, size, modification time, inode), kept in ``$EMBSTORE_CACHE/.hashes.json``. So a
re-run of a finished extraction finds its complete store at once, and the full extraction
computes its id from the very same function.

What is deliberately *not* in the id: thread counts, ``--num-processes``, the device index, and
for text (whose padding the attention mask hides) the batch size, token budget and chunk size:
they change values only by float rounding. For speech models that take no attention mask, padding
reaches the real frames, so their batching options *are* in the id. The torch and transformers
major.minor versions are in the id (kernels and random initialisation change between them).
"""

from __future__ import annotations

import hashlib
import json
import logging
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embstore.store.fingerprint import file_sha256, files_sha256

if TYPE_CHECKING:
    from embstore.config import ExtractConfig
    from embstore.data.spec import DataSpec

__all__ = [
    "file_sha256",
    "files_sha256",
    "model_identity",
    "data_identity",
    "store_fingerprint",
    "library_versions",
    "VOLATILE_CONFIG_KEYS",
    "speech_extractor_settings",
]

log = logging.getLogger(__name__)

VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures"})
"""config.json keys that do not change what the model computes."""

SPEECH_EXTRACTOR = {
    "feature_size": 1,
    "sampling_rate": 16000,
    "padding_value": 0.0,
    "do_normalize": True,
    "return_attention_mask": True,
}
"""The feature extractor settings of the random speech models (Wav2Vec2FeatureExtractor)."""


def library_versions() -> dict[str, str]:
    """major.minor of torch and transformers, read from the installed metadata (nothing is imported)."""
    out = {}
    for name in ("torch", "transformers"):
        try:
            out[name] = ".".join(metadata.version(name).split("+")[0].split(".")[:2])
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def speech_extractor_settings(path: Path | None) -> dict[str, Any]:
    """A speech model's feature extractor settings: its preprocessor_config.json, or the random models' own."""
    if path is None:
        return dict(SPEECH_EXTRACTOR)
    try:
        return dict(json.loads((path / "preprocessor_config.json").read_text()))
    except (OSError, ValueError):
        return {}


def model_identity(name: str) -> dict[str, Any]:
    """The id-relevant identity of ``--model``, without loading it.

    ``{model_type, config, weights, tokenizer, n_layers, modality, extractor}``: the config is the
    config.json (or the random model's config) without :data:`VOLATILE_CONFIG_KEYS`; ``weights`` is
    the weight files' sha256 for real models, or ``random:<seed>`` (their weights follow from config,
    seed and library versions); ``tokenizer`` the sha256 of the tokenizer files.
    """
    from embstore.backbones.registry import (
        RANDOM_SEED,
        SPEECH_MODEL_TYPES,
        minilm_path,
        resolve_model_path,
        resolve_random_config,
        tokenizer_files,
        weight_files,
    )
    from embstore.errors import ModelNotFoundError

    if name.startswith("random:"):
        cfg, _origin = resolve_random_config(name.split(":", 1)[1])
        model_type = str(cfg["model_type"])
        audio = model_type in SPEECH_MODEL_TYPES
        tok = None if audio else files_sha256(tokenizer_files(minilm_path()))
        weights = f"random:{RANDOM_SEED}"
        path: Path | None = None
    else:
        path = resolve_model_path(name)[0]
        try:
            cfg = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(
                f"{path} holds no readable config.json ({exc}); pass a Hugging Face model directory (config.json + "
                f"weights + tokenizer)."
            ) from None
        model_type = str(cfg.get("model_type", ""))
        audio = model_type in SPEECH_MODEL_TYPES
        files = weight_files(path)
        weights = files_sha256(files) if files else "none"
        tfiles = tokenizer_files(path)
        tok = files_sha256(tfiles) if tfiles else None
    extractor = speech_extractor_settings(path) if audio else None
    return {
        "model_type": model_type,
        "config": {k: v for k, v in cfg.items() if k not in VOLATILE_CONFIG_KEYS},
        "weights": weights,
        "tokenizer": tok,
        "n_layers": cfg.get("num_hidden_layers"),
        "modality": "audio" if audio else "text",
        "extractor": extractor,
        "attention_mask": None if extractor is None else bool(extractor.get("return_attention_mask", False)),
    }


def audio_digest(table: Path, audio_col: str) -> str | None:
    """One sha256 over every audio file a table lists (relative path and content, in table order; a missing
    or empty entry counts as such), or None when the table or column cannot be read (the full planning
    path then reports the problem)."""
    from embstore.data.tables import read_table

    try:
        values = read_table(table)[audio_col].tolist()
    except Exception:  # a missing column or an unreadable table: extraction's own checks name it
        return None
    h = hashlib.sha256()
    for v in values:
        rel = "" if v is None or (isinstance(v, float) and v != v) else str(v).strip()
        h.update(rel.encode() + b"\0")
        f = (table.parent / rel).resolve() if rel else None
        if f is not None and f.is_file():
            h.update(bytes.fromhex(file_sha256(f)))
        else:
            h.update(b"missing")
    return h.hexdigest()


def data_identity(src: DataSpec) -> dict[str, Any] | None:
    """The id-relevant identity of a data source (an object with the data fields of ExtractConfig / DataSpec):
    every file's sha256 (not its path) and suffix, the effective columns, holdout and row filters.
    None when a file is missing (the full planning path then reports it)."""
    from embstore.data.tables import BUILTIN_SOURCES, builtin_path

    text_col, label_col, holdout = src.text_col, src.label_col, src.holdout
    if src.data is not None and src.data.startswith("builtin:"):
        name = src.data.split(":", 1)[1]
        if name not in BUILTIN_SOURCES:
            return None
        b = BUILTIN_SOURCES[name]
        text_col, label_col = text_col or b.text_col, label_col or b.label_col
        holdout = b.holdout if holdout is None else holdout
        files = [("all", builtin_path(name))]
    elif src.data is not None:
        files = [("all", Path(src.data))]
    else:
        files = [(n, Path(p)) for n, p in src.splits]
    entries = []
    for split, path in files:
        if not path.is_file():
            return None
        entry: dict[str, Any] = {"split": split, "sha256": file_sha256(path), "suffix": path.suffix.lower()}
        if src.audio_col:
            entry["audio"] = audio_digest(path, src.audio_col)
            if entry["audio"] is None:
                return None
        entries.append(entry)
    out = {
        "files": entries,
        "text_col": None if src.audio_col else (text_col or "text"),
        "text_pair_col": src.text_pair_col,
        "label_col": label_col,
        "group_col": src.group_col,
        "audio_col": src.audio_col,
        "holdout": holdout,
        "seed": src.seed if holdout is not None else None,
        "limit": src.limit,
        "skip_empty": src.skip_empty,
        "skip_bad": getattr(src, "skip_bad", False),
    }
    # only when set, so the ids of stores made before these options stay what they were
    if getattr(src, "label_from_path", None) is not None:
        out["label_from_path"] = src.label_from_path
    preprocess = getattr(src, "preprocess", None)
    if preprocess is not None:
        from embstore.data.preprocess import preprocess_identity

        out["preprocess"] = preprocess_identity(preprocess)
    return out


def store_fingerprint(
    config: ExtractConfig,
    model: dict[str, Any],
    data: dict[str, Any],
    *,
    layers: list[int],
    token_layers: list[int],
    poolings: list[str],
    precision: str,
) -> str:
    """The store id: sha256 of everything that can change a stored value (see the module docstring).

    ``model`` is :func:`model_identity`, ``data`` is :func:`data_identity`, ``config`` an ExtractConfig.
    """
    from embstore.store.layout import SCHEMA_VERSION

    content: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "model": {k: model[k] for k in ("model_type", "config", "weights", "tokenizer", "extractor")},
        "data": data,
        "pair_mode": config.pair_mode,
        "max_length": config.max_length,
        "bucket": config.bucket,
        "layers": list(layers),
        "poolings": list(poolings),
        "token_layers": list(token_layers),
        "dtype": config.dtype,
        "precision": precision,
        "libraries": library_versions(),
    }
    if getattr(config, "quantize", "none") != "none":
        content["quantize"] = config.quantize
    if getattr(config, "random_weights", None) is not None:
        # re-initialised from the config: the weight files play no part, the seed does
        content["model"]["weights"] = f"reinit:{config.random_weights}"
    if model["modality"] == "audio":
        content["audio"] = {
            "max_seconds": config.max_seconds,
            "augment": list(config.augment),
            "copies": config.copies if config.augment else None,
            "augment_classes": config.augment_classes if config.augment else None,
            "snr_db": config.snr_db if "noise" in config.augment else None,
            "seed": config.source.seed if config.augment else None,
        }
        content["audio"].update(config.augment_extras())
        if not model["attention_mask"]:
            # Without an attention mask the zero padding of a batch reaches the real frames' attention,
            # so which rows share a batch changes the stored values.
            content["audio"]["batching"] = {
                "batch_seconds": config.batch_seconds,
                "batch_size": config.batch_size,
                "chunk_rows": config.chunk_rows,
            }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()
