"""Prompt sources: files (JSONL, JSON, parquet), embedded sets, Hugging Face datasets, tabular games; split into train
and held-out eval. A prompt is a string or a chat (a list of ``{"role", "content"}`` messages).

Bad rows fail at load with the file and row that are wrong, before any generation is paid for.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nashray.models import load_tokenizer, resolve_model_path
from nashray.oracles.games import load_game

# Embedded prompt set of the demo campaign: short instructions an instruct model answers in a sentence or two.
DEMO_PROMPTS = [
    "What is the capital of France?", "Name a fruit that is yellow.", "What is 7 times 8?",
    "Give one tip for sleeping better.", "What colour is the sky on a clear day?", "Translate 'thank you' to Spanish.",
    "What is the boiling point of water in Celsius?", "Name a planet in our solar system.",
    "What does a thermometer measure?", "Suggest a name for a pet cat.", "What is the opposite of 'cold'?",
    "How many days are in a week?", "What animal says 'moo'?", "Name a primary colour.",
    "What is 15 plus 27?", "Give a synonym for 'happy'.", "What language is spoken in Brazil?",
    "What is the largest ocean on Earth?", "Name a musical instrument with strings.", "What is H2O?",
    "How many legs does a spider have?", "What is the square root of 81?", "Name a vegetable that is green.",
    "What season comes after winter?", "What do bees make?", "Give an example of a mammal that swims.",
    "What is the freezing point of water in Fahrenheit?", "Name a famous painter.", "What is 100 divided by 4?",
    "What gas do plants take in?", "Suggest a healthy breakfast.", "What is the plural of 'mouse'?",
    "Which is heavier, a kilogram of iron or a kilogram of feathers?", "What shape has three sides?",
    "Name a country in Africa.", "What is the main ingredient of guacamole?", "How many minutes are in an hour?",
    "What is the chemical symbol for gold?", "Give one reason to exercise.", "What is the past tense of 'run'?",
    "Name a bird that cannot fly.", "What is 9 squared?", "What instrument has 88 keys?",
    "What is the tallest animal?", "Give a word that rhymes with 'cat'.", "What does a compass show?",
    "Name something you can recycle.", "What is the first letter of the Greek alphabet?",
]


class PromptDataError(ValueError):
    """A prompt source that cannot be used; the message names the file and row."""


BUILTIN_SETS = ("builtin:demo", "builtin:instructions")
# builtin:instructions: 344 short instructions written for this project, about half inviting answers whose sentiment
# and length vary a lot (opinions, reviews, advice, complaints, descriptions; ``kind: open``), the rest factual,
# how-to, explain-like-I'm-five and short creative tasks (``kind: task``).
INSTRUCTIONS_FILE = Path(__file__).parent / "defaults" / "instructions.jsonl"
CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Prompt:
    """``prompt`` is the text judges and records see. A chat prompt also carries its ``messages`` (JSON of the
    ``{"role", "content"}`` list), which the generators wrap in the chat template instead of ``prompt``."""
    prompt_id: str
    prompt: str
    messages: str | None = None

    def as_dict(self) -> dict:
        return {"prompt_id": self.prompt_id, "prompt": self.prompt, "messages": self.messages}

    def chat(self) -> str | list[dict]:
        """What the chat template wraps: the messages of a chat prompt, else ``prompt`` as the user turn."""
        return json.loads(self.messages) if self.messages is not None else self.prompt


def _rows_from_file(path: Path) -> list[dict]:
    if not path.is_file():
        raise PromptDataError(f"prompt file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as err:
            raise PromptDataError(f"prompt file {path} is not a readable parquet file: {err}") from None
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise PromptDataError(f"prompt file {path} is not UTF-8 (line {line}, byte {err.start})") from None
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise PromptDataError(f"prompt file {path} line {number} is not JSON: {err.msg}") from None
        return rows
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PromptDataError(f"prompt file {path} is not JSON: {err.msg} (line {err.lineno})") from None
        if not isinstance(data, list):
            raise PromptDataError(f"prompt file {path} must hold a JSON list of rows")
        return data
    raise PromptDataError(f"prompt file {path}: unsupported extension {suffix!r} (use .jsonl, .json or .parquet)")


def load_prompts(source: str, field: str = "prompt", split: str = "train") -> list[Prompt]:
    """``builtin:demo``, ``builtin:instructions``, ``game:SPEC`` (the prompts of a tabular game), ``hf:NAME_OR_PATH``
    (``split`` of a Hugging Face hub dataset, or of a folder saved with ``save_to_disk``), or a JSONL/JSON/parquet
    file; the rows of a file or dataset hold ``field`` (a string, or a chat: a list of ``{"role", "content"}``
    messages) and optionally ``prompt_id``."""
    if source == "builtin:demo":
        return [Prompt(f"demo-{i:03d}", text) for i, text in enumerate(DEMO_PROMPTS)]
    if source.startswith("game:"):
        return [Prompt(name, name) for name in load_game(source[len("game:"):]).prompts]
    if source == "builtin:instructions":
        path = INSTRUCTIONS_FILE
    elif source.startswith("builtin:"):
        raise PromptDataError(f"unknown embedded prompt set {source!r}; known: {', '.join(BUILTIN_SETS)}")
    elif source.startswith("hf:"):
        name = source[len("hf:"):]
        where = f"hf dataset {name!r} split {split!r}"
        return _prompts_from_rows(_rows_from_hf(name, split, field), where, field)
    else:
        path = Path(source).expanduser()
    return _prompts_from_rows(_rows_from_file(path), f"prompt file {path}", field)


def _rows_from_hf(name: str, split: str, field: str) -> list[dict]:
    """The rows (``field`` and ``prompt_id`` columns) of ``split`` of a folder written by ``save_to_disk`` or, when
    ``name`` is no existing path, of the hub dataset ``name``."""
    if not name:
        raise PromptDataError("data.prompts 'hf:' names no dataset: use hf:HUB_ID or hf:FOLDER")
    try:
        import datasets
    except ImportError:
        raise PromptDataError(f"data.prompts hf:{name} needs the datasets package (pip install datasets)") from None
    path = Path(name).expanduser()
    if path.exists():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise PromptDataError(f"hf dataset {name!r}: {path} is not a folder written by Dataset.save_to_disk or "
                                  f"DatasetDict.save_to_disk") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise PromptDataError(f"hf dataset {name!r} has no split {split!r} (data.split); its splits: "
                                      f"{sorted(loaded)}")
            dataset = loaded[split]
        elif loaded.split is not None and str(loaded.split) != split:
            raise PromptDataError(f"hf dataset {name!r} holds only split {str(loaded.split)!r}, not data.split "
                                  f"{split!r}")
        else:
            dataset = loaded
    else:
        dataset = _load_hub_dataset(datasets, name, split)
    if field not in dataset.column_names:
        raise PromptDataError(f"hf dataset {name!r} split {split!r} has no column {field!r} (data.prompt_field); its "
                              f"columns: {dataset.column_names}")
    return dataset.select_columns([c for c in (field, "prompt_id") if c in dataset.column_names]).to_list()


def _load_hub_dataset(datasets, name: str, split: str):
    try:
        return datasets.load_dataset(name, split=split)
    except (OSError, ValueError) as err:  # not found, unreachable, offline, gated (OSError); unknown split (ValueError)
        offline = " (HF_HUB_OFFLINE is set: only datasets in the local cache load)" \
            if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") else ""
        raise PromptDataError(f"hf dataset {name!r} is no local folder and its split {split!r} (data.split) could not "
                              f"be loaded from the Hugging Face hub{offline}: {type(err).__name__}: {err}") from None


def _prompts_from_rows(rows: list, where: str, field: str) -> list[Prompt]:
    if not rows:
        raise PromptDataError(f"{where} holds no rows")
    prompts, seen = [], set()
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise PromptDataError(f"{where} row {number} is a {type(row).__name__}, not an object")
        if field not in row:
            raise PromptDataError(f"{where} row {number} has no field {field!r} (fields: {sorted(row)})")
        value = row[field]
        if isinstance(value, list):
            messages = chat_messages(value, f"{where} row {number}: field {field!r}")
            text, chat = render_chat(messages), json.dumps(messages, ensure_ascii=False)
        elif isinstance(value, str) and value.strip():
            text, chat = value, None
        else:
            raise PromptDataError(f"{where} row {number}: field {field!r} must be a non-empty string or a list of "
                                  f"{{'role', 'content'}} messages, got {value!r:.60}")
        prompt_id = f"row-{number}" if row.get("prompt_id") is None else str(row["prompt_id"])
        if prompt_id in seen:
            raise PromptDataError(f"{where} row {number}: duplicate prompt_id {prompt_id!r}")
        seen.add(prompt_id)
        prompts.append(Prompt(prompt_id, text, chat))
    return prompts


def chat_messages(value: list, where: str) -> list[dict]:
    """``value`` checked as a chat prompt (OpenAI / TRL conversational format): ``{"role", "content"}`` messages,
    roles among CHAT_ROLES, string contents, at least one user turn and the user's turn last — the turn the model
    answers. Keys besides role and content must be absent or null (Arrow fills a struct's missing fields)."""
    if not value:
        raise PromptDataError(f"{where} is an empty list of messages")
    messages = []
    for k, message in enumerate(value):
        at = f"{where}[{k}]"
        if not isinstance(message, dict):
            raise PromptDataError(f"{at} is a {type(message).__name__}, not a {{'role', 'content'}} message")
        extra = sorted(key for key, v in message.items() if key not in ("role", "content") and v is not None)
        if extra:
            raise PromptDataError(f"{at} has fields {extra} besides 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise PromptDataError(f"{at} has role {role!r}; a message's role is one of {list(CHAT_ROLES)}")
        if content is None:
            raise PromptDataError(f"{at} ({role}) has no content")
        if not isinstance(content, str):
            raise PromptDataError(f"{at} ({role}): content must be a string, got {type(content).__name__}")
        if not content.strip():
            raise PromptDataError(f"{at} ({role}): content is empty")
        messages.append({"role": role, "content": content})
    roles = [m["role"] for m in messages]
    if "user" not in roles:
        raise PromptDataError(f"{where} has no user turn (roles: {roles})")
    if roles[-1] != "user":
        raise PromptDataError(f"{where} ends with a turn of role {roles[-1]!r}: the last message must be the user's, "
                              f"which the model answers")
    return messages


def render_chat(messages: list[dict]) -> str:
    """The text judges and records see of a chat prompt: a lone user turn as it is, a longer chat one turn per
    paragraph, each led by its role."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def check_prompts_fit_model(prompts: list[Prompt], cfg, source: str) -> None:
    """Fail before any generation is paid for when the context of the campaign's model (``cfg``, a
    ``CampaignConfig``) cannot hold model.max_prompt_tokens plus generators.sampling.max_new_tokens, or when a prompt
    of ``source``, wrapped in the model's chat template as the generators wrap it, is longer than
    model.max_prompt_tokens (the error names the prompt)."""
    from transformers import AutoConfig

    from nashray.actors.engines import chat_prompt_ids  # lazy: loads torch, which reading prompts does not need
    model, limit, new_tokens = cfg.model.path, cfg.model.max_prompt_tokens, cfg.generators.sampling.max_new_tokens
    base = AutoConfig.from_pretrained(resolve_model_path(model), trust_remote_code=cfg.model.trust_remote_code)
    context = getattr(base, "max_position_embeddings", None)
    if context is not None and limit + new_tokens + 1 > context:
        raise PromptDataError(f"model.max_prompt_tokens ({limit}) + generators.sampling.max_new_tokens ({new_tokens}) "
                              f"+ 1 exceeds the context of model {model!r} ({context} tokens)")
    tokenizer = load_tokenizer(model)
    for prompt in prompts:
        n_tokens = len(chat_prompt_ids(tokenizer, prompt.chat()))
        if n_tokens > limit:
            raise PromptDataError(f"{source}: prompt {prompt.prompt_id!r} is {n_tokens} tokens with the chat "
                                  f"template of {model!r}, over model.max_prompt_tokens = {limit}")


@dataclass(frozen=True)
class PromptSplit:
    train: list[Prompt]
    eval: list[Prompt]

    def for_round(self, t: int, n: int) -> list[Prompt]:
        """Round t's prompts: the train split read in order from cursor t·n, wrapping into a new epoch at its end.
        A round's prompts depend only on t, so a resumed round asks exactly the prompts it asked before."""
        return [self.train[(t * n + i) % len(self.train)] for i in range(n)]


def split_prompts(prompts: list[Prompt], eval_fraction: float, seed: int, source: str = "the source") -> PromptSplit:
    """A fixed permutation of ``prompts`` by ``seed``: its first round(eval_fraction · n) are held out, the rest
    train."""
    order = np.random.default_rng(seed).permutation(len(prompts))
    n_eval = int(round(eval_fraction * len(prompts)))
    if len(prompts) - n_eval < 1:
        raise PromptDataError(f"{len(prompts)} prompts leave none for training with eval_fraction={eval_fraction}: "
                              f"data.eval_fraction holds out all {n_eval} prompts of {source}; lower it or add "
                              f"prompts")
    shuffled = [prompts[i] for i in order]
    return PromptSplit(train=shuffled[n_eval:], eval=shuffled[:n_eval])


def split_campaign_prompts(prompts: list[Prompt], cfg, source: str) -> PromptSplit:
    """The train / held-out split of a campaign (``cfg``, a ``CampaignConfig``) by data.eval_fraction and
    data.shuffle_seed (tabular games hold nothing out). Fails at load, naming the numbers and fields, when no
    prompt is left to train on or when an evaluating campaign holds out fewer prompts than evaluation.prompts."""
    tabular = cfg.generators.engine == "tabular"
    fraction = 0.0 if tabular else cfg.data.eval_fraction
    split = split_prompts(prompts, fraction, cfg.data.shuffle_seed, source)
    wanted, held_out, n = cfg.evaluation.prompts, len(split.eval), len(prompts)
    if tabular or not cfg.evaluation.every_rounds or held_out >= wanted:
        return split
    needed = math.ceil(1000 * wanted / n) / 1000  # the smallest fraction in steps of 0.001 that holds out enough
    if needed < 1 and n - round(needed * n) >= 1:
        remedy = f"raise data.eval_fraction to {needed} or more, or lower evaluation.prompts"
    else:
        remedy = f"{n} prompts cannot hold out {wanted} and still train: lower evaluation.prompts or add prompts"
    raise PromptDataError(f"{source}: data.eval_fraction={fraction} holds out {held_out} of its {n} prompts, fewer "
                          f"than evaluation.prompts={wanted}, the held-out prompts each evaluation answers "
                          f"(evaluation.every_rounds={cfg.evaluation.every_rounds}); {remedy} "
                          f"(evaluation.every_rounds=0 turns evaluation off)")
