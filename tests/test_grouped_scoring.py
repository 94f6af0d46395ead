"""The learner scores each distinct (prompt, response) once per pass: a prompt's K samples judged all-pairs make
K(K−1)/2 records over K sequences, and the grouped scoring must give exactly the log-probs, losses and gradients of
scoring the records pair by pair. Real tiny models (a random Llama, the tabular policy), no Ray, no DeepSpeed."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from nashray.cluster.config import CampaignConfig
from nashray.trainers.algorithms import get_algorithm
from nashray.trainers.learner import (RoundData, SequenceScorer, score_records, pack_groups, prompt_groups, score_sequences,
                              unique_sequences)

K = 4


class CountingScorer:
    """The learner's scorer, counting forwards and the sequences in them."""

    def __init__(self, scorer: SequenceScorer):
        self.scorer = scorer
        self.forwards: list[int] = []

    def __call__(self, model, prompt_ids, response_ids):
        self.forwards.append(len(prompt_ids))
        return self.scorer(model, prompt_ids, response_ids)


def round_data(records: list[dict]) -> RoundData:
    columns = {name: [list(r[name]) for r in records] for name in ("prompt_ids", "a_ids", "b_ids", "x_ids")}
    columns.update({name: np.array([r[name] for r in records], dtype="float64")
                    for name in ("target", "a_score", "b_score")})
    return RoundData(columns)


def all_pairs_records(algorithm_name: str, prompts: list[list[int]], responses: list[list[list[int]]],
                      refs: list[list[int]] | None = None, seed: int = 0) -> list[dict]:
    """The algorithm's own training records for K policy samples per prompt judged all-pairs (random P)."""
    algorithm = get_algorithm(algorithm_name)
    cfg = CampaignConfig.model_validate({"algorithm": {"name": algorithm_name, "label": "soft"}}).algorithm
    rng = np.random.default_rng(seed)
    records = []
    for p, (prompt, samples) in enumerate(zip(prompts, responses)):
        drawn = [{"prompt_id": f"p{p}", "prompt_ids": prompt, "response_ids": r, "source": "policy", "version": 0,
                  "sample_index": n} for n, r in enumerate(samples)]
        if refs is not None:
            drawn.append({"prompt_id": f"p{p}", "prompt_ids": prompt, "response_ids": refs[p], "source": "ref",
                          "version": 0, "sample_index": 0})
        judged = {pair: float(rng.uniform(0.05, 0.95)) for pair in algorithm.plan(drawn, "all_pairs")}
        records += algorithm.build_records(drawn, judged, cfg)
    return records


def pair_by_pair(scorer, model, data: RoundData, idx, keys: tuple[str, ...], prefix: str) -> dict:
    """The reference computation, the learner's before grouping: every record's own sequences (a, b, x) stacked in
    one forward, a sequence repeated as often as pairs use it, nothing shared."""
    prompts, responses, sizes = [], [], []
    for key in keys:
        p, r = data.sequences(key, idx)
        prompts += p
        responses += r
        sizes.append(len(p))
    scored = scorer(model, prompts, responses).double().split(sizes)
    return {f"{prefix}_{key}": values for key, values in zip(keys, scored)}


