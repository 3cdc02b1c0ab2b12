"""Speech backbones: audio reading and resampling, the audio store, groups, augmentation, bad input.

Synthetic tones (factories.pitch_clips): the tests that only read them and their stores share the session's
``pitch_table`` and ``shared_store`` (each distinct store extracted once); a test that edits the table, interrupts
or times an extraction writes its own (``tones``). A few real Emo-DB files are used when ../shared is present.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from click.testing import CliRunner
from factories import (
    assert_same_store,
    needs_shared,
    pitch_clips,
    random_model_dir,
    recorded_calls,
    recording_env,
    tone,
)

from cli.embstore_cli import main as embstore_main
from cli.heads_cli import main as heads_main
from embstore.backbones.registry import load_backbone
from embstore.config import ExtractConfig
from embstore.data.audio import load_waveform, probe_files, rational, read_audio, resample, resampled_length
from embstore.data.augment import AugmentParams, AugmentSpec, apply, choose_sources, draw_params
from embstore.errors import ConfigError, DataError
from embstore.extraction.run import extract
from embstore.store.reader import open_store
from heads.probe.sweep import SweepConfig, run_sweep
from heads.protocol import split_roles

HUBERT = "random:hubert-tiny"


def peak_hz(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spec)])


@pytest.fixture
def tones(tmp_path: Path) -> Path:
    """The 24 recordings of factories.pitch_clips, this test's own copy (it may edit the table or write beside it);
    a test that only reads them takes the session's ``pitch_table``."""
    return pitch_clips(tmp_path)


def cfg(data: Path, tmp_path: Path, **kw) -> ExtractConfig:
    base = dict(
        model=HUBERT, data=str(data), audio_col="file", label_col="label", dtype="float32", out=str(tmp_path / "stores")
    )
    base.update(kw)
    return ExtractConfig.from_dict(dict(**base))


# -- reading and resampling --------------------------------------------------------------------


def test_resampling_keeps_frequency_and_length(tmp_path: Path):
    x = tone(440.0, 1.0, 22050)
    up, down = rational(16000 / 22050)
    assert (up, down) == (320, 441)
    y = resample(x, up, down)
    assert len(y) == resampled_length(len(x), up, down) == 16000
    assert abs(peak_hz(y, 16000) - 440.0) < 2.0
    # a tone above the new Nyquist is filtered out, not aliased down into the band
    high = resample(tone(10000.0, 1.0, 22050), up, down)
    assert np.sqrt(np.mean(high**2)) < 0.01 * np.sqrt(np.mean(x**2))
    sf.write(tmp_path / "t.wav", x, 22050)
    w = load_waveform(tmp_path / "t.wav", 16000, max_samples=8000)
    assert w.dtype == np.float32 and len(w) == 8000


def test_stereo_is_mixed_to_mono(tmp_path: Path):
    x = tone(300.0, 0.2, 16000)
    sf.write(tmp_path / "st.wav", np.stack([x, np.zeros_like(x)], axis=1), 16000)
    mono, rate = read_audio(tmp_path / "st.wav")
    assert rate == 16000 and mono.ndim == 1
    np.testing.assert_allclose(mono, x / 2, atol=1e-4)


def test_probe_reports_missing_unreadable_and_empty(tmp_path: Path):
    sf.write(tmp_path / "ok.wav", tone(300, 0.1, 16000), 16000)
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    (tmp_path / "junk.wav").write_text("not audio")
    info = probe_files([str(tmp_path / n) for n in ("ok.wav", "missing.wav", "junk.wav", "empty.wav")])
    assert info.frames[0] == 1600 and info.rates[0] == 16000
    reasons = dict(info.bad)
    assert set(reasons) == {1, 2, 3}
    assert "no such file" in reasons[1] and "unreadable" in reasons[2] and "zero-length" in reasons[3]


# -- augmentation ------------------------------------------------------------------------------


