"""Full-model merge benchmark: langmerge vs mergekit 0.1.5 vs a plain read-average-write floor.

What it measures
    On a base + 3 synthetic Llama-shaped fp32 models (~0.47B parameters each, sharded safetensors
    HF directories, built once under bench/work/models/ with a fixed seed; experts are
    base + 0.01*randn), it runs as separate subprocesses, one at a time:
      - langmerge      `langmerge merge --method M --density 0.5 --base B --experts E1 E2 E3 -o O`
      - langmerge_yaml `langmerge merge CONFIG.yaml -o O` (the same mergekit YAML as below,
                       i.e. mergekit's semantics: for dare_ties normalize=false and L1 rescale)
      - mergekit       `mergekit-yaml CONFIG.yaml O` (0.1.5, own venv, CPU, same shard size)
      - plain          a streaming pass: read each tensor of the 4 models, average, write shards
    for M in ties and dare_ties (density 0.5, weight 1.0), and records for each the wall time
    (min over --repeat runs; process start-up and imports included) and the peak RSS of the process
    tree (max of the command's ru_maxrss, taken by a fresh tiny launcher process so the bench's own
    memory cannot leak in, and a 50 ms poll of the tree's summed VmRSS; the polled private RssAnon
    is reported too, since RSS also counts the page-cache pages of mmap'd inputs). The plain
    floor opens each input with safe_open per tensor and streams each shard to disk.
    Before every timed run the 4 input models are read once to warm the page cache, and dirty
    pages are synced, so every contender starts from the same warm, clean state.

    Correctness: for ties, the max abs difference between langmerge's and mergekit's outputs over
    all tensors (tensor by tensor). For dare_ties the masks come from different RNGs, so only a
    sanity metric is given: the relative L2 distance between the merged deltas (out - base) and the
    ratio of their norms (close to 1 when the semantics agree).

Goals (ties): mergekit_time / langmerge_time >= 5; langmerge_time / plain_time <= 3;
    langmerge_rss / mergekit_rss <= 1; max |langmerge - mergekit| <= 1e-6.

How to run (from the repo root)
    .venv/bin/python bench/merge_full.py            # full size: ~6 min on 2 cores, mostly mergekit
    .venv/bin/python bench/merge_full.py --quick    # 4 layers, hidden 256: a smoke run
    options: --skip-mergekit, --methods ties,dare_ties, --repeat N (min wall kept),
    --wait-idle S (default 120: wait for a quiet machine before each run), --keep-outputs
    The first run creates bench/work/venv-mergekit (python3.11 venv; pip install torch==2.13.0
    mergekit==0.1.5). Results: a table on stdout and bench/results/merge_full[_quick].json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, run_measured, tail, wait_idle, warm_page_cache  # noqa: E402

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / "work"
MK_VENV = WORK / "venv-mergekit"
MK_PINS = ["torch==2.13.0", "mergekit==0.1.5"]

FULL = {"hidden": 1024, "intermediate": 4096, "layers": 24, "heads": 16, "kv_heads": 16,
        "vocab": 32000, "shard_bytes": 1_000_000_000}  # fmt: skip
QUICK = {"hidden": 256, "intermediate": 1024, "layers": 4, "heads": 4, "kv_heads": 4,
         "vocab": 8000, "shard_bytes": 12_000_000}  # fmt: skip
MODELS = ["base", "e1", "e2", "e3"]
SEED = 1234
PERTURB = 0.01
TOL = 1e-6
ST_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}


# --------------------------------------------------------------------------- synthetic models


def tensor_shapes(spec: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a LlamaForCausalLM's tensors, in file order."""
    h, i, hd = spec["hidden"], spec["intermediate"], spec["hidden"] // spec["heads"]
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (spec["vocab"], h))]
    for n in range(spec["layers"]):
        p = f"model.layers.{n}."
        out += [
            (p + "self_attn.q_proj.weight", (spec["heads"] * hd, h)),
            (p + "self_attn.k_proj.weight", (spec["kv_heads"] * hd, h)),
            (p + "self_attn.v_proj.weight", (spec["kv_heads"] * hd, h)),
            (p + "self_attn.o_proj.weight", (h, spec["heads"] * hd)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (spec["vocab"], h))]
    return out


