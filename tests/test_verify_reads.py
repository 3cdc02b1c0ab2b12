"""Reads check what they read: a flipped byte stops a read (and a sweep) with one line naming where."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli.heads_cli import main as heads_main
from embstore import ExtractConfig, StoreCorruptedError, extract, open_store


def _store(tiny_csv: Path, **kw) -> Path:
    cfg = ExtractConfig.from_dict(
        dict(model="random:tiny-bert", data=str(tiny_csv), label_col="label", chunk_rows=4, **kw)
    )
    return Path(extract(cfg, show_progress=False).path)


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[7] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_flipped_byte_stops_the_read_naming_split_chunk_array_and_layer(tiny_csv):
    path = _store(tiny_csv)
    clean = open_store(path).pooled("all", "mean")
    _flip(path / "splits/all/text/pooled/mean/c/1/2/0")  # layer 1, row chunk 2
    store = open_store(path)
    store.pooled("all", "cls")  # other arrays still read
    store.pooled("all", "mean", layers=[0, 2])  # and so do the other layers of the same array
    with pytest.raises(
        StoreCorruptedError,
        match=r"split all, row chunk 2, splits/all/text/pooled/mean layer 1 does not match .*embstore verify "
        r".*--no-verify",
    ):
        store.pooled("all", "mean")
    unchecked = open_store(path, verify=False).pooled("all", "mean")
    assert not np.array_equal(unchecked, clean) and np.array_equal(unchecked[:, [0, 2]], clean[:, [0, 2]])


def test_token_states_are_verified_too(tiny_csv):
    path = _store(tiny_csv, tokens="-1")
    _flip(path / "splits/all/text/tokens/2/c000001/c/0/0")
    with pytest.raises(StoreCorruptedError, match=r"row chunk 1, splits/all/text/tokens/2/c000001 layer 2"):
        open_store(path).tokens("all", 2)
    assert open_store(path, verify=False).tokens("all", 2).values.shape[1] == 32


def test_a_sweep_on_a_corrupted_store_stops_with_one_line(tmp_path):
    from factories import synthetic_csv

    path = _store(synthetic_csv(tmp_path, 60), holdout=0.5)
    _flip(path / "splits/train/text/pooled/cls/c/0/0/0")
    res = CliRunner().invoke(heads_main, ["sweep", "--store", str(path), "--out", str(tmp_path / "run")])
    assert res.exit_code == 2
    assert (
        res.stderr.count("\n") == 1 and "does not match the checksum" in res.stderr and "embstore verify" in res.stderr
    )
    assert not (tmp_path / "run" / "summary.md").exists()
    res = CliRunner().invoke(
        heads_main, ["sweep", "--store", str(path), "--no-verify", "--out", str(tmp_path / "run2")]
    )
    assert res.exit_code == 0, res.output  # read anyway, as asked
    assert (tmp_path / "run2" / "summary.md").exists()


def test_an_hdf5_store_with_a_changed_value_stops_the_read(tiny_csv):
    """The same check on an HDF5 store: one stored value changed in place (h5py, not the file's bytes blindly)."""
    import h5py

    path = _store(tiny_csv, format="h5")
    clean = open_store(path).pooled("all", "mean")
    with h5py.File(path, "r+") as f:
        ds = f["splits/all/text/pooled/mean"]  # (layers, rows, hidden); row chunk 1 is rows 4-7
        ds[1, 5, 3] = ds[1, 5, 3] + 1.0
    store = open_store(path)
    store.pooled("all", "mean", layers=[0, 2])  # the other layers read as before
    with pytest.raises(
        StoreCorruptedError, match=r"split all, row chunk 1, splits/all/text/pooled/mean layer 1 does not match"
    ):
        store.pooled("all", "mean")
    assert open_store(path).verify() != []
    unchecked = open_store(path, verify=False).pooled("all", "mean")
    assert not np.array_equal(unchecked, clean) and np.array_equal(unchecked[:, [0, 2]], clean[:, [0, 2]])


def test_a_chunk_verified_once_is_not_hashed_again(tiny_csv, monkeypatch):
    """A reader hashes each row chunk of a layer once: a sweep reading a layer for several configuration groups, or
    streaming it on every pass, pays for the check once. A corrupted chunk is still caught on its first read."""
    import embstore.store.digests as digests

    path = _store(tiny_csv)
    hashed: list[tuple[str, int]] = []
    real = digests.entry_digest

    def counting(name, layer, data):
        hashed.append((name, layer))
        return real(name, layer, data)

    monkeypatch.setattr(digests, "entry_digest", counting)
    store = open_store(path)
    first = store.pooled("all", "mean", layers=[1])
    n_chunks = store.layout.splits["all"].n_chunks
    assert len(hashed) == n_chunks  # layer 1's chunks, once each
    for start, stop in (store.layout.splits["all"].rows(c) for c in range(n_chunks)):
        store.pooled_rows("all", "mean", start, stop, [1])  # streamed chunk by chunk: already verified
    assert np.array_equal(store.pooled("all", "mean", layers=[1]), first)
    assert len(hashed) == n_chunks
    store.pooled("all", "mean", layers=[2])
    assert len(hashed) == 2 * n_chunks  # another layer is checked on its first read
    _flip(path / "splits/all/text/pooled/mean/c/0/1/0")
    with pytest.raises(StoreCorruptedError, match="layer 0"):
        open_store(path).pooled("all", "mean", layers=[0])
