"""Experts branched from a shared seed (`experts.start: seed`) and regmean in a study, on the
tiny encoder: the seed is trained once and counted in the initial cost, the experts and their
merges take it as their base, and maintenance retrains one expert (and its statistics) only."""

import json
from pathlib import Path

import pytest
from tiny import project, sentences, write_jsonl

from langmerge.project.registry import Registry
from langmerge.project.state import load_recipe
from langmerge.train.statistics import FOLDER


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """A tiny project with seed-started experts after `langmerge run` (ties and regmean)."""
    from langmerge.cli import main

    root = tmp_path_factory.mktemp("seeded")
    path = project(root, experts={"start": "seed", "seed_steps": 6},
                   merge={"compare": ["ties", "regmean"]}, guard={"max_drop": 100.0})  # fmt: skip
    write_jsonl(root / "new_de.jsonl", sentences("de", 20, seed=5))
    with pytest.raises(SystemExit) as done:
        main(["run", str(path), "--quiet"])
    assert done.value.code == 0
    return path


def rows(path):
    registry = Registry(load_recipe(path).run_dir)
    try:
        experts = {c: registry.latest("expert", c) for c in ("en", "de", "fr")}
        return registry.ledger(), experts, registry.latest("joint"), registry.merges()
    finally:
        registry.close()


def test_the_experts_branch_from_one_seed_and_merges_take_it_as_base(seeded):
    ledger, experts, joint, merges = rows(seeded)
    seeds = [j for j in ledger if j["kind"] == "seed"]
    assert len(seeds) == 1 and seeds[0]["status"] == "done"
    assert seeds[0]["languages"] == ["en", "de", "fr"]
    seed = Path(experts["en"]["base"])
    assert seed.parent.name == "seed"
    meta = json.loads((seed / "prepared.json").read_text())
    assert meta["seed"]["steps"] == 6 and meta["seed"]["languages"] == ["en", "de", "fr"]
    assert {e["base"] for e in experts.values()} == {str(seed)}
    assert Path(joint["base"]).parent.name == "base"  # the baseline trains from the base
    for m in merges:
        summary = json.loads((Path(m["path"]) / "langmerge_merge.json").read_text())
        assert summary["config"]["base"] == str(seed)


def test_the_seed_is_part_of_the_initial_cost(seeded):
    ledger, *_ = rows(seeded)
    seed_s = next(j["wall_s"] for j in ledger if j["kind"] == "seed")
    cost = json.loads((load_recipe(seeded).run_dir / "results.json").read_text())["cost"]
    assert cost["seed_s"] == seed_s
    serial = seed_s + cost["experts_serial_s"] + cost["merge_s"]
    assert cost["serial_vs_joint"] == pytest.approx(serial / cost["joint_s"])
    report = (load_recipe(seeded).run_dir / "report.md").read_text()
    assert "seed (joint warm-up the experts branch from)" in report


def test_each_expert_keeps_its_statistics_and_regmean_is_compared(seeded):
    _, experts, _, merges = rows(seeded)
    for e in experts.values():
        meta = json.loads((Path(e["path"]) / FOLDER / "statistics.json").read_text())
        assert meta["rows"] and meta["bytes"] > 0
    regmean = [m for m in merges if m["method"] == "regmean"]
    assert len(regmean) == 1
    summary = json.loads((Path(regmean[0]["path"]) / "langmerge_merge.json").read_text())
    assert summary["data_aware"]["tensors"] > 0
    report = (load_recipe(seeded).run_dir / "report.md").read_text()
    assert "merged:regmean" in report


def test_an_update_branches_from_the_same_seed_and_recollects_one_language(seeded, cli):
    _, before, _, _ = rows(seeded)
    files = {c: Path(e["path"]) / FOLDER / "statistics.json" for c, e in before.items()}
    stamps = {c: f.stat().st_mtime_ns for c, f in files.items()}
    new = seeded.parent / "new_de.jsonl"
    code, text = cli("update", seeded, "--lang", "de", "--data", new, "--quiet")
    assert code == 0, text
    ledger, after, _, _ = rows(seeded)
    assert [j["kind"] for j in ledger].count("seed") == 1  # not trained again
    assert after["de"]["version"] == 2 and after["de"]["base"] == before["de"]["base"]
    assert (Path(after["de"]["path"]) / FOLDER / "statistics.json").is_file()
    for code in ("en", "fr"):  # the other experts and their statistics are untouched
        assert after[code]["id"] == before[code]["id"]
        assert files[code].stat().st_mtime_ns == stamps[code]


def test_a_regmean_merge_collects_the_statistics_experts_lack(tmp_path, cli):
    path = project(tmp_path / "p", merge={"compare": ["regmean"]}, statistics={"collect": False})
    code, text = cli("run", path, "--quiet")
    assert code == 0, text
    _, experts, _, merges = rows(path)
    for code_, e in experts.items():  # collected once, by the first merge that needed them
        assert (Path(e["path"]) / FOLDER / "statistics.json").is_file()
        assert f"expert {code_}: input statistics for data-aware merges" in text
    assert [m["method"] for m in merges] == ["regmean"]
