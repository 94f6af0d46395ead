"""Prompt sources: the shipped instruction set, the campaign split and its bad sizes, Hugging Face datasets, and chat
prompts (lists of {"role", "content"} messages) from every source down to the token ids a generator samples after."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import tomllib
from pathlib import Path

import pytest

from nashray.cluster.config import parse_config
from nashray.cluster.prompts import (INSTRUCTIONS_FILE, Prompt, PromptDataError, load_prompts, split_campaign_prompts,
                             split_prompts)

ROOT = Path(__file__).resolve().parents[1]
CHAT = [{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"}]


def _normalised(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


# ---------------------------------------------------------------------------------------- builtin:instructions

def test_builtin_instructions_are_many_short_distinct_and_half_open_ended():
    prompts = load_prompts("builtin:instructions")
    assert len(prompts) >= 320
    assert len({p.prompt_id for p in prompts}) == len(prompts)
    texts = [_normalised(p.prompt) for p in prompts]
    duplicates = sorted({t for t in texts if texts.count(t) > 1})
    assert not duplicates, duplicates
    assert all(p.messages is None and len(p.prompt.split()) <= 20 for p in prompts)
    rows = [json.loads(line) for line in INSTRUCTIONS_FILE.read_text(encoding="utf-8").splitlines()]
    kinds = [r["kind"] for r in rows]
    assert set(kinds) == {"open", "task"}
    assert 0.4 <= kinds.count("open") / len(kinds) <= 0.6  # sentiment and length free to vary on about half


def test_builtin_instructions_ship_with_the_package():
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    relative = INSTRUCTIONS_FILE.relative_to(ROOT / "cluster").as_posix()
    assert any(fnmatch.fnmatch(relative, pattern) for pattern in package_data["nashray.cluster"])


def test_builtin_instructions_fit_well_under_60_tokens_of_smollm2(smollm2_dir):
    from nashray.actors.engines import chat_prompt_ids
    from nashray.models import load_tokenizer
    tokenizer = load_tokenizer(smollm2_dir)
    lengths = {p.prompt_id: len(chat_prompt_ids(tokenizer, p.chat())) for p in load_prompts("builtin:instructions")}
    # SmolLM2's template alone is about 30 tokens (it adds a default system turn); 50 keeps every prompt well under 60
    assert max(lengths.values()) <= 50, max(lengths.items(), key=lambda kv: kv[1])


def test_the_split_holds_out_a_fixed_seeded_set():
    prompts = load_prompts("builtin:instructions")
    cfg = parse_config({"data": {"prompts": "builtin:instructions", "eval_fraction": 0.2, "shuffle_seed": 3},
                        "evaluation": {"prompts": 64}})
    split = split_campaign_prompts(prompts, cfg, "builtin:instructions")
    assert len(split.eval) >= 64
    assert sorted(p.prompt_id for p in split.train + split.eval) == sorted(p.prompt_id for p in prompts)
    again = split_prompts(prompts, 0.2, seed=3)
    assert (again.train, again.eval) == (split.train, split.eval)
    assert split_prompts(prompts, 0.2, seed=4).eval != split.eval


# ------------------------------------------------------------------------------------------ too few prompts

@pytest.mark.parametrize("data, evaluation, names", [
    ({"eval_fraction": 0.0}, {"prompts": 8},
     ["builtin:demo", "data.eval_fraction=0.0 holds out 0 of its 48 prompts", "evaluation.prompts=8",
      "raise data.eval_fraction to 0.167"]),
    ({"eval_fraction": 0.1}, {"prompts": 8},
     ["data.eval_fraction=0.1 holds out 5 of its 48 prompts, fewer than evaluation.prompts=8"]),
    ({"eval_fraction": 0.9}, {"prompts": 48}, ["holds out 43 of its 48", "48 prompts cannot hold out 48"]),
    ({"eval_fraction": 0.99}, {"prompts": 8},
     ["48 prompts leave none for training with eval_fraction=0.99", "data.eval_fraction holds out all 48",
      "builtin:demo"]),
])
def test_a_split_too_small_for_the_config_names_the_numbers_and_fields(data, evaluation, names):
    cfg = parse_config({"data": data, "evaluation": evaluation})
    with pytest.raises(PromptDataError) as err:
        split_campaign_prompts(load_prompts("builtin:demo"), cfg, "builtin:demo")
    for name in names:
        assert name in str(err.value)


def test_a_split_needs_no_held_out_prompts_without_evaluation():
    prompts = load_prompts("builtin:demo")
    off = parse_config({"data": {"eval_fraction": 0.0}, "evaluation": {"every_rounds": 0}})
    assert len(split_campaign_prompts(prompts, off, "builtin:demo").train) == 48
    tabular = parse_config({"generators": {"engine": "tabular"}, "judges": {"oracle": {"kind": "matrix"}},
                            "learner": {"precision": "fp32"}, "data": {"game": "builtin:rps"}})
    game = load_prompts("game:builtin:rps")
    assert split_campaign_prompts(game, tabular, "game:builtin:rps").train == game


def test_a_campaign_with_too_few_held_out_prompts_fails_at_load(tmp_path, tiny_model_dir):
    from nashray.cluster.driver import Campaign
    from nashray.layout import RunDir
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"what is {i} plus {i}?"}) + "\n" for i in range(20)))
    cfg = parse_config({"model": {"path": tiny_model_dir, "max_prompt_tokens": 64},
                        "data": {"prompts": str(path), "eval_fraction": 0.1}, "evaluation": {"prompts": 4}})
    with pytest.raises(PromptDataError, match=re.escape(f"{path}: data.eval_fraction=0.1 holds out 2 of its 20 "
                                                        "prompts, fewer than evaluation.prompts=4")):
        Campaign(cfg, RunDir(tmp_path / "run"))


# ----------------------------------------------------------------------------------------- Hugging Face datasets

@pytest.fixture(scope="module")
def saved_datasets(tmp_path_factory):
    """A DatasetDict (train with a prompt_id column, test of chats) and a lone Dataset, saved with save_to_disk."""
    import datasets
    root = tmp_path_factory.mktemp("hf")
    train = datasets.Dataset.from_list([{"prompt_id": f"t{i}", "instruction": f"say {i}", "extra": i}
                                        for i in range(5)])
    test = datasets.Dataset.from_list([{"instruction": CHAT}, {"instruction": [{"role": "user", "content": "hi"}]}])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(root / "dict"))
    datasets.Dataset.from_list([{"prompt": "one"}, {"prompt": "two"}]).save_to_disk(str(root / "single"))
    return root


def test_hf_datasets_saved_to_disk_load_with_their_split_and_field(saved_datasets):
    train = load_prompts(f"hf:{saved_datasets / 'dict'}", "instruction")
    assert [(p.prompt_id, p.prompt, p.messages) for p in train] == [(f"t{i}", f"say {i}", None) for i in range(5)]
    test = load_prompts(f"hf:{saved_datasets / 'dict'}", "instruction", split="test")
    assert [p.prompt_id for p in test] == ["row-1", "row-2"]
    assert test[0].chat() == CHAT and (test[1].prompt, test[1].chat()) == ("hi", [{"role": "user", "content": "hi"}])
    assert [p.prompt for p in load_prompts(f"hf:{saved_datasets / 'single'}")] == ["one", "two"]


def test_hf_dataset_errors_name_the_split_field_or_id(saved_datasets, tmp_path):
    folder = saved_datasets / "dict"
    with pytest.raises(PromptDataError, match=re.escape(f"hf dataset '{folder}' has no split 'validation' "
                                                        "(data.split); its splits: ['test', 'train']")):
        load_prompts(f"hf:{folder}", "instruction", split="validation")
    with pytest.raises(PromptDataError, match=re.escape(f"hf dataset '{folder}' split 'train' has no column 'prompt' "
                                                        "(data.prompt_field); its columns: ['prompt_id', "
                                                        "'instruction', 'extra']")):
        load_prompts(f"hf:{folder}")
    with pytest.raises(PromptDataError, match=f"hf dataset '{tmp_path}': {tmp_path} is not a folder written by "
                                              "Dataset.save_to_disk"):
        load_prompts(f"hf:{tmp_path}")
    with pytest.raises(PromptDataError, match="'hf:' names no dataset"):
        load_prompts("hf:")


def test_a_hub_dataset_that_cannot_be_loaded_names_the_id():
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # tests/conftest.py, before the hub client is imported
    with pytest.raises(PromptDataError) as err:
        load_prompts("hf:nashray-tests/no-such-dataset", split="train")
    message = str(err.value)
    assert message.startswith("hf dataset 'nashray-tests/no-such-dataset' is no local folder and its split 'train' "
                              "(data.split) could not be loaded from the Hugging Face hub (HF_HUB_OFFLINE is set")
    assert "ConnectionError" in message


# ------------------------------------------------------------------------------------------------ chat prompts

def test_chat_prompts_load_from_every_file_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"prompt_id": "chat", "prompt": CHAT}, {"prompt_id": "plain", "prompt": "Name a colour."}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "p.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist([rows[0]]), tmp_path / "p.parquet")  # list<struct<role, content>>
    for name, expected in (("p.jsonl", 2), ("p.json", 2), ("p.parquet", 1)):
        prompts = load_prompts(str(tmp_path / name))
        assert len(prompts) == expected
        chat = prompts[0]
        assert chat.chat() == CHAT
        assert chat.prompt == ("System: Answer in one sentence.\n\nUser: Name a colour.\n\nAssistant: Blue.\n\n"
                               "User: Another one?")
        assert chat.as_dict() == {"prompt_id": "chat", "prompt": chat.prompt, "messages": json.dumps(CHAT)}
    plain = load_prompts(str(tmp_path / "p.jsonl"))[1]
    assert (plain.chat(), plain.as_dict()["messages"]) == ("Name a colour.", None)


@pytest.mark.parametrize("messages, names", [
    ([{"role": "system", "content": "be brief"}], ["row 1: field 'prompt' has no user turn", "['system']"]),
    ([{"role": "bot", "content": "hi"}], ["row 1: field 'prompt'[0] has role 'bot'", "'system', 'user', 'assistant'"]),
    ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
     ["row 1: field 'prompt'[0] (user): content must be a string, got list"]),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": 7}],
     ["field 'prompt'[1] (assistant): content must be a string, got int"]),
    ([{"role": "user"}], ["field 'prompt'[0] (user) has no content"]),
    ([{"role": "user", "content": "  "}], ["field 'prompt'[0] (user): content is empty"]),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}],
     ["row 1: field 'prompt' ends with a turn of role 'assistant'"]),
    ([{"role": "user", "content": "hi", "name": "ann"}], ["field 'prompt'[0] has fields ['name'] besides"]),
    (["hi"], ["field 'prompt'[0] is a str, not a {'role', 'content'} message"]),
    ([], ["row 1: field 'prompt' is an empty list of messages"]),
])
def test_bad_chat_prompts_fail_at_load_naming_the_row(tmp_path, messages, names):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": messages}) + "\n")
    with pytest.raises(PromptDataError) as err:
        load_prompts(str(path))
    assert f"prompt file {path} row 1" in str(err.value)
    for name in names:
        assert name in str(err.value)


def test_a_chat_prompt_is_encoded_with_the_models_chat_template(tiny_model_dir):
    from nashray.actors.engines import chat_prompt_ids
    from nashray.actors.generator import GeneratorActor
    from nashray.models import load_tokenizer
    tokenizer = load_tokenizer(tiny_model_dir)
    expected = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"]
    assert chat_prompt_ids(tokenizer, CHAT) == expected
    assert chat_prompt_ids(tokenizer, "Another one?") != expected  # the earlier turns are in the ids

    config = parse_config({"model": {"path": tiny_model_dir, "dtype": "float32", "max_prompt_tokens": 128},
                           "generators": {"engine": "hf", "sampling": {"max_new_tokens": 4}}})
    chat = Prompt("chat", "Another one?", json.dumps(CHAT))
    records = GeneratorActor(config).generate([chat.as_dict()], 2, seed=0)
    assert [r["prompt_ids"] for r in records] == [expected, expected]
    assert all((r["prompt"], r["messages"]) == ("Another one?", chat.messages) for r in records)


def test_a_chat_prompt_is_measured_with_all_its_turns(tmp_path, tiny_model_dir):
    from nashray.cluster.prompts import check_prompts_fit_model
    long_system = [{"role": "system", "content": "the quick brown fox jumps over the lazy dog " * 8},
                   {"role": "user", "content": "hi"}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt_id": "long", "prompt": long_system}) + "\n")
    prompts = load_prompts(str(path))
    cfg = parse_config({"model": {"path": tiny_model_dir, "max_prompt_tokens": 64}})
    with pytest.raises(PromptDataError, match="prompt 'long' is \\d+ tokens with the chat template"):
        check_prompts_fit_model(prompts, cfg, str(path))


# -------------------------------------------------------------------------------------- streamed through Ray Data

@pytest.fixture
def small_shards(monkeypatch):
    """Shards of 40 rows in row groups of 8, so that a hundred prompts span shards and groups."""
    import nashray.cluster.prompts as prompts
    monkeypatch.setattr(prompts, "SHARD_ROWS", 40)
    monkeypatch.setattr(prompts, "GROUP_ROWS", 8)


def _streaming_config(model_dir: str, source: str, **data):
    return parse_config({"model": {"path": model_dir, "max_prompt_tokens": 96}, "evaluation": {"prompts": 1},
                         "data": {"prompts": source, "streaming": True, **data}})


def test_streamed_prompt_sets_split_and_read_as_they_do_in_memory(ray_cluster, tmp_path, tiny_model_dir,
                                                                   saved_datasets, small_shards):
    """Every streamable source, streamed into shards, gives the prompts, held-out set and rounds that loading it in
    memory gives; a resumed campaign reads its shards, not the source."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nashray.cluster.prompts import stream_prompts
    rows = [{"prompt_id": f"q{i}", "prompt": f"what is {i} plus {i}?"} if i % 3 else {"prompt": f"say {i}"}
            for i in range(100)]
    rows[5] = {"prompt_id": "chat", "prompt": CHAT}  # a chat among strings: JSONL rows may differ in type
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" + ("\n" if i == 50 else "") for i, r in enumerate(rows)))
    folder = tmp_path / "parquet"
    folder.mkdir()
    strings = [{"prompt_id": r.get("prompt_id"), "prompt": r["prompt"]} for r in rows if isinstance(r["prompt"], str)]
    pq.write_table(pa.Table.from_pylist(strings[:60]), folder / "a.parquet")
    pq.write_table(pa.Table.from_pylist(strings[60:]), folder / "b.parquet")
    pq.write_table(pa.Table.from_pylist(strings), tmp_path / "all.parquet")
    cases = [("builtin:instructions", "prompt", "builtin:instructions"), (str(jsonl), "prompt", str(jsonl)),
             (str(folder), "prompt", str(tmp_path / "all.parquet")),
             (f"hf:{saved_datasets / 'dict'}", "instruction", f"hf:{saved_datasets / 'dict'}")]
    for k, (source, field, same_as) in enumerate(cases):
        cfg = _streaming_config(tiny_model_dir, source, prompt_field=field)
        sharded = stream_prompts(cfg, source, tmp_path / f"run{k}" / "prompts")
        in_memory = load_prompts(same_as, field)
        assert list(sharded) == in_memory, source
        streamed, loaded = split_campaign_prompts(sharded, cfg, source), split_campaign_prompts(in_memory, cfg, source)
        assert list(streamed.eval) == loaded.eval and len(streamed.train) == len(loaded.train)
        assert all(streamed.for_round(t, 7) == loaded.for_round(t, 7) for t in range(0, 60, 11)), source
    assert len(list((tmp_path / "run1/prompts").glob("shard-*.parquet"))) == 3  # 100 rows in shards of 40
    before = load_prompts(str(jsonl))
    jsonl.write_text(json.dumps({"prompt": "a changed source"}) + "\n")
    assert list(stream_prompts(_streaming_config(tiny_model_dir, str(jsonl)), str(jsonl),
                               tmp_path / "run1/prompts")) == before


