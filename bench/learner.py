"""Learner throughput: tokens per second of online-DPO rounds on SmolLM2, and the fraction of this machine's matmul
peak they reach.

1. **Peak**: bf16 (and fp32) ``torch.matmul`` of square matrices on ``--threads`` threads, GFLOP/s = 2n³ / t,
   the best median over n ∈ {1024, 2048, 3072}.
2. **Rounds**: the campaign's persistent learner (``nashray.trainers.learner.Learner``: Ray Train + DeepSpeed, one worker,
   bf16, ``--threads`` torch threads, micro-batch 8, AdamW) trains ``--rounds`` rounds of ``--pairs`` online-DPO
   pairs each (real SmolLM2 chat-template prompts of ``builtin:demo``, random response tokens of
   ``--response-tokens``), exactly as a campaign round calls it. The first round is a warm-up.
3. **Profile** (``--profile``): one DeepSpeed engine built in this process with the learner's own functions
   (``deepspeed_config``, ``build_optimizer``, ``build_policy``, the online-DPO loss) times each part of a step —
   π_ref forward, policy forward, backward, optimizer step — and ``torch.profiler`` lists the top operators.

FLOPs, counted as the learner performs them (attention's sequence-squared terms, under 3 % at these lengths, left
out): a forward costs 2·N_body·T + 2·N_head·S, with N_head the LM head's parameters (SmolLM2 ties it to the
embeddings, whose lookup is free), N_body the rest, T the tokens laid out — each pair's prompt once, shared by its
two responses, plus both responses, padding excluded — and S the scored positions (the response tokens: the head
sees nothing else). One round of online DPO is one no-grad π_ref forward (computed once, before the first update)
and the policy's forward and backward (3 forwards' worth): 4 forwards. The campaign's default
``evaluation.ranking_accuracy`` adds one no-grad forward by π_t (the DPO losses need no π_t of their own), counted
when the round reports a ranking accuracy. MFU = FLOPs / (logprob_s + train_s) / peak. ``pair_tokens`` counts what
the pairs hold (prompt + response of both sequences), the work a pair-by-pair learner without shared prompts does.

    .venv/bin/python bench/learner.py [--rounds 5] [--pairs 16] [--response-tokens 48] [--threads 2] [--profile]

Writes ``bench/results/learner.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (Run, median, process_tree_peaks, setup_environment, spread, summary_row,  # noqa: E402
                          tmp_ray_dir)

TARGET_MFU = 0.40


def matmul_peak(threads: int, dtype_name: str, sizes=(1024, 2048, 3072), repeats: int = 5) -> dict:
    import torch
    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    per_size = {}
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.matmul(a, b)
        iters = max(1, int(2e10 // (2 * n**3)))
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(iters):
                torch.matmul(a, b)
            rates.append(2 * n**3 * iters / (time.perf_counter() - t0) / 1e9)
        per_size[n] = spread(rates)
    best = max(per_size, key=lambda n: per_size[n]["median"])
    return {"gflops": per_size[best]["median"], "best_n": best, "per_size": per_size, "threads": threads,
            "dtype": dtype_name}


def round_records(folder: str, pairs: int, response_tokens: int, seed: int) -> list[dict]:
    """Training records of the campaign's contract: demo prompts in the chat template, random response tokens."""
    import numpy as np

    from nashray.cluster.prompts import load_prompts
    from nashray.models import load_tokenizer
    tokenizer = load_tokenizer(folder)
    prompts = load_prompts("builtin:demo")
    rng = np.random.default_rng(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(min(len(tokenizer), 40000)) if i not in special]
    records = []
    for i in range(pairs):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompts[i % len(prompts)].prompt}],
                                             tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        a, b = (rng.choice(vocab, response_tokens).tolist() for _ in range(2))
        records.append({"prompt_id": f"p{i}", "prompt_ids": prompt_ids, "a_ids": a, "b_ids": b, "x_ids": [],
                        "target": 1.0, "a_score": 1.0, "b_score": 0.0, "a_version": 0, "b_version": 0})
    return records


