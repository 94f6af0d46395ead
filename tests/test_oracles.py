"""Preference oracles: rules, ensembles, the on-disk cache, reward and pairwise models, the LLM judge (tiny random
models, a deliberately position-biased judge, and the real SmolLM2)."""

from __future__ import annotations

import math

import pytest

from nashray.oracles import build_oracle, is_deterministic
from nashray.oracles.base import Comparison, PreferenceOracle, Verdict
from nashray.oracles.cache import VerdictCache
from nashray.oracles.config import MatrixOracleConfig, ModelOracleConfig, RuleOracleConfig, parse_oracle_config
from nashray.oracles.ensemble import EnsembleOracle
from nashray.oracles.judging import (DEFAULT_TEMPLATE, check_template, judging_messages, parse_judging_message,
                             parse_verdict_text)
from nashray.oracles.rules import RULES, build_rule


def probs(oracle: PreferenceOracle, triples) -> list[float | None]:
    return [v.prob for v in oracle.compare([Comparison(*t) for t in triples])]


# ------------------------------------------------------------------------------------------------ rules

def test_arithmetic_prefers_the_right_number():
    rule = build_rule("arithmetic")
    assert probs(rule, [("What is 12+7?", "It is 19.", "It is 18."),
                        ("What is 12+7?", "12 + 7 = 20", "19"),
                        ("What is 3 * (2 - 5)?", "-9", "9"),
                        ("what is 6 x 7", "42", "forty-two"),
                        ("What is 12+7?", "19", "19!")]) == [1.0, 0.0, 1.0, 1.0, 0.5]
    dropped = rule.compare([Comparison("Tell me a joke.", "1", "2")])[0]
    assert dropped.prob is None and "not a 'What is <expression>?' question" in dropped.reason
    last = build_rule("arithmetic", {"match": "last"})
    assert probs(last, [("What is 12+7?", "19? no, 18", "18? no, 19")]) == [0.0]
    assert probs(rule, [("What is 12+7?", "19? no, 18", "18? no, 19")]) == [0.5]


def test_concise_answer_is_the_default_oracle_and_prefers_short_non_empty():
    from nashray.cluster.config import JudgeConfig
    oracle = build_oracle(JudgeConfig().oracle)
    assert oracle.oracle_id.startswith("rule:concise_answer")
    long, short = "a fairly long answer that rambles on and on", "a short answer here"
    assert probs(oracle, [("q", short, long), ("q", long, short), ("q", "", "x"), ("q", "  ", ""),
                          ("q", "ok", "yes")]) == [1.0, 0.0, 0.0, 0.5, 0.5]
    # under min_chars (16 by default) shortness earns nothing more
    assert probs(build_rule("concise_answer", {"min_chars": 1}), [("q", "ok", "yes")]) == [1.0]


def test_format_and_length_rules():
    assert probs(build_rule("max_words", {"limit": 3}), [("q", "one two", "one two three four"),
                                                         ("q", "a b c d", "a b c d e")]) == [1.0, 0.5]
    fmt = build_rule("matches_format", {"pattern": r"\d+", "fullmatch": True})
    assert probs(fmt, [("q", " 42 ", "42 apples"), ("q", "x", "7")]) == [1.0, 0.0]


def test_cyclic_rule_is_intransitive():
    rule = build_rule("cyclic")
    one, two, three = "w", "w w", "w w w"
    # class = words mod 3: 1 beats 2, 2 beats 0 (three words), 0 beats 1: a rock-paper-scissors cycle
    assert probs(rule, [("q", one, two), ("q", two, three), ("q", three, one)]) == [1.0, 1.0, 1.0]
    assert probs(rule, [("q", two, one), ("q", one, "x y z w")]) == [0.0, 0.5]
    soft = build_rule("cyclic", {"classes": 5, "strength": 0.5})
    assert probs(soft, [("q", one, two), ("q", one, "w w w w")]) == [0.75, 0.25]


def test_rule_registry_errors_name_what_exists():
    assert {"arithmetic", "concise_answer", "cyclic", "max_words", "matches_format"} <= set(RULES)
    with pytest.raises(ValueError, match=r"unknown rule oracle 'nope'.*concise_answer"):
        build_rule("nope")
    with pytest.raises(ValueError, match=r"no option\(s\) \['limit'\].*min_chars"):
        build_rule("concise_answer", {"limit": 3})
    with pytest.raises(ValueError, match="odd integer"):
        build_rule("cyclic", {"classes": 4})


