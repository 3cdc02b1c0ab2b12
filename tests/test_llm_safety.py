"""Decoder LLMs, continued: no non-finite value is ever stored silently (and old stores holding them are reported and
refused), a device map with offloaded blocks writes the same store as the plain load, the GPU groups of
``--gpus-per-rank``, and a probe finding a signal that only the last token carries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from factories import TEXTS, synthetic_csv

from cli.embstore_cli import main
from cli.heads_cli import main as heads_main
from embstore import ConfigError, ExtractConfig, StoreIncompleteError, extract, open_store
from embstore.backbones.registry import load_backbone
from embstore.device import parse_device_memory, rank_device_memory, rank_gpus
from embstore.errors import NonFiniteValuesError
from embstore.extraction.plan import rank_device


@pytest.fixture
def texts_csv(tmp_path: Path) -> Path:
    path = tmp_path / "texts.csv"
    pd.DataFrame({"text": TEXTS, "label": [i % 2 for i in range(len(TEXTS))]}).to_csv(path, index=False)
    return path


def _saved(tmp_path: Path, name: str, edit=None) -> Path:
    """A random decoder saved as a model directory, after ``edit(model)``."""
    bb = load_backbone(f"random:{name}")
    if edit is not None:
        with torch.no_grad():
            edit(bb.model)
    out = tmp_path / f"{name}-dir"
    bb.model.save_pretrained(out)
    bb.tokenizer.save_pretrained(out)
    return out


def _huge(model) -> None:
    """GPT-2 whose embeddings (layer 0) reach about 1e6, beyond float16's 65504."""
    model.wte.weight.mul_(1e7)


def test_a_value_beyond_float16_stops_the_extraction_and_leaves_nothing_complete(tmp_path, texts_csv):
    model = _saved(tmp_path, "tiny-gpt2", _huge)
    out = tmp_path / "s.zarr"
    cfg = dict(model=str(model), data=str(texts_csv), out=str(out), pooling=("last", "mean", "max"), batch_size=4)
    with pytest.raises(
        NonFiniteValuesError,
        match=r"^Split 'all', layer 0, pooling last: a value of \|x\| = [0-9.e+]+ does not fit the storage dtype "
        r"float16 \(largest 65504\), so it would be stored as inf; .* pass --dtype float32\.$",
    ):
        extract(ExtractConfig.from_dict(cfg), show_progress=False)
    with pytest.raises(StoreIncompleteError):
        open_store(out)
    assert not open_store(out, allow_incomplete=True).done_chunks("all").any()
    args = ["extract", "--model", str(model), "--data", str(texts_csv), "--out", str(tmp_path / "cli.zarr"), "-q"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and res.output.count("error: Split 'all', layer 0") == 1
    store = open_store(
        extract(
            ExtractConfig.from_dict({**cfg, "dtype": "float32", "out": str(tmp_path / "f.zarr")}), show_progress=False
        ).path
    )
    assert np.isfinite(store.pooled("all", "max")).all() and np.abs(store.pooled("all", "max")).max() > 65504


def test_inf_or_nan_from_the_model_is_named_with_its_fix(tmp_path, texts_csv):
    model = _saved(tmp_path, "tiny-llama", lambda m: m.layers[1].mlp.down_proj.weight.fill_(float("nan")))
    with pytest.raises(
        NonFiniteValuesError, match=r"layer 2, pooling last: the model produced inf or NaN \(computing in float32\)"
    ):
        extract(
            ExtractConfig.from_dict(dict(model=str(model), data=str(texts_csv), out=str(tmp_path / "n.zarr"))),
            show_progress=False,
        )
    # layers below the broken block are fine: the forward stops before it
    ok = extract(
        ExtractConfig.from_dict(
            dict(model=str(model), data=str(texts_csv), layers="0-1", out=str(tmp_path / "ok.zarr"))
        ),
        show_progress=False,
    )
    assert np.isfinite(open_store(ok.path).pooled("all", "mean")).all()


def test_old_stores_with_inf_are_reported_by_verify_and_refused_by_the_sweep(tmp_path, monkeypatch):
    """A store as an embstore from before the check wrote it: inf stored silently."""
    from embstore.extraction import forward

    model = _saved(tmp_path, "tiny-gpt2", _huge)
    data = synthetic_csv(tmp_path, 60, max_words=8)
    monkeypatch.setattr(forward.Launched, "bad", lambda self, *a: None)  # the old extractor: no check
    path = extract(
        ExtractConfig.from_dict(dict(model=str(model), data=str(data), label_col="label", holdout=0.3)),
        show_progress=False,
    ).path
    monkeypatch.undo()
    store = open_store(path)
    assert not np.isfinite(store.pooled("train", "last")).all()
    problems = store.verify()
    assert problems and all("non-finite values (inf or NaN)" in p and "--dtype float32" in p for p in problems)
    assert any("pooled/last layer 0" in p for p in problems)
    res = CliRunner().invoke(main, ["verify", path])
    assert res.exit_code == 1 and "FAIL split" in res.output
    sweep = CliRunner().invoke(heads_main, ["sweep", "--store", path, "--layers", "0", "--out", str(tmp_path / "run")])
    assert sweep.exit_code == 2, sweep.output
    assert "holds inf or NaN in split 'train', layer 0, pooling last" in sweep.output
    assert "re-extract it with --dtype float32" in sweep.output


@pytest.mark.parametrize(
    "name, how, device_map, budget",
    [
        ("tiny-llama", how, device_map, budget)
        for how in ("directory", "random")
        for device_map, budget in (("sequential", "cpu=150KB"), ("auto", "cpu=120KB"))
    ]
    + [(name, "random", "sequential", "cpu=150KB") for name in ("tiny-gpt2", "tiny-qwen2", "tiny-neox")],
)
def test_a_device_map_with_blocks_offloaded_to_disk_writes_the_same_store(
    tmp_path, texts_csv, name, how, device_map, budget
):
    model = str(_saved(tmp_path, name)) if how == "directory" else f"random:{name}"
    kw = dict(
        model=model, data=str(texts_csv), pooling=("last", "mean", "max"), tokens="1", dtype="float32", batch_size=5
    )
    plain = open_store(
        extract(ExtractConfig.from_dict({**kw, "out": str(tmp_path / "plain.zarr")}), show_progress=False).path
    )
    mapped = open_store(
        extract(
            ExtractConfig.from_dict(
                {
                    **kw,
                    "device_map": device_map,
                    "max_device_memory": budget,
                    "offload_dir": str(tmp_path / "off"),
                    "out": str(tmp_path / "mapped.zarr"),
                }
            ),
            show_progress=False,
        ).path
    )
    placed = mapped.provenance.model["device_map"]
    assert "disk" in placed.values() and "cpu" in placed.values(), placed  # some blocks run from disk
    assert mapped.fingerprint == plain.fingerprint  # where the weights sit changes no value
    for p in ("last", "mean", "max"):
        np.testing.assert_array_equal(mapped.pooled("all", p), plain.pooled("all", p))
    np.testing.assert_array_equal(mapped.tokens("all", 1).values, plain.tokens("all", 1).values)  # stopped after 1


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(offload_dir="x"), "--offload-dir places a device map: pass --device-map"),
        (dict(gpus_per_rank=2), "--gpus-per-rank places a device map"),
        (dict(device_map="auto", max_device_memory="0=20"), r"entry '0=20' must be GPU=SIZE"),
        (dict(device_map="auto", num_processes=2), "drop --num-processes"),
        (dict(quantize="int8", compute_dtype="bfloat16"), "drop --compute-dtype bfloat16"),
    ],
)
def test_placement_options_that_do_not_fit_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        ExtractConfig.from_dict(dict(model="random:tiny-llama", **kw))