def test_augment_transforms():
    x = tone(500.0, 1.0, 16000)
    p = AugmentParams(source=0, copy=1, speed=float("nan"), shift_fraction=float("nan"), snr_db=10.0, noise_seed=7)
    y = apply(x, p, None)
    snr = 10 * np.log10(np.mean(x.astype(np.float64) ** 2) / np.mean((y - x).astype(np.float64) ** 2))
    assert abs(snr - 10.0) < 0.3
    np.testing.assert_array_equal(y, apply(x, p, None))  # seeded
    fast = apply(x, AugmentParams(0, 1, 1.25, float("nan"), float("nan"), 0), None)
    assert len(fast) == 12800  # 1.25x faster: 4/5 of the samples, so 500 Hz plays at 625 Hz
    assert abs(peak_hz(fast, 16000) - 625.0) < 3.0
    shifted = apply(x, AugmentParams(0, 1, float("nan"), 0.25, float("nan"), 0), None)
    np.testing.assert_array_equal(shifted, np.roll(x, 4000))


def test_choose_sources_and_params():
    labels = np.array([0, 0, 0, 0, 1, 2, 2])
    names = ["big", "rare", "mid"]
    assert choose_sources(labels, names, "minority").tolist() == [4, 5, 6]  # below the mean class size 7/3
    assert choose_sources(labels, names, "all").tolist() == list(range(7))
    assert choose_sources(labels, names, "rare").tolist() == [4]
    with pytest.raises(ConfigError, match="'nope', not among the labels"):
        choose_sources(labels, names, "nope")
    spec = AugmentSpec(transforms=("noise", "speed"), copies=2, seed=3)
    params = draw_params(spec, np.array([4, 5]), np.arange(7) + 100)
    assert [(p.source, p.copy) for p in params] == [(4, 1), (4, 2), (5, 1), (5, 2)]
    assert all(0.9 <= p.speed <= 1.1 and np.isnan(p.shift_fraction) and p.snr_db == 20.0 for p in params)
    again = draw_params(spec, np.array([4, 5]), np.arange(7) + 100)
    assert [repr(p) for p in params] == [repr(p) for p in again]  # deterministic (repr: NaN != NaN)
    assert len({p.noise_seed for p in params}) == 4
    with pytest.raises(ConfigError, match="'transforms' .* must be a comma list of noise, shift, speed, pitch. Got"):
        AugmentSpec(transforms=("echo",))


# -- extraction ---------------------------------------------------------------------------------


def test_audio_store_shapes_and_values(pitch_table: Path, shared_store, tmp_path: Path):
    res = shared_store(cfg(pitch_table, tmp_path, tokens="2", batch_size=4))
    bb = load_backbone(HUBERT)
    with open_store(res.path) as s:
        assert s.modality == "audio" and s.towers == ["audio"] and s.poolings == ["mean", "max"]
        assert s.layers == [0, 1, 2] and s.hidden == 32
        n = s.n_rows("all")
        assert n == 24 and s.pooled("all", "mean").shape == (24, 3, 32)
        dur = s.durations("all")
        rows = s.row_ids("all")
        expected = np.array([0.3 + 0.05 * (i % 5) for i in rows])
        np.testing.assert_allclose(dur, expected, atol=1e-3)  # every rate resampled to 16 kHz
        frames = s.n_tokens("all")
        np.testing.assert_array_equal(frames, bb.frames(np.round(expected * 16000).astype(int)))
        tok = s.tokens("all", 2)
        np.testing.assert_array_equal(tok.lengths, frames)
        # the stored mean and max of one row equal the model run on that row alone
        import torch

        i = 3
        wav = load_waveform(pitch_table.parent / f"audio/r{rows[i]:02d}.wav", 16000)
        x = bb.tokenizer(wav, sampling_rate=16000, return_tensors="pt")["input_values"]
        with torch.inference_mode():
            hs = bb.model(input_values=x, output_hidden_states=True).hidden_states
        for k in range(3):
            np.testing.assert_allclose(s.pooled("all", "mean")[i, k], hs[k][0].mean(0).numpy(), atol=1e-4)
            np.testing.assert_allclose(s.pooled("all", "max")[i, k], hs[k][0].amax(0).numpy(), atol=1e-4)
        np.testing.assert_allclose(tok[i], hs[2][0].numpy(), atol=1e-4)
        assert s.provenance.sources[0]["audio_files"] == 24
        assert s.meta.sampling_rate == 16000