# ------------------------------------------------------------------------------------------ the protocol

def test_judging_template_round_trip_and_verdict_parsing():
    message = judging_messages(DEFAULT_TEMPLATE, "What {is} 2+2?", "4\n\nyes", "five")[0]["content"]
    assert parse_judging_message(DEFAULT_TEMPLATE, message) == ("What {is} 2+2?", "4\n\nyes", "five")
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        check_template("{prompt}: {a}")
    assert [parse_verdict_text(t) for t in ("A", " b.", "Response B", "[[A]]", "AB", "I pick A", "")] == [
        "A", "B", "B", "A", None, None, None]


# ------------------------------------------------------------------------------------------- ensembles

def test_ensemble_mean_majority_and_drops():
    arithmetic, concise = build_rule("arithmetic"), build_rule("concise_answer", {"min_chars": 1})
    cases = [("What is 1+1?", "the answer is 2", "3"), ("Hi", "hello", "hello there")]
    mean = EnsembleOracle([arithmetic, concise], "mean")
    # first: arithmetic says 1, concise says 0 → 0.5; second: arithmetic drops, concise alone says 1
    assert probs(mean, cases) == [0.5, 1.0]
    # majority: first, 1 vote for a against 2 for b (max_words: 4 words > 2) → 0; second, concise's vote for a
    # against an abstention (both within 2 words) → 1
    majority = EnsembleOracle([arithmetic, concise, build_rule("max_words", {"limit": 2})], "majority")
    assert probs(majority, cases) == [0.0, 1.0]
    assert probs(EnsembleOracle([arithmetic, concise], "majority"), cases[:1]) == [0.5]
    both_drop = EnsembleOracle([arithmetic, build_rule("arithmetic", {"match": "last"})])
    verdict = both_drop.compare([Comparison("Hi", "a", "b")])[0]
    assert verdict.prob is None and verdict.reason.count("not a 'What is") == 2
    built = build_oracle(parse_oracle_config({"kind": "ensemble", "combine": "majority",
                                              "members": [{"kind": "rule", "rule": "arithmetic"},
                                                          {"kind": "rule", "rule": "concise_answer"}]}))
    assert isinstance(built, EnsembleOracle) and len(built.members) == 2


# ------------------------------------------------------------------------------------------------ cache

class CountingRule(PreferenceOracle):
    """A real rule oracle that counts the comparisons it is asked."""

    def __init__(self):
        self.inner, self.asked = build_rule("concise_answer"), 0
        self.oracle_id = self.inner.oracle_id

    def compare(self, comparisons):
        self.asked += len(comparisons)
        return self.inner.compare(comparisons)


def test_cache_is_shared_between_writers_and_survives_torn_lines(tmp_path):
    cs = [Comparison("q", f"answer {i}", "a much longer answer than that") for i in range(4)]
    first = VerdictCache(tmp_path, "oracle-x", writer="actor-1")
    second = VerdictCache(tmp_path, "oracle-x", writer="actor-2")
    first.put(cs[:2], [Verdict(0.25), Verdict(None, "timeout")])
    second.put(cs[2:], [Verdict(1.0), Verdict(0.0)])
    assert first.get(cs) == [0.25, None, 1.0, 0.0]       # picks up what actor-2 appended since
    assert sorted(p.name for p in tmp_path.iterdir()) == ["actor-1.jsonl", "actor-2.jsonl"]
    assert "answer" not in (tmp_path / "actor-1.jsonl").read_text()   # hashes only, no texts
    with open(tmp_path / "actor-2.jsonl", "a") as f:                   # a writer killed mid-line
        f.write('{"key": "abc", "pr')
    resumed = VerdictCache(tmp_path, "oracle-x", writer="actor-3")
    assert resumed.get(cs) == [0.25, None, 1.0, 0.0]
    assert VerdictCache(tmp_path, "another-oracle").get(cs) == [None] * 4


def test_build_oracle_with_run_dir_never_pays_twice(tmp_path):
    from nashray.oracles.cache import CachedOracle
    counting = CountingRule()
    cs = [Comparison("q", "short", "longer answer here"), Comparison("q", "", "x")]
    cached = CachedOracle(counting, tmp_path / "judge-cache")
    assert [v.prob for v in cached.compare(cs)] == [1.0, 0.0]
    assert [v.prob for v in CachedOracle(counting, tmp_path / "judge-cache").compare(cs)] == [1.0, 0.0]
    assert counting.asked == 2
    assert isinstance(build_oracle(RuleOracleConfig(kind="rule", rule="arithmetic"), run_dir=tmp_path), CachedOracle)
    assert is_deterministic(MatrixOracleConfig(kind="matrix", sample=False))
    assert not is_deterministic(parse_oracle_config({"kind": "ensemble", "members": [
        {"kind": "matrix"}, {"kind": "rule", "rule": "cyclic"}]}))


