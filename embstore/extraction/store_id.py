"""What a store id is made of, computed from cheap inputs only.

A store is content-addressed: its id (fingerprint) is a hash of everything that can change a
stored value. Everything here is read without loading the model or tokenizing the data: config
files are parsed as JSON, and weight, tokenizer, data and audio files are hashed through a cache
keyed by (path, size, modification time, inode), kept in ``$EMBSTORE_CACHE/.hashes.json``. So a
re-run of a finished extraction finds its complete store at once, and the full extraction
computes its id from the very same function.

What is deliberately *not* in the id: thread counts, ``--num-processes``, the device index, a device map and
offloading, and for text (whose padding the attention mask hides) the batch size, token budget and chunk size:
they change values only by float rounding (at float32 within 1e-5; at bfloat16 by its own rounding, as much as
bfloat16 compute already differs from float32: docs/llm.md gives the figures). The compute dtype is in the id
(``precision``), and so are a template, a chat template and ``--pool-tokens`` where they differ from the text
alone with every token pooled. Speech models of every family the anatomy map knows give each clip its values
alone in any batch (:mod:`embstore.backbones.padding`), so their id says ``batching: exact`` instead; for a
speech model the map does not know, the padding of a batch can reach the real frames, so its batching options
*are* in the id (and ``embstore info`` says so). The torch and transformers major.minor versions are in the id
(kernels and random initialisation change between them).
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
    "audio_batching",
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


def speech_extractor_settings(path: Path | None, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """A speech model's feature extractor settings: its preprocessor_config.json, or the random models' own (for a
    random Whisper, its log-mel extractor, set by the config: mel bins and window)."""
    if path is None:
        if config is not None and config.get("model_type") == "whisper":
            return {
                "feature_extractor_type": "WhisperFeatureExtractor",
                "feature_size": config.get("num_mel_bins", 80),
                "max_source_positions": config.get("max_source_positions", 1500),
            }
        return dict(SPEECH_EXTRACTOR)
    try:
        return dict(json.loads((path / "preprocessor_config.json").read_text()))
    except (OSError, ValueError):
        return {}


def model_identity(name: str) -> dict[str, Any]:
    """The id-relevant identity of ``--model``, without loading it.

    ``{model_type, config, weights, tokenizer, n_layers, modality, causal, extractor}``: the config is the
    config.json (or the random model's config) without :data:`VOLATILE_CONFIG_KEYS`; ``weights`` is
    the weight files' sha256 for real models, or ``random:<seed>`` (their weights follow from config,
    seed and library versions); ``tokenizer`` the sha256 of the tokenizer files.
    """
    from embstore.backbones import bpe
    from embstore.backbones.anatomy import causal_from_config
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
        convention = bpe.convention_for(model_type)
        if audio:
            tok = None
        elif convention is not None:
            tok = bpe.tokenizer_sha256(convention)
        else:
            tok = files_sha256(tokenizer_files(minilm_path()))
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
    extractor = speech_extractor_settings(path, cfg) if audio else None
    if audio:
        from embstore.backbones.anatomy import batch_exact  # audio models only: the map imports torch
    return {
        "model_type": model_type,
        "config": {k: v for k, v in cfg.items() if k not in VOLATILE_CONFIG_KEYS},
        "weights": weights,
        "tokenizer": tok,
        "n_layers": cfg.get("num_hidden_layers"),
        "modality": "audio" if audio else "text",
        "causal": causal_from_config(cfg),
        "extractor": extractor,
        "attention_mask": None if extractor is None else bool(extractor.get("return_attention_mask", False)),
        "batch_exact": batch_exact(model_type) if audio else None,
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
    word_poolings: list[str] | None = None,
    text: dict[str, Any] | None = None,
) -> str:
    """The store id: sha256 of everything that can change a stored value (see the module docstring).

    ``model`` is :func:`model_identity`, ``data`` is :func:`data_identity`, ``config`` an ExtractConfig,
    ``precision`` the compute dtype ('float32', 'bfloat16', 'float16') or 'int8-dynamic', ``text`` the text spec's
    :meth:`~embstore.extraction.textspec.TextSpec.id_content` (template, chat template, pooled tokens; None for the
    text alone with every token pooled, so encoder stores keep their ids).
    """
    from embstore.store.layout import SCHEMA_VERSION

    content: dict[str, Any] = {
        # version 2 only added word states: a store without them holds what version 1 wrote, under the same id
        "schema_version": SCHEMA_VERSION if word_poolings else 1,
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
    if word_poolings:  # word states (and the alignment, tokenizer offsets) are stored
        content["word_poolings"] = list(word_poolings)
    if getattr(config, "quantize", "none") != "none":
        content["quantize"] = config.quantize
    if text is not None:
        content["text"] = text
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
        content["audio"]["batching"] = audio_batching(config, model)
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def audio_batching(config: ExtractConfig, model: dict[str, Any]) -> str | dict[str, Any]:
    """What an audio store's batching contributes to its id: ``exact`` for a family the anatomy map knows (which
    clips share a batch changes no value), else the options that decide it and why: ``unmapped`` (the padding of a
    batch reaches the real frames of a model the map does not know) or ``int8`` (``--quantize int8`` quantises each
    batch's activations with one scale, which the batch's other clips and padding move)."""
    quantized = getattr(config, "quantize", "none") != "none"
    if model.get("batch_exact") and not quantized:
        return "exact"
    return {
        "why": "int8" if quantized else "unmapped",
        "batch_seconds": config.batch_seconds,
        "batch_size": config.batch_size,
        "chunk_rows": config.chunk_rows,
    }
