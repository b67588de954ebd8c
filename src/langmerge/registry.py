"""The run directory's registry: one SQLite database of experts, merges, evaluations and the cost
ledger (DESIGN §2, §5).

Schema versioned, migrations in code, WAL journal so readers never block the writer. Every write
is one transaction: a job row is inserted as `running` before the work and turned into `done` or
`failed` after it, so a crash leaves a row marked as running (see `mark_abandoned`), never a half
row. A second process writing at the same time waits for the lock up to `timeout` seconds and
then gets a clear error.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from langmerge.errors import LangmergeError
from langmerge.processes import alive

SCHEMA_VERSION = 1
DB_NAME = "registry.sqlite"

MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('expert', 'joint', 'merge', 'evaluate')),
        languages TEXT NOT NULL,              -- JSON list
        recipe_hash TEXT NOT NULL,
        data_hash TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
        pid INTEGER NOT NULL,
        started REAL NOT NULL,                -- unix time
        ended REAL,
        wall_s REAL,
        cpu_s REAL,
        device_kind TEXT,
        device_count INTEGER,
        device_s REAL,                        -- wall × devices
        tokens INTEGER,
        examples INTEGER,
        peak_memory_bytes INTEGER,
        flops REAL,                           -- training FLOPs estimate
        error TEXT
    );
    CREATE TABLE experts (
        id INTEGER PRIMARY KEY,
        language TEXT NOT NULL,
        version INTEGER NOT NULL,
        base TEXT NOT NULL,
        recipe_hash TEXT NOT NULL,
        data_hash TEXT NOT NULL,
        path TEXT NOT NULL,
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        scores TEXT NOT NULL DEFAULT '{}',     -- JSON: validation metrics
        UNIQUE (language, version)
    );
    CREATE TABLE merges (
        id INTEGER PRIMARY KEY,
        method TEXT NOT NULL,
        params TEXT NOT NULL,                 -- JSON
        expert_ids TEXT NOT NULL,             -- JSON list of experts.id
        path TEXT NOT NULL,
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        current INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE evaluations (
        id INTEGER PRIMARY KEY,
        model TEXT NOT NULL,                  -- base, joint:ID, expert:ID, merge:ID, or a path
        language TEXT NOT NULL,
        split TEXT NOT NULL,
        metrics TEXT NOT NULL,                -- JSON
        job_id INTEGER NOT NULL REFERENCES jobs(id)
    );
    """,
}


class RegistryError(LangmergeError):
    """The registry cannot be used as it is (newer schema, locked, corrupt)."""


@dataclass(frozen=True)
class Cost:
    """What a job consumed, measured by the caller (DESIGN §5)."""

    cpu_s: float = 0.0
    device_kind: str = "cpu"
    device_count: int = 1
    tokens: int = 0
    examples: int = 0
    peak_memory_bytes: int = 0
    flops: float = 0.0


