"""Shared bench helpers: run a command as a subprocess, measuring wall time and peak memory."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

GB = 1e9


def _status_kb(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    """Read the given kB fields from /proc/PID/status (0 for a vanished process)."""
    out = dict.fromkeys(keys, 0)
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in out:
                    out[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def busy_cpu_s() -> float:
    """Non-idle CPU seconds of the whole machine since boot (all cores)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def wait_idle(max_wait_s: float, busy_frac: float = 0.25, sample_s: float = 2.0) -> float:
    """Wait (up to `max_wait_s`) until the machine is below `busy_frac` CPU use over `sample_s`.

    Returns the last measured busy fraction (0..1 of all cores)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        frac = psutil.cpu_percent(interval=sample_s) / 100
        if frac < busy_frac or time.monotonic() >= deadline:
            return frac


# Runs the command as its child and reports the child's exact rusage. The launcher is tiny and
# freshly exec'd, so the child's ru_maxrss is not inflated by the bench process's own high-water
# mark (Linux records the pre-exec mm's peak in ru_maxrss, and Popen's vfork shares ours).
_LAUNCHER = """
import os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, st, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    f.write(f"{ru.ru_maxrss} {ru.ru_utime} {ru.ru_stime} {wall}")
sys.exit(os.waitstatus_to_exitcode(st))
"""


def run_measured(
    cmd: list[str], log: Path, env: dict[str, str] | None = None, poll_s: float = 0.05
) -> dict:
    """Run `cmd` to completion; return wall time, peak RSS, CPU times and exit code.

    Peak RSS is reported two ways and `peak_rss_gb` is the larger of them:
    - `maxrss_wait4_gb`: the kernel's ru_maxrss of the command (via a tiny launcher process),
      i.e. the exact peak of the largest single process in its tree (not a sum);
    - `tree_rss_polled_gb`: the sum of VmRSS over the launcher, the command and all their
      descendants, polled every `poll_s` seconds (catches multi-process trees; may miss spikes
      shorter than `poll_s`; includes the launcher's ~10 MB).
    `tree_anon_polled_gb` is the polled sum of RssAnon (private memory, excluding the file pages
    of mmap'd safetensors inputs, which RSS counts). `other_cpu_s` is the CPU time the rest of
    the machine used during the run: a noise indicator on a shared machine.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    res_file = log.with_suffix(".rusage")
    res_file.unlink(missing_ok=True)
    launcher = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(res_file), *cmd]
    peaks = {"rss": 0, "anon": 0}
    done = threading.Event()
    with open(log, "wb") as logf:
        busy0 = busy_cpu_s()
        t0 = time.perf_counter()
        proc = subprocess.Popen(launcher, stdout=logf, stderr=subprocess.STDOUT, env=env)

        def poll() -> None:
            root = psutil.Process(proc.pid)
            while not done.is_set():
                try:
                    pids = [proc.pid] + [c.pid for c in root.children(recursive=True)]
                except psutil.Error:
                    pids = [proc.pid]
                rss = anon = 0
                for pid in pids:
                    st = _status_kb(pid, ("VmRSS", "RssAnon"))
                    rss += st["VmRSS"]
                    anon += st["RssAnon"]
                peaks["rss"] = max(peaks["rss"], rss)
                peaks["anon"] = max(peaks["anon"], anon)
                done.wait(poll_s)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        busy = busy_cpu_s() - busy0
        done.set()
        poller.join()
    maxrss_kb = utime = stime = 0.0
    if res_file.exists():  # absent only if the launcher itself was killed
        maxrss_kb, utime, stime, wall = (float(x) for x in res_file.read_text().split())
    maxrss = maxrss_kb * 1024 / GB  # ru_maxrss is in kB on Linux
    tree = peaks["rss"] * 1024 / GB
    return {
        "rc": rc,
        "wall_s": wall,
        "peak_rss_gb": max(maxrss, tree),
        "maxrss_wait4_gb": maxrss,
        "tree_rss_polled_gb": tree,
        "tree_anon_polled_gb": peaks["anon"] * 1024 / GB,
        "cpu_user_s": utime,
        "cpu_sys_s": stime,
        # CPU seconds the rest of the machine (other processes, this poller) used meanwhile
        "other_cpu_s": max(0.0, busy - utime - stime),
    }


def warm_page_cache(paths: list[Path], chunk: int = 1 << 24) -> int:
    """Read every file under `paths` once so it sits in the page cache; return bytes read."""
    total = 0
    buf = bytearray(chunk)
    for root in paths:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                with open(p, "rb", buffering=0) as f:
                    while n := f.readinto(buf):
                        total += n
    return total


def tail(path: Path, n: int = 2000) -> str:
    """Last `n` characters of a text file."""
    data = path.read_bytes()[-n:]
    return data.decode("utf-8", "replace")


def machine_info(packages: tuple[str, ...]) -> dict:
    """CPU, memory, the versions of torch and `packages`, and the source revision measured."""
    import torch

    repo = Path(__file__).parents[1]
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "",
    )

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    git = subprocess.run(
        ["git", "-C", str(repo), "describe", "--always", "--dirty"], capture_output=True, text=True
    )
    src = hashlib.sha1()
    for f in sorted((repo / "src").rglob("*.py")):
        src.update(f.read_bytes())
    return {
        "repo_commit": git.stdout.strip() or None,
        "langmerge_src_sha1": src.hexdigest()[:12],  # the package may be edited between runs
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "mem_total_gb": psutil.virtual_memory().total / GB,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        **{pkg: version(pkg) for pkg in packages},
    }
