"""One store contract, run against every backend (zarr and HDF5)."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from factories import LABELS, TEXTS

from embstore import ConfigError, ExtractConfig, LayerSpecError, extract, open_store
from embstore.store import layout as L


def _build(tmp_path_factory, fmt: str) -> str:
    base = tmp_path_factory.mktemp(f"store-{fmt}")
    data = base / "d.csv"
    pd.DataFrame({"text": TEXTS * 3, "label": LABELS * 3}).to_csv(data, index=False)
    cfg = ExtractConfig.from_dict(
        dict(
            model="random:tiny-bert",
            data=str(data),
            label_col="label",
            pooling=("cls", "mean", "max"),
            tokens="0,-1",
            chunk_rows=8,
            format=fmt,
            out=str(base),
            batch_size=5,
        )
    )
    return extract(cfg, show_progress=False).path


class StoreContract:
    """Every backend must pass these; subclasses name their format in ``fmt``."""

    n = 36
    fmt = ""

    @pytest.fixture(scope="class")
    @classmethod
    def store_path(cls, tmp_path_factory):
        path = _build(tmp_path_factory, cls.fmt)
        assert path.endswith(f".{cls.fmt}")
        return path

    @pytest.fixture
    def store(self, store_path):
        with open_store(store_path) as s:
            yield s

    def test_description(self, store):
        assert store.complete
        assert store.splits == ["all"]
        assert store.layers == [0, 1, 2]
        assert store.hidden == 32
        assert store.poolings == ["cls", "mean", "max"]
        assert store.towers == ["text"]
        assert store.token_layers == [0, 2]
        assert store.label_names == ["business", "science", "sport", "world"]
        d = store.describe()
        assert d["splits"]["all"] == {
            "rows": self.n,
            "chunks": 5,
            "chunks_done": 5,
            "tokens": {"text": int(store.n_tokens("all").sum())},
            "truncated": 0,
            "augmented": 0,
        }
        prov = d["provenance"]
        assert prov["model"]["name"] == "random:tiny-bert" and prov["model"]["weights_sha256"]
        assert prov["tokenizer"]["sha256"] and prov["max_length"] == 128 and prov["dtype"] == "float16"
        assert prov["sources"][0]["sha256"] and prov["rows"] == {"all": self.n}
        assert prov["tool"]["embstore"] and d["created"] and d["finished"]

    def test_rows_map_back_to_the_source(self, store):
        rid = store.row_ids("all")
        assert sorted(rid) == list(range(self.n))
        names = store.label_names
        assert [names[i] for i in store.labels("all")] == [(LABELS * 3)[i] for i in rid]
        lengths = store.n_tokens("all")
        assert list(lengths) == sorted(lengths, reverse=True)  # stored longest first

    def test_pooled_shapes_and_selection(self, store):
        full = store.pooled("all", "cls")
        assert full.shape == (self.n, 3, 32) and full.dtype == np.float16
        np.testing.assert_array_equal(store.pooled("all", "cls", "-1")[:, 0], full[:, 2])
        np.testing.assert_array_equal(store.pooled("all", "cls", [0, 2]), full[:, [0, 2]])
        assert np.isfinite(store.pooled("all", "max").astype(np.float32)).all()

    def test_tokens_agree_with_pooling(self, store):
        for layer in (0, 2):
            tok = store.tokens("all", layer)
            assert len(tok) == self.n
            np.testing.assert_array_equal(tok.lengths, store.n_tokens("all"))
            cls = store.pooled("all", "cls", [layer])[:, 0]
            mean = store.pooled("all", "mean", [layer])[:, 0].astype(np.float32)
            mx = store.pooled("all", "max", [layer])[:, 0]
            for i in (0, 17, self.n - 1):
                np.testing.assert_array_equal(tok[i][0], cls[i])
                np.testing.assert_allclose(tok[i].astype(np.float32).mean(0), mean[i], atol=2e-2)
                np.testing.assert_array_equal(tok[i].max(0), mx[i])

    def chunks_read(self, store_path: str, monkeypatch) -> Callable[[str], set[tuple[int, ...]]]:
        """Start recording what the backend reads from disk; returns ``chunks(array path)``, the storage chunks of
        that array read so far (chunk grid coordinates). Each backend says how it sees a read."""
        raise NotImplementedError

    def test_one_layer_reads_only_its_chunks(self, store_path, monkeypatch):
        chunks = self.chunks_read(store_path, monkeypatch)
        with open_store(store_path) as store:
            # 36 rows with at most 8 per chunk: 5 chunks evened out to 8 rows (no mostly-empty last chunk)
            assert store.layout.chunk_shape_pooled("all") == (1, 8, 32)
            assert store.layout.splits["all"].rows(4) == (32, 36)
            last = store.pooled("all", "cls", "-1")
            assert last.shape == (self.n, 1, 32)
            path = L.pooled_path("all", "text", "cls")
            assert chunks(path) == {(2, c, 0) for c in range(5)}  # layer 2's five row chunks, nothing of layers 0-1
            assert chunks(L.pooled_path("all", "text", "mean")) == set()
            first_rows = store.pooled_rows("all", "cls", 0, 8, [0])
            assert first_rows.shape == (8, 1, 32) and chunks(path) == {(2, c, 0) for c in range(5)} | {(0, 0, 0)}

    def test_verify_passes(self, store):
        assert store.verify() == []

    def test_bad_requests_name_the_choices(self, store):
        with pytest.raises(ConfigError, match=r"Split 'train' is not in .* its splits are all"):
            store.pooled("train", "cls")
        with pytest.raises(ConfigError, match=r"Pooling 'sum' .* stores cls, mean, max"):
            store.pooled("all", "sum")
        with pytest.raises(LayerSpecError, match=r"\[0, 2\]"):
            store.pooled("all", "cls", "5")
        with pytest.raises(ConfigError, match=r"Layer 1 has no per-token states .* --tokens 1"):
            store.tokens("all", 1)
        with pytest.raises(ConfigError, match=r"Tower 'b'"):
            store.pooled("all", "cls", tower="b")


class TestZarrStore(StoreContract):
    fmt = "zarr"

    def chunks_read(self, store_path, monkeypatch):
        """zarr keeps each storage chunk in a file of its own, ``<array>/c/<i>/<j>/<k>``: record every file read."""
        import zarr.storage._local as local

        files: list[Path] = []
        real = local._get

        def get(path, *args, **kwargs):
            files.append(Path(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(local, "_get", get)

        def chunks(array: str) -> set[tuple[int, ...]]:
            base = Path(store_path) / array / "c"
            return {tuple(int(p) for p in f.relative_to(base).parts) for f in files if f.is_relative_to(base)}

        return chunks


class TestH5Store(StoreContract):
    fmt = "h5"

    def chunks_read(self, store_path, monkeypatch):
        """HDF5 keeps chunks at byte ranges of one file: the store is opened through a file object that records the
        byte ranges read, and a chunk counts as read when a read starts at its first byte and covers it (h5py's chunk
        index). A read that merely overlaps it is HDF5 reading metadata nearby (its blocks of a few KB can span the
        tiny chunks of this store, at offsets that move with the timestamps in the attributes)."""
        import h5py

        reads: list[tuple[int, int]] = []

        class Recording(io.FileIO):
            def readinto(self, buffer):  # type: ignore[override]
                start = self.tell()
                n = super().readinto(buffer)
                reads.append((start, start + (n or 0)))
                return n

        real = h5py.File

        def open_file(name, mode="r", *args, **kwargs):
            if str(name) == store_path and mode == "r":
                return real(Recording(store_path, "r"), mode, *args, **kwargs)
            return real(name, mode, *args, **kwargs)

        monkeypatch.setattr(h5py, "File", open_file)

        def chunks(array: str) -> set[tuple[int, ...]]:
            with real(store_path, "r") as f:
                ds = f[array]
                infos = [ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks())]
                return {
                    tuple(o // c for o, c in zip(info.chunk_offset, ds.chunks))
                    for info in infos
                    if any(a == info.byte_offset and b >= info.byte_offset + info.size for a, b in reads)
                }

        return chunks


def test_backends_hold_identical_content(tmp_path_factory):
    z, h = open_store(_build(tmp_path_factory, "zarr")), open_store(_build(tmp_path_factory, "h5"))
    assert z.fingerprint == h.fingerprint
    for pooling in z.poolings:
        np.testing.assert_array_equal(z.pooled("all", pooling), h.pooled("all", pooling))
    np.testing.assert_array_equal(z.tokens("all", 2).values, h.tokens("all", 2).values)
    np.testing.assert_array_equal(z.row_ids("all"), h.row_ids("all"))


def test_layout_owns_paths():
    assert L.pooled_path("train", "text", "cls") == "splits/train/text/pooled/cls"
    sl = L.SplitLayout.plan(7600, 2048, {"text": 1})
    assert (sl.n_chunks, sl.chunk_rows) == (4, 1900)
    assert sl.rows(3) == (5700, 7600)
