"""One data-source concept (DataSpec) and one set of optimiser fields (OptimConfig), nested in the configs
while YAML keys, CLI flags, to_dict and stored provenance stay flat."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from embstore import DataSpec, ExtractConfig, extract, open_store
from embstore.data.tables import load_dataset
from embstore.errors import ConfigError
from heads.finetune.config import FinetuneConfig
from heads.pretrain.config import PretrainConfig
from heads.training.optim import OptimConfig

# The data keys ExtractConfig.to_dict() writes at the top level (as before DataSpec existed): stores keep them there.
DATA_KEYS = {
    "data",
    "splits",
    "holdout",
    "seed",
    "text_col",
    "text_pair_col",
    "label_col",
    "audio_col",
    "group_col",
    "limit",
    "skip_empty",
    "skip_bad",
    "label_from_path",
    "preprocess",
}
FLAT_EXTRACT_KEYS = ({f.name for f in dataclasses.fields(ExtractConfig)} - {"source"}) | DATA_KEYS


def test_the_three_configs_nest_the_same_spec_from_flat_keys():
    flat = {
        "data": None,
        "splits": [["train", "a.csv"], ["test", "b.csv"]],
        "seed": 3,
        "text_col": "s1",
        "text_pair_col": "s2",
        "limit": 50,
        "skip_empty": True,
    }
    ex = ExtractConfig.from_dict(flat)
    ft = FinetuneConfig.from_dict({**flat, "label_col": "y"})
    pt = PretrainConfig.from_dict(flat)
    expected = DataSpec(
        data=None,
        splits=(("train", "a.csv"), ("test", "b.csv")),
        seed=3,
        text_col="s1",
        text_pair_col="s2",
        limit=50,
        skip_empty=True,
    )
    assert ex.source == pt.source == expected
    assert ft.source == DataSpec(**{**expected.__dict__, "label_col": "y"})
    for config, keys in ((ex, flat), (pt, flat)):
        d = config.to_dict()
        assert "source" not in d and "optim" not in d
        assert {k: d[k] for k in keys} == keys  # flat, and JSON-ready (lists, not tuples)
        assert type(config).from_dict(json.loads(json.dumps(d))) == config
    assert set(ex.to_dict()) == FLAT_EXTRACT_KEYS


def test_each_command_takes_only_its_data_and_optimiser_keys():
    with pytest.raises(ConfigError, match=r"Unknown finetune config keys \['quantize'\]"):
        FinetuneConfig.from_dict({"data": "x.csv", "quantize": "int8"})
    with pytest.raises(ConfigError, match=r"Unknown pretrain config keys \['holdout', 'label_col'\]"):
        PretrainConfig.from_dict({"data": "x.csv", "holdout": 0.2, "label_col": "y"})
    with pytest.raises(ConfigError, match="heads pretrain does not take the 'label_col' option"):
        PretrainConfig(source=DataSpec(data="x.csv", label_col="y"))
    with pytest.raises(
        ConfigError,
        match="'schedule' parameter of PretrainConfig must be one of linear, cosine, constant. Got 'exponential'",
    ):
        PretrainConfig.from_dict({"data": "x.csv", "schedule": "exponential"})
    with pytest.raises(ConfigError, match="cannot pass both --data and --split"):
        FinetuneConfig.from_dict({"data": "x.csv", "splits": [["train", "a.csv"]]})
    with pytest.raises(ConfigError, match="No data given"):
        PretrainConfig.from_dict({})


def test_optimiser_fields_keep_each_commands_defaults():
    ft = FinetuneConfig.from_dict({"data": "x.csv", "lr": 1e-3})
    pt = PretrainConfig.from_dict({"data": "x.csv", "lr": 1e-3})
    assert ft.optim.lr == pt.optim.lr == 1e-3
    assert ft.optim.batch_size == FinetuneConfig().optim.batch_size  # one key given, the other defaults kept
    assert pt.optim.batch_size == 32 and pt.optim.warmup_ratio == 0.06
    assert isinstance(ft.optim, OptimConfig) and ft.to_dict()["lr"] == 1e-3
    with pytest.raises(ConfigError, match="'grad_accum' parameter of OptimConfig must be a positive integer. Got 0"):
        OptimConfig(grad_accum=0)


def test_load_reads_what_load_dataset_reads(tiny_csv):
    spec = DataSpec(data=str(tiny_csv), label_col="label", holdout=0.25, seed=4)
    ds = spec.load()
    ref = load_dataset(data=str(tiny_csv), label_col="label", holdout=0.25, seed=4)
    for name in ("train", "test"):
        np.testing.assert_array_equal(ds.splits[name].row_ids, ref.splits[name].row_ids)
    assert ds.sources == ref.sources
    fp = spec.fingerprinted(ds.sources)
    assert fp["data"][0]["sha256"] == ref.sources[0]["sha256"] and fp["data"][0]["holdout"]["seed"] == 4
    assert "path" not in fp["data"][0]  # the content decides, not where the file lies


def test_a_store_keeps_its_config_flat(tiny_csv, tmp_path):
    config = ExtractConfig.from_dict(
        {
            "model": "random:tiny-bert",
            "data": str(tiny_csv),
            "label_col": "label",
            "holdout": 0.25,
            "out": str(tmp_path / "s.zarr"),
        }
    )
    store = open_store(extract(config, show_progress=False).path)
    stored = store.provenance.config
    assert set(stored) == FLAT_EXTRACT_KEYS and stored["label_col"] == "label" and stored["holdout"] == 0.25
    assert ExtractConfig.from_dict(stored) == config