def laid_out_tokens(records: list[dict]) -> tuple[int, int]:
    """(tokens a forward lays out, positions it scores), padding excluded: each pair's prompt once, shared by its two
    responses, and both responses; the response tokens."""
    responses = sum(len(r["a_ids"]) + len(r["b_ids"]) for r in records)
    return sum(len(r["prompt_ids"]) for r in records) + responses, responses


def pair_tokens(records: list[dict]) -> int:
    """Prompt + response of each of a pair's two sequences: what the pairs hold."""
    return sum(2 * len(r["prompt_ids"]) + len(r["a_ids"]) + len(r["b_ids"]) for r in records)


def forward_flops(tokens: int, scored: int, n_body: int, n_head: int) -> float:
    """One forward: 2·N_body per token laid out, 2·N_head per scored position (``laid_out_tokens``)."""
    return 2 * n_body * tokens + 2 * n_head * scored


def learner_config(folder: str, args) -> "CampaignConfig":  # noqa: F821
    from nashray.cluster.config import CampaignConfig
    return CampaignConfig.model_validate({
        "model": {"path": folder, "dtype": "bfloat16", "max_prompt_tokens": 96},
        "algorithm": {"name": "online_dpo", "beta": 0.1},
        "learner": {"workers": 1, "zero_stage": 0, "precision": "bf16", "micro_batch_size": args.micro_batch,
                    "optimizer": {"name": "adamw", "lr": 2e-6}, "threads_per_worker": args.threads,
                    "resources": {"num_cpus": args.threads}},
        "storage": {"run_dir": tempfile.mkdtemp(prefix="nashray-bench-learner-")},
    })