class Registry:
    """One run directory's database, created on first use: `Registry(run_dir)`."""

    def __init__(self, run_dir: Path, timeout: float = 30.0):
        self.path = Path(run_dir) / DB_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise RegistryError(f"cannot use the registry {self.path}: {e}") from None

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write: everything in the block is committed together, or nothing."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise RegistryError(
                f"the registry {self.path} is busy ({e}): another langmerge process is writing "
                "to this run directory; wait for it to finish and run the command again"
            ) from None
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RegistryError(
                f"{self.path} was written by a newer langmerge (schema {version}, this one knows "
                f"{SCHEMA_VERSION}): upgrade langmerge to use this run directory"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self.transaction() as db:
                for statement in MIGRATIONS[target].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={target}")

    # ---- jobs and the cost ledger ----------------------------------------------------------

    def start_job(self, kind: str, languages: list[str], recipe_hash: str, data_hash: str) -> int:
        """Record a job as running, before its work starts; returns its id."""
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO jobs (kind, languages, recipe_hash, data_hash, status, pid, started) "
                "VALUES (?, ?, ?, ?, 'running', ?, ?)",
                (kind, json.dumps(languages), recipe_hash, data_hash, os.getpid(), time.time()),
            )
            return int(cur.lastrowid)

    def finish_job(self, job_id: int, cost: Cost) -> None:
        """Close a running job with its measured cost (one ledger row)."""
        with self.transaction() as db:
            (started,) = self._running(db, job_id)
            ended = time.time()
            wall = ended - started
            db.execute(
                "UPDATE jobs SET status='done', ended=?, wall_s=?, cpu_s=?, device_kind=?, "
                "device_count=?, device_s=?, tokens=?, examples=?, peak_memory_bytes=?, flops=? "
                "WHERE id=?",
                (ended, wall, cost.cpu_s, cost.device_kind, cost.device_count,
                 wall * cost.device_count, cost.tokens, cost.examples, cost.peak_memory_bytes,
                 cost.flops, job_id),
            )  # fmt: skip

    def fail_job(self, job_id: int, error: str) -> None:
        with self.transaction() as db:
            self._running(db, job_id)
            db.execute(
                "UPDATE jobs SET status='failed', ended=?, error=? WHERE id=?",
                (time.time(), error, job_id),
            )

    def mark_abandoned(self) -> int:
        """Mark as failed the running jobs whose process is gone (killed, crashed)."""
        with self.transaction() as db:
            rows = db.execute("SELECT id, pid FROM jobs WHERE status='running'").fetchall()
            gone = [job_id for job_id, pid in rows if not alive(pid)]
            db.executemany(
                "UPDATE jobs SET status='failed', ended=?, error='process ended without "
                "finishing the job' WHERE id=?",
                [(time.time(), job_id) for job_id in gone],
            )
            return len(gone)

    def ledger(self) -> list[dict]:
        """Every job, oldest first, as dictionaries (the source of every cost report)."""
        cur = self.db.execute("SELECT * FROM jobs ORDER BY id")
        names = [c[0] for c in cur.description]
        return [
            {**dict(zip(names, row)), "languages": json.loads(row[2])} for row in cur.fetchall()
        ]

    @staticmethod
    def _running(db: sqlite3.Connection, job_id: int) -> tuple[float]:
        row = db.execute(
            "SELECT started FROM jobs WHERE id=? AND status='running'", (job_id,)
        ).fetchone()
        if row is None:
            raise RegistryError(f"job {job_id} is not running")
        return row

    # ---- experts ---------------------------------------------------------------------------

    def add_expert(
        self, language: str, base: str, recipe_hash: str, data_hash: str, path: str, job_id: int,
        scores: dict | None = None,
    ) -> int:  # fmt: skip
        """Record a new version of `language`'s expert; returns its id."""
        with self.transaction() as db:
            (latest,) = db.execute(
                "SELECT COALESCE(MAX(version), 0) FROM experts WHERE language=?", (language,)
            ).fetchone()
            cur = db.execute(
                "INSERT INTO experts (language, version, base, recipe_hash, data_hash, path, "
                "job_id, scores) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (language, latest + 1, base, recipe_hash, data_hash, path, job_id,
                 json.dumps(scores or {})),
            )  # fmt: skip
            return int(cur.lastrowid)

    def latest_expert(self, language: str) -> dict | None:
        """The newest expert of `language` whose job finished, or None."""
        cur = self.db.execute(
            "SELECT e.* FROM experts e JOIN jobs j ON j.id = e.job_id "
            "WHERE e.language=? AND j.status='done' ORDER BY e.version DESC LIMIT 1",
            (language,),
        )
        row = cur.fetchone()
        if row is None:
            return None
        out = dict(zip([c[0] for c in cur.description], row))
        out["scores"] = json.loads(out["scores"])
        return out

    def find_expert(self, language: str, recipe_hash: str, data_hash: str) -> dict | None:
        """The finished expert trained from exactly this recipe and data (for caching), or None."""
        expert = self.latest_expert(language)
        if expert and expert["recipe_hash"] == recipe_hash and expert["data_hash"] == data_hash:
            return expert
        return None
