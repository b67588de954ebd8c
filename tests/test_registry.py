"""The registry: versioned schema, transactional job rows, the cost ledger, concurrent writers."""

import multiprocessing
import os
import sqlite3

import pytest

from langmerge.project.registry import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Cost,
    Registry,
    RegistryError,
    TrainedModel,
)


def test_a_job_goes_from_running_to_a_ledger_row(tmp_path):
    reg = Registry(tmp_path)
    job = reg.start_job("expert", ["de"], "r1", "d1")
    assert reg.ledger()[0]["status"] == "running"
    reg.finish_job(job, Cost(cpu_s=1.5, tokens=1234, examples=10, device_count=2))
    (row,) = reg.ledger()
    assert row["status"] == "done" and row["languages"] == ["de"]
    assert row["tokens"] == 1234 and row["examples"] == 10 and row["cpu_s"] == 1.5
    assert row["wall_s"] > 0 and row["device_s"] == pytest.approx(2 * row["wall_s"])


def expert(language, data_hash, kind="expert"):
    languages = [language] if language else ["en", "de"]
    return TrainedModel(kind, language, languages, "base", "r1", data_hash, {"f1": 0.5})


def test_expert_versions_and_the_cache_lookup(tmp_path):
    reg = Registry(tmp_path)
    for data_hash in ("d1", "d2"):
        job = reg.start_job("expert", ["de"], "r1", data_hash)
        recorded = reg.finish_training(job, Cost(), expert("de", data_hash), lambda v: f"de/v{v}")
        assert recorded.path == f"de/v{recorded.version}"
    latest = reg.latest("expert", "de")
    assert latest["version"] == 2 and latest["scores"] == {"f1": 0.5}
    assert reg.find_trained("expert", "de", "r1", "d2")["id"] == latest["id"]
    assert reg.find_trained("expert", "de", "r1", "d1") is None  # current version: other data
    assert reg.latest("expert", "fr") is None
    assert reg.next_version("expert", "fr") == 1


def test_joint_models_have_their_own_versions(tmp_path):
    reg = Registry(tmp_path)
    job = reg.start_job("joint", ["en", "de"], "r1", "d1")
    reg.finish_training(job, Cost(tokens=7), expert(None, "d1", kind="joint"))
    (joint,) = reg.trained("joint")
    assert joint["languages"] == ["en", "de"] and joint["tokens"] == 7
    assert reg.next_version("joint") == 2 and reg.next_version("expert", "en") == 1


def test_a_model_is_recorded_only_with_its_finished_job(tmp_path):
    reg = Registry(tmp_path)
    job = reg.start_job("expert", ["fr"], "r", "d")

    def place(version):
        raise OSError("disk full while moving the adapter")

    with pytest.raises(OSError, match="disk full"):
        reg.finish_training(job, Cost(), expert("fr", "d"), place)
    assert reg.latest("expert", "fr") is None and reg.ledger()[0]["status"] == "running"
    reg.fail_job(job, "disk full", Cost(cpu_s=2.0, tokens=5))
    row = reg.ledger()[0]
    assert (row["status"], row["tokens"], row["cpu_s"]) == ("failed", 5, 2.0) and row["wall_s"] > 0


def test_a_dead_job_is_marked_failed(tmp_path):
    reg = Registry(tmp_path)
    job = reg.start_job("expert", ["fr"], "r", "d")
    reg.db.execute("UPDATE jobs SET pid=999999999 WHERE id=?", (job,))  # as if it was killed
    assert reg.mark_abandoned() == 1
    row = reg.ledger()[0]
    assert row["status"] == "failed" and "process ended" in row["error"]


def test_opening_the_registry_cleans_up_after_a_killed_process(tmp_path):
    reg = Registry(tmp_path)
    job = reg.start_job("merge", ["en", "de"], "r", "d")
    reg.db.execute("UPDATE jobs SET pid=999999999 WHERE id=?", (job,))  # killed mid-merge
    reg.close()
    dead = tmp_path / "merges" / ".0001-ties.partial-999999999"
    (dead / "model.safetensors").parent.mkdir(parents=True)
    (dead / "model.safetensors").write_bytes(b"half")
    old = tmp_path / "experts" / "de" / ".v2.old-999999999"
    old.mkdir(parents=True)
    alive = tmp_path / "merges" / f".0002-ties.partial-{os.getpid()}"  # a merge in progress
    alive.mkdir()
    Registry(tmp_path).close()  # what every command does first
    assert not dead.exists() and not old.exists() and alive.is_dir()
    row = Registry(tmp_path).ledger()[0]
    assert row["status"] == "failed" and "process ended" in row["error"]