# ----------------------------------------------------------------------------- reward and pairwise models

TRIPLES = [("What is 2+2?", "4", "five"), ("Say hello.", "hello world", "the quick brown fox jumps"),
           ("Name a number.", "seven", "7 8 9 10 11 12"), ("Why?", "because", "")]


def test_reward_model_is_bradley_terry_on_its_scores(tiny_classifier_dir):
    rm = build_oracle(ModelOracleConfig(kind="reward_model", model=tiny_classifier_dir))
    cs = [Comparison(*t) for t in TRIPLES]
    scores_a = rm.score([c.prompt for c in cs], [c.a for c in cs])
    scores_b = rm.score([c.prompt for c in cs], [c.b for c in cs])
    assert len(set(scores_a + scores_b)) == 8, "a random head should tell these responses apart"
    for verdict, ra, rb in zip(rm.compare(cs), scores_a, scores_b):
        assert verdict.prob == pytest.approx(1 / (1 + math.exp(rb - ra)), abs=1e-6)
    swapped = rm.compare([Comparison(c.prompt, c.b, c.a) for c in cs])
    assert all(v.prob + w.prob == pytest.approx(1.0) for v, w in zip(rm.compare(cs), swapped))
    one_at_a_time = build_oracle(ModelOracleConfig(kind="reward_model", model=tiny_classifier_dir, batch_size=1))
    assert one_at_a_time.score([c.prompt for c in cs], [c.a for c in cs]) == pytest.approx(scores_a, abs=1e-5)


def test_pairwise_model_debiases_a_joint_classifier(tiny_classifier_dir):
    raw = build_oracle(ModelOracleConfig(kind="pairwise_model", model=tiny_classifier_dir, both_orders=False))
    cs = [Comparison(*t) for t in TRIPLES]
    swapped = [Comparison(c.prompt, c.b, c.a) for c in cs]
    raw_sums = [v.prob + w.prob for v, w in zip(raw.compare(cs), raw.compare(swapped))]
    assert max(abs(s - 1.0) for s in raw_sums) > 1e-3, "an untrained joint classifier is not antisymmetric"
    pairwise = build_oracle(ModelOracleConfig(kind="pairwise_model", model=tiny_classifier_dir))
    forward, backward = pairwise.compare(cs), pairwise.compare(swapped)
    assert all(v.prob + w.prob == pytest.approx(1.0, abs=1e-12) for v, w in zip(forward, backward))
    batched_one = build_oracle(ModelOracleConfig(kind="pairwise_model", model=tiny_classifier_dir, batch_size=1))
    assert [v.prob for v in batched_one.compare(cs)] == pytest.approx([v.prob for v in forward], abs=1e-5)


def test_model_oracle_config_errors(tiny_model_dir):
    with pytest.raises(ValueError, match="invalid oracle config: reward_model: .*engine 'vllm' serves kind "
                                         "'llm_judge' only"):
        parse_oracle_config({"kind": "reward_model", "model": tiny_model_dir, "engine": "vllm"})
    with pytest.raises(ValueError, match=r"invalid oracle config: llm_judge.template: .*unknown \['c'\]"):
        parse_oracle_config({"kind": "llm_judge", "model": tiny_model_dir, "template": "{prompt}{a}{b}{c}"})
    with pytest.raises(ValueError, match="engine 'vllm' serves kind 'llm_judge' only"):  # the models themselves
        ModelOracleConfig(kind="reward_model", model=tiny_model_dir, engine="vllm")


# --------------------------------------------------------------------------------------------- LLM judge

def test_llm_judge_on_tiny_model_is_symmetric_and_batch_invariant(tiny_model_dir):
    judge = build_oracle(ModelOracleConfig(kind="llm_judge", model=tiny_model_dir))
    cs = [Comparison(*t) for t in TRIPLES]
    forward = judge.compare(cs)
    backward = judge.compare([Comparison(c.prompt, c.b, c.a) for c in cs])
    assert all(0.0 < v.prob < 1.0 for v in forward)
    assert all(v.prob + w.prob == pytest.approx(1.0, abs=1e-12) for v, w in zip(forward, backward))
    one_by_one = build_oracle(ModelOracleConfig(kind="llm_judge", model=tiny_model_dir, batch_size=1))
    assert [v.prob for v in one_by_one.compare(cs)] == pytest.approx([v.prob for v in forward], abs=1e-6)
    short = build_oracle(ModelOracleConfig(kind="llm_judge", model=tiny_model_dir, max_length=40))
    dropped = short.compare(cs[:1])[0]
    assert dropped.prob is None and "over the judge's max_length 40" in dropped.reason