def llama_config(spec: dict) -> dict:
    """A LlamaForCausalLM config.json for `spec`."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec["hidden"],
        "intermediate_size": spec["intermediate"],
        "num_hidden_layers": spec["layers"],
        "num_attention_heads": spec["heads"],
        "num_key_value_heads": spec["kv_heads"],
        "head_dim": spec["hidden"] // spec["heads"],
        "vocab_size": spec["vocab"],
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Greedy split of (name, nbytes) into shards of at most `max_bytes` (one tensor at least)."""
    shards: list[list[str]] = [[]]
    cur = 0
    for name, nb in sizes:
        if shards[-1] and cur + nb > max_bytes:
            shards.append([])
            cur = 0
        shards[-1].append(name)
        cur += nb
    return shards


def shard_name(i: int, n: int) -> str:
    """HF shard file name."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_index(out: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    """Write model.safetensors.index.json."""
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _randn(shape: tuple[int, ...], key: str) -> torch.Tensor:
    """Deterministic standard normal tensor for (SEED, key)."""
    g = torch.Generator().manual_seed(SEED * 1_000_003 + zlib.crc32(key.encode()))
    return torch.randn(shape, generator=g, dtype=torch.float32)


def build_models(root: Path, spec: dict) -> dict[str, Path]:
    """Build (or reuse) base + 3 experts as sharded fp32 HF dirs under `root`, tensor by tensor."""
    dirs = {m: root / m for m in MODELS}
    want = {**spec, "seed": SEED, "perturb": PERTURB, "format": 1}
    marker = root / "spec.json"
    if marker.exists() and json.loads(marker.read_text()) == want:
        return dirs
    print(f"building synthetic models under {root} ...", flush=True)
    t0 = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    shapes = dict(tensor_shapes(spec))
    sizes = [(n, 4 * torch.Size(s).numel()) for n, s in shapes.items()]
    shards = plan_shards(sizes, spec["shard_bytes"])
    weight_map = {n: shard_name(i, len(shards)) for i, sh in enumerate(shards) for n in sh}
    for d in dirs.values():
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(llama_config(spec), indent=2))
        write_index(d, weight_map, sum(nb for _, nb in sizes))
    for i, names in enumerate(shards):
        base = {}
        for n in names:
            if n.endswith("norm.weight"):
                base[n] = torch.ones(shapes[n])
            else:
                base[n] = _randn(shapes[n], f"base/{n}").mul_(0.02)
        save_file(base, dirs["base"] / shard_name(i, len(shards)), metadata={"format": "pt"})
        for m in MODELS[1:]:
            exp = {n: _randn(shapes[n], f"{m}/{n}").mul_(PERTURB).add_(base[n]) for n in names}
            save_file(exp, dirs[m] / shard_name(i, len(shards)), metadata={"format": "pt"})
            del exp
        del base
    marker.write_text(json.dumps(want))
    print(f"built in {time.perf_counter() - t0:.1f} s", flush=True)
    return dirs


# --------------------------------------------------------------------------- reading outputs


def tensor_index(d: Path) -> dict[str, Path]:
    """Map tensor name -> safetensors file for an HF dir (sharded or single-file)."""
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        wm = json.loads(idx.read_text())["weight_map"]
        return {n: d / f for n, f in wm.items()}
    out: dict[str, Path] = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            out.update(dict.fromkeys(h.keys(), f))
    return out


class Reader:
    """Tensor-by-tensor access to an HF safetensors dir (keeps one handle per file)."""

    def __init__(self, d: Path) -> None:
        self.index = tensor_index(d)
        self._h: dict[Path, object] = {}

    def get(self, name: str) -> torch.Tensor:
        f = self.index[name]
        if f not in self._h:
            self._h[f] = safe_open(f, framework="pt")
        return self._h[f].get_tensor(name)


def threshold_ties(
    n: str, t0: torch.Tensor, experts: list[Reader], density: float, idx: torch.Tensor
) -> torch.Tensor:
    """Which flat positions `idx` of tensor `n` sit on an exact tie at some expert's TIES trim
    threshold (|τ| equal to the k-th largest while more than k entries reach it). There the
    kept entries are a free choice: langmerge keeps the lowest indices, mergekit whatever
    torch.argsort(descending=True) puts first."""
    on_tie = torch.zeros(idx.numel(), dtype=torch.bool)
    for r in experts:
        tau = (r.get(n).float() - t0).reshape(-1).abs_()
        k = max(1, int(density * tau.numel()))
        if k >= tau.numel():
            continue
        thr = torch.kthvalue(tau, tau.numel() - k + 1).values
        if int((tau >= thr).sum()) > k:
            on_tie |= tau[idx] == thr
    return on_tie


def compare(
    a: Path, b: Path, base: Path, experts: list[Path] | None = None, density: float = 1.0
) -> dict:
    """Tensor-by-tensor comparison of merged outputs `a` and `b` (and of their deltas vs base).

    With `experts` (a TIES merge at `density`), differences are also split into those at exact
    ties on a trim threshold and the rest."""
    ra, rb, r0 = Reader(a), Reader(b), Reader(base)
    rexp = [Reader(e) for e in experts or []]
    at_ties = 0
    max_off_ties = 0.0
    names = list(r0.index)
    missing_a = sorted(set(names) - set(ra.index))
    missing_b = sorted(set(names) - set(rb.index))
    extra = sorted((set(ra.index) | set(rb.index)) - set(names))
    per: list[tuple[str, float, int]] = []
    mismatch: list[str] = []
    dd = bb = aa = 0.0
    numel = 0
    for n in names:
        if n in missing_a or n in missing_b:
            continue
        ta, tb, t0 = ra.get(n), rb.get(n), r0.get(n)
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            mismatch.append(f"{n}: {tuple(ta.shape)} {ta.dtype} vs {tuple(tb.shape)} {tb.dtype}")
            continue
        ta, tb, t0 = ta.float(), tb.float(), t0.float()
        diff = (ta - tb).abs_()
        per.append((n, float(diff.max()), int((diff > TOL).sum())))
        if rexp and per[-1][2]:
            idx = (diff.reshape(-1) > TOL).nonzero().flatten()
            tie = threshold_ties(n, t0, rexp, density, idx)
            at_ties += int(tie.sum())
            off = diff.reshape(-1)[idx][~tie]
            max_off_ties = max(max_off_ties, float(off.max()) if off.numel() else 0.0)
        da, db = ta - t0, tb - t0
        dd += float(torch.sum((da - db).square_(), dtype=torch.float64))
        aa += float(torch.sum(da.square(), dtype=torch.float64))
        bb += float(torch.sum(db.square_(), dtype=torch.float64))
        numel += ta.numel()
    worst = sorted(per, key=lambda x: -x[1])
    return {
        "tensors_compared": len(per),
        "elements_compared": numel,
        "max_abs_diff": max((x[1] for x in per), default=float("nan")),
        "elements_over_tol": sum(x[2] for x in per),
        "tensors_over_tol": sum(1 for x in per if x[1] > TOL),
        "tol": TOL,
        "elements_over_tol_at_threshold_ties": at_ties if rexp else None,
        "max_abs_diff_off_threshold_ties": max_off_ties if rexp else None,
        "worst_tensors": [
            {"name": n, "max_abs_diff": m, "elements_over_tol": c} for n, m, c in worst[:10]
        ],
        "delta_rel_l2_distance": (dd / bb) ** 0.5 if bb else float("nan"),
        "delta_norm_ratio": (aa / bb) ** 0.5 if bb else float("nan"),
        "missing_in_a": missing_a,
        "missing_in_b": missing_b,
        "extra_names": extra,
        "shape_or_dtype_mismatch": mismatch,
    }


# --------------------------------------------------------------------------- plain floor


def write_streamed(path: Path, entries: list[tuple[str, str, list[int]]], produce) -> int:
    """Write a safetensors file tensor by tensor: header first, then each `produce(name)`."""
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, dt, shape in entries:
        nb = ST_DTYPES[dt].itemsize * torch.Size(shape).numel()
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + nb]}
        off += nb
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for name, _, _ in entries:
            t = produce(name).contiguous().view(-1)
            f.write(t.view(torch.uint8).numpy().data)
    return off


def plain_average(out: Path, inputs: list[Path], shard_bytes: int) -> None:
    """Streaming floor: read each tensor from all inputs, average in fp32, stream it to its shard.

    Each read opens the file with safe_open and closes it again, so no input stays mapped; the
    output is written tensor by tensor (no shard buffered in memory)."""
    idx = [tensor_index(p) for p in inputs]
    entries = {}
    for f in dict.fromkeys(idx[0].values()):
        with safe_open(f, framework="pt") as h:
            for n in h.keys():  # noqa: SIM118 (safe_open is not a mapping)
                sl = h.get_slice(n)
                entries[n] = (n, sl.get_dtype(), list(sl.get_shape()))
    names = list(idx[0])
    sizes = [(n, ST_DTYPES[dt].itemsize * torch.Size(shape).numel()) for n, dt, shape in
             (entries[n] for n in names)]  # fmt: skip
    shards = plan_shards(sizes, shard_bytes)

    def load(i: int, name: str) -> torch.Tensor:
        with safe_open(idx[i][name], framework="pt") as h:
            return h.get_tensor(name)

    def average(name: str) -> torch.Tensor:
        acc = load(0, name).float() + load(1, name)  # a new tensor: inputs may be mmap'd
        for i in range(2, len(inputs)):
            acc.add_(load(i, name))
        return acc.mul_(1.0 / len(inputs)).to(ST_DTYPES[entries[name][1]])

    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = shard_name(i, len(shards))
        total += write_streamed(out / fname, [entries[n] for n in shard], average)
        weight_map.update(dict.fromkeys(shard, fname))
    write_index(out, weight_map, total)
    shutil.copy(inputs[0] / "config.json", out / "config.json")


# --------------------------------------------------------------------------- contenders


def ensure_mergekit() -> Path:
    """Create bench/work/venv-mergekit with mergekit 0.1.5 and torch 2.13.0 if missing."""
    exe = MK_VENV / "bin" / "mergekit-yaml"
    if not exe.exists():
        print(f"creating {MK_VENV} (pip install {' '.join(MK_PINS)}) ...", flush=True)
        py311 = shutil.which("python3.11") or sys.executable
        subprocess.run([py311, "-m", "venv", "--clear", str(MK_VENV)], check=True)
        # torch is pinned in the same command so the resolver cannot pull another build.
        pip = [str(MK_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run(pip + MK_PINS, check=True)
    return exe


def mergekit_versions() -> dict[str, str]:
    """Versions of mergekit and torch inside the mergekit venv."""
    code = "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"
    r = subprocess.run(
        [str(MK_VENV / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True
    )
    mk, tv = r.stdout.split()
    return {"mergekit": mk, "mergekit_venv_torch": tv}


def langmerge_cmd() -> tuple[list[str], dict[str, str]]:
    """How to invoke the langmerge CLI (console script, or the source tree as a fallback)."""
    exe = REPO / ".venv" / "bin" / "langmerge"
    if exe.exists():
        return [str(exe)], {}
    code = "import sys; from langmerge.cli.main import app; sys.argv[0] = 'langmerge'; app()"
    return [sys.executable, "-c", code], {"PYTHONPATH": str(REPO / "src")}


def mergekit_yaml(path: Path, method: str, dirs: dict[str, Path], density: float) -> None:
    """Write the mergekit config for `method` (all experts density `density`, weight 1.0)."""
    lines = ["models:"]
    for m in MODELS[1:]:
        lines += [f"  - model: {dirs[m]}", "    parameters:", f"      density: {density}",
                  "      weight: 1.0"]  # fmt: skip
    lines += [f"base_model: {dirs['base']}", f"merge_method: {method}", "dtype: float32", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def contender_cmds(
    method: str, dirs: dict[str, Path], cfg: Path, out: Path, density: float, shard_bytes: int,
    skip_mergekit: bool,
) -> dict[str, tuple[list[str], dict[str, str]]]:  # fmt: skip
    """Command line (and extra env) of each contender for `method`, keyed by contender name."""
    lm, lm_env = langmerge_cmd()
    experts = [str(dirs[m]) for m in MODELS[1:]]
    cmds = {
        "langmerge": (
            lm + ["merge", "--method", method, "--density", str(density),
                  "--base", str(dirs["base"]), "--experts", *experts,
                  "--seed", "0", "--shard-size", str(shard_bytes),
                  "-o", str(out / f"langmerge_{method}"), "--force", "--quiet"],
            lm_env,
        ),
        "langmerge_yaml": (
            lm + ["merge", str(cfg), "--shard-size", str(shard_bytes),
                  "-o", str(out / f"langmerge_yaml_{method}"), "--force", "--quiet"],
            lm_env,
        ),
    }  # fmt: skip
    if not skip_mergekit:
        cmds["mergekit"] = (
            [str(MK_VENV / "bin" / "mergekit-yaml"), str(cfg), str(out / f"mergekit_{method}"),
             "--no-cuda", "--lazy-unpickle", "--out-shard-size", str(shard_bytes),
             "--no-copy-tokenizer", "--no-write-model-card", "--quiet", "--random-seed", "0"],
            {},
        )  # fmt: skip
    return cmds


def timed(
    name: str, cmd: list[str], extra_env: dict[str, str], out_dir: Path, inputs: list[Path],
    repeat: int, logs: Path, max_wait_idle_s: float,
) -> dict:  # fmt: skip
    """Run one contender `repeat` times from a warm cache; min wall, max peak RSS."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra_env}
    runs = []
    for r in range(repeat):
        shutil.rmtree(out_dir, ignore_errors=True)
        warm_page_cache(inputs)
        os.sync()
        log = logs / f"{name}.{r}.log"
        print(f"  {name} run {r + 1}/{repeat} ...", end=" ", flush=True)
        busy = wait_idle(max_wait_idle_s)
        res = run_measured(cmd, log, env)
        res["machine_busy_frac_before"] = busy
        if out_dir.is_dir():
            res["output_files"] = sorted(p.name for p in out_dir.iterdir())
        print(
            f"{res['wall_s']:.1f} s, {res['peak_rss_gb']:.2f} GB, rc={res['rc']} "
            f"(busy before {busy:.0%}, other CPU during {res['other_cpu_s']:.1f} s)",
            flush=True,
        )
        if res["rc"] != 0:
            res["log_tail"] = tail(log)
            print(res["log_tail"], flush=True)
        runs.append(res)
        if res["rc"] != 0:
            break
    ok = [x for x in runs if x["rc"] == 0]
    best = {
        "rc": runs[-1]["rc"],
        "cmd": cmd,
        "walls_s": [x["wall_s"] for x in runs],
        "wall_s": min(x["wall_s"] for x in ok) if ok else None,
        "peak_rss_gb": max(x["peak_rss_gb"] for x in ok) if ok else None,
        "tree_anon_polled_gb": max(x["tree_anon_polled_gb"] for x in ok) if ok else None,
        "runs": runs,
    }
    if not ok:
        best["log_tail"] = runs[-1].get("log_tail", "")
    return best


