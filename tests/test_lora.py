"""LoRA policies (learner.lora): merged weights or the adapters out, π_ref as the adapters switched off, real
campaigns on vLLM."""

from __future__ import annotations

import copy

import pytest

LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "all-linear"}


@pytest.fixture
def adapted(tiny_model_dir):
    """The tiny model with adapters whose B is random (fresh adapters compute nothing), and its base copy."""
    import torch

    from nashray.cluster.config import LoraConfig
    from nashray.trainers.lora import add_adapters
    from nashray.models import load_causal_lm
    base = load_causal_lm(tiny_model_dir, "float32", False)
    model = add_adapters(copy.deepcopy(base), LoraConfig(**LORA))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model, base


def test_only_the_adapters_train(adapted):
    model, base = adapted
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) < 0.2 * sum(p.numel() for p in base.parameters())


def test_merged_state_dict_is_peft_merge_in_hf_names_and_leaves_the_model_unchanged(adapted):
    import torch

    from nashray.trainers.lora import merged_state_dict
    model, base = adapted
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merged_state_dict(model)
    assert set(merged) == set(base.state_dict())   # the plain HF layout generators and exports load
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    for key, value in merged.items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=1e-6)
    changed = [k for k in merged if not torch.equal(merged[k], base.state_dict()[k])]
    assert changed and all(k.endswith("_proj.weight") for k in changed)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_adapters_off_is_the_base_model_and_adapters_on_is_the_merged_one(adapted, tiny_model_dir):
    """π_ref through AdaptersOff scores sequences exactly as the untouched base model does; with the adapters on,
    as the merged weights do — the two things a LoRA campaign relies on."""
    import torch

    from nashray.trainers.logprobs import causal_lm_sequence_logprobs
    from nashray.trainers.lora import AdaptersOff, merged_state_dict
    model, base = adapted

    class Engine:  # the one part of a DeepSpeed engine AdaptersOff uses: forward through the wrapped module
        module = model

        def __call__(self, **inputs):
            return model(**inputs)

    prompts, responses = [[1, 5, 9, 3], [1, 7]], [[4, 4, 8], [2, 6, 6, 5, 11]]
    with torch.no_grad():
        off = causal_lm_sequence_logprobs(AdaptersOff(Engine()), prompts, responses, 0)
        on = causal_lm_sequence_logprobs(model, prompts, responses, 0)
        expected_off = causal_lm_sequence_logprobs(base, prompts, responses, 0)
        merged = copy.deepcopy(base)
        merged.load_state_dict(merged_state_dict(model))
        expected_on = causal_lm_sequence_logprobs(merged, prompts, responses, 0)
    torch.testing.assert_close(off, expected_off, rtol=0, atol=1e-5)
    torch.testing.assert_close(on, expected_on, rtol=0, atol=1e-4)
    assert (on - off).abs().max() > 1e-3


def test_lora_is_refused_with_zero3_and_the_tabular_engine():
    from nashray.cluster.config import ConfigError, parse_config
    with pytest.raises(ConfigError, match="learner.lora .* learner.zero_stage 0–2"):
        parse_config({"learner": {"lora": LORA, "zero_stage": 3}})
    with pytest.raises(ConfigError, match="learner.lora"):
        parse_config({"learner": {"lora": LORA, "precision": "fp32"}, "generators": {"engine": "tabular"},
                      "judges": {"oracle": {"kind": "matrix"}}, "data": {"game": "builtin:rps"}})


def test_adapted_module_names_are_what_peft_adapts(tiny_model_dir, adapted):
    from nashray.cluster.config import LoraConfig
    from nashray.trainers.lora import adapted_module_names
    model, _ = adapted
    peft_names = sorted({name.rpartition(".")[2] for name, module in model.named_modules() if hasattr(module, "lora_A")})
    assert adapted_module_names(tiny_model_dir, LoraConfig(**LORA)) == peft_names
    assert "lm_head" not in peft_names and "q_proj" in peft_names
    assert adapted_module_names(tiny_model_dir, LoraConfig(target_modules=["v_proj", "q_proj"])) == ["q_proj", "v_proj"]


def test_adapter_pushes_are_refused_where_vllm_lora_cannot_serve_them():
    from nashray.cluster.config import ConfigError, parse_config
    adapter = {"lora": {**LORA, "push": "adapter"}}
    with pytest.raises(ConfigError, match="learner.lora.push 'adapter' .* generators.engine 'vllm', not 'hf'"):
        parse_config({"learner": adapter, "generators": {"engine": "hf"}})
    with pytest.raises(ConfigError, match="learner.lora.push 'adapter'.*Nash-MD's policy/reference pair"):
        parse_config({"learner": adapter, "algorithm": {"name": "nash_md"}})
    with pytest.raises(ConfigError, match="learner.lora.push 'adapter' .* generators.weight_transport 'broadcast'"):
        parse_config({"learner": adapter, "generators": {"weight_transport": "broadcast", "on_failure": "abort"}})
    with pytest.raises(ConfigError, match="learner.lora.rank"):
        parse_config({"learner": {"lora": {**LORA, "rank": 1024}}})
    assert parse_config({"learner": adapter}).learner.lora.push == "adapter"


@pytest.mark.ray
@pytest.mark.parametrize("push", ["merged", "adapter"])
def test_lora_campaign_trains_adapters_pushes_them_and_checkpoints_them(ray_cluster, tmp_path, tiny_model_dir, push):
    """INPO with a LoRA policy on the vLLM generator, pushing merged weights or the adapters alone (applied by
    vLLM's LoRA support over the base weights): every push leaves the generator on the learner's policy, which moved
    far enough that a generator left on the base weights would fail that check. The checkpoint's model.safetensors
    is the merged model and its adapter/ folder, loaded by peft onto the base model, scores sequences as that merged
    model does; weights outside the adapted layers never move."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from nashray.cluster.driver import run_campaign
    from tests.test_campaign import llm_config
    from nashray.trainers.logprobs import causal_lm_sequence_logprobs
    from nashray.layout import ADAPTER_DIR

    run = run_campaign(llm_config(tmp_path, tiny_model_dir, {"name": "inpo"},
                                  learner={"workers": 1, "precision": "fp32", "micro_batch_size": 4,
                                           "optimizer": {"lr": 1e-2}, "threads_per_worker": 1,
                                           "lora": {**LORA, "push": push}}))
    metrics = run.metrics()
    assert [m["round"] for m in metrics] == [0, 1]
    assert all(m["push_logprob_max_abs_diff"] < 1e-4 and m["steps"] > 0 for m in metrics)
    checkpoint = run.read_state().checkpoint
    merged = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    moved = {name for (name, a), b in zip(merged.named_parameters(), initial.parameters())
             if float((a - b).detach().abs().max()) > 0}
    assert moved and all(name.endswith("_proj.weight") for name in moved)
    prompts, responses = [[1, 5, 9, 3]], [[4, 4, 8, 2]]
    with torch.no_grad():
        before = causal_lm_sequence_logprobs(initial, prompts, responses, 0)
        after = causal_lm_sequence_logprobs(merged, prompts, responses, 0)
        with_adapter = PeftModel.from_pretrained(initial, f"{checkpoint}/{ADAPTER_DIR}")  # adapts `initial` in place
        torch.testing.assert_close(causal_lm_sequence_logprobs(with_adapter, prompts, responses, 0), after, rtol=0,
                                   atol=1e-4)
    assert (after - before).abs().max() > 1e-2
