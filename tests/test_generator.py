"""The generator actor on real engines: vLLM (in-process, CPU), transformers, and the tabular policy.

Every log-prob a generator reports is checked against transformers' own computation on the same weights, before and
after an in-place push; distributions are checked with goodness-of-fit tests on many draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from nashray.actors.generator import GeneratorActor
from nashray.cluster.config import CampaignConfig
from nashray.trainers.logprobs import causal_lm_sequence_logprobs
from nashray.models import load_causal_lm, load_tokenizer
from nashray.weights import WeightPush, encode_state_dict

PROMPTS = [{"prompt_id": "p0", "prompt": "what is two plus two?"}, {"prompt_id": "p1", "prompt": "hello world"}]
RECORD_KEYS = {"prompt_id", "prompt", "prompt_ids", "response", "response_ids", "logprob", "version", "source",
               "sample_index"}


def llm_config(model_dir: str, engine: str, algorithm: dict, max_new_tokens: int = 12) -> CampaignConfig:
    return CampaignConfig.model_validate({
        "model": {"path": model_dir, "dtype": "float32", "max_prompt_tokens": 48},
        "algorithm": algorithm,
        "generators": {"engine": engine, "sampling": {"max_new_tokens": max_new_tokens}},
    })


def perturb_(model, scale: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # a tied parameter once
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def push(state: dict, version: int) -> WeightPush:
    payload = encode_state_dict(state)
    return WeightPush(version=version, payload=payload, n_params=sum(t.numel() for t in state.values()),
                      nbytes=len(payload), dtype="float32")


def hf_logprobs(model, records) -> np.ndarray:
    with torch.no_grad():
        return causal_lm_sequence_logprobs(model, [r["prompt_ids"] for r in records],
                                           [r["response_ids"] for r in records], pad_id=0).numpy()


def check_records(records, tokenizer, n: int, version: int, source: str, max_new_tokens: int) -> None:
    assert len(records) == n * len(PROMPTS)
    for i, r in enumerate(records):
        prompt = PROMPTS[i // n]
        assert set(r) == RECORD_KEYS
        assert (r["prompt_id"], r["prompt"], r["sample_index"]) == (prompt["prompt_id"], prompt["prompt"], i % n)
        assert (r["version"], r["source"]) == (version, source)
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt["prompt"]}], tokenize=False,
                                             add_generation_prompt=True)
        assert r["prompt_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = r["response_ids"]
        assert 1 <= len(ids) <= max_new_tokens
        assert tokenizer.eos_token_id not in ids[:-1]  # generation stops at the first EOS
        assert len(ids) == max_new_tokens or ids[-1] == tokenizer.eos_token_id
        assert r["response"] == tokenizer.decode(ids, skip_special_tokens=True)
        assert isinstance(r["logprob"], float) and r["logprob"] < 0


@pytest.fixture(scope="module")
def tied_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model with its LM head tied to the token embeddings, as SmolLM2's: pushes store the tie once and
    vLLM must refresh the LM head it derives from the embeddings."""
    from transformers import AutoConfig, AutoModelForCausalLM
    target = tmp_path_factory.mktemp("tiny-tied")
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config)
    untied = load_causal_lm(tiny_model_dir).state_dict()
    model.load_state_dict({k: v for k, v in untied.items() if k != "lm_head.weight"}, strict=False)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(target)
    load_tokenizer(tiny_model_dir).save_pretrained(target)
    return str(target)


@pytest.fixture(scope="module")
def models(tied_model_dir):
    """The model as loaded (π_ref) and a strongly perturbed copy (what the pushes carry)."""
    return load_causal_lm(tied_model_dir).eval(), perturb_(load_causal_lm(tied_model_dir).eval(), 0.2)


def test_sampling_logprobs_temper_then_keep_the_top_p_mass():
    from nashray.actors.engines import sampling_logprobs
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    np.testing.assert_allclose(sampling_logprobs(probs.log(), 1.0, 1.0).exp(), probs)
    np.testing.assert_allclose(sampling_logprobs(probs.log(), 2.0, 1.0).exp(), probs.sqrt() / probs.sqrt().sum())
    np.testing.assert_allclose(sampling_logprobs(probs.log(), 1.0, 0.7).exp(), [[0.625, 0.375, 0, 0]])
    np.testing.assert_allclose(sampling_logprobs(probs.log(), 1.0, 0.81).exp(), [[0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]])
    np.testing.assert_allclose(sampling_logprobs(probs.log(), 1.0, 0.2).exp(), [[1.0, 0, 0, 0]])
    assert sampling_logprobs(probs.log(), 1.0, 0.2)[0, 1] == float("-inf")