@pytest.fixture(scope="module")
def position_biased_judge_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model rewired into a judge that says "A" whatever it reads.

    With every attention and MLP output projection zeroed, the last hidden state is the (normed) embedding of the
    last prompt token — the chat template's assistant header, the same for every question — and the verdict rows of
    the LM head are set so that logit(A) − logit(B) = 8 on it: P(A) = σ(8) ≈ 0.9997 in any position."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        header = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                         add_generation_prompt=True))["input_ids"]
        hidden = model.model.norm(model.model.embed_tokens.weight[header[-1]])
        token_a, token_b = (tokenizer.encode(v, add_special_tokens=False)[0] for v in "AB")
        model.lm_head.weight[token_a] = 4.0 * hidden / hidden.dot(hidden)
        model.lm_head.weight[token_b] = -4.0 * hidden / hidden.dot(hidden)
    target = tmp_path_factory.mktemp("biased-judge")
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return str(target)


def test_debiasing_turns_an_always_A_judge_into_a_symmetric_one(position_biased_judge_dir):
    cs = [Comparison(*t) for t in TRIPLES]
    swapped = [Comparison(c.prompt, c.b, c.a) for c in cs]
    single = build_oracle(ModelOracleConfig(kind="llm_judge", model=position_biased_judge_dir, both_orders=False))
    # one order: a ≻ b and b ≻ a are both near certain — pure position bias
    assert all(v.prob > 0.999 for v in single.compare(cs) + single.compare(swapped))
    debiased = build_oracle(ModelOracleConfig(kind="llm_judge", model=position_biased_judge_dir))
    assert [v.prob for v in debiased.compare(cs) + debiased.compare(swapped)] == pytest.approx([0.5] * 8,
                                                                                               abs=1e-9)


@pytest.mark.slow
def test_llm_judge_on_smollm2(smollm2_dir):
    """The real SmolLM2-135M-Instruct: the verdict tokens carry real mass, the model is position-biased when asked
    once, and debiasing makes its verdicts complementary."""
    from nashray.oracles.llm_judge import LLMJudge
    cs = [Comparison("What is the capital of France?", "The capital of France is Paris.", "I like turtles."),
          Comparison("What is 12+7?", "12+7 = 19.", "12+7 = 25.")]
    swapped = [Comparison(c.prompt, c.b, c.a) for c in cs]
    judge = LLMJudge(smollm2_dir)
    asked = judge.verdict_logprobs([judging_messages(judge.template, c.prompt, c.a, c.b) for c in cs + swapped])
    assert all(math.exp(lp_a) + math.exp(lp_b) > 0.1 for lp_a, lp_b in asked), \
        "the judging prompt should make A or B a likely next token"
    single = [1 / (1 + math.exp(lp_b - lp_a)) for lp_a, lp_b in asked]
    assert sum(abs(single[i] + single[i + 2] - 1.0) for i in range(2)) > 0.1, "a 135M judge favours a position"
    forward, backward = judge.compare(cs), judge.compare(swapped)
    assert [v.prob for v in forward] == pytest.approx([(single[i] + 1 - single[i + 2]) / 2 for i in range(2)])
    assert all(v.prob + w.prob == pytest.approx(1.0, abs=1e-12) for v, w in zip(forward, backward))


def test_llm_judge_vllm_engine_matches_transformers(tiny_model_dir):
    """Last in the file: an in-process vLLM engine lowers this process's torch threads to 1."""
    pytest.importorskip("vllm")
    cs = [Comparison(*t) for t in TRIPLES]
    hf = build_oracle(ModelOracleConfig(kind="llm_judge", model=tiny_model_dir, both_orders=False))
    vllm = build_oracle(ModelOracleConfig(kind="llm_judge", model=tiny_model_dir, engine="vllm", max_length=512,
                                          both_orders=False))
    assert [v.prob for v in vllm.compare(cs)] == pytest.approx([v.prob for v in hf.compare(cs)], abs=1e-4)