# --------------------------------------------------------------------------- main


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing."""
    return a / b if a is not None and b else None


def fmt(x: float | None, spec: str = ".2f") -> str:
    """Format a number or '-'."""
    return "-" if x is None else format(x, spec)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models (smoke run)")
    p.add_argument("--skip-mergekit", action="store_true")
    p.add_argument("--methods", default="ties,dare_ties")
    p.add_argument("--repeat", type=int, default=1, help="runs per contender; the min wall is kept")
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument(
        "--wait-idle",
        type=float,
        default=120.0,
        help="before each run, wait up to this many seconds for the machine to be <25%% busy",
    )
    p.add_argument("--keep-outputs", action="store_true", help="keep merged dirs in bench/work")
    p.add_argument("--json", type=Path, default=None, help="results file")
    p.add_argument("--_plain", nargs="+", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--_shard-bytes", type=int, default=1_000_000_000, help=argparse.SUPPRESS)
    a = p.parse_args()

    if a._plain:  # worker mode for the floor: OUT BASE E1 E2 E3
        plain_average(Path(a._plain[0]), [Path(x) for x in a._plain[1:]], a._shard_bytes)
        return 0

    tag = "quick" if a.quick else "full"
    spec = QUICK if a.quick else FULL
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    json_path = a.json or BENCH / "results" / f"merge_full{'_quick' if a.quick else ''}.json"
    dirs = build_models(WORK / "models" / tag, spec)
    inputs = [dirs[m] for m in MODELS]
    out = WORK / "out" / tag
    logs = WORK / "logs" / tag
    n_params = sum(torch.Size(s).numel() for _, s in tensor_shapes(spec))

    info = machine_info(("safetensors", "langmerge"))
    if not a.skip_mergekit:
        ensure_mergekit()
        info.update(mergekit_versions())
    lm_cmd, _ = langmerge_cmd()
    info["langmerge_invocation"] = " ".join(lm_cmd[:2])

    results: dict = {
        "benchmark": "merge_full",
        "mode": tag,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": info,
        "model": {**spec, "params": n_params, "bytes_per_model": 4 * n_params, "dtype": "float32",
                  "seed": SEED, "expert_perturbation": f"base + {PERTURB} * randn"},
        "settings": {
            "density": a.density, "weight": 1.0, "repeat": a.repeat,
            "wall_statistic": "min over repeats (process start-up and imports included)",
            "rss_statistic": "max over repeats of max(wait4 ru_maxrss, polled tree VmRSS sum)",
            "page_cache": "warm: the 4 input models are read once before every timed run, "
                          "then os.sync(); outputs deleted before each run",
            "output_shard_bytes": spec["shard_bytes"],
            "mergekit_flags": "--no-cuda (CPU), --out-shard-size = the shard bytes all contenders "
                              "use, --no-copy-tokenizer (none exists), --no-write-model-card, "
                              "--quiet, --random-seed 0; --lazy-unpickle only affects .bin inputs",
            "noise": "each run waits (up to --wait-idle s) for the machine to be <25% busy; "
                     "runs[].other_cpu_s is CPU time other processes used during the run",
        },
        "runs": {},
        "ratios": {},
        "correctness": {},
    }  # fmt: skip

    print(f"== merge_full ({tag}): {n_params / 1e6:.1f}M params/model, methods={methods}")
    plain_out = out / "plain"
    plain_cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_shard-bytes",
        str(spec["shard_bytes"]),
        "--_plain",
        str(plain_out),
        *map(str, inputs),
    ]
    results["runs"]["plain"] = timed(
        "plain", plain_cmd, {}, plain_out, inputs, a.repeat, logs, a.wait_idle
    )
    if not a.keep_outputs:
        shutil.rmtree(plain_out, ignore_errors=True)

    failed = results["runs"]["plain"]["rc"] != 0
    for method in methods:
        cfg = WORK / "cfg" / tag / f"{method}.yaml"
        mergekit_yaml(cfg, method, dirs, a.density)
        cmds = contender_cmds(
            method, dirs, cfg, out, a.density, spec["shard_bytes"], a.skip_mergekit
        )
        print(f"-- {method}")
        for name, (cmd, env) in cmds.items():
            key = f"{name}:{method}"
            results["runs"][key] = timed(
                f"{name}_{method}",
                cmd,
                env,
                out / f"{name}_{method}",
                inputs,
                a.repeat,
                logs,
                a.wait_idle,
            )
            failed |= results["runs"][key]["rc"] != 0

        r = results["runs"]
        lm, mk, pl = r[f"langmerge:{method}"], r.get(f"mergekit:{method}"), r["plain"]
        results["ratios"][method] = {
            "mergekit_time/langmerge_time": ratio(mk and mk["wall_s"], lm["wall_s"]),
            "langmerge_time/plain_time": ratio(lm["wall_s"], pl["wall_s"]),
            "langmerge_rss/mergekit_rss": ratio(lm["peak_rss_gb"], mk and mk["peak_rss_gb"]),
            "langmerge_anon/mergekit_anon": ratio(
                lm["tree_anon_polled_gb"], mk and mk["tree_anon_polled_gb"]
            ),
            "langmerge_yaml_time/plain_time": ratio(
                r[f"langmerge_yaml:{method}"]["wall_s"], pl["wall_s"]
            ),
        }
        corr = {}
        if mk and mk["rc"] == 0:
            for name in ("langmerge", "langmerge_yaml"):
                if r[f"{name}:{method}"]["rc"] == 0:
                    print(f"  comparing {name} vs mergekit ...", flush=True)
                    corr[f"{name}_vs_mergekit"] = compare(
                        out / f"{name}_{method}",
                        out / f"mergekit_{method}",
                        dirs["base"],
                        [dirs[m] for m in MODELS[1:]] if method == "ties" else None,
                        a.density,
                    )
        if method != "ties":
            corr["note"] = (
                "random masks: langmerge and mergekit draw them from different RNGs, so only "
                "delta_rel_l2_distance and delta_norm_ratio (|delta_a| / |delta_mergekit|) are "
                "meaningful. The CLI form uses langmerge's semantics (disjoint mean, rescale "
                "1/density); the YAML form uses mergekit's (normalize=false, L1 rescale)."
            )
        results["correctness"][method] = corr
        if not a.keep_outputs:
            for name in cmds:
                shutil.rmtree(out / f"{name}_{method}", ignore_errors=True)

    report(results)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {json_path}")
    return 1 if failed else 0


def report(res: dict) -> None:
    """Print the results table, ratios against goals, and correctness."""
    print(f"\n{'contender':<26}{'wall s':>9}{'peak RSS GB':>13}{'anon GB':>9}{'rc':>4}")
    for key, r in res["runs"].items():
        print(
            f"{key:<26}{fmt(r['wall_s']):>9}{fmt(r['peak_rss_gb']):>13}"
            f"{fmt(r['tree_anon_polled_gb']):>9}{r['rc']:>4}"
        )
    goals = {
        "mergekit_time/langmerge_time": (">=", 5.0),
        "langmerge_time/plain_time": ("<=", 3.0),
        "langmerge_rss/mergekit_rss": ("<=", 1.0),
    }
    if res["mode"] == "quick":
        print("(quick mode: times are mostly process start-up; the goals are for the full run)")
    for method, ratios in res["ratios"].items():
        print(f"\n{method}:")
        for k, v in ratios.items():
            g = goals.get(k)
            verdict = ""
            if g and method == "ties" and v is not None:
                ok = v >= g[1] if g[0] == ">=" else v <= g[1]
                verdict = f"  (goal {g[0]} {g[1]:g}: {'met' if ok else 'MISSED'})"
            print(f"  {k:<32}{fmt(v):>8}{verdict}")
        for name, c in res["correctness"].get(method, {}).items():
            if name == "note":
                print(f"  note: {c}")
                continue
            line = (
                f"  {name}: max|diff| {c['max_abs_diff']:.3g} over {c['tensors_compared']} "
                f"tensors ({c['elements_over_tol']} elements > {c['tol']:g}); "
                f"delta rel L2 {c['delta_rel_l2_distance']:.4f}, "
                f"norm ratio {c['delta_norm_ratio']:.4f}"
            )
            print(line)
            if c.get("elements_over_tol_at_threshold_ties") is not None:
                print(
                    f"    of which at exact ties on a trim threshold: "
                    f"{c['elements_over_tol_at_threshold_ties']}; max|diff| elsewhere: "
                    f"{c['max_abs_diff_off_threshold_ties']:.3g}"
                )
            if method == "ties" and c["tensors_over_tol"]:
                for w in c["worst_tensors"][:5]:
                    print(f"    {w['name']}: {w['max_abs_diff']:.3g} ({w['elements_over_tol']})")
            for k in ("missing_in_a", "missing_in_b", "extra_names", "shape_or_dtype_mismatch"):
                if c[k]:
                    print(f"    {k}: {c[k][:5]}")


if __name__ == "__main__":
    sys.exit(main())