# ------------------------------------------------------------------------------------------------- vLLM

@pytest.fixture(scope="module")
def vllm_generator(tied_model_dir):
    return GeneratorActor(llm_config(tied_model_dir, "vllm", {"name": "xpo"}))


def test_vllm_samples_are_records_with_the_models_logprobs(vllm_generator, models, tied_model_dir):
    ref, _ = models
    records = vllm_generator.generate(PROMPTS, n=3)
    check_records(records, load_tokenizer(tied_model_dir), 3, version=0, source="policy", max_new_tokens=12)
    # temperature 1, top-p 1: the sampling log-prob is the model's log-prob of the sampled sequence
    np.testing.assert_allclose([r["logprob"] for r in records], hf_logprobs(ref, records), atol=1e-3)
    same_seed = [vllm_generator.generate(PROMPTS, n=3, seed=11) for _ in range(2)]
    assert [r["response_ids"] for r in same_seed[0]] == [r["response_ids"] for r in same_seed[1]]


def test_vllm_push_in_place_matches_transformers(vllm_generator, models):
    ref, pushed = models
    engine = vllm_generator.engine.llm
    fixed = vllm_generator.generate(PROMPTS, n=2)  # fills vLLM's prefix cache with the old weights' KV
    prompt_ids, response_ids = [r["prompt_ids"] for r in fixed], [r["response_ids"] for r in fixed]
    before = vllm_generator.sequence_logprobs(prompt_ids, response_ids)
    np.testing.assert_allclose(before, hf_logprobs(ref, fixed), atol=1e-4)

    assert vllm_generator.apply_weights(push(pushed.state_dict(), 1), 1) == 1
    assert vllm_generator.version() == 1 and vllm_generator.engine.llm is engine
    after = vllm_generator.sequence_logprobs(prompt_ids, response_ids)
    np.testing.assert_allclose(after, hf_logprobs(pushed, fixed), atol=1e-4)
    assert np.abs(np.array(after) - np.array(before)).max() > 1.0

    # same prompts again: the samples must come from the new weights, not from stale cached prompt KV
    policy = vllm_generator.generate(PROMPTS, n=2)
    assert {r["version"] for r in policy} == {1}
    np.testing.assert_allclose([r["logprob"] for r in policy], hf_logprobs(pushed, policy), atol=1e-3)
    # XPO's π_ref samples run the engine's frozen reference stack (actors/vllm_mixture.py); the policy is untouched
    reference = vllm_generator.generate(PROMPTS, n=2, source="ref")
    np.testing.assert_allclose([r["logprob"] for r in reference], hf_logprobs(ref, reference), atol=1e-3)
    np.testing.assert_allclose(vllm_generator.sequence_logprobs(prompt_ids, response_ids), after, atol=1e-5)
    stats = vllm_generator.stats()
    assert stats["pushes"] == 1 and stats["tokens_generated"] > 0 and stats["busy_s"] > 0
    # a state dict (what a broadcast receiver hands over, tied names included) loads through the same reload
    vllm_generator.engine.load_weights(ref.state_dict())
    np.testing.assert_allclose(vllm_generator.sequence_logprobs(prompt_ids, response_ids), before, atol=1e-5)


def test_vllm_refuses_the_mixture_and_overlong_prompts(vllm_generator):
    with pytest.raises(ValueError, match="mixture"):
        vllm_generator.generate(PROMPTS, n=1, source="mixture")
    with pytest.raises(ValueError, match="'long-one'.*max_prompt_tokens = 48"):
        vllm_generator.generate([PROMPTS[0], {"prompt_id": "long-one", "prompt": "the lazy dog " * 40}], n=1)
    with pytest.raises(ValueError, match="older than the loaded version"):
        vllm_generator.apply_weights(push(load_causal_lm(vllm_generator.engine.model_path).state_dict(), -1), -1)


# --------------------------------------------------------------------------------------------------- hf

@pytest.fixture(scope="module")
def hf_generator(tied_model_dir):
    return GeneratorActor(llm_config(tied_model_dir, "hf", {"name": "nash_md", "beta": 0.5}))


