"""--quantize int8: a store of its own, the deviation from float32 measured and recorded, CPU only."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from click.testing import CliRunner

from cli.embstore_cli import main
from embstore import ConfigError, ExtractConfig, extract, open_store
from embstore.backbones.quantize import relative_deviation
from embstore.extraction import run as extraction


def cfg(data, **kw) -> ExtractConfig:
    return ExtractConfig.from_dict(dict(model="random:tiny-bert", data=str(data), label_col="label", tokens="2", **kw))


def test_int8_is_a_new_store_whose_recorded_deviation_is_the_measured_one(tiny_csv):
    fp32 = open_store(extract(cfg(tiny_csv), show_progress=False).path)
    int8 = open_store(extract(cfg(tiny_csv, quantize="int8"), show_progress=False).path)
    assert int8.path != fp32.path and int8.fingerprint != fp32.fingerprint
    prov = int8.provenance
    assert prov.precision == "int8-dynamic" and fp32.provenance.precision == "float32"
    record = prov.quantization
    assert record is not None
    assert record["mode"] == "int8" and record["split"] == "all" and record["first_batch_rows"] == 12
    deviation = record["mean_relative_l2_deviation_per_row"]
    assert set(deviation) == {"cls", "mean", "tokens"} and set(deviation["cls"]) == {"0", "1", "2"}
    # the 12 rows are one batch: the recorded figures are those of the stored arrays themselves
    for p in ("cls", "mean"):
        a, b = fp32.pooled("all", p), int8.pooled("all", p)
        for k, layer in enumerate(int8.layers):
            assert deviation[p][str(layer)] == pytest.approx(relative_deviation(a[:, k], b[:, k]), rel=1e-6, abs=1e-9)
    assert deviation["tokens"]["2"] == pytest.approx(
        relative_deviation(fp32.tokens("all", 2).values, int8.tokens("all", 2).values), rel=1e-6
    )
    # the embeddings have no Linear layer; the encoder layers do, and their states move
    assert deviation["cls"]["0"] == 0.0 and deviation["mean"]["0"] == 0.0
    assert 0.0 < deviation["mean"]["2"] < 0.5
    np.testing.assert_array_equal(fp32.pooled("all", "mean")[:, 0], int8.pooled("all", "mean")[:, 0])
    assert extract(cfg(tiny_csv, quantize="int8"), show_progress=False).status == "already complete"


def test_a_resumed_int8_store_equals_an_uninterrupted_one(tiny_csv, tmp_path, monkeypatch):
    """A resumed run quantises its freshly loaded model too (without measuring again)."""
    from embstore.store.writer import StoreWriter

    whole = open_store(extract(cfg(tiny_csv, quantize="int8", chunk_rows=4), show_progress=False).path)
    write_chunk = StoreWriter.write_chunk
    calls = []

    def crash_after_one(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return write_chunk(self, *args, **kwargs)

    out = str(tmp_path / "resumed.zarr")
    with monkeypatch.context() as m:
        m.setattr(StoreWriter, "write_chunk", crash_after_one)
        with pytest.raises(KeyboardInterrupt):
            extract(cfg(tiny_csv, quantize="int8", chunk_rows=4, out=out), show_progress=False)
    res = extract(cfg(tiny_csv, quantize="int8", chunk_rows=4, out=out), show_progress=False)
    assert res.status == "resumed"
    resumed = open_store(out)
    assert resumed.provenance.quantization == whole.provenance.quantization
    for p in ("cls", "mean"):
        np.testing.assert_array_equal(resumed.pooled("all", p), whole.pooled("all", p))


def test_int8_is_refused_on_cuda_and_bad_values_are_named(tiny_csv, monkeypatch):
    with pytest.raises(
        ConfigError,
        match=r"--quantize int8 is for CPU extraction .* got --device cuda: pass --device cpu or drop --quantize",
    ):
        cfg(tiny_csv, quantize="int8", device="cuda")
    with pytest.raises(
        ConfigError, match=r"'quantize' parameter of ExtractConfig must be one of none, int8\. Got 'int4'"
    ):
        cfg(tiny_csv, quantize="int4")
    # CUDA picked automatically (no --device) is refused before anything is loaded
    monkeypatch.setattr(extraction, "resolve_device", lambda requested: "cuda")
    monkeypatch.setattr(extraction, "make_plan", lambda *a: pytest.fail("planned an int8 run on CUDA"))
    with pytest.raises(ConfigError, match=r"--quantize int8 is for CPU extraction"):
        extract(cfg(tiny_csv, quantize="int8"), show_progress=False)
    res = CliRunner().invoke(
        main,
        [
            "extract",
            "--model",
            "random:tiny-bert",
            "--data",
            str(tiny_csv),
            "--quantize",
            "int8",
            "--device",
            "cuda:1",
            "-q",
        ],
    )
    assert res.exit_code == 2 and "got --device cuda:1: pass --device cpu" in res.output
    assert len(res.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_predict_on_an_int8_store_encodes_with_int8(tmp_path):
    """heads predict re-encodes new texts as the store was made: with the int8 model, not float32."""
    import pandas as pd
    from factories import synthetic_csv

    from cli.heads_cli import main as heads_main
    from heads.probe.features import FeatureBank
    from heads.probe.predict import load_head, predict_texts
    from heads.probe.specs import Combo

    data = synthetic_csv(tmp_path, 80, max_words=12)
    store = open_store(extract(cfg(data, quantize="int8", holdout=0.25), show_progress=False).path)
    out = tmp_path / "run"
    res = CliRunner().invoke(
        heads_main,
        [
            "sweep",
            "--store",
            store.path,
            "--layers",
            "1-2",
            "--combine",
            "concat",
            "--pooling",
            "mean",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    est = load_head(str(out))
    assert est.card_ is not None and est.card_.precision == "int8-dynamic"
    texts = pd.read_csv(data).text.tolist()
    rid = store.row_ids("test")
    combo = Combo((1, 2), "concat", "mean", "linear")
    stored = est.predict_proba(
        FeatureBank(store, [combo], ["test"], 1 << 30).features(combo, "test", np.arange(len(rid)))
    )
    _, proba = predict_texts(est, [texts[i] for i in rid])
    est.card_ = dataclasses.replace(est.card_, precision="float32")  # what predict did before: the float32 model
    _, proba_fp32 = predict_texts(est, [texts[i] for i in rid])
    err, err_fp32 = np.abs(proba - stored).max(), np.abs(proba_fp32 - stored).max()
    assert err < 1e-3 and err < err_fp32, (err, err_fp32)
