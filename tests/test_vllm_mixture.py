"""Nash-MD on the vLLM generator: one in-process vLLM-CPU engine whose model is the π_θ/π_ref pair
(:mod:`nashray.actors.vllm_mixture`) samples from π_θ, π_ref or their token-level geometric mixture.

Every log-prob the engine reports is checked against the same computation on two transformers models (fp32): the
mixture (1−β)·log π_θ + β·log π_ref renormalised per token, as the HF engine combines them. Nash-MD samples at
temperature 1 and top-p 1 (the config refuses others), so no tempering or filtering comes on top."""

from __future__ import annotations

import numpy as np
import torch

from nashray.actors.generator import GeneratorActor
from nashray.cluster.config import CampaignConfig
from tests.test_generator import PROMPTS, hf_logprobs, models, push, tied_model_dir  # noqa: F401 (fixtures)

BETA = 0.25  # not ½: weights swapped between the models would show


def nash_md_config(model_dir: str, max_new_tokens: int = 12) -> CampaignConfig:
    return CampaignConfig.model_validate({
        "model": {"path": model_dir, "dtype": "float32", "max_prompt_tokens": 48},
        "algorithm": {"name": "nash_md", "beta": BETA},
        "generators": {"engine": "vllm", "sampling": {"max_new_tokens": max_new_tokens}},
    })


def hf_mixture_logprobs(weighted_models: list[tuple[float, torch.nn.Module]], records) -> np.ndarray:
    """Σ_t of the log-prob of each response token under the distribution the HF engine samples it from: the models'
    log-probs combined with their weights and renormalised."""
    totals = []
    with torch.no_grad():
        for r in records:
            ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
            combined = sum(w * model(ids).logits[0].float().log_softmax(-1) for w, model in weighted_models)
            lp = torch.log_softmax(combined, -1)
            start = len(r["prompt_ids"])
            totals.append(sum(float(lp[start - 1 + t, tok]) for t, tok in enumerate(r["response_ids"])))
    return np.array(totals)


def test_vllm_pair_samples_policy_reference_and_mixture_after_a_push(tied_model_dir, models):  # noqa: F811
    """The tied LM head (as SmolLM2's) also checks that a push refreshes vLLM-CPU's packed copy in the policy half."""
    ref, pushed = models
    nash_md_generator = GeneratorActor(nash_md_config(tied_model_dir))
    assert nash_md_generator.apply_weights(push(pushed.state_dict(), 1), 1) == 1

    mixture = nash_md_generator.generate(PROMPTS, n=3, source="mixture", seed=0)
    assert {(r["source"], r["version"]) for r in mixture} == {("mixture", 1)}
    reported = np.array([r["logprob"] for r in mixture])
    # the mixture of the pushed θ and the untouched initial weights
    np.testing.assert_allclose(reported, hf_mixture_logprobs([(1 - BETA, pushed), (BETA, ref)], mixture), atol=1e-3)
    for alone in (pushed, ref):  # and neither model alone: the check can tell them apart
        assert np.abs(reported - hf_mixture_logprobs([(1.0, alone)], mixture)).max() > 0.1

    # policy samples come from π_θ alone, ref samples from π_ref alone, and the push check scores under π_θ
    policy = nash_md_generator.generate(PROMPTS, n=3, seed=1)
    np.testing.assert_allclose([r["logprob"] for r in policy], hf_logprobs(pushed, policy), atol=1e-3)
    reference = nash_md_generator.generate(PROMPTS, n=3, source="ref", seed=2)
    np.testing.assert_allclose([r["logprob"] for r in reference], hf_logprobs(ref, reference), atol=1e-3)
    prompt_ids, response_ids = [r["prompt_ids"] for r in mixture], [r["response_ids"] for r in mixture]
    np.testing.assert_allclose(nash_md_generator.sequence_logprobs(prompt_ids, response_ids),
                               hf_logprobs(pushed, mixture), atol=1e-4)

    # a second push moves the policy half only: back to the initial weights, the mixture is π_ref itself
    nash_md_generator.engine.load_weights(ref.state_dict())
    again = nash_md_generator.generate(PROMPTS, n=3, source="mixture", seed=3)
    np.testing.assert_allclose([r["logprob"] for r in again], hf_mixture_logprobs([(1.0, ref)], again), atol=1e-3)
    np.testing.assert_allclose(nash_md_generator.sequence_logprobs(prompt_ids, response_ids),
                               hf_logprobs(ref, mixture), atol=1e-4)