def test_a_copied_run_directory_uses_its_own_files(tmp_path):
    import shutil

    run = tmp_path / "run"
    reg = Registry(run)
    job = reg.start_job("expert", ["de"], "r", "d")
    model = TrainedModel("expert", "de", ["de"], str(run / "base" / "b1"), "r", "d", {})
    reg.finish_training(job, Cost(), model, place=lambda v: str(run / "experts" / "de" / f"v{v}"))
    merge_job = reg.start_job("merge", ["de"], "r", "d")
    (run / "merges" / "0002-ties").mkdir(parents=True)
    reg.finish_merge(merge_job, Cost(), "ties", {}, [1], str(run / "merges" / "0002-ties"))
    reg.close()
    shutil.copytree(run, tmp_path / "copy")
    shutil.rmtree(run)
    copy = Registry(tmp_path / "copy")
    expert = copy.latest("expert", "de")
    assert expert["path"] == str(tmp_path / "copy" / "experts" / "de" / "v1")
    assert expert["base"] == str(tmp_path / "copy" / "base" / "b1")
    assert copy.merges()[0]["path"] == str(tmp_path / "copy" / "merges" / "0002-ties")
    copy.serve(1, "by hand")  # finds the copy's files


def test_a_version_7_registry_gets_relative_paths(tmp_path):
    db = sqlite3.connect(tmp_path / "registry.sqlite")
    for version in range(1, 8):
        for statement in MIGRATIONS[version].split(";"):
            if statement.strip():
                db.execute(statement)
    db.execute("INSERT INTO jobs (kind, languages, recipe_hash, data_hash, status, pid, started) "
               "VALUES ('expert', '[\"de\"]', 'r', 'd', 'done', 1, 0)")  # fmt: skip
    db.execute(
        "INSERT INTO experts (language, version, base, recipe_hash, data_hash, path, job_id) "
        "VALUES ('de', 1, '/models/base', 'r', 'd', ?, 1)",
        (str(tmp_path / "experts" / "de" / "v1"),),
    )
    db.execute("PRAGMA user_version=7")
    db.commit()
    db.close()
    reg = Registry(tmp_path)
    stored = reg.db.execute("SELECT base, path FROM experts").fetchone()
    assert stored == ("/models/base", "experts/de/v1")  # a base outside stays absolute
    assert reg.latest("expert", "de")["path"] == str(tmp_path / "experts" / "de" / "v1")


def test_merges_are_recorded_and_one_is_served_at_a_time(tmp_path):
    reg = Registry(tmp_path)
    for method in ("ties", "dare_ties"):
        (tmp_path / method).mkdir()
        job = reg.start_job("merge", ["en", "de"], "r", "d")
        reg.finish_merge(job, Cost(), method, {"density": 0.5}, [1, 2], str(tmp_path / method),
                         serve="test" if method == "ties" else None)  # fmt: skip
    first, second = reg.merges()
    assert (first["current"], second["current"]) == (1, 0) and second["expert_ids"] == [1, 2]
    reg.serve(second["id"], "rollforward")
    assert reg.current_merge()["method"] == "dare_ties"
    assert [s["reason"] for s in reg.serving()] == ["test", "rollforward"]
    with pytest.raises(RegistryError, match="no merge 9"):
        reg.serve(9, "typo")


def test_a_version_1_registry_is_migrated(tmp_path):
    db = sqlite3.connect(tmp_path / "registry.sqlite")
    for statement in MIGRATIONS[1].split(";"):
        db.execute(statement)
    db.execute("INSERT INTO jobs (kind, languages, recipe_hash, data_hash, status, pid, started) "
               "VALUES ('merge', '[]', 'r', 'd', 'done', 1, 0)")  # fmt: skip
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    reg = Registry(tmp_path)
    assert reg.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert len(reg.ledger()) == 1 and reg.trained("joint") == []


