"""Typed metadata: a store's root attribute (StoreMeta, Provenance) and a saved head's HeadCard.

The files in tests/data/v1 were written by an earlier version (commit 5bc779d, see its README): they must still open,
describe themselves as that version did, and predict as that version did.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli.embstore_cli import main as embstore_main
from cli.heads_cli import main as heads_main
from embstore import ExtractConfig, extract, open_store
from embstore.errors import ConfigError, StoreDamagedError, StoreMismatchError
from embstore.store import layout as L
from heads.probe.card import HeadCard
from heads.probe.estimator import HeadClassifier
from heads.probe.features import FeatureBank
from heads.probe.predict import head_card, load_head, predict_texts
from heads.probe.sweep import SweepConfig, run_sweep

OLD = Path(__file__).resolve().parent / "data" / "v1"


@pytest.fixture
def old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch copy of tests/data/v1 as the current directory, the store under the name it was written as."""
    shutil.copytree(OLD / "store.zarr", tmp_path / "store-v1.zarr")
    shutil.copytree(OLD / "best_head", tmp_path / "best_head")
    shutil.copy(OLD / "news.csv", tmp_path / "news.csv")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _raw(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_text())["attributes"][L.ATTR_KEY]


def test_a_store_written_before_typed_metadata_opens_and_describes_itself_as_before(old: Path):
    raw = _raw(old / "store-v1.zarr")
    meta = L.StoreMeta.from_dict(raw)
    assert meta.to_dict() == raw and list(meta.to_dict()) == list(raw)  # read back exactly, key order included
    assert meta.other == {} and meta.provenance.other == {}
    with open_store("store-v1.zarr") as store:
        assert store.meta == meta and store.complete and store.label_names == ["business", "sport"]
        prov = store.provenance
        assert (
            prov.model_name == "random:tiny-bert"
            and prov.precision == "float32"
            and prov.rows == {"train": 30, "test": 10}
        )
        assert prov.sources[0]["sha256"] == hashlib.sha256((old / "news.csv").read_bytes()).hexdigest()
        assert store.pooled("test", "mean", [1, 2]).shape == (10, 2, 32)
    runner = CliRunner()
    info = runner.invoke(embstore_main, ["info", "store-v1.zarr", "--json"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout) == json.loads((OLD / "info.json").read_text())
    text = runner.invoke(embstore_main, ["info", "store-v1.zarr"])
    assert text.stdout == (OLD / "info.txt").read_text()
    verify = runner.invoke(embstore_main, ["verify", "store-v1.zarr"])
    assert verify.exit_code == 0 and "ok (2 row chunks verified)" in verify.stdout
    # the same extraction finds it complete from its metadata alone (no model load)
    again = runner.invoke(
        embstore_main,
        "extract --model random:tiny-bert -q --data news.csv --label-col label --holdout 0.25 --layers all "
        "--pooling cls,mean --out store-v1.zarr".split(),
    )
    assert again.exit_code == 0 and "already complete" in again.stderr and again.stdout.strip() == "store-v1.zarr"


def test_a_head_saved_before_the_card_loads_and_predicts_as_before(old: Path):
    est = load_head(head_dir="best_head")
    card = head_card(est)
    assert card == HeadClassifier.read_card("best_head")
    assert (card.layers, card.combine, card.pooling, card.head) == ((1, 2), "concat", "mean", "linear")
    assert card.label_names == ("business", "sport") and card.towers == ("text",) and card.modality == "text"
    saved = json.loads((old / "best_head" / "head.json").read_text())["extra"]
    assert card.to_dict() == saved and list(card.to_dict()) == list(saved)
    texts = (OLD / "predict_in.txt").read_text().splitlines()
    before = [json.loads(line) for line in (OLD / "predict_out.jsonl").read_text().splitlines()]
    labels, proba = predict_texts(est, texts)
    assert labels == [b["label"] for b in before]
    np.testing.assert_allclose(proba, [[b["probabilities"][n] for n in card.label_names] for b in before], atol=1e-4)
    with open_store("store-v1.zarr") as store:  # and as the head scores the store's own rows
        order = np.argsort(store.row_ids("test"))  # predict_in.txt holds the test rows by source row
        stored = est.predict_proba(
            FeatureBank(store, [card.combo], ["test"], 1 << 30).features(card.combo, "test", order)
        )
    np.testing.assert_allclose(proba, stored, atol=2e-3)
    res = CliRunner().invoke(heads_main, ["predict", "--head-dir", "best_head", str(OLD / "predict_in.txt")])
    assert res.exit_code == 0, res.output
    assert [json.loads(line)["label"] for line in res.stdout.splitlines()] == labels


def test_a_sweep_today_writes_the_card_an_old_sweep_wrote(old: Path):
    run = run_sweep(
        SweepConfig(store="store-v1.zarr", layers="1-2", combine=("concat",), pooling=("mean",), out="run"),
        show_progress=False,
    )
    new = json.loads((run.run_dir / "best_head" / "head.json").read_text())
    saved = json.loads((old / "best_head" / "head.json").read_text())
    assert new["extra"] == saved["extra"] and list(new["extra"]) == list(saved["extra"])
    assert set(new) == set(saved)  # head.json itself: the same keys


def test_a_new_store_reads_back_exactly_what_was_written(tiny_csv: Path, tmp_path: Path):
    path = extract(
        ExtractConfig.from_dict(
            {"model": "random:tiny-bert", "data": str(tiny_csv), "label_col": "label", "out": str(tmp_path / "s.zarr")}
        ),
        show_progress=False,
    ).path
    raw = _raw(Path(path))
    with open_store(path) as store:
        assert store.meta.to_dict() == raw and store.meta.complete and store.meta.finished
        assert store.meta.provenance.config["label_col"] == "label"
        assert ExtractConfig.from_dict(store.provenance.config).source.label_col == "label"
        assert "augmented" not in raw and "sampling_rate" not in raw and "quantization" not in raw["provenance"]


def test_keys_this_version_does_not_know_are_kept(tmp_path: Path):
    raw = _raw(OLD / "store.zarr")
    later = {**raw, "written_by_later": [1, 2], "provenance": {**raw["provenance"], "new_fact": "x"}}
    meta = L.StoreMeta.from_dict(later)
    assert meta.other == {"written_by_later": [1, 2]} and meta.provenance.other == {"new_fact": "x"}
    assert meta.to_dict() == later
    assert meta.completed("2030-01-01T00:00:00+00:00").to_dict()["written_by_later"] == [1, 2]
    # keys an older version did not write read as "not recorded"
    sparse = L.StoreMeta.from_dict({k: raw[k] for k in ("schema_version", "fingerprint", "layout")})
    assert sparse.modality == "text" and sparse.label_names is None and not sparse.complete
    assert sparse.provenance.model_name is None and sparse.provenance.sources == ()


def test_another_schema_version_or_a_damaged_attribute_is_refused(tmp_path: Path):
    raw = _raw(OLD / "store.zarr")
    with pytest.raises(StoreMismatchError, match="has store schema version 3, this embstore reads versions 1, 2"):
        L.StoreMeta.from_dict({**raw, "schema_version": 3})
    with pytest.raises(StoreDamagedError, match="has no 'fingerprint' in its 'embstore' attribute"):
        L.StoreMeta.from_dict({k: v for k, v in raw.items() if k != "fingerprint"})
    store = tmp_path / "future.zarr"
    shutil.copytree(OLD / "store.zarr", store)
    doc = json.loads((store / "zarr.json").read_text())
    doc["attributes"][L.ATTR_KEY]["schema_version"] = 3
    (store / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(StoreMismatchError, match=r"future\.zarr has store schema version 3.*re-extract it"):
        open_store(store)


def test_a_card_needs_its_features_and_backbone(tmp_path: Path):
    saved = json.loads((OLD / "best_head" / "head.json").read_text())["extra"]
    with pytest.raises(ConfigError, match="The head card lacks model, which a head needs"):
        HeadCard.from_dict({k: v for k, v in saved.items() if k != "model"})
    assert HeadCard.from_saved({"note": "mine"}) is None and HeadCard.from_saved({}) is None
    older = HeadCard.from_dict({k: saved[k] for k in ("layers", "combine", "pooling", "head", "model")})
    assert older.towers == ("text",) and older.dtype == "float16" and older.label_names is None
    est = load_head(head_dir=str(OLD / "best_head"))
    est.save(tmp_path / "bare")  # HeadClassifier.save outside a sweep: no card
    assert HeadClassifier.load(tmp_path / "bare").card_ is None
    with pytest.raises(ConfigError, match="saved without its store's description"):
        load_head(head_dir=str(tmp_path / "bare"))