def gradients(model, loss: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def fixed_logprobs(theta: dict, seed: int = 1) -> dict:
    """Stand-ins for the no-grad π_t / π_ref log-probs (constants in the loss), near π_θ's as at a round's start."""
    g = torch.Generator().manual_seed(seed)
    return {f"{prefix}_{name[len('theta_'):]}": values.detach() + 0.3 * torch.randn(len(values), generator=g,
                                                                                     dtype=torch.float64)
            for prefix in ("t", "ref") for name, values in theta.items()}


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from nashray.models import load_tokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model, SequenceScorer(tabular=False, pad_id=load_tokenizer(tiny_model_dir).pad_token_id)


def random_tokens(g: torch.Generator, vocab: int, lengths) -> list[list[int]]:
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("algorithm_name", ["inpo", "xpo"])
def test_grouped_micro_batch_gradient_equals_pair_by_pair(tiny_llm, algorithm_name):
    """Two prompts of different lengths, K = 4 responses of different lengths each, all pairs (xpo: a π_ref sample x
    per prompt too): one forward over the 8 (xpo: 10) distinct sequences gives each record's log-probs, the loss and
    the gradient of the 24-sequence pair-by-pair computation (fp32, 1e-6)."""
    model, scorer = tiny_llm
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = random_tokens(g, vocab, (6, 11))
    responses = [random_tokens(g, vocab, (3, 9, 5, 1)), random_tokens(g, vocab, (7, 2, 7, 4))]
    refs = random_tokens(g, vocab, (5, 8)) if algorithm_name == "xpo" else None
    records = all_pairs_records(algorithm_name, prompts, responses, refs)
    assert len(records) == 2 * K * (K - 1) // 2
    algorithm = get_algorithm(algorithm_name)
    cfg = CampaignConfig.model_validate({"algorithm": {"name": algorithm_name}}).algorithm
    data, keys, idx = round_data(records), algorithm.sequences, np.arange(len(records))

    counting = CountingScorer(scorer)
    grouped = score_records(counting, model, data, idx, keys, "theta")
    fixed = fixed_logprobs(grouped)
    assert counting.forwards == [2 * K + (2 if refs else 0)]  # one forward, each distinct sequence once
    grouped_loss = algorithm.loss({**grouped, **fixed}, data.tensors(idx), cfg).mean()
    grouped_grads = gradients(model, grouped_loss)

    separate = pair_by_pair(scorer, model, data, idx, keys, "theta")
    separate_loss = algorithm.loss({**separate, **fixed}, data.tensors(idx), cfg).mean()
    separate_grads = gradients(model, separate_loss)

    for key in keys:
        torch.testing.assert_close(grouped[f"theta_{key}"], separate[f"theta_{key}"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grouped_loss, separate_loss, rtol=1e-6, atol=1e-6)
    assert len(grouped_grads) == len(separate_grads) == len(list(model.parameters()))
    for grouped_grad, separate_grad in zip(grouped_grads, separate_grads):
        torch.testing.assert_close(grouped_grad, separate_grad, rtol=1e-6, atol=1e-6)
    assert max(float(grad.abs().max()) for grad in grouped_grads) > 1e-3  # a gradient that could differ


def test_tabular_records_share_their_one_token_sequences():
    """Rock-paper-scissors: every record is (prompt 0, action, action); 400 pair records need 3 sequences, and the
    grouped gradient of the tabular policy equals the pair-by-pair one."""
    from nashray.oracles.games import load_game
    from nashray.trainers.tabular import TabularPolicy

    game = load_game("builtin:rps")
    policy = TabularPolicy(game.pi_ref).float()
    with torch.no_grad():
        policy.logits += torch.tensor([[0.3, -0.2, 0.1]])
    scorer = CountingScorer(SequenceScorer(tabular=True))
    rng = np.random.default_rng(0)
    actions = rng.integers(0, game.n_actions, (400, 2))
    data = round_data([{"prompt_ids": [0], "a_ids": [int(a)], "b_ids": [int(b)], "x_ids": [],
                        "target": float(rng.integers(0, 2)), "a_score": 0.0, "b_score": 0.0} for a, b in actions])
    algorithm = get_algorithm("inpo")
    cfg = CampaignConfig.model_validate({"algorithm": {"name": "inpo"}}).algorithm
    idx, keys = np.arange(len(data)), algorithm.sequences
    assert [len(group) for group in prompt_groups(data.columns["prompt_ids"])] == [400]

    grouped = score_records(scorer, policy, data, idx, keys, "theta")
    fixed = fixed_logprobs(grouped)
    assert scorer.forwards == [game.n_actions]
    grouped_grad = gradients(policy, algorithm.loss({**grouped, **fixed}, data.tensors(idx), cfg).mean())
    separate = pair_by_pair(scorer, policy, data, idx, keys, "theta")
    separate_grad = gradients(policy, algorithm.loss({**separate, **fixed}, data.tensors(idx), cfg).mean())
    torch.testing.assert_close(grouped_grad[0], separate_grad[0], rtol=1e-6, atol=1e-6)
    assert float(grouped_grad[0].abs().max()) > 1e-3


def test_micro_batches_are_whole_prompt_groups_of_at_least_the_micro_batch_size():
    """Every record exactly once per epoch, a prompt's records never split across steps, each step at least the
    micro-batch size but the last; groups, not records, are shuffled."""
    prompt_ids = [[p % 5, 9] for p in range(5 * 6)] + [[7]] * 3  # five prompts of 6 records, one of 3
    groups = prompt_groups(prompt_ids)
    assert sorted(len(g) for g in groups) == [3, 6, 6, 6, 6, 6]
    assert all(len({tuple(prompt_ids[i]) for i in g}) == 1 for g in groups)
    rng = np.random.default_rng(0)
    for mbs in (1, 4, 8, 12, 100):
        batches = pack_groups([groups[g] for g in rng.permutation(len(groups))], mbs)
        assert sorted(np.concatenate(batches).tolist()) == list(range(len(prompt_ids)))
        assert all(len(b) >= mbs for b in batches[:-1])
        assert all(len(b) < mbs + 6 for b in batches)  # closed as soon as it is full
        by_group = {tuple(prompt_ids[i]): n for n, b in enumerate(batches) for i in b}
        assert all(by_group[tuple(prompt_ids[i])] == n for n, b in enumerate(batches) for i in b)
    assert pack_groups([], 8) == []


def test_no_grad_pass_scores_each_distinct_sequence_once_in_the_forwards_asked(tiny_llm):
    """π_t / π_ref: the shard's distinct sequences in `forwards` forwards (a rank with fewer sequences than the ranks'
    common forward count still runs it), each record's log-probs those of scoring it alone."""
    model, scorer = tiny_llm
    g = torch.Generator().manual_seed(3)
    vocab = model.config.vocab_size
    prompts = random_tokens(g, vocab, (4, 13, 8))
    responses = [random_tokens(g, vocab, (2, 6, 3, 10)) for _ in prompts]
    records = all_pairs_records("online_dpo", prompts, responses)
    data, keys = round_data(records), ("a", "b")
    sequences = unique_sequences(data, np.arange(len(data)), keys)
    assert len(sequences[0]) == 3 * K
    with torch.no_grad():
        expected = pair_by_pair(scorer, model, data, np.arange(len(data)), keys, "ref")
        for forwards in (1, 5, 3 * K + 2):
            counting = CountingScorer(scorer)
            scored = score_sequences(counting, model, sequences, "ref", forwards)
            assert len(counting.forwards) == forwards
            assert sum(counting.forwards) == max(3 * K, forwards)
            for name in expected:
                torch.testing.assert_close(scored[name], expected[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("prompt_lengths, response_lengths, shared, layout", [
    ((5, 12, 1, 7), (9, 3, 6, 0), (), "padded"),            # 4 rows of 15 slots; packing would save 2 of 60
    ((5, 12, 1, 7, 3, 2), (9, 3, 6, 0, 2, 1), (), "packed"),  # 2 rows of 29 instead of 6 of 15
    # prompts 0, 2 and 5 are one prompt, 1 and 4 another: 3 units of 23, 17 and 12 tokens in 2 rows of 29
    ((5, 12, 5, 7, 12, 5), (9, 3, 6, 0, 2, 1), ((0, 2, 5), (1, 4)), "packed"),
])
def test_sequence_logprobs_match_each_sequence_scored_alone(tiny_llm, prompt_lengths, response_lengths, shared,
                                                            layout):
    """Padded rows, or rows of units end to end (a unit: one prompt once, then each of its responses, each seeing the
    prompt and itself), of different prompt and response lengths (one response empty), the LM head fed only the
    scored positions: each sequence's log-prob and the gradient of their sum equal the full log-softmax of each
    sequence forwarded alone (fp32)."""
    from nashray.trainers.logprobs import causal_lm_sequence_logprobs, sequence_layout

    model, scorer = tiny_llm
    g = torch.Generator().manual_seed(5)
    vocab = model.config.vocab_size
    prompts = random_tokens(g, vocab, prompt_lengths)
    for same in shared:
        for s in same[1:]:
            prompts[s] = prompts[same[0]]
    responses = random_tokens(g, vocab, response_lengths)
    inputs, lay = sequence_layout(model, prompts, responses, scorer.pad_id)
    assert inputs["attention_mask"].ndim == (4 if layout == "packed" else 2)
    # packed: each distinct prompt's tokens go in once; padded: each sequence whole
    prompt_tokens = sum(map(len, {tuple(p) for p in prompts} if layout == "packed" else prompts))
    assert int((lay.unit >= 0).sum()) == prompt_tokens + sum(map(len, responses))
    model.zero_grad()
    batched = causal_lm_sequence_logprobs(model, prompts, responses, scorer.pad_id)
    batched.sum().backward()
    batched_grad = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alone = []
    for p, r in zip(prompts, responses):
        logp = model(input_ids=torch.tensor([p + r])).logits[0, :-1].float().log_softmax(-1)
        positions = torch.arange(len(p) - 1, len(p) + len(r) - 1)
        alone.append(logp[positions, torch.tensor(r, dtype=torch.long)].sum())
    torch.stack(alone).sum().backward()
    torch.testing.assert_close(batched.detach(), torch.stack(alone).detach(), rtol=1e-6, atol=1e-5)
    for mine, reference in zip(batched_grad, (p.grad for p in model.parameters())):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6)
    assert batched[3] == 0.0
    model.zero_grad()


def test_a_shared_prompt_is_laid_out_once_with_each_response_seeing_it_and_itself():
    """Two responses of one prompt and a sequence of another: the unit's tokens, positions continuing from the
    prompt's end in each response, and a mask in which the second response never sees the first."""
    from nashray.trainers.logprobs import lay_out_units, prompt_units

    prompts, responses = [[7, 8], [9], [7, 8]], [[1, 2], [3], [4]]
    units = prompt_units(prompts)
    assert units == [[0, 2], [1]]
    lay = lay_out_units(prompts, responses, units, [[0, 1]], pad_id=0)
    assert lay.input_ids.tolist() == [[7, 8, 1, 2, 4, 9, 3]]
    assert lay.positions.tolist() == [[0, 1, 2, 3, 2, 0, 1]]
    assert lay.branch.tolist() == [[-1, -1, 0, 0, 2, -1, 1]]
    # (column of the hidden state, token it predicts, sequence): the prompt's last token predicts both first tokens
    assert list(zip(lay.columns.tolist(), lay.targets.tolist(), lay.sequence.tolist())) == [
        (1, 1, 0), (2, 2, 0), (1, 4, 2), (5, 3, 1)]
    seen = lay.shared_prefix_mask(torch.float32)[0, 0] == 0
    assert seen[4].tolist() == [True, True, False, False, True, False, False]  # response 2: prompt and itself
    assert seen[6].tolist() == [False] * 5 + [True, True]  # the other unit sees nothing of the first


def test_first_fit_rows_put_the_longest_first_and_fill_each_row():
    from nashray.trainers.logprobs import first_fit_rows
    assert first_fit_rows([7, 15, 14, 7, 5], 30) == [[1, 2], [0, 3, 4]]
    assert first_fit_rows([10, 10, 10], 10) == [[0], [1], [2]]


def test_cpu_attention_follows_the_batch_width(tiny_llm):
    """Eager attention up to EAGER_ATTENTION_MAX_COLUMNS columns, SDPA above, on CPU; the log-probs and their gradient
    are the same either way (fp32), so the choice is speed alone."""
    from nashray.trainers.logprobs import EAGER_ATTENTION_MAX_COLUMNS, causal_lm_sequence_logprobs

    model, scorer = tiny_llm
    g = torch.Generator().manual_seed(6)
    vocab = model.config.vocab_size
    for width, expected in ((40, "eager"), (EAGER_ATTENTION_MAX_COLUMNS + 20, "sdpa")):
        prompts = random_tokens(g, vocab, (width - 25, 7))
        responses = random_tokens(g, vocab, (25, 4))
        results = {}
        for start in ("sdpa", "eager"):
            model.set_attn_implementation(start)
            model.zero_grad()
            logp = causal_lm_sequence_logprobs(model, prompts, responses, scorer.pad_id)
            assert model.config._attn_implementation == expected
            logp.sum().backward()
            results[start] = (logp.detach(), model.model.embed_tokens.weight.grad.clone())
        model.set_attn_implementation("sdpa" if expected == "eager" else "eager")  # the row alone, the other way
        with torch.no_grad():
            out = model(input_ids=torch.tensor([prompts[0] + responses[0]])).logits[0, :-1].float().log_softmax(-1)
        positions = torch.arange(len(prompts[0]) - 1, width - 1)
        alone = out[positions, torch.tensor(responses[0])].sum()
        torch.testing.assert_close(results["sdpa"][0], results["eager"][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(results["sdpa"][1], results["eager"][1], rtol=0, atol=1e-6)
        # a sum of ~150 nats: fp32 resolves it to ~1.5e-5, hence the relative tolerance
        torch.testing.assert_close(results["eager"][0][0], alone, rtol=1e-6, atol=1e-5)
    model.set_attn_implementation("sdpa")


def test_all_pairs_sequences_per_pass_fall_from_pairs_to_samples():
    """K = 4 all-pairs: 6 records and 12 record sequences per prompt, 4 distinct ones scored."""
    records = [{"prompt_ids": [1, 2], "a_ids": [10 + i], "b_ids": [10 + j], "x_ids": [], "target": 1.0,
                "a_score": 0.0, "b_score": 0.0} for i, j in itertools.combinations(range(K), 2)]
    prompts, responses, where = unique_sequences(round_data(records), np.arange(len(records)), ("a", "b"))
    assert len(prompts) == K and sorted(map(tuple, responses)) == [(10 + i,) for i in range(K)]
    assert all(responses[where["a"][n]] == r["a_ids"] and responses[where["b"][n]] == r["b_ids"]
               for n, r in enumerate(records))
