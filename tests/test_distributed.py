"""One expert trained by two processes (torchrun, CPU, gloo): ranks above 0 train alongside
rank 0, which alone scores, saves and writes the registry; the ledger counts both processes."""

import os
import socket
import subprocess
import sys

from tiny import project

from langmerge.data.prepare import load_data
from langmerge.project.registry import Registry
from langmerge.project.state import load_recipe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_one_expert(tmp_path, cli):
    path = project(tmp_path / "p")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "langmerge.cli", "train", str(path), "--lang", "en", "--quiet"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("expert en: v1 in") == 1  # rank 0 alone reports and records
    recipe = load_recipe(path)
    registry = Registry(recipe.run_dir)
    try:
        (job,) = registry.ledger()
        expert = registry.latest("expert", "en")
    finally:
        registry.close()
    assert job["status"] == "done" and job["device_count"] == 2
    n = len(load_data(recipe.data_spec()).languages["en"].train)
    # every example seen each epoch; the ranks' batches are evened out by repeating a few
    assert recipe.training.epochs * n <= job["examples"] <= recipe.training.epochs * (n + 8)
    assert expert["version"] == 1
    code, text = cli("eval", path, "--model", "expert:en", "--lang", "en")
    assert code == 0, text


def test_only_train_runs_as_several_processes(tmp_path, cli, monkeypatch):
    path = project(tmp_path / "p")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, text = cli("run", path)
    assert code == 1 and "only `langmerge train` runs as several processes" in text
    monkeypatch.setenv("RANK", "1")
    code, text = cli("train", path, "--all", "--executor", "ray")
    assert code == 1 and "runs with the local executor" in text
