"""Every file in configs/ must stay valid for the code."""

from pathlib import Path

import pytest

from cli.common import load_yaml_config
from embstore import ExtractConfig
from embstore.backbones.registry import resolve_random_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("extract-*.yaml")), ids=lambda p: p.name)
def test_extract_configs_parse(path):
    cfg = ExtractConfig.from_dict(load_yaml_config(str(path)))
    assert cfg.model and (cfg.source.data or cfg.source.splits)


@pytest.mark.parametrize("path", sorted((CONFIGS / "models").glob("*.yaml")), ids=lambda p: p.name)
def test_model_configs_resolve(path):
    cfg, origin = resolve_random_config(str(path))
    assert cfg["model_type"] == "bert" and origin == str(path)


def test_unknown_config_key_is_named():
    from embstore.errors import ConfigError

    with pytest.raises(ConfigError, match=r"Unknown extract config keys \['layer'\]"):
        ExtractConfig.from_dict({"layer": "all"})


@pytest.mark.parametrize(
    "path", sorted(CONFIGS.glob("sweep-*.yaml")) + sorted(CONFIGS.glob("train-*.yaml")), ids=lambda p: p.name
)
def test_sweep_configs_parse(path):
    from heads.probe.sweep import SweepConfig

    cfg = SweepConfig.from_dict(load_yaml_config(str(path)))
    assert cfg.heads and cfg.layers


def test_finetune_variants_config_parses():
    from heads.finetune.config import FinetuneConfig

    values = load_yaml_config(str(CONFIGS / "finetune-variants-ag-news.yaml"))
    runs = values.pop("runs")
    assert [r["name"] for r in runs] == ["full", "freeze-0-4", "freeze-all-but-last", "truncate-4", "prune-30pct"]
    for run in runs:
        variant = {k: v for k, v in run.items() if k != "name"}
        assert FinetuneConfig.from_dict({**values, **variant}).model == "minilm"


def test_pretrain_config_parses():
    from heads.pretrain.config import PretrainConfig

    cfg = PretrainConfig.from_dict(load_yaml_config(str(CONFIGS / "pretrain-wic.yaml")))
    assert cfg.swap_augment and cfg.source.text_pair_col


def test_speech_emodb_config_parses():
    from heads.finetune.config import FinetuneConfig

    cfg = FinetuneConfig.from_dict(load_yaml_config(str(CONFIGS / "finetune-speech-emodb.yaml")))
    assert cfg.audio and cfg.freeze_ == "feature-encoder" and cfg.pooling_ == "mean" and cfg.classifier == "mlp"
    assert (cfg.optim.batch_size, cfg.optim.lr, cfg.optim.epochs, cfg.augment) == (2, 1e-5, 4, "noise")


def test_scratch_study_config_parses():
    from heads.finetune.config import FinetuneConfig

    cfg = FinetuneConfig.from_dict(load_yaml_config(str(CONFIGS / "study-rnn-scratch.yaml")))
    assert cfg.scratch and cfg.model == "scratch:gru" and cfg.aggregate_ == "mean" and cfg.classifier == "mlp"
    o = cfg.optim
    assert (o.lr, o.weight_decay, o.schedule, o.batch_size, cfg.gamma, cfg.max_length) == (
        1e-3,
        0.0,
        "exponential-epoch",
        128,
        0.9,
        256,
    )
    assert [name for name, _ in cfg.source.splits or ()] == ["train", "test"]
