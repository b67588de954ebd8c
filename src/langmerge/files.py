"""Writing files whole or not at all, and reading sizes such as 2GB: the primitives every
layer shares."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from langmerge.errors import OutputExistsError
from langmerge.processes import remove_leftovers


@contextmanager
def atomic_output_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; rename it to `out` only if the block completes."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out.parent, recursive=False)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def parse_size(size: int | str) -> int:
    """Bytes from 2000000000, '2GB', '500MB' or '1.5GiB'."""
    if isinstance(size, int):
        return size
    s = size.strip().upper().replace(" ", "")
    units = {
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "B": 1,
    }
    for unit, factor in units.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * factor)
    return int(s)


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all: through a temp file of its own beside it
    (two writers never share one), renamed over `path`."""
    fd, partial = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.",
                                   suffix=".partial")  # fmt: skip
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private; honour the user's umask
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: set it straight back
    os.umask(mask)
    return mask


def write_json(path: Path, data: object) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
