"""The persistent Ray Train + DeepSpeed learner on a real local Ray cluster, two workers, a tiny random Llama."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.ray


def _records(tokenizer, n: int) -> list[dict]:
    """Pairs where the chosen answer is always the short one: a preference the policy can learn in a few steps."""
    rows = []
    for i in range(n):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"what is {i} plus {i}?"}],
                                               add_generation_prompt=True, tokenize=True, return_dict=True)
        rows.append({"prompt_id": f"p{i}", "prompt_ids": list(prompt["input_ids"]),
                     "a_ids": tokenizer.encode(f"{2 * i}.") + [tokenizer.eos_token_id],
                     "b_ids": tokenizer.encode("the quick brown fox jumps over the lazy dog") +
                     [tokenizer.eos_token_id],
                     "x_ids": [], "target": 1.0, "a_score": 0.0, "b_score": 0.0, "a_version": 0, "b_version": 0})
    return rows


def test_learner_trains_rounds_checkpoints_and_pushes(ray_cluster, tiny_model_dir, tmp_path):
    import ray.data
    from transformers import AutoModelForCausalLM

    from cluster.config import parse_config
    from trainers.learner import CHECKPOINT_DONE, Learner
    from trainers.logprobs import causal_lm_sequence_logprobs
    from trainers.models import load_tokenizer
    from trainers.weights import decode_state_dict, payload_bytes

    cfg = parse_config({
        "model": {"path": tiny_model_dir, "dtype": "float32"},
        "algorithm": {"name": "online_dpo", "beta": 0.5},
        "generators": {"engine": "hf"},
        "learner": {"workers": 2, "zero_stage": 2, "precision": "fp32", "micro_batch_size": 4,
                    "epochs_per_round": 3, "optimizer": {"name": "adamw", "lr": 3e-3},
                    "resources": {"num_cpus": 1}, "threads_per_worker": 1},
    })
    tokenizer = load_tokenizer(tiny_model_dir)
    rows = _records(tokenizer, 16)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    prompts, chosen, rejected = [r["prompt_ids"] for r in rows], [r["a_ids"] for r in rows], [r["b_ids"] for r in rows]

    def margin(model) -> float:
        with torch.no_grad():
            return float((causal_lm_sequence_logprobs(model, prompts, chosen, tokenizer.pad_token_id)
                          - causal_lm_sequence_logprobs(model, prompts, rejected, tokenizer.pad_token_id)).mean())

    learner = Learner(cfg.model_dump(mode="json"), tmp_path)
    try:
        results = []
        for t in range(2):  # the same DeepSpeed engine serves both rounds
            ds = ray.data.from_items(rows)
            results.append(learner.train_round(t, ds.split(2, equal=True), tmp_path / f"ckpt-{t}", t + 1))
        pushed = decode_state_dict(payload_bytes(results[1]["weights"]))  # its owner, the mailbox, ends at shutdown
    finally:
        learner.shutdown()

    for t, result in enumerate(results):
        assert result["round"] == t and result["rows"] == 16 and result["steps"] == 3 * 2
        assert torch.isfinite(torch.tensor(result["loss"]))
        assert (tmp_path / f"ckpt-{t}" / CHECKPOINT_DONE).is_file()
        assert json.loads((tmp_path / f"ckpt-{t}" / CHECKPOINT_DONE).read_text())["metrics"]["loss"] == result["loss"]
    assert results[1]["loss"] < results[0]["loss"]  # persistent optimizer state: round 2 continues round 1

    # The checkpoint is an HF folder; the pushed weights are exactly the checkpoint's.
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt-1", dtype=torch.float32)
    assert results[1]["weights"].version == 2
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(pushed[name], tensor, rtol=0, atol=0)
    assert margin(trained) > margin(base) + 1.0  # DPO moved probability towards the chosen answers