def test_bucketing_changes_order_not_values(pitch_table: Path, shared_store, tmp_path: Path):
    a = shared_store(cfg(pitch_table, tmp_path)).path
    b = shared_store(cfg(pitch_table, tmp_path, bucket=False, batch_size=5)).path
    assert a != b
    with open_store(a) as sa, open_store(b) as sb:
        assert sb.row_ids("all").tolist() == list(range(24))
        assert np.all(np.diff(sa.durations("all")) <= 1e-6)  # longest first
        ia, ib = np.argsort(sa.row_ids("all")), np.argsort(sb.row_ids("all"))
        np.testing.assert_allclose(sa.pooled("all", "mean")[ia], sb.pooled("all", "mean")[ib], atol=1e-4)


def test_max_seconds_crops(pitch_table: Path, shared_store, tmp_path: Path):
    res = shared_store(cfg(pitch_table, tmp_path, max_seconds=0.35))
    with open_store(res.path) as s:
        assert float(s.durations("all").max()) == pytest.approx(0.35)
        cropped = s._b.read("splits/all/audio/truncated")
        assert int(cropped.sum()) == res.truncated["all"] == sum(1 for i in range(24) if 0.3 + 0.05 * (i % 5) > 0.35)


def test_group_holdout_is_speaker_disjoint(pitch_table: Path, shared_store, tmp_path: Path):
    res = shared_store(cfg(pitch_table, tmp_path, group_col="speaker", holdout=0.34))
    with open_store(res.path) as s:
        names = s.group_names
        assert names == [f"s{i}" for i in range(6)]
        train, test = set(s.groups("train").tolist()), set(s.groups("test").tolist())
        assert train and test and not train & test and len(train | test) == 6
        # each row's stored group is its speaker in the table
        table = pd.read_csv(pitch_table)
        for split in ("train", "test"):
            assert [names[g] for g in s.groups(split)] == table.speaker[s.row_ids(split)].tolist()


def test_augmented_rows_only_in_train(pitch_table: Path, shared_store, tmp_path: Path):
    res = shared_store(
        cfg(
            pitch_table,
            tmp_path,
            group_col="speaker",
            holdout=0.34,
            augment=("noise", "shift", "speed"),
            copies=2,
            augment_classes="all",
        ),
    )
    with open_store(res.path) as s:
        assert s.augmentation("test") is None and not s.augmented("test").any()
        aug = s.augmentation("train")
        copies = aug["copy"]
        originals = s.row_ids("train")[copies == 0]
        assert (copies > 0).sum() == 2 * len(originals) == (s.meta.augmented or {})["train"]
        # every copy points at a training original, keeps its label and group, and records its transform
        lab, grp = s.labels("train"), s.groups("train")
        by_row = {int(r): (int(lab[i]), int(grp[i])) for i, r in enumerate(s.row_ids("train")) if copies[i] == 0}
        for i in np.flatnonzero(copies > 0):
            assert by_row[int(s.row_ids("train")[i])] == (int(lab[i]), int(grp[i]))
        assert np.all(np.isfinite(aug["speed"][copies > 0])) and np.all(np.isnan(aug["speed"][copies == 0]))
        assert np.all(aug["snr_db"][copies > 0] == 20.0)
        assert not set(s.row_ids("test").tolist()) & set(originals.tolist())
        # copies differ from their source
        pooled = s.pooled("train", "mean", [2])[:, 0]
        first_copy = np.flatnonzero(copies == 1)[0]
        src = np.flatnonzero((copies == 0) & (s.row_ids("train") == s.row_ids("train")[first_copy]))[0]
        assert not np.allclose(pooled[first_copy], pooled[src])


def _planned(monkeypatch) -> list:
    """The RoundRows (fit, validation and evaluation rows of every round) the sweeps run from now on make."""
    import heads.probe.sweep as sweep_module

    plans: list = []
    real = sweep_module.plan_rounds

    def plan_rounds(*args, **kwargs):
        made = real(*args, **kwargs)
        plans.extend(made)
        return made

    monkeypatch.setattr(sweep_module, "plan_rounds", plan_rounds)
    return plans