@pytest.mark.parametrize("lines, names", [
    (['{"prompt": "fine"}', '', '{"prompt": "fine too"', '{"prompt": "fine"}'], ["line 3 is not JSON"]),
    (['{"prompt": "fine"}', '', '{"text": "no prompt"}'], ["row 2 has no field 'prompt'"]),
    (['{"prompt_id": "a", "prompt": "x"}', '{"prompt_id": "b", "prompt": "y"}', '{"prompt_id": "a", "prompt": "z"}'],
     ["row 3: duplicate prompt_id 'a' (row 1 has it too)"]),
    (['{"prompt_id": "long", "prompt": "%s"}' % ("many words " * 60)], ["prompt 'long' is", "over model.max_prompt"]),
    ([], ["holds no rows"]),
])
def test_a_bad_streamed_row_fails_naming_the_file_and_row(ray_cluster, tmp_path, tiny_model_dir, lines, names):
    from nashray.cluster.prompts import stream_prompts
    path = tmp_path / "p.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(PromptDataError) as err:
        stream_prompts(_streaming_config(tiny_model_dir, str(path)), str(path), tmp_path / "prompts")
    assert f"prompt file {path}" in str(err.value)
    for name in names:
        assert name in str(err.value)
    assert not (tmp_path / "prompts/index.json").exists()  # a resume streams the corrected file again


def test_streaming_is_refused_where_it_cannot_apply():
    for data, name in (({"prompts": "builtin:demo"}, "data.prompts 'builtin:demo'"),
                       ({"prompts": "p.json"}, "data.prompts 'p.json'"),
                       ({"game": "builtin:rps"}, "data.game 'builtin:rps'")):
        with pytest.raises(ValueError, match=re.escape(name)):
            parse_config({"data": {**data, "streaming": True}})
