"""Jobs on Ray: a local cluster (2 CPUs, loopback, no dashboard) trains tiny experts in
parallel and runs the study's evaluations; the driver alone writes the registry; a worker that
dies is replaced by another try; a job that keeps failing is reported and the finished experts
are kept."""

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
from tiny import project, sentences, write_jsonl

from langmerge.project.registry import Registry
from langmerge.project.state import load_recipe
from langmerge.workflows import training
from langmerge.workflows.study import concurrency

ray = pytest.importorskip(
    "ray", reason="the ray extra is not installed: pip install langmerge[ray]"
)


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    """A Ray instance of 2 CPUs on loopback; its token and session files stay in tmp dirs."""
    from ray import cloudpickle

    home = tmp_path_factory.mktemp("home")
    real_home = Path.home()
    had_ray_dir = (real_home / ".ray").exists()
    saved = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    sessions = Path(f"/tmp/lm-ray-{os.getpid()}")  # short: Ray's socket paths have a limit
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the wrappers below
    try:
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 _temp_dir=str(sessions), log_to_driver=False, configure_logging=False)  # fmt: skip
        yield
    finally:
        ray.shutdown()
        os.environ["HOME"] = saved or ""
        shutil.rmtree(sessions, ignore_errors=True)
    assert (real_home / ".ray").exists() == had_ray_dir  # nothing left in the user's home


def ray_project(root, retries=2, **overrides):
    return project(root, executor={"kind": "ray", "cpus": 1, "retries": retries}, **overrides)


def ledger(path):
    registry = Registry(load_recipe(path).run_dir)
    try:
        return registry.ledger(), {c: registry.latest("expert", c) for c in ("en", "de", "fr")}
    finally:
        registry.close()


def test_two_experts_train_in_parallel_workers(local_cluster, tmp_path, cli):
    # jobs of a few seconds, so their spans overlap however unevenly the two workers start
    path = project(tmp_path / "p", executor={"kind": "ray", "cpus": 1}, training={"epochs": 12})
    code, text = cli("train", path, "--lang", "en", "--lang", "de", "--quiet")
    assert code == 0, text
    jobs, experts = ledger(path)
    # rows in the order the jobs finished
    assert sorted((j["kind"], j["languages"], j["status"]) for j in jobs) == [
        ("expert", ["de"], "done"), ("expert", ["en"], "done")
    ]  # fmt: skip
    assert experts["en"]["version"] == experts["de"]["version"] == 1 and experts["fr"] is None
    assert all(j["tokens"] > 0 and j["wall_s"] > 0 for j in jobs)
    workers = set(re.findall(r" s on (\S+), \d+ tokens", " ".join(text.split())))
    assert len(workers) == 2  # two worker processes, one expert each, at the same time
    assert concurrency([(j["started"], j["ended"]) for j in jobs]) == 2
    # a second request trains nothing: the models are cached as with the local executor
    code, text = cli("train", path, "--lang", "en", "--lang", "de", "--quiet")
    assert code == 0 and text.count("up to date") == 2 and len(ledger(path)[0]) == 2


def crash_once(recipe, data, language, work, threads):
    """The task of a worker that dies (like a killed process) on de's first try."""
    marker = Path(work).parent / "crashed-once"
    if language == "de" and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        os._exit(1)
    return training.attempt(recipe, data, language, work, threads)  # the worker's own, unpatched


def always_fail_fr(recipe, data, language, work, threads):
    if language == "fr":
        raise RuntimeError("fr's data is on a disk this worker cannot read")
    return training.attempt(recipe, data, language, work, threads)


@pytest.fixture
def wrapped(monkeypatch):
    """`wrapped(fn)`: the driver sends `fn` as the task (None: the real one again). On the
    worker, `training.attempt` is the real function, which the wrappers call."""
    real = training.attempt

    def use(fn):
        monkeypatch.setattr(training, "attempt", fn or real)

    return use