def test_a_populated_version_4_registry_keeps_every_row_when_migrated(tmp_path):
    db = sqlite3.connect(tmp_path / "registry.sqlite")
    for version in range(1, 5):
        for statement in MIGRATIONS[version].split(";"):
            if statement.strip():
                db.execute(statement)
    job = ("INSERT INTO jobs (kind, languages, recipe_hash, data_hash, status, pid, started, "
           "wall_s, tokens) VALUES (?, '[\"de\"]', 'r', 'd', 'done', 1, 0, ?, ?)")  # fmt: skip
    db.execute(job, ("expert", 12.5, 900))
    db.execute(job, ("merge", 0.5, 0))
    db.execute(job, ("evaluate", 2.0, 300))
    db.execute("INSERT INTO experts (language, version, base, recipe_hash, data_hash, path, "
               "job_id) VALUES ('de', 1, 'b', 'r', 'd', 'p', 1)")  # fmt: skip
    db.execute("INSERT INTO merges (method, params, expert_ids, path, job_id, current) "
               "VALUES ('ties', '{}', '[1]', 'm', 2, 1)")  # fmt: skip
    db.execute("INSERT INTO evaluations (model, language, split, metrics, job_id, data_hash) "
               "VALUES ('merged:ties#1', 'de', 'test', '{\"accuracy\": 0.5}', 3, 'k')")  # fmt: skip
    db.execute("INSERT INTO serving (merge_id, at, reason) VALUES (1, 0, 'run')")
    db.execute("PRAGMA user_version=4")
    db.commit()
    db.close()
    reg = Registry(tmp_path)
    assert [(j["kind"], j["wall_s"], j["tokens"]) for j in reg.ledger()] == [
        ("expert", 12.5, 900), ("merge", 0.5, 0), ("evaluate", 2.0, 300)
    ]  # fmt: skip
    assert reg.current_merge()["id"] == 1 and reg.merges()[0]["wall_s"] == 0.5
    assert reg.evaluation("merged:ties#1", "de", "test", "k") == {"accuracy": 0.5}
    assert reg.db.execute("PRAGMA foreign_key_check").fetchall() == []
    assert reg.db.execute("PRAGMA foreign_keys").fetchone() == (1,)
    assert reg.start_job("sweep", ["de"], "r", "d") == 4  # the new job kind


def test_a_failed_write_leaves_no_half_row(tmp_path):
    reg = Registry(tmp_path)
    with pytest.raises(RuntimeError, match="crash"), reg.transaction() as db:
        db.execute(
            "INSERT INTO jobs (kind, languages, recipe_hash, data_hash, status, pid, "
            "started) VALUES ('merge', '[]', 'r', 'd', 'running', 1, 0)"
        )
        raise RuntimeError("crash in the middle of a write")
    assert reg.ledger() == []


def test_a_newer_schema_is_refused(tmp_path):
    Registry(tmp_path).close()
    db = sqlite3.connect(tmp_path / "registry.sqlite")
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(RegistryError, match="newer langmerge"):
        Registry(tmp_path)


def test_a_busy_registry_gives_a_clear_error(tmp_path):
    holder = Registry(tmp_path)
    holder.db.execute("BEGIN IMMEDIATE")  # another process in the middle of a write
    with pytest.raises(RegistryError, match="another langmerge process"):
        Registry(tmp_path, timeout=0.2).start_job("merge", [], "r", "d")
    holder.db.execute("ROLLBACK")


def _write_jobs(run_dir, n):
    reg = Registry(run_dir)
    for _ in range(n):
        reg.finish_job(reg.start_job("evaluate", ["en"], "r", "d"), Cost(examples=1))


def test_concurrent_writers_lose_nothing(tmp_path):
    Registry(tmp_path).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_jobs, args=(tmp_path, 25)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    rows = Registry(tmp_path).ledger()
    assert len(rows) == 50 and all(r["status"] == "done" for r in rows)


def _open(run_dir, barrier):
    barrier.wait()
    Registry(run_dir).close()


def test_processes_creating_one_registry_at_once_all_succeed(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_open, args=(tmp_path, barrier)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert Registry(tmp_path).db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
