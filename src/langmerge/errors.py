"""Errors a user can cause. The CLI prints them without a traceback and exits non-zero."""

import errno


class LangmergeError(Exception):
    """Base class: the message says what is wrong and what to do about it."""


class ConfigError(LangmergeError):
    """A recipe or merge config is invalid or asks for something unsupported."""


class InputError(LangmergeError):
    """An input model, adapter or tensor is missing, corrupt or incompatible."""


class OutputExistsError(LangmergeError):
    """The output path exists and `--force` was not given."""


class TrainingFailed(LangmergeError):
    """A model learned nothing (its health check failed): reported and recorded, not used."""


class DiskFull(LangmergeError):
    """A write failed for want of space (raised in place of the library's own error)."""


def is_disk_full(e: BaseException) -> bool:
    """Whether `e` says the disk is full: an OSError, or the RuntimeError, SafetensorError or
    SQLite error that PyTorch, safetensors and SQLite raise instead."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e).lower()
    return any(
        s in text
        for s in ("no space left", "disk quota", "file write failed", "database or disk is full")
    )
