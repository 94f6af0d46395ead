"""``nashray export RUN_DIR [--round t] OUT``: a round checkpoint of a real campaign becomes a plain HF model folder
with a model card, which transformers and vLLM load with the trained weights."""

from __future__ import annotations

import pytest
import torch
import yaml

from nashray.cluster.cli import main


@pytest.fixture(scope="module")
def trained_run(ray_cluster, tiny_model_dir, tmp_path_factory):
    """One round of online DPO on the tiny model: the cheapest campaign that leaves a checkpoint."""
    from nashray.cluster.driver import run_campaign
    root = tmp_path_factory.mktemp("export-campaign")
    config = root / "campaign.yaml"
    config.write_text(yaml.safe_dump(dict(
        seed=0,
        model={"path": tiny_model_dir, "dtype": "float32", "max_prompt_tokens": 96},
        algorithm={"name": "online_dpo"},
        generators={"count": 1, "engine": "hf", "sampling": {"max_new_tokens": 12}},
        # min_chars 1: the tiny model's random answers are short, and every pair of them must not tie
        judges={"count": 1, "oracle": {"kind": "rule", "rule": "concise_answer", "options": {"min_chars": 1}}},
        learner={"workers": 1, "precision": "fp32", "micro_batch_size": 4, "optimizer": {"lr": 1e-2},
                 "threads_per_worker": 1},
        schedule={"rounds": 1, "prompts_per_round": 4, "samples_per_prompt": 3},
        storage={"run_dir": str(root / "run")},
        evaluation={"every_rounds": 0})))
    return run_campaign(str(config))


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "tiny-dpo"
    assert main(["export", str(trained_run.root), str(out)]) == 0
    return out


def test_the_export_is_the_checkpoints_model_files_and_a_model_card(trained_run, exported):
    ckpt = trained_run.checkpoint_dir(0)
    model_files = {p.name for p in ckpt.iterdir() if p.is_file()} - {"COMPLETE"}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= model_files
    assert {p.name for p in exported.iterdir()} == model_files | {"README.md"}  # no DeepSpeed state, no marker
    for name in model_files:
        assert (exported / name).read_bytes() == (ckpt / name).read_bytes(), name

    card = (exported / "README.md").read_text()
    front_matter = yaml.safe_load(card.split("---\n")[1])
    assert front_matter["library_name"] == "transformers" and "online_dpo" in front_matter["tags"]
    assert "base_model" not in front_matter  # a local folder, not a hub model
    assert trained_run.config_path.read_text().rstrip() in card
    final = trained_run.metrics()[-1]
    assert final["round"] == 0
    for key in ("loss", "kl_to_ref", "train_tokens_per_s"):
        assert f"| `{key}` | {final[key]:.6g} |" in card
    assert "Full weights" in card and "no LoRA adapters" in card


def test_transformers_loads_the_trained_weights(tiny_model_dir, trained_run, exported):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    trained = load_file(str(trained_run.checkpoint_dir(0) / "model.safetensors"))
    state = model.state_dict()
    for name, tensor in trained.items():
        torch.testing.assert_close(state[name], tensor.float(), rtol=0, atol=0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    assert any(not torch.equal(base[name], state[name]) for name in trained)  # the round moved the policy
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True).endswith("assistant\n")


def test_vllm_serves_the_export_with_the_trained_weights(exported):
    """vLLM's log-probabilities of a fixed sequence are transformers' on the exported folder (fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams, TokensPrompt
    tokenizer = AutoTokenizer.from_pretrained(exported)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Name a fruit that is yellow."}],
                                        tokenize=True, add_generation_prompt=True, return_dict=False)
    ids = list(ids) + tokenizer.encode(" A banana.", add_special_tokens=False)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)(torch.tensor([ids])).logits[0]
    expected = torch.log_softmax(logits.float(), -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]

    llm = LLM(model=str(exported), dtype="float32", enforce_eager=True, distributed_executor_backend="uni",
              max_model_len=len(ids) + 8, seed=0)
    try:
        (out,) = llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=0),
                              use_tqdm=False)
        got = torch.tensor([step[tok].logprob for step, tok in zip(out.prompt_logprobs[1:], ids[1:])])
    finally:
        del llm
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-3)


def test_a_round_or_folder_that_cannot_be_exported_is_named(trained_run, exported, tmp_path, capsys):
    from nashray.cluster.config import dump_config, parse_config
    from nashray.layout import RunDir
    assert main(["export", str(trained_run.root), str(tmp_path / "r5"), "--round", "5"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"nashray export: {trained_run.root} has no complete checkpoint of round 5 (complete: ['round-0000']; "
        f"storage.keep_checkpoints keeps the newest few)"]
    assert not (tmp_path / "r5").exists()
    assert main(["export", str(trained_run.root), str(exported), "--round", "0"]) == 2
    assert capsys.readouterr().err.strip() == (f"nashray export: {exported} already exists and is not an empty folder: "
                                               f"an export never overwrites")
    tabular = RunDir(tmp_path / "tabular")
    tabular.create(dump_config(parse_config({"generators": {"engine": "tabular"}, "judges": {"oracle": {
        "kind": "matrix"}}, "learner": {"precision": "fp32"}, "data": {"game": "builtin:rps"}})))
    assert main(["export", str(tabular.root), str(tmp_path / "t")]) == 2
    assert "is a tabular campaign: its policy is a logit table, not an HF model" in capsys.readouterr().err
