"""The run directory's registry: one SQLite database of experts, merges, evaluations and the cost
ledger.

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from langmerge.errors import LangmergeError
from langmerge.meter import Cost
from langmerge.processes import alive, remove_leftovers

SCHEMA_VERSION = 8
DB_NAME = "registry.sqlite"

MIGRATIONS: dict[int, str | Callable] = {  # SQL, or code taking (registry, db)
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
    2: """
    CREATE TABLE joints (
        id INTEGER PRIMARY KEY,
        languages TEXT NOT NULL,              -- JSON list
        version INTEGER NOT NULL UNIQUE,
        base TEXT NOT NULL,
        recipe_hash TEXT NOT NULL,
        data_hash TEXT NOT NULL,
        path TEXT NOT NULL,
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        scores TEXT NOT NULL DEFAULT '{}'
    );
    """,
    3: """
    ALTER TABLE evaluations ADD COLUMN data_hash TEXT NOT NULL DEFAULT '';
    CREATE INDEX evaluations_lookup ON evaluations (model, language, split, data_hash);
    """,
    4: """
    CREATE TABLE additions (
        id INTEGER PRIMARY KEY,
        language TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('update', 'add')),
        path TEXT NOT NULL,                   -- a copy inside the run directory
        sha256 TEXT NOT NULL,
        added REAL NOT NULL
    );
    CREATE TABLE serving (
        id INTEGER PRIMARY KEY,
        merge_id INTEGER NOT NULL REFERENCES merges(id),
        at REAL NOT NULL,
        reason TEXT NOT NULL
    );
    """,
    5: """
    CREATE TABLE jobs_v5 (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('expert', 'joint', 'merge', 'evaluate', 'sweep')),
        languages TEXT NOT NULL,
        recipe_hash TEXT NOT NULL,
        data_hash TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
        pid INTEGER NOT NULL,
        started REAL NOT NULL,
        ended REAL,
        wall_s REAL,
        cpu_s REAL,
        device_kind TEXT,
        device_count INTEGER,
        device_s REAL,
        tokens INTEGER,
        examples INTEGER,
        peak_memory_bytes INTEGER,
        flops REAL,
        error TEXT
    );
    INSERT INTO jobs_v5 (
        id, kind, languages, recipe_hash, data_hash, status, pid, started, ended, wall_s,
        cpu_s, device_kind, device_count, device_s, tokens, examples, peak_memory_bytes, flops,
        error)
    SELECT id, kind, languages, recipe_hash, data_hash, status, pid, started, ended, wall_s,
        cpu_s, device_kind, device_count, device_s, tokens, examples, peak_memory_bytes, flops,
        error
    FROM jobs;
    DROP TABLE jobs;
    ALTER TABLE jobs_v5 RENAME TO jobs;
    CREATE TABLE steps (
        id INTEGER PRIMARY KEY,
        language TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('update', 'add')),
        merge_id INTEGER NOT NULL UNIQUE REFERENCES merges(id),  -- a rerun updates its step
        served INTEGER NOT NULL,
        at REAL NOT NULL,
        result TEXT NOT NULL                  -- JSON: cost comparison, per-language shifts
    );
    CREATE TABLE sweep_points (
        key TEXT PRIMARY KEY,                 -- merge settings, experts, validation data
        name TEXT NOT NULL,                   -- e.g. ties-d0.5-l1
        settings TEXT NOT NULL,               -- JSON: method, density, lambda, weights
        expert_ids TEXT NOT NULL,             -- JSON list of experts.id
        metrics TEXT NOT NULL,                -- JSON: language → validation metrics
        seconds REAL NOT NULL,                -- merge in memory + evaluation
        job_id INTEGER NOT NULL REFERENCES jobs(id)
    );
    CREATE TABLE sweeps (
        id INTEGER PRIMARY KEY,
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        result TEXT NOT NULL                  -- JSON: points, selection, winner, test scores
    );
    """,
    6: """
    ALTER TABLE experts ADD COLUMN health TEXT NOT NULL DEFAULT '{}';   -- JSON: the verdict
    ALTER TABLE experts ADD COLUMN training TEXT NOT NULL DEFAULT '{}'; -- JSON: steps, curve
    ALTER TABLE joints ADD COLUMN health TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE joints ADD COLUMN training TEXT NOT NULL DEFAULT '{}';
    """,
    7: """
    CREATE TABLE jobs_v7 (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL
            CHECK (kind IN ('expert', 'joint', 'merge', 'evaluate', 'sweep', 'seed')),
        languages TEXT NOT NULL,
        recipe_hash TEXT NOT NULL,
        data_hash TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
        pid INTEGER NOT NULL,
        started REAL NOT NULL,
        ended REAL,
        wall_s REAL,
        cpu_s REAL,
        device_kind TEXT,
        device_count INTEGER,
        device_s REAL,
        tokens INTEGER,
        examples INTEGER,
        peak_memory_bytes INTEGER,
        flops REAL,
        error TEXT
    );
    INSERT INTO jobs_v7 SELECT * FROM jobs;
    DROP TABLE jobs;
    ALTER TABLE jobs_v7 RENAME TO jobs;
    """,
    8: lambda registry, db: registry._relative_paths(db),  # paths inside the run dir: relative
}
PATH_COLUMNS = {"experts": ("path", "base"), "joints": ("path", "base"), "merges": ("path",),
                "additions": ("path",)}  # fmt: skip


class RegistryError(LangmergeError):
    """The registry cannot be used as it is (newer schema, locked, corrupt)."""


class Registry:
    """One run directory's database, created on first use: `Registry(run_dir)`."""

    def __init__(self, run_dir: Path, timeout: float = 30.0, read_only: bool = False):
        self.root = Path(run_dir).absolute()
        self.path = Path(run_dir) / DB_NAME
        if read_only:  # reads only, changes nothing (not even the journal mode or the schema)
            try:
                self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=timeout)
            except sqlite3.DatabaseError as e:
                raise RegistryError(f"cannot read the registry {self.path}: {e}") from None
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        except sqlite3.DatabaseError as e:
            raise RegistryError(f"cannot use the registry {self.path}: {e}") from None
        try:
            self._refuse_newer()  # before anything, even the journal mode, changes the file
            self._wal(timeout)
            self.db.execute("PRAGMA foreign_keys=OFF")  # migration 5 rebuilds `jobs`
            self._migrate()
            self.db.execute("PRAGMA foreign_keys=ON")
            self._tidy()
        except sqlite3.DatabaseError as e:
            self.db.close()
            raise RegistryError(f"cannot use the registry {self.path}: {e}") from None
        except BaseException:
            self.db.close()
            raise

    def _wal(self, timeout: float) -> None:
        """Switch to WAL (once per database file). SQLite does not wait for the busy timeout
        here, so a process that finds another one creating the database tries again."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
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

    def _refuse_newer(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            self.db.close()
            raise RegistryError(
                f"{self.path} was written by a newer langmerge (schema {version}, this one knows "
                f"{SCHEMA_VERSION}): upgrade langmerge to use this run directory"
            )

    def _migrate(self) -> None:
        """Bring the schema up to date, one migration per transaction. The version is read again
        under the write lock: two processes opening a new run directory at once migrate once."""
        while self.db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            with self.transaction() as db:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version >= SCHEMA_VERSION:
                    break
                step = MIGRATIONS[version + 1]  # SQL, or code where SQL cannot say it
                if callable(step):
                    step(self, db)
                else:
                    for statement in step.split(";"):
                        if statement.strip():
                            db.execute(statement)
                broken = db.execute("PRAGMA foreign_key_check").fetchall()
                if broken:  # rolled back: the file stays as it was
                    raise RegistryError(f"migration {version + 1} broke references: {broken[:3]}")
                db.execute(f"PRAGMA user_version={version + 1}")

    def _relative_paths(self, db: sqlite3.Connection) -> None:
        """Migration 8: the paths recorded inside the run directory, made relative to it."""
        for table, columns in PATH_COLUMNS.items():
            for column in columns:
                rows = db.execute(f"SELECT id, {column} FROM {table}").fetchall()
                db.executemany(
                    f"UPDATE {table} SET {column}=? WHERE id=?",
                    [(self._stored(p), i) for i, p in rows if self._stored(p) != p],
                )

    def _stored(self, path: str | Path) -> str:
        """How a path is recorded: relative to the run directory when inside it (so the run
        directory can be moved or copied), else as given."""
        p = Path(path)
        if not p.is_absolute():
            return str(path)
        for root in (self.root, self.root.resolve()):
            for candidate in (p, p.resolve()):
                if candidate.is_relative_to(root):
                    return candidate.relative_to(root).as_posix() or "."
        return str(path)

    def _read(self, path: str) -> str:
        """A recorded path as a usable one (relative ones are inside the run directory)."""
        return path if not path or Path(path).is_absolute() else str(self.root / path)

    # ---- jobs and the cost ledger ----------------------------------------------------------

    def start_job(
        self,
        kind: str,
        languages: list[str],
        recipe_hash: str,
        data_hash: str,
        started: float | None = None,
    ) -> int:
        """Record a job as running, before its work starts (or, for work done elsewhere, as of
        when it `started` there); returns its id."""
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO jobs (kind, languages, recipe_hash, data_hash, status, pid, started) "
                "VALUES (?, ?, ?, ?, 'running', ?, ?)",
                (kind, json.dumps(languages), recipe_hash, data_hash, os.getpid(),
                 time.time() if started is None else started),
            )  # fmt: skip
            return int(cur.lastrowid)

    def finish_job(
        self,
        job_id: int,
        cost: Cost,
        then: Callable[[sqlite3.Connection], None] | None = None,
        ended: float | None = None,
    ) -> None:
        """Close a running job with its measured cost (one ledger row), as of now or of when it
        `ended` where it ran; `then` records what the job made in the same transaction."""
        with self.transaction() as db:
            self._close(db, job_id, "done", cost, None, ended)
            if then is not None:
                then(db)

    def fail_job(
        self, job_id: int, error: str, cost: Cost | None = None, ended: float | None = None
    ) -> None:
        """Close a running job as failed, with what it consumed until then when measured."""
        with self.transaction() as db:
            self._close(db, job_id, "failed", cost or Cost(), error, ended)

    def _close(
        self,
        db: sqlite3.Connection,
        job_id: int,
        status: str,
        cost: Cost,
        error: str | None,
        ended: float | None = None,
    ) -> None:
        (started,) = self._running(db, job_id)
        ended = time.time() if ended is None else ended
        wall = ended - started
        db.execute(
            "UPDATE jobs SET status=?, ended=?, error=?, wall_s=?, cpu_s=?, device_kind=?, "
            "device_count=?, device_s=?, tokens=?, examples=?, peak_memory_bytes=?, flops=? "
            "WHERE id=?",
            (status, ended, error, wall, cost.cpu_s, cost.device_kind, cost.device_count,
             wall * cost.device_count, cost.tokens, cost.examples, cost.peak_memory_bytes,
             cost.flops, job_id),
        )  # fmt: skip

    def _tidy(self) -> None:
        """What a killed process left: its jobs still `running`, its half-written outputs."""
        running = self.db.execute("SELECT pid FROM jobs WHERE status='running'").fetchall()
        if any(not alive(pid) for (pid,) in running):
            self.mark_abandoned()
        remove_leftovers(self.root)

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

    def job(self, job_id: int) -> dict:
        """One job's ledger row."""
        (row,) = self._jobs("WHERE id=?", (job_id,))
        return row

    def ledger(self) -> list[dict]:
        """Every job, oldest first, as dictionaries (the source of every cost report)."""
        return self._jobs("", ())

    def _jobs(self, where: str, args: tuple) -> list[dict]:
        cur = self.db.execute(f"SELECT * FROM jobs {where} ORDER BY id", args)
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

    # ---- trained models: experts and joint models --------------------------------------------

    def next_version(self, kind: str, language: str | None = None) -> int:
        """The version number the next `kind` model (of `language`, for experts) will get."""
        table, where, args = _model_query(kind, language)
        (latest,) = self.db.execute(
            f"SELECT COALESCE(MAX(version), 0) FROM {table} {where}", args
        ).fetchone()
        return latest + 1

    def finish_training(
        self,
        job_id: int,
        cost: Cost,
        model: TrainedModel,
        place: Callable[[int], str] | None = None,
        ended: float | None = None,
    ) -> TrainedModel:
        """Close a training job and record the model it made, in one transaction. The version is
        the next free one, chosen under the write lock; `place(version)` (if given) puts the
        model's files where they belong and returns their path. Returns the model as recorded."""
        recorded: list[TrainedModel] = []

        def insert(db: sqlite3.Connection) -> None:
            version = self.next_version(model.kind, model.language)
            m = replace(model, version=version, path=place(version) if place else model.path)
            common = (m.version, self._stored(m.base), m.recipe_hash, m.data_hash,
                      self._stored(m.path), job_id,
                      *(json.dumps(x) for x in (m.scores, m.health, m.training)))  # fmt: skip
            columns = "version, base, recipe_hash, data_hash, path, job_id, scores, health, "
            columns += "training"
            if m.kind == "expert":
                db.execute(
                    f"INSERT INTO experts (language, {columns}) VALUES ({', '.join('?' * 10)})",
                    (m.language, *common),
                )
            else:
                db.execute(
                    f"INSERT INTO joints (languages, {columns}) VALUES ({', '.join('?' * 10)})",
                    (json.dumps(m.languages), *common),
                )
            recorded.append(m)

        self.finish_job(job_id, cost, then=insert, ended=ended)
        return recorded[0]

    def trained(self, kind: str, language: str | None = None) -> list[dict]:
        """Every finished `kind` model (of `language`), oldest first, with its job's cost."""
        table, where, args = _model_query(kind, language, alias="m")
        cur = self.db.execute(
            f"SELECT m.*, j.wall_s, j.started, j.ended, j.cpu_s, j.device_kind, j.device_s, "
            f"j.tokens, j.examples, j.peak_memory_bytes, j.flops FROM {table} m "
            f"JOIN jobs j ON j.id = m.job_id {where}{' AND' if where else ' WHERE'} "
            "j.status='done' ORDER BY m.id",
            args,
        )
        names = [c[0] for c in cur.description]
        rows = [dict(zip(names, row)) for row in cur.fetchall()]
        for row in rows:
            for key in ("scores", "health", "training"):
                row[key] = json.loads(row[key])
            row["path"], row["base"] = self._read(row["path"]), self._read(row["base"])
            if "languages" in row:
                row["languages"] = json.loads(row["languages"])
        return rows

    def latest(self, kind: str, language: str | None = None) -> dict | None:
        """The newest finished `kind` model (of `language`), or None."""
        rows = self.trained(kind, language)
        return max(rows, key=lambda r: r["version"]) if rows else None

    def find_trained(
        self, kind: str, language: str | None, recipe_hash: str, data_hash: str
    ) -> dict | None:
        """The current model if it was trained from exactly this recipe and data (the cache)."""
        model = self.latest(kind, language)
        if model and model["recipe_hash"] == recipe_hash and model["data_hash"] == data_hash:
            return model
        return None

    # ---- merges ----------------------------------------------------------------------------

    def finish_merge(
        self,
        job_id: int,
        cost: Cost,
        method: str,
        params: dict,
        expert_ids: list[int],
        path: str,
        serve: str | None = None,
    ) -> int:
        """Close a merge job and record the merge, in one transaction; with `serve` (the reason)
        it also becomes the current, served merge."""
        ids: list[int] = []

        def insert(db: sqlite3.Connection) -> None:
            cur = db.execute(
                "INSERT INTO merges (method, params, expert_ids, path, job_id, current) "
                "VALUES (?, ?, ?, ?, ?, 0)",
                (method, json.dumps(params), json.dumps(expert_ids), self._stored(path), job_id),
            )
            ids.append(int(cur.lastrowid))
            if serve:
                self._serve(db, ids[0], serve)

        self.finish_job(job_id, cost, then=insert)
        return ids[0]

    def serve(self, merge_id: int, reason: str) -> None:
        """Make merge `merge_id` the current one (its files must be there)."""
        with self.transaction() as db:
            row = db.execute("SELECT path FROM merges WHERE id=?", (merge_id,)).fetchone()
            if row is None:
                raise RegistryError(f"there is no merge {merge_id}")
            if not Path(self._read(row[0])).is_dir():
                raise RegistryError(
                    f"the files of merge {merge_id} ({self._read(row[0])}) are gone"
                )
            self._serve(db, merge_id, reason)

    @staticmethod
    def _serve(db: sqlite3.Connection, merge_id: int, reason: str) -> None:
        db.execute("UPDATE merges SET current = (id = ?)", (merge_id,))
        db.execute(
            "INSERT INTO serving (merge_id, at, reason) VALUES (?, ?, ?)",
            (merge_id, time.time(), reason),
        )

    def current_merge(self) -> dict | None:
        """The merge in service, or None."""
        rows = [m for m in self.merges() if m["current"]]
        return rows[0] if rows else None

    def serving(self) -> list[dict]:
        """Which merge was put in service when and why, oldest first."""
        cur = self.db.execute("SELECT merge_id, at, reason FROM serving ORDER BY id")
        return [{"merge_id": m, "at": at, "reason": r} for m, at, r in cur.fetchall()]

    def record_step(
        self,
        language: str,
        kind: str,
        merge_id: int,
        result: dict,
        addition: tuple[str, str, str] | None,
    ) -> None:
        """Record one maintenance step (kind `update`, or `add` for a new language) whose new
        merge is `merge_id`, with its `result` (cost, shifts). With `addition` = (data path,
        sha256, reason) the step passed: its data is recorded as added to `language` and the
        merge put in service — all in one transaction. A rerun of the step (the same new merge,
        e.g. with --accept) updates its row; the same file added to the same language twice is
        recorded once."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO steps (language, kind, merge_id, served, at, result) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (merge_id) DO UPDATE SET "
                "served=excluded.served, at=excluded.at, result=excluded.result",
                (language, kind, merge_id, int(addition is not None), time.time(),
                 json.dumps(result)),
            )  # fmt: skip
            if addition is None:
                return
            path, sha256, reason = addition
            known = db.execute(
                "SELECT 1 FROM additions WHERE language=? AND sha256=?", (language, sha256)
            ).fetchone()
            if not known:
                db.execute(
                    "INSERT INTO additions (language, kind, path, sha256, added) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (language, kind, self._stored(path), sha256, time.time()),
                )
            self._serve(db, merge_id, reason)

    def steps(self) -> list[dict]:
        """Every maintenance step, served or refused, oldest first, with its result."""
        cur = self.db.execute("SELECT * FROM steps ORDER BY id")
        names = [c[0] for c in cur.description]
        rows = [dict(zip(names, row)) for row in cur.fetchall()]
        for row in rows:
            row["result"] = json.loads(row.pop("result"))
            row["served"] = bool(row["served"])
        return rows

    def finish_evaluation(
        self,
        job_id: int,
        cost: Cost,
        model: str,
        split: str,
        results: dict[str, tuple[str, dict]],
        ended: float | None = None,
    ) -> None:
        """Close an evaluation job and record its metrics per language (`results`: language →
        (data hash, metrics)), in one transaction."""

        def insert(db: sqlite3.Connection) -> None:
            db.executemany(
                "INSERT INTO evaluations (model, language, split, metrics, job_id, data_hash) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(model, code, split, json.dumps(metrics), job_id, data_hash)
                 for code, (data_hash, metrics) in results.items()],
            )  # fmt: skip

        self.finish_job(job_id, cost, then=insert, ended=ended)

    def evaluation(
        self, model: str, language: str, split: str, data_hash: str | None
    ) -> dict | None:
        """The newest metrics of `model` on this language's split of exactly this data (of any
        data when `data_hash` is None), or None."""
        row = self.db.execute(
            "SELECT e.metrics FROM evaluations e JOIN jobs j ON j.id = e.job_id "
            "WHERE e.model=? AND e.language=? AND e.split=? AND (? IS NULL OR e.data_hash=?) "
            "AND j.status='done' ORDER BY e.id DESC LIMIT 1",
            (model, language, split, data_hash, data_hash),
        ).fetchone()
        return json.loads(row[0]) if row else None

    # ---- sweeps ----------------------------------------------------------------------------

    def sweep_point(self, key: str) -> dict | None:
        """A sweep point evaluated before (by any sweep), or None."""
        cur = self.db.execute("SELECT * FROM sweep_points WHERE key=?", (key,))
        row = cur.fetchone()
        if row is None:
            return None
        out = dict(zip([c[0] for c in cur.description], row))
        for k in ("settings", "expert_ids", "metrics"):
            out[k] = json.loads(out[k])
        return out

    def record_sweep_point(
        self, job_id: int, key: str, name: str, settings: dict, expert_ids: list[int],
        metrics: dict, seconds: float,
    ) -> None:  # fmt: skip
        """Keep one evaluated point at once, so an interrupted sweep resumes after it."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO sweep_points "
                "(key, name, settings, expert_ids, metrics, seconds, job_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, name, json.dumps(settings), json.dumps(expert_ids), json.dumps(metrics),
                 seconds, job_id),
            )  # fmt: skip

    def finish_sweep(self, job_id: int, cost: Cost, result: dict) -> int:
        """Close a sweep job and record its result; returns the sweep's id."""
        ids: list[int] = []

        def insert(db: sqlite3.Connection) -> None:
            cur = db.execute(
                "INSERT INTO sweeps (job_id, result) VALUES (?, ?)", (job_id, json.dumps(result))
            )
            ids.append(int(cur.lastrowid))

        self.finish_job(job_id, cost, then=insert)
        return ids[0]

    def conclude_sweep(self, sweep_id: int, result: dict, serve: tuple[int, str] | None) -> None:
        """Record what a sweep decided (its final `result`); with `serve` = (merge id, reason)
        that merge goes into service, in the same transaction."""
        with self.transaction() as db:
            db.execute("UPDATE sweeps SET result=? WHERE id=?", (json.dumps(result), sweep_id))
            if serve is not None:
                self._serve(db, *serve)

    def sweeps(self) -> list[dict]:
        """Finished sweeps, oldest first: id, job id and result."""
        cur = self.db.execute("SELECT id, job_id, result FROM sweeps ORDER BY id")
        return [{"id": i, "job_id": j, **json.loads(r)} for i, j, r in cur.fetchall()]

    def merges(self) -> list[dict]:
        cur = self.db.execute(
            "SELECT m.*, j.wall_s, j.cpu_s, j.flops, j.ended FROM merges m "
            "JOIN jobs j ON j.id = m.job_id "
            "ORDER BY m.id"
        )
        names = [c[0] for c in cur.description]
        rows = [dict(zip(names, row)) for row in cur.fetchall()]
        for row in rows:
            row["params"] = json.loads(row["params"])
            row["expert_ids"] = json.loads(row["expert_ids"])
            row["path"] = self._read(row["path"])
        return rows


