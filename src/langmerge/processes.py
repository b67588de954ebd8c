"""Processes and one another: whether a process still runs (how crash leftovers are told apart
from work in progress), and locks that let one process at a time do a given job."""

import fcntl
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from langmerge.errors import InputError


def alive(pid: int) -> bool:
    """True if process `pid` exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


_LEFTOVER = re.compile(r"^\..+\.(partial|old)-(\d+)$")  # `.NAME.partial-PID`, `.NAME.old-PID`


def remove_leftovers(root: Path, recursive: bool = True) -> list[Path]:
    """Delete the temporary outputs (`.NAME.partial-PID`, `.NAME.old-PID`) under `root` whose
    process is gone (killed, crashed); returns what was deleted."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = root.rglob(".*-*") if recursive else root.glob(".*-*")
    removed = []
    for path in list(found):
        m = _LEFTOVER.match(path.name)
        if m is None or alive(int(m.group(2))) or not path.exists():
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


@contextmanager
def exclusive(lock: Path, busy: str) -> Iterator[None]:
    """Hold the lock file `lock` for the block; if another process holds it, raise InputError
    with the message `busy` at once (no waiting). The lock goes with the process, even killed."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(busy) from None
        yield


def world_size() -> int:
    """How many processes share this job (torchrun, accelerate launch); 1 when alone."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank among the processes of one distributed job (0 when alone)."""
    return int(os.environ.get("RANK", "0"))
