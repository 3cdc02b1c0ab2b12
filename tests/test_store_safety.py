"""One writer per store, durable progress, damaged stores, ranks that fail together.

Processes are coordinated by conditions (a file that appears, a chunk flag that is set), never by
sleeping for a guessed time, so the outcomes do not depend on how fast the machine is.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from factories import synthetic_csv

from cli.embstore_cli import main
from embstore import ExtractConfig, StoreBusyError, StoreDamagedError, StoreMismatchError, extract, open_store
from embstore.store.lock import StoreLock, lock_path

ROOT = Path(__file__).resolve().parents[1]

# Runs `embstore extract ARGS`; after its first row chunk is written it waits until $GO_FILE exists,
# holding the store's lock all the while.
_PAUSED_RUN = """
import os, sys, time
from pathlib import Path
import embstore.store.writer as w
original = w.StoreWriter.write_chunk
go = Path(os.environ["GO_FILE"])
def write_chunk(self, *args, **kwargs):
    original(self, *args, **kwargs)
    while not go.exists():
        time.sleep(0.02)
w.StoreWriter.write_chunk = write_chunk
from cli.embstore_cli import main
main(sys.argv[1:])
"""


def _data(tmp_path: Path, n: int = 120) -> Path:
    return synthetic_csv(tmp_path, n, max_words=20)


def _wait_for(condition, what: str, proc: subprocess.Popen | None = None, limit: float = 240.0) -> None:
    """Poll until ``condition()``; the limit only guards against a hang, it is not a measurement."""
    deadline = time.monotonic() + limit
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"process ended before {what}: {proc.stderr.read().decode()[-1000:] if proc.stderr else ''}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _chunks_done(path: Path) -> int:
    import zarr

    try:
        return int(zarr.open_group(str(path), mode="r")["progress/all/done"][:].sum())
    except Exception:
        return 0


def test_a_held_lock_names_its_owner_and_frees_on_release(tmp_path):
    store = str(tmp_path / "s.zarr")
    with StoreLock(store) as held:
        assert held.owner()["pid"] == os.getpid() and held.owner()["host"] == socket.gethostname()
        with pytest.raises(
            StoreBusyError, match=rf"being written by another embstore process, pid {os.getpid()} on .*pass --wait"
        ):
            StoreLock(store).acquire()
    assert not lock_path(store).exists()  # released cleanly: nothing left beside the store
    StoreLock(store).acquire().release()


def test_extract_refuses_a_store_whose_lock_is_held(tmp_path):
    data = _data(tmp_path, 20)
    out = tmp_path / "s.zarr"
    args = [
        "extract",
        "--model",
        "random:tiny-bert",
        "-q",
        "--data",
        str(data),
        "--label-col",
        "label",
        "--out",
        str(out),
    ]
    with StoreLock(str(out)):
        res = CliRunner().invoke(main, args)
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1 and f"pid {os.getpid()}" in res.stderr and "--wait" in res.stderr
    assert not out.exists()
    assert CliRunner().invoke(main, args).exit_code == 0
    assert open_store(out).verify() == []


@pytest.mark.slow
@pytest.mark.multiprocess
def test_concurrent_extractions_one_writes_one_refuses_one_waits(tmp_path):
    """One run writes; a second is refused naming it; a third with --wait queues, and when the writer is killed
    (SIGKILL, holding the lock, after its first row chunk) the waiter takes the lock and resumes the store."""
    import signal

    data = _data(tmp_path)
    out = tmp_path / "shared.zarr"
    go = tmp_path / "go"
    script = tmp_path / "paused_run.py"
    script.write_text(_PAUSED_RUN)
    args = [
        "extract",
        "--model",
        "random:tiny-bert",
        "-q",
        "--data",
        str(data),
        "--label-col",
        "label",
        "--chunk-rows",
        "20",
        "--out",
        str(out),
    ]
    env = {**os.environ, "GO_FILE": str(go), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, str(script), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    waiter = None
    try:
        _wait_for(lambda: _chunks_done(out) >= 1, "the first run's first chunk", first)
        second = subprocess.run(
            [sys.executable, "-m", "cli.embstore_cli", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert second.returncode == 2
        assert second.stderr.strip().count("\n") == 0, second.stderr
        assert f"pid {first.pid} on {socket.gethostname()}" in second.stderr and "--wait" in second.stderr
        log = tmp_path / "waiter.err"
        with open(log, "w") as err:
            waiter = subprocess.Popen(
                [sys.executable, "-m", "cli.embstore_cli", *args, "--wait"],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        _wait_for(lambda: "waiting for it to finish" in log.read_text(), "the --wait run to queue", waiter)
        assert _chunks_done(out) == 1  # neither the refused nor the waiting run wrote anything
        first.send_signal(signal.SIGKILL)  # the writer dies holding the lock, its store one chunk of six
        assert first.wait(timeout=240) == -signal.SIGKILL
        assert waiter.wait(timeout=240) == 0, log.read_text()[-1000:]
    finally:
        go.touch()
        for p in (first, waiter):
            if p is not None and p.poll() is None:
                p.kill()
    assert "resumed: all 120 rows" in log.read_text(), log.read_text()[-1000:]
    assert waiter.stdout is not None and waiter.stdout.read().decode().strip() == str(out)
    assert open_store(out).verify() == []
    assert not lock_path(str(out)).exists()


def test_chunk_data_is_fsynced_before_its_done_flag(tmp_path, monkeypatch):
    import embstore.store.writer as w

    synced: list[tuple[str, bool]] = []
    original = w._fsync_file

    store = tmp_path / "s.zarr"

    def record(path: Path) -> None:
        if store in Path(path).parents:  # the skeleton is fsynced in its staging directory before the rename
            synced.append((str(Path(path).relative_to(store)), (store / "progress/all/done/c/0").exists()))
        original(path)

    monkeypatch.setattr(w, "_fsync_file", record)
    extract(
        ExtractConfig.from_dict(
            dict(model="random:tiny-bert", data=str(_data(tmp_path, 10)), label_col="label", out=str(store))
        ),
        show_progress=False,
    )
    data_syncs = [(p, flag) for p, flag in synced if "/pooled/" in p and "/c/" in p]
    assert data_syncs and all(not flag for _, flag in data_syncs)  # every data chunk before the flag exists
    assert ("progress/all/done/c/0", True) in synced  # and the flag itself afterwards


def test_damaged_metadata_is_reported_as_damaged(tmp_path):
    cfg = ExtractConfig.from_dict(
        dict(model="random:tiny-bert", data=str(_data(tmp_path, 10)), label_col="label", out=str(tmp_path / "s.zarr"))
    )
    path = Path(extract(cfg, show_progress=False).path)
    meta = path / "zarr.json"
    meta.write_bytes(meta.read_bytes()[: len(meta.read_bytes()) // 2])  # a torn write
    with pytest.raises(
        StoreDamagedError, match=r"zarr.json cannot be parsed .* damaged: run 'embstore verify .*or delete it"
    ):
        extract(cfg, show_progress=False)
    res = CliRunner().invoke(main, ["info", str(path)])
    assert res.exit_code == 2 and "cannot be parsed" in res.stderr and res.stderr.count("\n") == 1


def test_a_foreign_directory_at_out_is_refused(tmp_path):
    (tmp_path / "s.zarr").mkdir()
    (tmp_path / "s.zarr" / "notes.txt").write_text("mine")
    with pytest.raises(StoreMismatchError, match="exists and is not an embstore store"):
        extract(
            ExtractConfig.from_dict(
                dict(model="random:tiny-bert", data=str(_data(tmp_path, 10)), out=str(tmp_path / "s.zarr"))
            ),
            show_progress=False,
        )


def test_only_dead_owners_staging_is_cleaned(tmp_path):
    out = tmp_path / "s.zarr"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    dead = tmp_path / f"s.zarr.creating-{host}-{gone.pid}"
    live = tmp_path / f"s.zarr.creating-{host}-{os.getppid()}"  # our parent is alive
    other_host = tmp_path / "s.zarr.creating-elsewhere-1"
    for d in (dead, live, other_host):
        d.mkdir()
    extract(
        ExtractConfig.from_dict(dict(model="random:tiny-bert", data=str(_data(tmp_path, 10)), out=str(out))),
        show_progress=False,
    )
    assert not dead.exists() and live.exists() and other_host.exists()


def test_a_store_appearing_during_creation_is_a_clear_error(tmp_path):
    from embstore.store import layout as L
    from embstore.store.writer import StoreWriter

    target = tmp_path / "s.zarr"
    target.mkdir()
    (target / "x").write_text("someone else")
    layout = L.StoreLayout(
        layers=(0,),
        poolings=("cls",),
        hidden=2,
        dtype="float16",
        towers=("text",),
        token_layers=(),
        chunk_rows=4,
        splits={},
    )
    meta = L.StoreMeta.from_dict({"schema_version": L.SCHEMA_VERSION, "fingerprint": "f", "layout": layout.to_dict()})
    with pytest.raises(StoreMismatchError, match="appeared while this run was creating it"):
        StoreWriter.create(str(target), meta, {}, {})
    assert not list(tmp_path.glob("s.zarr.creating-*"))


def test_a_binary_config_file_is_one_line(tmp_path):
    conf = tmp_path / "config.yaml"
    conf.write_bytes(bytes(range(256)))
    res = CliRunner().invoke(main, ["extract", "--config", str(conf)])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "not a text (UTF-8) file" in res.stderr


def test_info_on_a_directory_of_stores_names_them(tmp_path):
    data = _data(tmp_path, 10)
    res = CliRunner().invoke(
        main, ["extract", "--model", "random:tiny-bert", "-q", "--data", str(data), "--out", str(tmp_path / "stores")]
    )
    assert res.exit_code == 0, res.output
    name = Path(res.stdout.strip()).name
    res = CliRunner().invoke(main, ["info", str(tmp_path / "stores")])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1
    assert "is a directory of stores" in res.stderr and name in res.stderr


# Rank $FAIL_RANK raises while encoding its first chunk ($FAIL_KIND 'bug': a RuntimeError; 'user': a DataError).
_FAILING_RANK = """
import os, sys
import embstore.extraction.encode as enc
from embstore.errors import DataError
original = enc.ChunkEncoder.encode
def encode(self, *args, **kwargs):
    if os.environ["RANK"] == os.environ["FAIL_RANK"]:
        if os.environ["FAIL_KIND"] == "bug":
            raise RuntimeError("boom in the encoder")
        raise DataError("row 7 of the data cannot be used")
    return original(self, *args, **kwargs)
enc.ChunkEncoder.encode = encode
from cli.embstore_cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "fail_rank,kind,message", [("1", "bug", "boom in the encoder"), ("0", "user", "row 7 of the data cannot be used")]
)
def test_a_failing_rank_stops_every_rank_with_the_same_error(tmp_path, fail_rank, kind, message):
    script = tmp_path / "failing_rank.py"
    script.write_text(_FAILING_RANK)
    out = tmp_path / "ranks.zarr"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        "extract",
        "-q",
        "--model",
        "random:tiny-bert",
        "--data",
        str(_data(tmp_path, 64)),
        "--label-col",
        "label",
        "--chunk-rows",
        "16",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "FAIL_RANK": fail_rank, "FAIL_KIND": kind}
    # Without the shared failure the other rank would wait at its next barrier for the process group's
    # 30-minute timeout; this limit only turns such a hang into a failure.
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode != 0
    expected = f"error: {message} (rank {fail_rank} of 2 failed; every rank stopped)"
    assert proc.stderr.count(expected) == 2, proc.stderr[-3000:]  # the same one line from both ranks
    store = open_store(out, allow_incomplete=True)
    assert not store.complete
    assert not lock_path(str(out)).exists()