def test_hf_samples_push_and_reference(hf_generator, models, tied_model_dir):
    ref, pushed = models
    records = hf_generator.generate(PROMPTS, n=3)
    check_records(records, load_tokenizer(tied_model_dir), 3, version=0, source="policy", max_new_tokens=12)
    np.testing.assert_allclose([r["logprob"] for r in records], hf_logprobs(ref, records), atol=1e-4)

    model = hf_generator.engine.model
    assert hf_generator.apply_weights(push(pushed.state_dict(), 3), 3) == 3
    assert hf_generator.engine.model is model
    np.testing.assert_allclose(hf_generator.sequence_logprobs([r["prompt_ids"] for r in records],
                                                              [r["response_ids"] for r in records]),
                               hf_logprobs(pushed, records), atol=1e-4)
    policy = hf_generator.generate(PROMPTS, n=3)
    np.testing.assert_allclose([r["logprob"] for r in policy], hf_logprobs(pushed, policy), atol=1e-4)
    reference = hf_generator.generate(PROMPTS, n=3, source="ref")
    assert {(r["source"], r["version"]) for r in reference} == {("ref", 3)}
    np.testing.assert_allclose([r["logprob"] for r in reference], hf_logprobs(ref, reference), atol=1e-4)


def mixture_logprobs(policy, reference, beta: float, records) -> np.ndarray:
    """Σ_t log of the normalised geometric mixture π_θ^{1−β}·π_ref^{β} at every response token."""
    totals = []
    with torch.no_grad():
        for r in records:
            ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
            mixed = torch.log_softmax((1 - beta) * policy(ids).logits.log_softmax(-1)
                                      + beta * reference(ids).logits.log_softmax(-1), -1)[0]
            start = len(r["prompt_ids"])
            totals.append(sum(float(mixed[start - 1 + t, tok]) for t, tok in enumerate(r["response_ids"])))
    return np.array(totals)


def test_hf_mixture_samples_the_geometric_mixture(tied_model_dir, models):
    ref, pushed = models
    beta = 0.5
    generator = GeneratorActor(llm_config(tied_model_dir, "hf", {"name": "nash_md", "beta": beta},
                                          max_new_tokens=1))
    generator.apply_weights(push(pushed.state_dict(), 1), 1)
    generator.engine.batch_size = 1000  # one token per sample: wide batches are cheap
    records = generator.generate([PROMPTS[0]], n=3000, source="mixture", seed=0)
    assert {r["source"] for r in records} == {"mixture"}
    np.testing.assert_allclose([r["logprob"] for r in records[:20]], mixture_logprobs(pushed, ref, beta, records[:20]),
                               atol=1e-4)

    ids = torch.tensor([records[0]["prompt_ids"]])
    with torch.no_grad():
        log_policy = pushed(ids).logits[0, -1].log_softmax(-1)
        log_ref = ref(ids).logits[0, -1].log_softmax(-1)
    mixture = torch.softmax((1 - beta) * log_policy + beta * log_ref, -1).numpy()
    counts = np.bincount([r["response_ids"][0] for r in records], minlength=len(mixture))

    def fit(probs: np.ndarray) -> float:
        """χ² p-value of the draws against ``probs``, tokens binned so that every bin expects ≥ 20 draws."""
        probs = probs.astype(np.float64) / probs.astype(np.float64).sum()
        order = np.argsort(-probs)
        expected, observed, bins_e, bins_o = [], [], 0.0, 0
        for token in order:
            bins_e, bins_o = bins_e + probs[token] * len(records), bins_o + counts[token]
            if bins_e >= 20:
                expected.append(bins_e), observed.append(bins_o)
                bins_e, bins_o = 0.0, 0
        expected[-1] += bins_e
        observed[-1] += bins_o
        return chisquare(observed, expected).pvalue

    assert fit(mixture) > 1e-3
    assert fit(log_policy.softmax(-1).numpy()) < 1e-6  # the test can tell the mixture from either model
    assert fit(log_ref.softmax(-1).numpy()) < 1e-6


def test_hf_without_a_reference_refuses_ref_samples(tiny_model_dir):
    generator = GeneratorActor(llm_config(tiny_model_dir, "hf", {"name": "online_dpo"}))
    assert generator.engine.reference is None
    with pytest.raises(ValueError, match="does not keep"):
        generator.generate(PROMPTS, n=1, source="ref")
    with pytest.raises(ValueError, match=r"prompts\[0\] lacks \['prompt_id'\]"):
        generator.generate([{"prompt": "hi"}], n=1)


