"""The demo campaign end to end: the README's main command, timed from start to exit.

Runs ``nashray run`` (the embedded demo: SmolLM2-135M-Instruct, a vLLM-CPU generator, the panel judge — SmolLM2 as
an LLM judge, VADER sentiment and a conciseness rule voting by majority —, one DeepSpeed learner worker, 4 rounds of
INPO with evaluation on 32 held-out prompts, then the report) as a child process with its run directory
in a temporary folder, and records its wall time — Ray, actors, engine and learner start included — against the
target of 10 minutes on 2 cores, with each round's metrics.

    .venv/bin/python bench/demo.py

Writes ``bench/results/demo.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Run, setup_environment, summary_row  # noqa: E402

TARGET_S = 600
ROUND_KEYS = ("round", "round_s", "generate_s", "judge_s", "train_phase_s", "logprob_s", "train_s", "push_s",
              "eval_s", "loss", "win_rate_vs_initial", "lc_win_rate_vs_initial", "ranking_accuracy", "kl_to_ref",
              "eval_kl_policy_to_ref", "mean_response_tokens", "push_logprob_max_abs_diff", "judge_cyclic_triads",
              "judge_decided_triads", "judge_agreement/0:llm_judge", "judge_agreement/1:sentiment",
              "judge_agreement/2:concise_answer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    setup_environment()
    run = Run("demo", vars(args))
    run_dir = Path(tempfile.mkdtemp(prefix="nashray-bench-demo-")) / "run"
    nashray = Path(sys.executable).parent / "nashray"
    start = time.perf_counter()
    proc = subprocess.run([str(nashray), "run", "--set", f"storage.run_dir={run_dir}"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    run.result.update(wall_s_total=round(wall, 1), returncode=proc.returncode, run_dir=str(run_dir),
                      output_tail=(proc.stdout + proc.stderr)[-3000:])
    if proc.returncode == 0:
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        run.result["rounds"] = [{k: m.get(k) for k in ROUND_KEYS} for m in metrics]
        run.result["summary"] = [summary_row(
            "demo campaign, `nashray run` end to end (SmolLM2, INPO under the panel judge, 4 rounds, evaluation on 32 held-out prompts)", wall, None, "s",
            f"≤ {TARGET_S} s", wall <= TARGET_S,
            note="Ray, actors, engine and learner start, the rounds, the report")]
    run.write(args.out)
    for row in run.result.get("summary", []):
        print(row)


if __name__ == "__main__":
    main()
