"""One writer per store: an exclusive ``fcntl.flock`` on a lock file beside the store.

``X.zarr`` is locked through ``X.zarr.lock`` (``X.h5`` through ``X.h5.lock``, which also covers its
``X.h5.partial.zarr`` staging store). The lock file holds the owner's pid, host, start time and
command, so a second writer can name who is writing. The kernel drops a flock when its process
dies, however it dies (``kill -9`` included), so a crashed run never leaves the store locked (its
lock file stays behind, unlocked, and is reused). A clean release deletes the file while still
holding the lock; a waiter that then wakes on the deleted file notices (its inode is no longer the
path's) and retries, so two processes never hold locks on two different files of one path.

Worker processes of ``--num-processes`` and the ranks of a torchrun / accelerate launch run share
the lock their parent (rank 0) took: only that process locks.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from embstore.errors import OutputNotWritableError, StoreBusyError

__all__ = ["StoreLock", "lock_path", "pid_alive", "owner_tag", "stale_owner"]

log = logging.getLogger(__name__)


def lock_path(store_path: str) -> Path:
    """The lock file of the store at ``store_path`` (a sibling: ``X.zarr.lock``)."""
    return Path(str(store_path).rstrip("/") + ".lock")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def owner_tag() -> str:
    """``host-pid`` of this process: names staging directories so only their owner's death frees them."""
    return f"{socket.gethostname()}-{os.getpid()}"


def stale_owner(tag: str) -> bool:
    """Whether the process a staging tag names (``host-pid``, or a bare pid from older versions) is gone.

    A tag from another host cannot be checked from here and is never stale.
    """
    host, _, pid = tag.rpartition("-")
    if not pid.isdigit():
        return False
    if host and host != socket.gethostname():
        return False
    return not pid_alive(int(pid))


class StoreLock:
    """An exclusive lock on one store path. Use as a context manager or call acquire/release."""

    def __init__(self, store_path: str) -> None:
        self.store_path = str(store_path)
        self.path = lock_path(store_path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def owner(self) -> dict[str, Any] | None:
        """What the lock file says about its holder (None when empty or unreadable)."""
        try:
            text = self.path.read_text()
            return dict(json.loads(text)) if text.strip() else None
        except (OSError, ValueError):
            return None

    def acquire(self, *, wait: bool = False, ranks: int = 1) -> "StoreLock":
        """Take the lock; with ``wait`` block until it is free, else raise :class:`StoreBusyError` naming the holder."""
        import fcntl

        if self._fd is not None:
            return self
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputNotWritableError(
                    f"Cannot create the lock file {self.path} ({exc.strerror}); choose a writable --out or set "
                    f"EMBSTORE_CACHE."
                ) from None
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise
                    if not wait:
                        raise StoreBusyError(self._busy_message()) from None
                    log.warning(
                        "%s is being written by %s; waiting for it to finish",
                        self.store_path,
                        self._describe(self.owner()),
                    )
                    fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            # The holder we waited for removes the file as it releases: then our lock is on an orphaned
            # inode, and a newcomer could lock a fresh file at the same path. Lock only the file that is there.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "ranks": ranks,
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file, then drop the lock (waiters notice the removal and retry on a new file)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> "StoreLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    @staticmethod
    def _describe(owner: dict[str, Any] | None) -> str:
        if not owner:
            return "another process"
        return f"pid {owner.get('pid')} on {owner.get('host')} (since {owner.get('started')}: {owner.get('command')})"

    def _busy_message(self) -> str:
        return (
            f"{self.store_path} is being written by another embstore process, {self._describe(self.owner())}; "
            f"wait for it to finish, or pass --wait to resume (or find it complete) once it has."
        )