# ---------------------------------------------------------------------------------------------- tabular

def test_tabular_samples_from_the_policy_distribution(tmp_path):
    import json

    from nashray.oracles.games import load_game
    from nashray.trainers.tabular import TabularPolicy

    game_file = tmp_path / "two_prompts.json"
    game_file.write_text(json.dumps({"prompts": {
        "cycle": {"P": [[0.5, 0.9, 0.1], [0.1, 0.5, 0.9], [0.9, 0.1, 0.5]], "pi_ref": [0.6, 0.3, 0.1]},
        "order": {"P": [[0.5, 0.7, 0.8], [0.3, 0.5, 0.6], [0.2, 0.4, 0.5]], "pi_ref": [0.2, 0.3, 0.5]}}}))
    config = CampaignConfig.model_validate({
        "algorithm": {"name": "nash_md", "beta": 0.25},
        "generators": {"engine": "tabular"}, "data": {"game": str(game_file)},
        "judges": {"oracle": {"kind": "matrix"}}, "learner": {"precision": "fp32"}})
    generator = GeneratorActor(config)
    game = load_game(str(game_file))
    prompts = [{"prompt_id": f"q{i}", "prompt": name} for i, name in enumerate(game.prompts)]
    draws = 10_000

    def check(records, probs: np.ndarray, source: str, version: int):
        assert len(records) == draws * len(prompts)
        for p, prompt in enumerate(prompts):
            rows = records[p * draws: (p + 1) * draws]
            assert {(r["prompt_id"], r["prompt"], tuple(r["prompt_ids"]), r["source"], r["version"])
                    for r in rows} == {(prompt["prompt_id"], prompt["prompt"], (p,), source, version)}
            assert all(r["response"] == str(r["response_ids"][0]) for r in rows)
            actions = np.array([r["response_ids"][0] for r in rows])
            np.testing.assert_allclose([r["logprob"] for r in rows], np.log(probs[p][actions]), atol=1e-12)
            assert chisquare(np.bincount(actions, minlength=game.n_actions), probs[p] * draws).pvalue > 1e-4

    check(generator.generate(prompts, draws, seed=1), game.pi_ref, "policy", 0)

    trained = TabularPolicy.from_game(game)
    with torch.no_grad():
        trained.logits.add_(torch.randn(trained.logits.shape, generator=torch.Generator().manual_seed(0),
                                        dtype=trained.logits.dtype))
    generator.apply_weights(push(trained.state_dict(), 1), 1)
    policy = trained.probs().detach().numpy()
    assert not np.allclose(policy, game.pi_ref, atol=0.05)
    check(generator.generate(prompts, draws, seed=2), policy, "policy", 1)
    check(generator.generate(prompts, draws, source="ref", seed=3), game.pi_ref, "ref", 1)
    check(generator.generate(prompts, draws, source="mixture", seed=4),
          trained.mixture_probs(game.pi_ref, 0.25).numpy(), "mixture", 1)
    np.testing.assert_allclose(generator.sequence_logprobs([[0], [1]], [[2], [0]]),
                               [np.log(policy[0, 2]), np.log(policy[1, 0])], atol=1e-12)
    with pytest.raises(ValueError, match="'bad'.*not a prompt of game"):
        generator.generate([{"prompt_id": "bad", "prompt": "no such prompt"}], 1)


@pytest.mark.ray
def test_an_actor_given_threads_runs_torch_on_that_many(ray_cluster):
    """Ray sets an actor's OMP_NUM_THREADS to its num_cpus (1 here) unless told otherwise; resources.threads tells
    it, and torch in the actor uses that many threads."""
    from nashray.cluster.config import Resources
    from nashray.cluster.placement import actor_options
    ray = ray_cluster

    class Threads:
        def torch_threads(self) -> int:
            import torch
            return torch.get_num_threads()

    def threads(**resources) -> int:
        actor = ray.remote(Threads).options(**actor_options(Resources(num_cpus=1, **resources))).remote()
        try:
            return ray.get(actor.torch_threads.remote(), timeout=120)
        finally:
            ray.kill(actor)

    assert (threads(), threads(threads=2)) == (1, 2)
