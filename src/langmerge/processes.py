"""Whether a process still runs: how crash leftovers (temporary outputs, running jobs) are told
apart from work in progress."""

import os


def alive(pid: int) -> bool:
    """True if process `pid` exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