def test_a_worker_that_dies_is_tried_again(local_cluster, tmp_path, cli, wrapped):
    wrapped(crash_once)
    path = ray_project(tmp_path / "p")
    code, text = cli("train", path, "--lang", "de", "--quiet")
    assert code == 0, text
    assert "expert de: failed on a worker: the worker failed" in " ".join(text.split())
    jobs, experts = ledger(path)
    assert [j["status"] for j in jobs] == ["failed", "done"]
    assert "the worker failed" in jobs[0]["error"]
    assert experts["de"]["version"] == 1


def test_a_job_that_keeps_failing_is_reported_and_the_others_kept(local_cluster, tmp_path, cli,
                                                                 wrapped):  # fmt: skip
    wrapped(always_fail_fr)
    path = ray_project(tmp_path / "p", retries=1)
    code, text = cli("train", path, "--all", "--quiet")
    flat = " ".join(text.split())
    assert code == 1
    assert "1 job(s) failed 2 time(s): expert fr: RuntimeError: fr's data is on a disk" in flat
    assert "The 2 other model(s) are recorded" in flat
    jobs, experts = ledger(path)
    assert sorted(j["status"] for j in jobs if j["languages"] == ["fr"]) == ["failed", "failed"]
    assert experts["en"] is not None and experts["de"] is not None and experts["fr"] is None
    # fixed, the same command trains only what is missing
    wrapped(None)
    code, text = cli("train", path, "--all", "--quiet")
    assert code == 0 and text.count("up to date") == 2
    assert ledger(path)[1]["fr"]["version"] == 1


def test_run_with_ray_evaluates_on_ray_too(local_cluster, tmp_path, cli):
    path = ray_project(tmp_path / "p", merge={"compare": ["ties"]})
    code, text = cli("run", path, "--quiet")
    assert code == 0, text
    flat = " ".join(text.split())
    # the evaluations ran as Ray tasks too, recorded by the driver
    assert "6 evaluation(s) on Ray" in flat and flat.count("evaluated ") == 6  # 3 experts
    cost = json.loads((load_recipe(path).run_dir / "results.json").read_text())["cost"]
    assert cost["experts_serial_s"] > 0 and cost["experts_makespan_s"] > 0


def test_a_job_no_node_can_hold_is_refused_at_once(local_cluster, tmp_path, cli):
    path = project(tmp_path / "p", executor={"kind": "ray", "gpus": 1})
    code, text = cli("train", path, "--all", "--quiet")
    assert code == 1
    assert "no node of the Ray cluster has what one job asks for" in " ".join(text.split())


def test_concurrency_of_job_spans():
    assert concurrency([(0.0, 2.0), (1.0, 3.0), (2.5, 4.0)]) == 2
    assert concurrency([(0.0, 1.0), (1.0, 2.0)]) == 1  # one ends as the next starts
    assert concurrency([(0.0, 5.0), (1.0, 2.0), (1.5, 3.0)]) == 3


def test_an_update_trains_its_expert_on_ray_when_asked(local_cluster, tmp_path, cli):
    path = project(tmp_path / "p", merge={"compare": ["ties"]}, guard={"max_drop": 100.0})
    write_jsonl(tmp_path / "p" / "new_de.jsonl", sentences("de", 20, seed=5))
    code, text = cli("run", path, "--quiet")  # the recipe's executor: local
    assert code == 0, text
    code, text = cli("update", path, "--lang", "de", "--data", tmp_path / "p" / "new_de.jsonl",
                     "--quiet", "--executor", "ray")  # fmt: skip
    assert code == 0, text
    flat = " ".join(text.split())
    assert re.search(r"expert de: v2 in .* s on \S+, \d+ tokens", flat)
    assert "1 training job(s) on Ray" in flat
    assert re.search(r"evaluated merged:ties#2 on en, de, fr test \([\d.]+ s on \S+\)", flat)
    jobs, experts = ledger(path)
    assert experts["de"]["version"] == 2 and experts["en"]["version"] == 1
    registry = Registry(load_recipe(path).run_dir)
    try:
        assert registry.serving()[-1]["reason"] == "update de"
    finally:
        registry.close()
    code, text = cli("eval", path, "--model", "expert:de", "--executor", "ray")
    assert code == 0 and "1 evaluation(s) on Ray" in " ".join(text.split()), text