def bench_rounds(folder: str, args, n_body: int, n_head: int) -> dict:
    import pyarrow as pa
    import ray
    import ray.data

    from nashray.cluster.config import dump_config
    from nashray.cluster.ray_util import init_local_ray
    from nashray.layout import RunDir
    from nashray.trainers.learner import Learner

    cfg = learner_config(folder, args)
    run_dir = RunDir(cfg.storage.run_dir)
    run_dir.create(dump_config(cfg))
    init_local_ray(num_cpus=args.threads + 2, object_store_gib=1.0, temp_dir=tmp_ray_dir())
    t0 = time.perf_counter()
    learner = Learner(cfg, run_dir.root)
    workers = learner.workers()
    start_s = time.perf_counter() - t0
    rounds = []
    for t in range(args.rounds):
        records = round_records(folder, args.pairs, args.response_tokens, seed=t)
        (tokens, scored), held = laid_out_tokens(records), pair_tokens(records)
        shards = ray.data.from_arrow(pa.Table.from_pylist(records)).split(1, equal=True)
        t0 = time.perf_counter()
        # One checkpoint, after the last round (storage.checkpoint_every = rounds, as in bench/end_to_end.py): a
        # round's 2 GB checkpoint goes on writing, in the worker and in the kernel's writeback, into the next
        # round's compute on 2 cores. Its own cost is the profile's `checkpoint`.
        result = learner.train_round(t, shards, run_dir.checkpoint_dir(t), t + 1,
                                     checkpoint=t == args.rounds - 1).metrics
        wall = time.perf_counter() - t0
        compute_s = result["logprob_s"] + result["train_s"]
        flops = (4 + (result.get("ranking_accuracy") is not None)) * forward_flops(tokens, scored, n_body, n_head)
        row = {"round": t, "pairs": args.pairs, "steps": result["steps"], "tokens": tokens, "pair_tokens": held,
               "flops": flops, "pair_tokens_per_s": held / compute_s,
               "logprob_s": result["logprob_s"], "train_s": result["train_s"], "encode_s": result.get("encode_s"),
               "round_wall_s": wall, "checkpoint_and_other_s": wall - compute_s - (result.get("encode_s") or 0),
               "tokens_per_s": tokens / compute_s, "train_tokens_per_s_reported": result["train_tokens_per_s"],
               "gflops_per_s": flops / compute_s / 1e9, "pairs_per_s": args.pairs / compute_s}
        rounds.append(row)
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    peaks = process_tree_peaks()
    learner.shutdown()
    ray.shutdown()
    shutil.rmtree(run_dir.root, ignore_errors=True)  # a 135 M checkpoint with its optimizer state per round
    measured = rounds[1:] if len(rounds) > 1 else rounds
    return {"learner_start_s": round(start_s, 1), "workers": workers, "rounds": rounds,
            "measured_rounds": [r["round"] for r in measured],
            **{key: spread([r[key] for r in measured]) for key in
               ("tokens_per_s", "pair_tokens_per_s", "gflops_per_s", "logprob_s", "train_s", "round_wall_s",
                "checkpoint_and_other_s", "pairs_per_s")},
            "peak_rss_mib": peaks}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def profile_step(folder: str, args, n_body: int, n_head: int, peak_gflops: float) -> dict:
    """The learner's DeepSpeed engine built here (one process, gloo), each part of an online-DPO step timed."""
    import numpy as np
    import torch

    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(_free_port())})
    import deepspeed

    from nashray.trainers.algorithms import get_algorithm
    from nashray.trainers.learner import RoundData, build_optimizer, build_policy, deepspeed_config, score_records
    torch.set_num_threads(args.threads)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    cfg = learner_config(folder, args)
    policy, reference, scorer, _ = build_policy(cfg)
    reference.requires_grad_(False).eval()
    optimizer = build_optimizer([p for p in policy.parameters() if p.requires_grad], cfg.learner.optimizer)
    engine, *_ = deepspeed.initialize(model=policy, optimizer=optimizer,
                                      config=deepspeed_config(cfg.learner, 1))
    algorithm = get_algorithm("online_dpo")
    import pyarrow as pa
    records = round_records(folder, args.micro_batch * (args.profile_steps + 1), args.response_tokens, seed=99)
    data = RoundData({name: (pa.array([r[name] for r in records]).to_pylist() if name.endswith("_ids") else
                             np.array([r[name] for r in records], dtype="float64"))
                      for name in ("prompt_ids", "a_ids", "b_ids", "x_ids", "target", "a_score", "b_score")})
    parts: dict[str, list[float]] = {"ref_forward_s": [], "policy_forward_s": [], "backward_s": [],
                                     "optimizer_step_s": []}
    tokens_per_step, flops_per_step = [], []

    def one_step(idx):
        t0 = time.perf_counter()
        with torch.no_grad():
            lp = score_records(scorer, reference, data, idx, algorithm.sequences, "ref")
        t1 = time.perf_counter()
        lp.update(score_records(scorer, engine, data, idx, algorithm.sequences, "theta"))
        loss = algorithm.loss(lp, data.tensors(idx), cfg.algorithm).mean()
        t2 = time.perf_counter()
        engine.backward(loss)
        t3 = time.perf_counter()
        engine.step()
        t4 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, t4 - t3

    engine.train()
    mbs = args.micro_batch
    one_step(np.arange(0, mbs))  # warm-up
    for step in range(1, args.profile_steps + 1):
        idx = np.arange(step * mbs, (step + 1) * mbs)
        for name, value in zip(parts, one_step(idx)):
            parts[name].append(value)
        tokens, scored = laid_out_tokens([records[i] for i in idx])
        tokens_per_step.append(tokens)
        flops_per_step.append(forward_flops(tokens, scored, n_body, n_head))
    # What a round pays after training: the learner's checkpoint (DeepSpeed state with the optimizer, HF weights)
    checkpoint_dir = Path(tempfile.mkdtemp(prefix="nashray-bench-ckpt-"))
    t0 = time.perf_counter()
    engine.save_checkpoint(str(checkpoint_dir / "deepspeed"), tag="state")
    deepspeed_save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.module.save_pretrained(checkpoint_dir / "hf", safe_serialization=True)
    hf_save_s = time.perf_counter() - t0
    checkpoint_bytes = sum(f.stat().st_size for f in checkpoint_dir.rglob("*") if f.is_file())
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    from torch.profiler import ProfilerActivity, profile
    idx = np.arange(0, mbs)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        one_step(idx)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    ops = [{"op": e.key, "self_cpu_s": round(e.self_cpu_time_total / 1e6, 4), "calls": e.count}
           for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]]
    tokens, forward = median(tokens_per_step), median(flops_per_step)
    med = {name: median(values) for name, values in parts.items()}
    fwd_bwd = med["policy_forward_s"] + med["backward_s"]
    result = {"steps": args.profile_steps, "tokens_per_step": tokens, **{k: spread(v) for k, v in parts.items()},
              "step_s": spread([sum(v) for v in zip(*parts.values())]),
              "mfu_ref_forward": forward / med["ref_forward_s"] / 1e9 / peak_gflops,
              "mfu_policy_forward_backward": 3 * forward / fwd_bwd / 1e9 / peak_gflops,
              "mfu_whole_step": 4 * forward / sum(med.values()) / 1e9 / peak_gflops,
              "optimizer_step_share": med["optimizer_step_s"] / sum(med.values()),
              "checkpoint": {"deepspeed_save_s": round(deepspeed_save_s, 2), "hf_save_s": round(hf_save_s, 2),
                             "bytes": checkpoint_bytes},
              "top_ops": ops}
    print(table, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--response-tokens", type=int, default=48)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    setup_environment()
    run = Run("learner", vars(args))

    from nashray.models import load_causal_lm, smollm2_hf_folder
    from nashray.weights import find_tied
    folder = str(smollm2_hf_folder())
    model = load_causal_lm(folder, "bfloat16")
    state = model.state_dict()
    tied = find_tied(state)
    n_params = sum(t.numel() for k, t in state.items() if k not in tied)
    n_head = model.get_output_embeddings().weight.numel()  # tied: also the embeddings, whose lookup is free
    n_body = n_params - n_head
    del model, state

    peak = {"bfloat16": matmul_peak(args.threads, "bfloat16"), "float32": matmul_peak(args.threads, "float32")}
    print("matmul peak", {k: round(v["gflops"], 1) for k, v in peak.items()}, flush=True)
    rounds = bench_rounds(folder, args, n_body, n_head)
    peak_gflops = peak["bfloat16"]["gflops"]
    mfu = rounds["gflops_per_s"]["median"] / peak_gflops
    run.result.update(model=folder, n_params=n_params, matmul_peak=peak, learner=rounds, mfu=round(mfu, 4),
                      n_body=n_body, n_head=n_head,
                      flops_formula="(4, or 5 with the ranking forward) forwards per online-DPO round, each "
                                    "2·N_body·T + 2·N_head·S: π_ref forward (no grad) + policy forward and backward "
                                    "(3 forwards' worth); T = tokens laid out (each pair's prompt once, shared by its "
                                    "two responses, plus both responses, padding excluded), S = response tokens (the "
                                    "LM head's positions), N_head = the tied LM head, N_body = the other parameters",
                      measures={"tokens_per_s": "T / (logprob_s + train_s) of a round, as the learner reports them "
                                                "(checkpoint save and weight encoding excluded, listed apart)",
                                "pair_tokens_per_s": "prompt + response of both sequences of every pair / (logprob_s "
                                                     "+ train_s): what a learner forwarding each sequence whole "
                                                     "would have processed"})
    if args.profile:
        run.result["profile"] = profile_step(folder, args, n_body, n_head, peak_gflops)
    run.result["summary"] = [
        summary_row("learner tokens/s, SmolLM2-135M bf16 online DPO (DeepSpeed, 1 worker)",
                    rounds["tokens_per_s"]["median"], None, "tokens/s",
                    note=f"{rounds['gflops_per_s']['median']:.0f} GFLOP/s"),
        summary_row("learner MFU (fraction of measured bf16 matmul peak)", mfu, None, "fraction",
                    f"≥ {TARGET_MFU:.0%}", mfu >= TARGET_MFU,
                    note=f"peak {peak_gflops:.0f} GFLOP/s bf16 on {args.threads} threads"),
    ]
    run.write(args.out)
    for row in run.result["summary"]:
        print(row)


if __name__ == "__main__":
    main()