def test_sweep_on_audio_never_evaluates_augmented_rows(pitch_table: Path, shared_store, tmp_path: Path, monkeypatch):
    path = shared_store(
        cfg(pitch_table, tmp_path, group_col="speaker", holdout=0.34, augment=("noise",), augment_classes="high"),
    ).path
    plans = _planned(monkeypatch)
    out = run_sweep(SweepConfig(store=path, layers="all", combine=("single",), seeds=2, out=str(tmp_path / "run")))
    folds = run_sweep(
        SweepConfig.from_dict(
            {
                "store": path,
                "layers": "-1",
                "combine": "single",
                "folds": 2,
                "validation_fraction": 0.5,
                "out": str(tmp_path / "folds"),
            }
        )
    )
    with open_store(path) as s:
        aug = {split: s.augmented(split) for split in s.splits}
    assert aug["train"].sum() > 0 and len(plans) == 2 + 2
    for p in plans:
        assert not aug[p.val_split][p.val_rows].any()  # every choice is made on original rows
        assert not aug[p.eval_split][p.eval_rows].any()  # and only original rows are scored
        assert aug[p.train_split][p.fit_rows].any()  # the copies train
    assert {p.eval_split for p in plans[:2]} == {"test"} and {p.eval_split for p in plans[2:]} == {"train"}
    rows = [json.loads(line) for line in (out.run_dir / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(set(r["per_class"]) == {"high", "low"} for r in rows)
    run = json.loads((out.run_dir / "run.json").read_text())
    assert run["eval_rows"] == open_store(path).n_rows("test")
    assert "Confusion matrix" in (out.run_dir / "summary.md").read_text()
    assert folds.rows == 2 * 2  # two poolings, two folds


def test_sweep_carves_and_folds_keep_speakers_apart(pitch_table: Path, shared_store, tmp_path: Path, monkeypatch):
    """The validation carve of every seed and the --folds rounds are speaker-disjoint: no speaker's rows on both
    sides, as planned for the sweep (a one-split store's evaluation carve: test_one_split_store_carves_by_group)."""
    path = shared_store(cfg(pitch_table, tmp_path, group_col="speaker", holdout=0.34)).path
    plans = _planned(monkeypatch)
    run_sweep(
        SweepConfig.from_dict(
            {
                "store": path,
                "layers": "-1",
                "combine": "single",
                "seeds": 3,
                "validation_fraction": 0.25,
                "out": str(tmp_path / "seeds"),
            }
        )
    )
    run_sweep(
        SweepConfig.from_dict(
            {
                "store": path,
                "layers": "-1",
                "combine": "single",
                "folds": 3,
                "validation_fraction": 0.5,
                "out": str(tmp_path / "folds"),
            }
        )
    )
    with open_store(path) as s:
        groups = s.groups("train")
    # a 0.34 holdout of 6 speakers holds out 2 (1 of 3 group folds): 4 train
    assert len(plans) == 3 + 3 and len(set(groups.tolist())) == 4
    for p in plans:
        fit, val = set(groups[p.fit_rows].tolist()), set(groups[p.val_rows].tolist())
        assert fit and val and not fit & val, (p.seed, p.fold, fit, val)
    for p in plans[3:]:  # folds: the held-out fold is scored, speakers apart from the fitting rows
        held = set(groups[p.eval_rows].tolist())
        assert p.eval_split == "train" and held and not held & set(groups[p.fit_rows].tolist())
    assert sorted(r for p in plans[3:] for r in p.eval_rows.tolist()) == list(range(len(groups)))  # each row once


def test_one_split_store_carves_by_group(pitch_table: Path, shared_store, tmp_path: Path):
    path = shared_store(cfg(pitch_table, tmp_path, group_col="speaker")).path
    with open_store(path) as s:
        (tr_split, tr), (ev_split, ev) = split_roles(s, "train", None, 0.34, 0)
        g = s.groups("all")
        assert tr_split == ev_split == "all" and not set(g[tr]) & set(g[ev])


def test_recurrent_head_over_frames(pitch_table: Path, shared_store, tmp_path: Path):
    path = shared_store(cfg(pitch_table, tmp_path, tokens="-1", holdout=0.25)).path
    res = CliRunner().invoke(
        heads_main,
        ["train", "--store", path, "--head", "gru", "--layers", "-1", "--epochs", "2", "--out", str(tmp_path / "gru")],
    )
    assert res.exit_code == 0, res.output
    row = json.loads((tmp_path / "gru" / "results.jsonl").read_text().splitlines()[0])
    assert row["head"] == "gru" and row["combine"] == "tokens"


# -- CLI and bad input ------------------------------------------------------------------------


def run(*args: str):
    return CliRunner().invoke(embstore_main, list(args))


def test_cli_extract_and_info(tones: Path, tmp_path: Path):
    res = run(
        "extract",
        "--model",
        HUBERT,
        "--data",
        str(tones),
        "--audio-col",
        "file",
        "--label-col",
        "label",
        "--group-col",
        "speaker",
        "--holdout",
        "0.34",
        "--augment",
        "noise,speed",
        "--augment-classes",
        "all",
        "--out",
        str(tmp_path / "s"),
        "-q",
    )
    assert res.exit_code == 0, res.output
    path = res.output.strip().splitlines()[-1]
    info = json.loads(run("info", path, "--json").output)
    assert info["modality"] == "audio" and info["poolings"] == ["mean", "max"] and info["sampling_rate"] == 16000
    assert info["splits"]["train"]["augmented"] > 0 and info["splits"]["test"]["augmented"] == 0
    text = run("info", path).output
    assert "audio" in text and "frames" in text and "augmented" in text
    assert "batching   exact: each clip has the values it has alone" in text


@pytest.mark.parametrize(
    "edit, args, message",
    [
        (
            "missing",
            [],
            r"2 of 24 audio files listed in .* cannot be used: .*r90.wav: no such file; .*r91.wav: no such file\. "
            r".*--skip-bad",
        ),
        ("junk", [], r"1 of 24 audio files .* unreadable"),
        ("empty", [], r"1 of 24 audio files .* zero-length audio"),
        (None, ["--pooling", "cls"], r"Audio has no \[CLS\] frame"),
        (None, ["--augment", "noise"], r"Augmented rows may only enter a training split"),
        (
            None,
            ["--augment", "echo", "--holdout", "0.5"],
            r"The --augment option must be a comma list of noise, shift, speed, pitch\. Got 'echo'",
        ),
        (None, ["--model", "random:tiny-bert"], r"random:tiny-bert is a text model, but --audio-col gives audio"),
        (
            None,
            ["--audio-col", "nope"],
            r"Column 'nope' \(from --audio-col\) is not in .*; its columns are: file, label, speaker",
        ),
    ],
)
def test_bad_audio_input(tones: Path, tmp_path: Path, edit, args, message):
    table = pd.read_csv(tones)
    if edit == "missing":
        table.loc[[3, 4], "file"] = ["audio/r90.wav", "audio/r91.wav"]
    elif edit == "junk":
        (tones.parent / "audio" / "junk.wav").write_text("not audio")
        table.loc[2, "file"] = "audio/junk.wav"
    elif edit == "empty":
        sf.write(tones.parent / "audio" / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
        table.loc[2, "file"] = "audio/empty.wav"
    table.to_csv(tones, index=False)
    base = ["extract", "--model", HUBERT, "--data", str(tones), "--audio-col", "file", "--label-col", "label", "-q"]
    # later options win in click, so a test's --model / --audio-col replaces the base one
    res = run(*base, *args, "--out", str(tmp_path / "s"))
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and len(res.output.strip().splitlines()) == 1, res.output
    import re

    assert re.search(message, res.output), res.output
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())


def test_skip_bad_drops_rows(tones: Path, tmp_path: Path):
    table = pd.read_csv(tones)
    table.loc[[3, 4], "file"] = ["audio/r90.wav", "audio/r91.wav"]
    table.to_csv(tones, index=False)
    res = extract(cfg(tones, tmp_path, skip_bad=True), show_progress=False)
    assert res.skipped_empty == {"all": 2}
    with open_store(res.path) as s:
        assert s.n_rows("all") == 22 and not {3, 4} & set(s.row_ids("all").tolist())


def test_speech_model_with_text_data(tiny_csv: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="random:hubert-tiny is a speech model and takes audio, but the data is text"):
        extract(
            ExtractConfig.from_dict(dict(model=HUBERT, data=str(tiny_csv), label_col="label", out=str(tmp_path))),
            show_progress=False,
        )


def test_too_short_audio(tmp_path: Path):
    sf.write(tmp_path / "a.wav", tone(300, 0.5, 16000), 16000)
    sf.write(tmp_path / "b.wav", tone(300, 0.01, 16000), 16000)  # 160 samples: no 25 ms window
    pd.DataFrame({"file": ["a.wav", "b.wav"], "label": ["x", "y"]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(
        DataError,
        match=r"1 clips of split 'all' are shorter than the model's receptive field of 400 samples \(0.025 s at "
        r"16000 Hz\), so they give no frame: .*b.wav \(160 samples\)\. Remove them from the table, or pass "
        r"--skip-bad to drop them\.",
    ):
        extract(cfg(tmp_path / "t.csv", tmp_path), show_progress=False)
    # --skip-bad drops it, as heads finetune does, and the store counts it with the other unusable rows
    res = extract(cfg(tmp_path / "t.csv", tmp_path, skip_bad=True), show_progress=False)
    with open_store(res.path) as store:
        assert store.n_rows("all") == 1 and list(store.row_ids("all")) == [0]
        assert store.meta.skipped_empty == {"all": 1}


# -- real recordings ----------------------------------------------------------------------------


@pytest.mark.slow
def test_emodb_files(tmp_path: Path):
    root = needs_shared("emodb")
    table = pd.read_csv(root / "labels.csv")
    few = table.groupby("speaker").head(2).head(12).copy()
    few["file"] = [str(root / f) for f in few["file"]]  # absolute paths stay as they are
    few.to_csv(tmp_path / "few.csv", index=False)
    res = extract(
        cfg(
            tmp_path / "few.csv", tmp_path, group_col="speaker", holdout=0.34, augment=("speed",), augment_classes="all"
        ),
        show_progress=False,
    )
    with open_store(res.path) as s:
        assert s.label_names == sorted(few.label.unique())
        test_dur = s.durations("test")
        np.testing.assert_allclose(test_dur, 2.0, atol=1e-3)  # 22.05 kHz, 2 s files -> 32,000 samples
        assert set(s.n_tokens("test").tolist()) == {99}
        assert not set(s.groups("train")) & set(s.groups("test"))
        assert s.augmented("train").sum() == (~s.augmented("train")).sum()
        assert np.isfinite(s.pooled("train", "mean")).all()


# -- resume and scale-out -------------------------------------------------------------------------


def test_interrupted_audio_extraction_resumes_to_the_same_store(tones: Path, tmp_path: Path, monkeypatch):
    from embstore.store.writer import StoreWriter

    kw = dict(
        group_col="speaker", holdout=0.34, augment=("noise", "shift", "speed"), augment_classes="all", chunk_rows=4
    )
    whole = extract(cfg(tones, tmp_path / "a", **kw), show_progress=False).path
    real = StoreWriter.write_chunk
    calls = []

    def crash_after_two(self, split, chunk, data):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        calls.append(chunk)
        return real(self, split, chunk, data)

    monkeypatch.setattr(StoreWriter, "write_chunk", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        extract(cfg(tones, tmp_path / "b", **kw), show_progress=False)
    monkeypatch.setattr(StoreWriter, "write_chunk", real)
    res = extract(cfg(tones, tmp_path / "b", **kw), show_progress=False)
    assert res.status == "resumed"
    assert_same_store(whole, res.path)
    with open_store(whole) as a, open_store(res.path) as b:
        for f, v in a.augmentation("train").items():
            np.testing.assert_array_equal(v, b.augmentation("train")[f])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_equal_one(tones: Path, tmp_path: Path, monkeypatch):
    kw = dict(augment=("noise",), augment_classes="all", holdout=0.25, chunk_rows=5)
    one = extract(cfg(tones, tmp_path / "one", **kw), show_progress=False).path
    for key, value in recording_env(tmp_path, "embstore.store.writer:StoreWriter.write_chunk").items():
        monkeypatch.setenv(key, value)  # the spawned workers log the (split, chunk) they write
    two = extract(cfg(tones, tmp_path / "two", num_processes=2, **kw), show_progress=False).path
    written = recorded_calls(tmp_path)
    assert len(written) == 2 and all(calls for calls in written.values())  # both workers wrote row chunks
    chunks = sorted((split, int(c)) for calls in written.values() for split, c in calls)
    with open_store(two) as s:
        assert chunks == sorted((split, c) for split in s.splits for c in range(s.layout.splits[split].n_chunks))
    with open_store(one) as a, open_store(two) as b:
        assert a.fingerprint == b.fingerprint and b.verify() == []
        for split in a.splits:
            np.testing.assert_array_equal(a.row_ids(split), b.row_ids(split))
            np.testing.assert_array_equal(a.n_tokens(split), b.n_tokens(split))
            for pooling in a.poolings:
                # float32 storage: a worker runs on 1 thread, the parent on 2, so sums may differ in the last bit
                np.testing.assert_allclose(a.pooled(split, pooling), b.pooled(split, pooling), rtol=0, atol=1e-6)


def test_predict_audio_files_equals_head_on_stored_features(pitch_table: Path, shared_store, tmp_path: Path):
    from heads.probe.predict import head_card, head_modality, load_head

    path = shared_store(cfg(pitch_table, tmp_path, holdout=0.25, max_seconds=0.4)).path
    out = run_sweep(SweepConfig(store=path, layers="1-2", combine=("concat",), out=str(tmp_path / "run")))
    est = load_head(str(out.run_dir))
    assert head_modality(est) == "audio"
    table = pd.read_csv(pitch_table)
    with open_store(path) as s:
        rows = s.row_ids("test")
        proba = est.predict_proba(s.pooled("test", out.best["pooling"], [1, 2]).reshape(len(rows), -1))
    stored = proba.argmax(1)
    files = [str(pitch_table.parent / table.file[r]) for r in rows]
    res = CliRunner().invoke(heads_main, ["predict", "--run", str(out.run_dir), "-"], input="\n".join(files) + "\n")
    assert res.exit_code == 0, res.output
    got = [json.loads(line)["label"] for line in res.output.strip().splitlines()]
    names = list(head_card(est).label_names or ())
    assert got == [names[i] for i in stored]
    got_proba = np.array(
        [[json.loads(line)["probabilities"][n] for n in names] for line in res.output.strip().splitlines()]
    )
    np.testing.assert_allclose(got_proba, proba, atol=2e-3)
    bad = CliRunner().invoke(heads_main, ["predict", "--run", str(out.run_dir), "-"], input="nope.wav\n")
    assert bad.exit_code == 2 and "1 of 1 audio files cannot be used: nope.wav: no such file" in bad.output


def test_h5_audio_store_matches_zarr(pitch_table: Path, shared_store, tmp_path: Path):
    kw = dict(group_col="speaker", holdout=0.34, augment=("shift",), augment_classes="all")
    z = shared_store(cfg(pitch_table, tmp_path, **kw)).path
    h = shared_store(cfg(pitch_table, tmp_path, format="h5", **kw)).path
    assert h.endswith(".h5")
    with open_store(z) as a, open_store(h) as b:
        assert b.modality == "audio" and b.group_names == a.group_names and b.verify() == []
        for split in a.splits:
            np.testing.assert_array_equal(a.groups(split), b.groups(split))
            np.testing.assert_array_equal(a.durations(split), b.durations(split))
            np.testing.assert_array_equal(a.pooled(split, "mean"), b.pooled(split, "mean"))
        np.testing.assert_array_equal(a.augmentation("train")["shift"], b.augmentation("train")["shift"])


def test_local_speech_model_directory(tones: Path, tmp_path: Path):
    """A saved HuBERT directory loads through AutoFeatureExtractor + AutoModel. Its feature extractor returns no
    attention mask (as HuBERT-base's), yet extraction gives the model one, so a padded batch equals each row alone;
    pooling counts only each row's own frames, checked against its own stored per-frame states."""
    model_dir = random_model_dir(tmp_path / "my-hubert", HUBERT, mask=False)
    local = load_backbone(str(model_dir))
    assert local.modality == "audio" and type(local.tokenizer).__name__ == "Wav2Vec2FeatureExtractor"
    assert local.identity["tokenizer"]["sha256"] and local.identity["kind"] == "local"
    alone = extract(cfg(tones, tmp_path, model=str(model_dir), batch_size=1, tokens="0,-1"), show_progress=False)
    padded = extract(cfg(tones, tmp_path, model=str(model_dir), batch_size=24, tokens="0,-1"), show_progress=False)
    ref = extract(cfg(tones, tmp_path, batch_size=1, tokens="0,-1"), show_progress=False)
    with open_store(alone.path) as a, open_store(padded.path) as p, open_store(ref.path) as r:
        assert a.provenance.model["path"] == str(model_dir.resolve())
        # one row per batch: no padding, so masked or not the states equal the random model's
        np.testing.assert_allclose(a.pooled("all", "mean"), r.pooled("all", "mean"), atol=1e-4)
        np.testing.assert_array_equal(a.n_tokens("all"), r.n_tokens("all"))
        in_a = np.argsort(a.row_ids("all"))[p.row_ids("all")]  # p's row i is a's row in_a[i] (row ids are 0..23)
        n = p.n_tokens("all")
        np.testing.assert_array_equal(n, a.n_tokens("all")[in_a])  # each row's own frames, not the batch's
        assert len(set(n.tolist())) > 1  # one batch of rows of different lengths: padded
        for layer in (0, 2):
            states = p.tokens("all", layer)
            mean, mx = p.pooled("all", "mean", [layer])[:, 0], p.pooled("all", "max", [layer])[:, 0]
            for i in range(len(n)):
                np.testing.assert_allclose(mean[i], states[i].mean(0), atol=1e-5)
                np.testing.assert_array_equal(mx[i], states[i].max(0))
        # the padding reaches no row (the mask the feature extractor does not return is given all the same): every
        # row of the padded batch equals itself alone, to the float16 of the store
        np.testing.assert_allclose(p.pooled("all", "mean"), a.pooled("all", "mean")[in_a], atol=2e-3)
        assert a.provenance.batching == p.provenance.batching == "exact"


@pytest.mark.parametrize("model_type", ["wav2vec2", "wavlm"])
def test_other_speech_architectures_from_local_directories(model_type: str, tones: Path, tmp_path: Path):
    import torch
    from transformers import AutoConfig, AutoModel

    from embstore.backbones.registry import RANDOM_CONFIGS, _speech_feature_extractor

    kw = {k: v for k, v in RANDOM_CONFIGS["hubert-tiny"].items() if k != "model_type"}
    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.for_model(model_type, **kw))
    model.save_pretrained(tmp_path / model_type)
    _speech_feature_extractor().save_pretrained(tmp_path / model_type)
    res = extract(cfg(tones, tmp_path, model=str(tmp_path / model_type)), show_progress=False)
    with open_store(res.path) as s:
        assert s.modality == "audio" and s.pooled("all", "mean").shape == (24, 3, 32)
        assert s.provenance.model["class"] == type(model).__name__


def test_one_table_per_split_and_augmentation_only_in_train(tones: Path, tmp_path: Path):
    table = pd.read_csv(tones)
    table.iloc[:16].to_csv(tones.parent / "train.tsv", sep="\t", index=False)
    table.iloc[16:].to_json(tones.parent / "test.jsonl", orient="records", lines=True)
    splits = (("train", str(tones.parent / "train.tsv")), ("test", str(tones.parent / "test.jsonl")))
    res = extract(
        ExtractConfig.from_dict(
            dict(
                model=HUBERT,
                data=None,
                splits=splits,
                audio_col="file",
                label_col="label",
                augment=("noise",),
                augment_classes="all",
                out=str(tmp_path / "s"),
            )
        ),
        show_progress=False,
    )
    with open_store(res.path) as s:
        assert s.n_rows("train") == 32 and s.n_rows("test") == 8
        assert s.augmented("train").sum() == 16 and s.augmentation("test") is None
