"""Where jobs run: the executor's settings (validated with pydantic; the recipe embeds them)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from langmerge.files import parse_size
from langmerge.yamlfile import Strict


def memory_size(v: str) -> str:
    """`v` if it is a size such as 8GB or 512MB, else the error pydantic reports."""
    try:
        size = parse_size(v)
    except Exception:
        size = 0
    if size <= 0:
        raise ValueError(f"memory: give a size such as 8GB or 512MB, not {v!r}")
    return v


class Executor(Strict):
    """Where training jobs run: here one after another (`local`), or as Ray tasks (`ray`), in
    parallel across a machine or a cluster. The run directory must then be on storage every
    node sees at the same path; the registry is written by the driver alone."""

    kind: Literal["local", "ray"] = "local"
    address: str | None = (
        None  # ray: a running cluster (`auto`, `ray://host:10001`); none: start one here
    )
    cpus: float = Field(1.0, gt=0)  # per job (also its torch threads)
    gpus: float = Field(0.0, ge=0)  # per job
    memory: str | None = None  # per job, e.g. 8GB (Ray schedules by it)
    retries: int = Field(2, ge=0)  # a failed job is tried again this many times

    @field_validator("memory")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        return v if v is None else memory_size(v)