def test_gpus_per_rank_gives_each_rank_its_own_group(monkeypatch):
    """No GPU here: the groups and budgets a rank maps its model over, as computed for 8 GPUs."""
    assert rank_gpus(0, 4, 8) == [0, 1, 2, 3] and rank_gpus(1, 4, 8) == [4, 5, 6, 7]
    assert rank_gpus(3, 2, 8) == [6, 7]
    with pytest.raises(ConfigError, match="gives local rank 2 GPUs 8-11, but only 8 are visible"):
        rank_gpus(2, 4, 8)
    totals = {g: 80 << 30 for g in range(8)}
    budgets = parse_device_memory("0=20GiB,1=30GiB,cpu=64GiB")
    assert budgets == {0: 20 << 30, 1: 30 << 30, "cpu": 64 << 30}
    # bytes, whatever the case: accelerate would read '20gb' as gigabits and knows no 'B' or 'TB'
    assert parse_device_memory("0=20gb,cpu=1.5TB,1=512B") == {0: 20 * 10**9, "cpu": 15 * 10**11, 1: 512}
    # positions in the group: the rank's first GPU gets 20GiB, its second 30GiB, the rest their totals; no other GPU
    assert rank_device_memory([4, 5, 6, 7], budgets, totals) == {
        4: 20 << 30,
        5: 30 << 30,
        6: 80 << 30,
        7: 80 << 30,
        "cpu": 64 << 30,
    }
    config = ExtractConfig(model="random:tiny-llama", device_map="auto", gpus_per_rank=4)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device(config, "cuda", world=2) == "cuda:4"
    assert rank_device(ExtractConfig(), "cuda", world=2) == "cuda:1"
    assert rank_device(config, "cpu", world=2) == "cpu"


POSITIVE = ["good", "great", "wonderful"]
NEGATIVE = ["bad", "awful", "boring"]
FILLER = "the a model layer store token chunk probe head sweep vector news sport film movie review".split()


def _last_word_csv(path: Path, n: int = 160, seed: int = 0) -> Path:
    """Random filler words, then one word that alone decides the label."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = list(rng.choice(FILLER, size=rng.integers(3, 9))) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rows.append({"text": " ".join(words), "label": "pos" if label else "neg"})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.mark.slow
def test_a_sweep_finds_the_last_word_with_last_where_position_0_cannot(tmp_path):
    data = _last_word_csv(tmp_path / "last.csv")
    store = extract(
        ExtractConfig.from_dict(
            dict(
                model="random:tiny-llama",
                data=str(data),
                label_col="label",
                holdout=0.25,
                tokens="0-3",
                out=str(tmp_path),
            )
        ),
        show_progress=False,
    ).path
    res = CliRunner().invoke(
        heads_main,
        [
            "sweep",
            "--store",
            store,
            "--layers",
            "all",
            "--pooling",
            "last",
            "--head",
            "linear",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert res.exit_code == 0, res.output
    df = pd.read_csv(tmp_path / "run" / "results.csv")
    assert df.f1_macro.max() >= 0.95, df[["layers", "f1_macro"]]
    # position 0 (what cls would read) is the BOS token in every row: one vector, so no probe can beat chance
    s = open_store(store)
    for layer in range(4):
        tok = s.tokens("train", layer)
        first = tok.values[tok.offsets[:-1]]
        assert np.ptp(first.astype(np.float32), axis=0).max() == 0, layer
    assert (
        "text: the text alone (no template); mean and max over the text tokens"
        in (tmp_path / "run" / "summary.md").read_text()
    )
