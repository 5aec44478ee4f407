"""One job per output folder: an advisory lock per process rank that the kernel drops when its holder dies.

Two extractions (or trainings) writing one folder lose and duplicate records without a word. Each
process of a job holds ``FOLDER/.lavender-lock-rank<R>`` with ``flock``: the ranks of one launch hold
different files, a second job's rank 0 finds rank 0 taken and stops with a clear message, and a job
that was killed (even with SIGKILL) leaves no stale lock behind — the kernel releases it. The lock
is advisory and local: it does not protect folders on network file systems without ``flock``
support (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from lavender.config import LavenderError


@contextlib.contextmanager
def hold_folder(folder: str | os.PathLike, rank: int = 0, what: str = "job") -> Iterator[None]:
    """Hold ``folder`` for this process's ``rank`` for the duration of the block, or raise."""
    import fcntl

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f".lavender-lock-rank{rank}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise LavenderError(f"{folder} is in use by another {what} (pid {holder}); wait for it to finish, "
                                "or write to another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def die_with_parent() -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    The workers of ``accelerate launch`` / ``torchrun`` are children of the launcher; a SIGKILLed
    launcher cannot stop them, and they would keep writing the folder (their locks keep a new job out,
    but the job the user thinks is dead goes on). Called by every process of a multi-process job.
    Returns False where the call is unavailable (not Linux), changing nothing.
    """
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG = 1
            return False
    except (OSError, AttributeError):
        return False
    return os.getppid() != 1  # already orphaned: the signal will never come
