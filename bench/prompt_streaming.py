"""A large prompt set streamed through Ray Data (``data.streaming``) against the same set loaded in memory: wall time,
prompts per second and the driver's memory, for a JSONL file of N prompts measured in SmolLM2's chat template (what
a campaign does before its first round), then reading rounds' prompts. Each side runs in a process of its own, so
that its peak RSS is its own; the figure is the peak over the process's RSS just before loading.

    python -m bench.prompt_streaming [--rows 100000 300000] [--out bench/results/prompt_streaming.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, Run, own_peak_rss_mib, setup_environment, summary_row, tmp_ray_dir


def write_prompts(path: Path, rows: int) -> None:
    from nashray.cluster.prompts import load_prompts
    texts = [p.prompt for p in load_prompts("builtin:instructions")]
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"prompt_id": f"p{i}", "prompt": f"{texts[i % len(texts)]} (variant {i})"}) + "\n")


def measure(side: str, path: Path, folder: Path) -> dict:
    """One side, in this process: load (or stream), check lengths, split, then read 20 rounds of 64 prompts."""
    import psutil

    import nashray.actors.engines  # noqa: F401 -- torch and transformers, which both sides import, before measuring
    from nashray.cluster.config import parse_config
    from nashray.cluster.prompts import check_prompts_fit_model, load_prompts, split_campaign_prompts, stream_prompts
    from nashray.models import smollm2_hf_folder

    cfg = parse_config({"model": {"path": str(smollm2_hf_folder())}, "evaluation": {"prompts": 64},
                        "data": {"prompts": str(path), "streaming": side == "stream"}})
    if side == "stream":
        from nashray.cluster.ray_util import init_local_ray
        init_local_ray(num_cpus=2, object_store_gib=1.0, temp_dir=tmp_ray_dir())
    before_mib = psutil.Process().memory_info().rss / 2**20
    start = time.perf_counter()
    if side == "stream":
        prompts = stream_prompts(cfg, str(path), folder)
    else:
        prompts = load_prompts(str(path))
        check_prompts_fit_model(prompts, cfg, str(path))
    split = split_campaign_prompts(prompts, cfg, str(path))
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    for t in range(20):
        split.for_round(t, 64)
    round_ms = (time.perf_counter() - start) / 20 * 1000
    return {"side": side, "prompts": len(prompts), "load_s": round(load_s, 1),
            "prompts_per_s": round(len(prompts) / load_s), "read_round_of_64_ms": round(round_ms, 2),
            "rss_before_load_mib": round(before_mib, 1), "peak_rss_mib": own_peak_rss_mib(),
            "peak_over_before_mib": round(own_peak_rss_mib() - before_mib, 1),
            "shards_mib": round(sum(f.stat().st_size for f in folder.glob("*")) / 2**20, 1) if side == "stream"
            else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 300_000], help="set sizes (at least two: "
                        "the figure is how the driver's memory grows with the set)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--side", choices=("memory", "stream"), help=argparse.SUPPRESS)  # one side, in a subprocess
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup_environment()
    if args.side:
        with tempfile.TemporaryDirectory() as folder:
            print(json.dumps(measure(args.side, Path(args.file), Path(folder) / "prompts")))
        return
    run = Run("prompt_streaming", {"rows": args.rows})
    sizes = []
    for rows in args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "prompts.jsonl"
            write_prompts(path, rows)
            size = {"rows": rows, "file_mib": round(path.stat().st_size / 2**20, 1)}
            for side in ("memory", "stream"):
                out = subprocess.run([sys.executable, "-m", "bench.prompt_streaming", "--side", side, "--file",
                                      str(path)], cwd=REPO, capture_output=True, text=True, check=True).stdout
                size[side] = json.loads(out.strip().splitlines()[-1])
                print(rows, side, size[side], flush=True)
            sizes.append(size)
    run.result["sizes"] = sizes
    first, last = sizes[0], sizes[-1]

    def growth(side: str) -> float:  # MiB of driver memory per 100 000 more prompts
        return (last[side]["peak_over_before_mib"] - first[side]["peak_over_before_mib"]) / \
            (last["rows"] - first["rows"]) * 100_000

    run.result["summary"] = [
        summary_row("driver memory growth per 100k prompts", growth("stream"), growth("memory"), "MiB",
                    baseline_name="in memory"),
        summary_row(f"driver memory while loading {last['rows']} prompts", last["stream"]["peak_over_before_mib"],
                    last["memory"]["peak_over_before_mib"], "MiB", baseline_name="in memory"),
        summary_row(f"load + length check + split of {last['rows']}", last["stream"]["load_s"],
                    last["memory"]["load_s"], "s", baseline_name="in memory"),
        summary_row("read a round of 64 prompts", last["stream"]["read_round_of_64_ms"],
                    last["memory"]["read_round_of_64_ms"], "ms", baseline_name="in memory"),
    ]
    run.write(args.out)


if __name__ == "__main__":
    main()