@dataclass(frozen=True)
class TrainedModel:
    """An expert (one language) or a joint model (all of them), as the registry records it."""

    kind: str  # expert | joint
    language: str | None
    languages: list[str]
    base: str
    recipe_hash: str
    data_hash: str
    scores: dict
    version: int = 0  # set by `finish_training`
    path: str = ""  # set by `finish_training` when it places the files
    health: dict = field(default_factory=dict)  # the verdict of evaluate/health.py
    training: dict = field(default_factory=dict)  # steps, the best step, the validation curve


def _model_query(kind: str, language: str | None, alias: str = "") -> tuple[str, str, tuple]:
    col = f"{alias}." if alias else ""
    if kind == "expert":
        if language is None:
            return "experts", "", ()
        return "experts", f"WHERE {col}language=?", (language,)
    if kind == "joint":
        return "joints", "", ()
    raise ValueError(f"unknown model kind {kind!r}")


def schema_version(run_dir: Path) -> int | None:
    """The schema version of `run_dir`'s registry, read without changing it (None: no registry)."""
    path = Path(run_dir) / DB_NAME
    if not path.is_file():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return int(db.execute("PRAGMA user_version").fetchone()[0])
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        raise RegistryError(f"cannot read the registry {path}: {e}") from None


def _read_only(run_dir: Path, since: int, query: str) -> list[tuple] | None:
    """Rows of `query` read without changing the registry; None when there is no registry yet
    or one older than schema `since` (a newer one is refused, with its message, on opening)."""
    path = Path(run_dir) / DB_NAME
    if not path.is_file() or not since <= (schema_version(run_dir) or 0) <= SCHEMA_VERSION:
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute(query).fetchall()
    except sqlite3.DatabaseError as e:
        raise RegistryError(f"cannot read the registry {path}: {e}") from None
    finally:
        db.close()


def read_additions(run_dir: Path) -> list[dict]:
    """The data maintenance added to a run directory, oldest first, read without changing the
    registry (none when there is no registry yet, or one from before additions existed)."""
    rows = _read_only(run_dir, 4, "SELECT language, kind, path, sha256 FROM additions ORDER BY id")
    root = Path(run_dir).absolute()
    return [
        {"language": lang, "kind": kind, "path": str(root / path), "sha256": sha}
        for lang, kind, path, sha in rows or []
    ]  # root / an absolute path is that path


def read_sweep_choice(run_dir: Path) -> dict | None:
    """The newest sweep's result (its winner and the recipe's merge settings it replaced), read
    without changing the registry; None without one."""
    rows = _read_only(run_dir, 5, "SELECT result FROM sweeps ORDER BY id DESC LIMIT 1")
    return json.loads(rows[0][0]) if rows else None
