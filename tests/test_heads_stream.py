"""Over --max-memory: configurations in groups that fit, each read once and trained in memory; a configuration that
alone does not fit is streamed (the L-BFGS probes read row chunks from the store, one pass per iteration); the
results are those of a sweep in memory. Under torchrun each rank takes its own chunks and the sums are all-reduced."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from factories import separable

from cli.heads_cli import main as heads_main
from embstore import ExtractConfig, extract

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--layers", "all", "--combine", "single,mean", "--c-grid", "1e-2,1,100", "--mdl", "--no-progress"]


@pytest.fixture(scope="module")
def chunked(tmp_path_factory) -> str:
    """120 rows of 3 classes, row chunks of 16 (train: 6 chunks), all 3 layers, mean pooling."""
    base = tmp_path_factory.mktemp("chunked")
    return extract(
        ExtractConfig.from_dict(
            dict(
                model="random:tiny-bert",
                data=str(separable(base / "sep.csv", n_per_class=40)),
                label_col="label",
                holdout=0.2,
                pooling=("mean",),
                chunk_rows=16,
                out=str(base),
            )
        ),
        show_progress=False,
    ).path


def run(*args: str):
    return CliRunner().invoke(heads_main, list(args))


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def _same(a: Path, b: Path) -> None:
    ra, rb = _rows(a), _rows(b)
    assert [(r["layers"], r["combine"]) for r in ra] == [(r["layers"], r["combine"]) for r in rb]
    for x, y in zip(ra, rb):
        assert x["hyperparameters"]["C"] == y["hyperparameters"]["C"]
        assert x["confusion"] == y["confusion"]
        assert x["val_accuracy"] == y["val_accuracy"] and x["val_f1_macro"] == y["val_f1_macro"]
        np.testing.assert_allclose(
            [np.nan if h["train_loss"] is None else h["train_loss"] for h in x["history"]],
            [np.nan if h["train_loss"] is None else h["train_loss"] for h in y["history"]],
            rtol=1e-4,
            atol=1e-6,
        )
        # the online code's block probes (in memory: rows in the shuffled order; streamed: by row chunk)
        assert x["mdl_bits"] == pytest.approx(y["mdl_bits"], rel=1e-3)
        assert x["p_vs_best"] == y["p_vs_best"] and x["f1_macro_lo"] == y["f1_macro_lo"]
    pa, pb = np.load(a / "predictions.npz"), np.load(b / "predictions.npz")
    assert np.array_equal(pa["row_id"], pb["row_id"]) and np.array_equal(pa["y_pred"], pb["y_pred"])
    np.testing.assert_allclose(pa["proba"], pb["proba"], atol=1e-4)


@pytest.mark.slow
def test_groups_and_streamed_configurations_give_the_in_memory_results(chunked, tmp_path):
    mem = run("sweep", "--store", chunked, *ARGS, "--out", str(tmp_path / "mem"))
    assert mem.exit_code == 0, mem.output
    assert json.loads((tmp_path / "mem" / "run.json").read_text())["feature_groups"] == 1
    # the features need 120 rows x 3 layers x 32 x 2 bytes = 23,040 B: 20,000 B holds groups of configurations; 7,000 B
    # not even one configuration with its solver copy, nor the 3-layer mean alone (7,680 B a layer): every one streams
    for budget, groups, streamed in (("20000", 4, 1), ("7000", 4, 4)):
        res = run("sweep", "--store", chunked, *ARGS, "--max-memory", budget, "--out", str(tmp_path / budget))
        assert res.exit_code == 0, res.output
        meta = json.loads((tmp_path / budget / "run.json").read_text())
        assert meta["features_preloaded"] is False and (meta["feature_groups"], meta["streamed_configurations"]) == (
            groups,
            streamed,
        )
        _same(tmp_path / "mem", tmp_path / budget)
        assert (tmp_path / budget / "best_head" / "head.json").is_file()


@pytest.mark.slow
def test_max_memory_below_one_chunk(chunked, tmp_path):
    res = run("sweep", "--store", chunked, *ARGS, "--max-memory", "2000", "--out", str(tmp_path / "r"))
    assert res.exit_code == 2
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and re.search(
        r"--max-memory 2000 is below one row chunk of .* \(\S+KB: 1[56] rows of split", err
    ), err
    assert "raise --max-memory to at least" in err and not (tmp_path / "r").exists()
    at_least = re.search(r"at least (\S+)\.$", err).group(1)  # and that is enough
    res = run("sweep", "--store", chunked, *ARGS, "--max-memory", at_least, "--out", str(tmp_path / "ok"))
    assert res.exit_code == 0, res.output


@pytest.mark.slow
@pytest.mark.multiprocess
def test_torchrun_ranks_split_the_chunks_and_equal_one_process(chunked, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "cli.heads_cli",
        "sweep",
        "--store",
        chunked,
        *ARGS,
        "--max-memory",
        "7000",
        "--out",
        str(tmp_path / "two"),
    ]
    from factories import recorded_calls, recording_env

    env = recording_env(tmp_path, "heads.probe.features:FeatureBank.chunk_blocks")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines() == [str(tmp_path / "two")]  # only rank 0 reports
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    # each rank streamed its own row chunks of the training split (chunk c on rank c % 2), together all 6
    read = {
        rank: {int(c) for split, c in calls if split == "train"} for rank, calls in recorded_calls(tmp_path).items()
    }
    assert read == {"0": {0, 2, 4}, "1": {1, 3, 5}}
    one = run("sweep", "--store", chunked, *ARGS, "--max-memory", "7000", "--out", str(tmp_path / "one"))
    assert one.exit_code == 0, one.output
    _same(tmp_path / "one", tmp_path / "two")
    df_one, df_two = pd.read_csv(tmp_path / "one" / "results.csv"), pd.read_csv(tmp_path / "two" / "results.csv")
    np.testing.assert_array_equal(df_one.accuracy, df_two.accuracy)
