"""Crash safety and scale-out: a kill -9 mid-run resumes to the same store; 2 processes = 1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from factories import assert_same_store, recorded_calls, recording_env, synthetic_csv

from embstore import ExtractConfig, StoreIncompleteError, extract, open_store

ROOT = Path(__file__).resolve().parents[1]


def _data(tmp_path: Path, n: int) -> Path:
    return synthetic_csv(tmp_path, n)


def _done(path: Path) -> tuple[int, int]:
    import zarr

    flags = zarr.open_group(str(path), mode="r")["progress/all/done"][:]
    return int(flags.sum()), len(flags)


# Runs `embstore extract ARGS` and sends itself SIGKILL right after its third row chunk is written: a real
# kill -9 at a known point, instead of racing a poll against however fast the machine extracts.
_KILLED_RUN = """
import os, signal, sys
import embstore.store.writer as w
original = w.StoreWriter.write_chunk
written = []
def write_chunk(self, *args, **kwargs):
    original(self, *args, **kwargs)
    written.append(1)
    if len(written) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
w.StoreWriter.write_chunk = write_chunk
from cli.embstore_cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    data = _data(tmp_path, 600)
    out = tmp_path / "killed.zarr"
    script = tmp_path / "killed_run.py"
    script.write_text(_KILLED_RUN)
    args = [
        sys.executable,
        str(script),
        "extract",
        "--model",
        "random:tiny-bert",
        "--data",
        str(data),
        "--label-col",
        "label",
        "--tokens",
        "-1",
        "--chunk-rows",
        "32",
        "--out",
        str(out),
        "-q",
    ]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-1000:]
    done, total = _done(out)
    assert (done, total) == (3, 19)
    with pytest.raises(StoreIncompleteError, match="re-run the same 'embstore extract'"):
        open_store(out)
    cfg = dict(model="random:tiny-bert", data=str(data), label_col="label", tokens="-1", chunk_rows=32)
    resumed = extract(ExtractConfig.from_dict(dict(out=str(out), **cfg)), show_progress=False)
    assert resumed.status == "resumed"
    clean = extract(ExtractConfig.from_dict(dict(out=str(tmp_path / "clean.zarr"), **cfg)), show_progress=False)
    assert clean.status == "created"
    assert_same_store(resumed.path, clean.path)


def _chunks_by_worker(tmp_path: Path) -> dict[str, list[int]]:
    """{worker: row chunks it wrote} from recorded StoreWriter.write_chunk calls (split, chunk)."""
    return {who: [int(call[1]) for call in calls] for who, calls in recorded_calls(tmp_path).items()}


def _split_between_two(by_worker: dict[str, list[int]], n_chunks: int) -> None:
    """Two workers wrote, worker k the chunks c % 2 == k, together every chunk once."""
    assert len(by_worker) == 2, by_worker
    parts = sorted(by_worker.values())
    assert [{c % 2 for c in part} for part in parts] == [{0}, {1}]
    assert sorted(parts[0] + parts[1]) == list(range(n_chunks))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_write_the_same_store_as_one(tmp_path, monkeypatch):
    data = _data(tmp_path, 300)
    cfg = dict(model="random:tiny-bert", data=str(data), label_col="label", tokens="0", chunk_rows=16)
    for key, value in recording_env(tmp_path, "embstore.store.writer:StoreWriter.write_chunk").items():
        monkeypatch.setenv(key, value)  # the spawned workers log their chunk writes; this process is not patched
    two = extract(
        ExtractConfig.from_dict(dict(out=str(tmp_path / "two.zarr"), num_processes=2, **cfg)), show_progress=False
    )
    by_worker = _chunks_by_worker(tmp_path)
    assert f"pid{os.getpid()}" not in by_worker and all(w.startswith("pid") for w in by_worker)
    _split_between_two(by_worker, 19)  # 300 rows in chunks of 16
    one = extract(ExtractConfig.from_dict(dict(out=str(tmp_path / "one.zarr"), **cfg)), show_progress=False)
    assert_same_store(two.path, one.path)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_torchrun_ranks_write_the_same_store_as_one(tmp_path):
    """The `accelerate launch` / torchrun path: ranks from the environment, gloo barriers on CPU."""
    data = _data(tmp_path, 200)
    out = tmp_path / "ranks.zarr"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "cli.embstore_cli",
        "extract",
        "-q",
        "--model",
        "random:tiny-bert",
        "--data",
        str(data),
        "--label-col",
        "label",
        "--chunk-rows",
        "16",
        "--out",
        str(out),
    ]
    env = recording_env(tmp_path, "embstore.store.writer:StoreWriter.write_chunk")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    by_rank = _chunks_by_worker(tmp_path)
    assert sorted(by_rank) == ["0", "1"] and all(c % 2 == int(r) for r, cs in by_rank.items() for c in cs)
    _split_between_two(by_rank, 13)  # 200 rows in chunks of 16
    one = extract(
        ExtractConfig.from_dict(
            dict(
                model="random:tiny-bert",
                data=str(data),
                label_col="label",
                chunk_rows=16,
                out=str(tmp_path / "one.zarr"),
            )
        ),
        show_progress=False,
    )
    assert_same_store(str(out), one.path)
