"""Nash-MD's mixture sampling, π_θ^{1−β}·π_ref^{β} renormalised at every token: the vLLM engine against the HF engine.

Both sides are the generator's own engines (``nashray.actors.engines``), in this process, on the same Nash-MD config: the
same model and dtype, the first ``--prompts`` prompts of ``builtin:demo`` in the model's chat template, ``--k``
samples per prompt, ``--max-new-tokens``, temperature 1, top-p 1, the same number of CPU threads.

- **vLLM** (``VLLMEngine.sample(..., "mixture")``): one in-process vLLM-CPU engine (eager, ``uni`` executor) whose
  model is ``nashray.actors.vllm_mixture.PolicyReferencePair``; every step runs both decoder stacks and samples from the
  combined log-probs, with the per-token log-probs the generator reports.
- **HF** (``HFEngine.sample(..., "mixture")``): transformers' two models, a token-by-token loop with a KV cache per
  model, the n samples of a prompt as one batch.
- **vLLM policy** (``VLLMEngine.sample(..., "policy")``, same engine): π_θ alone, one stack — what the mixture's
  second stack costs.

Throughput = generated tokens / wall seconds of the call over all prompts. The sides alternate, ``--repeats`` times
each after one warm-up call each on the first prompt; medians, and the median of paired (back-to-back) ratios.

The defaults (4 prompts × K=4, 32 new tokens) keep the run near 5 minutes on 2 shared cores without bf16 matrix
instructions, where the HF engine's token-by-token loop over two models draws about 6 tokens/s.

    .venv/bin/python bench/mixture_sampling.py [--model smollm2|tiny] [--prompts 4] [--k 4] [--max-new-tokens 32]

Writes ``bench/results/mixture_sampling.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (Run, cpu_seconds, load_average, own_peak_rss_mib, paired_ratio,  # noqa: E402
                          setup_environment, spread, summary_row)
from bench.generation import resolve_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny, or an HF folder")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of both engines")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    setup_environment()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # vLLM-CPU otherwise serves on one thread
    run = Run("mixture_sampling", vars(args))

    import torch

    from nashray.actors.engines import HFEngine, VLLMEngine
    from nashray.cluster.config import CampaignConfig
    from nashray.cluster.prompts import load_prompts

    torch.set_num_threads(args.threads)
    folder = resolve_model(args.model)

    def config(engine: str) -> CampaignConfig:
        return CampaignConfig.model_validate({
            "model": {"path": folder, "dtype": args.dtype, "max_prompt_tokens": 96},
            "algorithm": {"name": "nash_md"},
            "generators": {"engine": engine, "sampling": {"max_new_tokens": args.max_new_tokens}, "kv_cache_gib": 1},
        })

    t0 = time.perf_counter()
    vllm_engine = VLLMEngine(config("vllm"))
    vllm_start_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf_engine = HFEngine(config("hf"))
    hf_start_s = time.perf_counter() - t0
    prompts = load_prompts("builtin:demo")[:args.prompts]
    if len(prompts) < args.prompts:
        parser.error(f"builtin:demo has {len(prompts)} prompts, fewer than --prompts {args.prompts}")
    prompt_ids = [vllm_engine.encode_prompt(p.prompt_id, p.chat()) for p in prompts]
    beta = config("vllm").algorithm.beta

    def call(engine, source: str, seed: int, ids: list[list[int]] = prompt_ids) -> tuple[int, dict]:
        cpu_before, start = cpu_seconds(), time.perf_counter()
        samples = engine.sample(ids, args.k, source, seed)
        wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu_before
        return sum(len(s.ids) for row in samples for s in row), {"wall_s": wall, "cpu_s": cpu}

    sides = {"vllm_mixture": (vllm_engine, "mixture"), "hf_mixture": (hf_engine, "mixture"),
             "vllm_policy": (vllm_engine, "policy")}
    for name, (engine, source) in sides.items():  # warm-up
        tokens, timing = call(engine, source, 0, prompt_ids[:1])
        print("warm-up", name, round(tokens / timing["wall_s"], 1), "tokens/s", flush=True)
    measured: dict[str, list[dict]] = {name: [] for name in sides}
    for repeat in range(args.repeats):
        for name, (engine, source) in sides.items():
            tokens, timing = call(engine, source, repeat + 1)
            measured[name].append({"tokens": tokens, **timing, "tokens_per_s": tokens / timing["wall_s"],
                                   "tokens_per_cpu_s": tokens / timing["cpu_s"], "load_1m": load_average()[0]})
        print(repeat, {n: round(m[-1]["tokens_per_s"], 1) for n, m in measured.items()}, flush=True)

    stats = {name: {"tokens_per_s": spread([r["tokens_per_s"] for r in rows]),
                    "tokens_per_cpu_s": spread([r["tokens_per_cpu_s"] for r in rows]),
                    "wall_s": spread([r["wall_s"] for r in rows]),
                    "tokens": spread([r["tokens"] for r in rows])} for name, rows in measured.items()}
    for other in ("hf_mixture", "vllm_policy"):
        stats["vllm_mixture"][f"paired_ratio_vs_{other}"] = paired_ratio(
            [r["tokens_per_s"] for r in measured["vllm_mixture"]], [r["tokens_per_s"] for r in measured[other]])
    ours = stats["vllm_mixture"]["tokens_per_s"]["median"]
    what = (f"{Path(folder).name} {args.dtype}, β = {beta}, {args.prompts} prompts × K={args.k}, "
            f"{args.max_new_tokens} new tokens")
    vs_hf = stats["vllm_mixture"]["paired_ratio_vs_hf_mixture"]["median"]
    vs_policy = stats["vllm_mixture"]["paired_ratio_vs_vllm_policy"]["median"]
    summary = [
        summary_row(f"Nash-MD mixture sampling tokens/s, vLLM engine vs HF engine, {what}", ours,
                    stats["hf_mixture"]["tokens_per_s"]["median"], "tokens/s", baseline_name="HF engine",
                    note=f"median of paired ratios {vs_hf:.2f}"),
        summary_row(f"mixture vs policy sampling tokens/s on the vLLM engine, {what}", ours,
                    stats["vllm_policy"]["tokens_per_s"]["median"], "tokens/s", baseline_name="vLLM policy",
                    note=f"median of paired ratios {vs_policy:.2f}: both decoder stacks run at every step"),
    ]
    run.result.update(model=folder, mixture=beta,
                      engine_start_s={"vllm": round(vllm_start_s, 2), "hf": round(hf_start_s, 2)},
                      repeats=measured, stats=stats, summary=summary,
                      peak_rss_mib={"process_with_both_engines": own_peak_rss_mib()},
                      measures={"tokens_per_s": "generated tokens / wall seconds of one engine.sample call over "
                                                "all prompts"})
    run.write(args.out)
    for row in summary:
        print(row)


if __name__ == "__main__":
    main()
