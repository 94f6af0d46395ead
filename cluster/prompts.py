"""Prompt sources: files (JSONL, JSON, parquet), embedded sets, Hugging Face datasets, tabular games; split into train
and held-out eval. A prompt is a string or a chat (a list of ``{"role", "content"}`` messages).

Bad rows fail at load with the file and row that are wrong, before any generation is paid for.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nashray.layout import atomic_write_json
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
    dataset = _hf_dataset(name, split, field, streaming=False)
    return dataset.select_columns([c for c in (field, "prompt_id") if c in dataset.column_names]).to_list()


def _hf_dataset(name: str, split: str, field: str, streaming: bool):
    """``split`` of the saved folder or hub dataset ``name``, checked to hold ``field``; a hub dataset is opened as an
    ``IterableDataset`` when ``streaming``."""
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
        dataset = _load_hub_dataset(datasets, name, split, streaming)
    columns = dataset.column_names  # None for a streamed dataset whose features the hub does not declare
    if columns is not None and field not in columns:
        raise PromptDataError(f"hf dataset {name!r} split {split!r} has no column {field!r} (data.prompt_field); its "
                              f"columns: {columns}")
    return dataset


def _load_hub_dataset(datasets, name: str, split: str, streaming: bool):
    try:
        return datasets.load_dataset(name, split=split, streaming=streaming)
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
        prompt = prompt_from_row(row, number, where, field)
        if prompt.prompt_id in seen:
            raise PromptDataError(f"{where} row {number}: duplicate prompt_id {prompt.prompt_id!r}")
        seen.add(prompt.prompt_id)
        prompts.append(prompt)
    return prompts


def prompt_from_row(row, number: int, where: str, field: str) -> Prompt:
    """Row ``number`` (from 1) of ``where`` as a prompt; its id is ``prompt_id`` or else ``row-NUMBER``."""
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
    return Prompt(prompt_id, text, chat)


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
    check_model_context(cfg)
    count = _token_counter(cfg.model.path)
    for prompt in prompts:
        check_prompt_length(prompt.prompt_id, count.tokens(prompt.chat()), cfg, source)


def check_model_context(cfg) -> None:
    from transformers import AutoConfig

    model, limit, new_tokens = cfg.model.path, cfg.model.max_prompt_tokens, cfg.generators.sampling.max_new_tokens
    base = AutoConfig.from_pretrained(resolve_model_path(model), trust_remote_code=cfg.model.trust_remote_code)
    context = getattr(base, "max_position_embeddings", None)
    if context is not None and limit + new_tokens + 1 > context:
        raise PromptDataError(f"model.max_prompt_tokens ({limit}) + generators.sampling.max_new_tokens ({new_tokens}) "
                              f"+ 1 exceeds the context of model {model!r} ({context} tokens)")


def check_prompt_length(prompt_id: str, n_tokens: int, cfg, source: str) -> None:
    if n_tokens > cfg.model.max_prompt_tokens:
        raise PromptDataError(f"{source}: prompt {prompt_id!r} is {n_tokens} tokens with the chat template of "
                              f"{cfg.model.path!r}, over model.max_prompt_tokens = {cfg.model.max_prompt_tokens}")


class PromptTokenCounter:
    """Prompt lengths in tokens as the generators see them (in the model's chat template)."""

    def __init__(self, model: str):
        from nashray.actors.engines import chat_prompt_ids  # lazy: loads torch, which reading prompts does not need
        self._ids, self._tokenizer = chat_prompt_ids, load_tokenizer(model)

    def tokens(self, chat: str | list[dict]) -> int:
        return len(self._ids(self._tokenizer, chat))


@functools.lru_cache(maxsize=2)
def _token_counter(model: str) -> PromptTokenCounter:
    return PromptTokenCounter(model)  # once per Ray worker process, which runs many batches


def count_prompt_tokens(batch, model: str, field: str, json_lines: bool):
    """A Ray Data map over a pyarrow batch of rows: adds their lengths in tokens as column ``prompt_tokens`` (-1 for a
    row that is no prompt, which the driver then names). With ``json_lines`` a row is a line of a JSONL file
    (``text``)."""
    import pyarrow as pa

    counter, counts = _token_counter(model), []
    for row in batch.to_pylist():
        try:
            if json_lines:
                row = json.loads(row["text"]) if row["text"].strip() else None
            counts.append(-1 if row is None else counter.tokens(prompt_from_row(row, 0, "", field).chat()))
        except (PromptDataError, json.JSONDecodeError):
            counts.append(-1)
    return batch.append_column("prompt_tokens", pa.array(counts, pa.int64()))


@dataclass(frozen=True)
class PromptSplit:
    train: Sequence[Prompt]
    eval: Sequence[Prompt]

    def for_round(self, t: int, n: int) -> list[Prompt]:
        """Round t's prompts: the train split read in order from cursor t·n, wrapping into a new epoch at its end.
        A round's prompts depend only on t, so a resumed round asks exactly the prompts it asked before."""
        return [self.train[(t * n + i) % len(self.train)] for i in range(n)]


def split_prompts(prompts: Sequence[Prompt], eval_fraction: float, seed: int,
                  source: str = "the source") -> PromptSplit:
    """A fixed permutation of ``prompts`` by ``seed``: its first round(eval_fraction · n) are held out, the rest
    train. Sharded prompts are split into views of their shards, in the same order as the same prompts in a list."""
    order = np.random.default_rng(seed).permutation(len(prompts))
    n_eval = int(round(eval_fraction * len(prompts)))
    if len(prompts) - n_eval < 1:
        raise PromptDataError(f"{len(prompts)} prompts leave none for training with eval_fraction={eval_fraction}: "
                              f"data.eval_fraction holds out all {n_eval} prompts of {source}; lower it or add "
                              f"prompts")
    if isinstance(prompts, ShardedPrompts):
        return PromptSplit(train=prompts.subset(order[n_eval:]), eval=prompts.subset(order[:n_eval]))
    return PromptSplit(train=[prompts[i] for i in order[n_eval:]], eval=[prompts[i] for i in order[:n_eval]])


# ------------------------------------------------------------------------------------ streamed prompt sets

SHARD_ROWS = 8192  # rows per parquet shard of a streamed set
GROUP_ROWS = 256  # rows per parquet row group: reading one prompt reads one group
SHARDS_INDEX = "index.json"
STREAM_FORMATS = (".jsonl", ".parquet")


class ShardedPrompts(Sequence):
    """The prompts of a set streamed into the run directory's ``prompts/`` folder: parquet shards of ``shard_rows``
    rows in the source's order, in row groups of ``group_rows``, read a group at a time, so the driver holds a round's
    prompts and an int32 per prompt, never the set. ``rows`` selects and orders the rows this view holds (all of them
    by default)."""

    def __init__(self, folder: Path, total: int, shard_rows: int, group_rows: int, rows: np.ndarray | None = None):
        self.folder, self.total, self.shard_rows, self.group_rows = folder, total, shard_rows, group_rows
        self.rows = np.arange(total, dtype=np.int32) if rows is None else rows.astype(np.int32)

    @classmethod
    def open(cls, folder: Path) -> "ShardedPrompts":
        index = json.loads((folder / SHARDS_INDEX).read_text())
        return cls(folder, index["rows"], index["shard_rows"], index["group_rows"])

    def subset(self, positions: np.ndarray) -> "ShardedPrompts":
        return ShardedPrompts(self.folder, self.total, self.shard_rows, self.group_rows, self.rows[positions])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return [self[i] for i in range(*key.indices(len(self)))]
        shard, offset = divmod(int(self.rows[key]), self.shard_rows)
        group, k = divmod(offset, self.group_rows)
        return Prompt(**_row_group(self.folder / f"shard-{shard:05d}.parquet", group)[k])


@functools.lru_cache(maxsize=64)
def _row_group(path: Path, group: int) -> list[dict]:
    import pyarrow.parquet as pq
    return pq.ParquetFile(path).read_row_group(group).to_pylist()


def stream_prompts(cfg, source: str, folder: Path) -> ShardedPrompts:
    """data.prompts (``source``) streamed through Ray Data into parquet shards under ``folder``, once: rows are read
    (and, for a language model, measured in tokens) by Ray Data tasks, then validated in order by this process, which
    holds a batch at a time; a row that is wrong fails the campaign naming its row (or file and line) as in-memory
    loading does. A resumed campaign reads the shards it wrote, so a round's prompts do not change if the source
    does."""
    if (folder / SHARDS_INDEX).exists():
        return ShardedPrompts.open(folder)
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    field, where = cfg.data.prompt_field, _stream_where(source, cfg.data.split)
    language_model = cfg.generators.engine != "tabular"
    if language_model:
        check_model_context(cfg)
    # A dataset takes the context in force when it is made: rows keep the source's order (files sorted by name).
    context = ray.data.DataContext.get_current()
    preserve_order, context.execution_options.preserve_order = context.execution_options.preserve_order, True
    number, shard, id_digests, lines = 0, [], array("Q"), _LineCounter()  # 8 bytes a prompt
    try:
        dataset, json_lines = _ray_dataset(source, cfg.data.split, field)
        if language_model:
            dataset = dataset.map_batches(count_prompt_tokens, batch_format="pyarrow", batch_size=GROUP_ROWS,
                                          fn_kwargs={"model": cfg.model.path, "field": field,
                                                     "json_lines": json_lines})
        folder.mkdir(parents=True, exist_ok=True)
        for batch in dataset.iter_batches(batch_size=GROUP_ROWS, batch_format="pyarrow"):
            for row in batch.to_pylist():
                n_tokens = row.pop("prompt_tokens", None)
                if json_lines and (row := lines.parse(row)) is None:
                    continue
                number += 1
                prompt = prompt_from_row(row, number, where, field)
                if language_model:
                    check_prompt_length(prompt.prompt_id, n_tokens, cfg, where)
                id_digests.append(_digest(prompt.prompt_id))
                shard.append(prompt.as_dict())
                if len(shard) == SHARD_ROWS:
                    _write_shard(pa, pq, folder, (number - 1) // SHARD_ROWS, shard)
                    shard = []
    except (ray.exceptions.RayError, pa.ArrowException, OSError) as err:
        message = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise PromptDataError(f"{where} could not be read through Ray Data: {message}") from None
    finally:
        context.execution_options.preserve_order = preserve_order
    if number == 0:
        raise PromptDataError(f"{where} holds no rows")
    if shard:
        _write_shard(pa, pq, folder, (number - 1) // SHARD_ROWS, shard)
    prompts = ShardedPrompts(folder, number, SHARD_ROWS, GROUP_ROWS)
    _check_unique_ids(prompts, np.frombuffer(id_digests, dtype=np.uint64), where)
    atomic_write_json(folder / SHARDS_INDEX, {"rows": number, "shard_rows": SHARD_ROWS, "group_rows": GROUP_ROWS,
                                              "source": source, "field": field, "split": cfg.data.split})
    return prompts


class _LineCounter:
    """Lines of JSONL files read by ``ray.data.read_text(include_paths=True)``, numbered per file as in-memory
    loading numbers them."""

    def __init__(self):
        self.path, self.line = None, 0

    def parse(self, row: dict) -> dict | None:
        """The line's JSON row, or None for a blank line."""
        if row["path"] != self.path:
            self.path, self.line = row["path"], 0
        self.line += 1
        if not row["text"].strip():
            return None
        try:
            return json.loads(row["text"])
        except json.JSONDecodeError as err:
            raise PromptDataError(f"prompt file {self.path} line {self.line} is not JSON: {err.msg}") from None


def _stream_where(source: str, split: str) -> str:
    return f"hf dataset {source[3:]!r} split {split!r}" if source.startswith("hf:") else f"prompt file {source}"


def _ray_dataset(source: str, split: str, field: str):
    """A Ray Data dataset over the rows of ``source`` — a JSONL or parquet file or a folder of them, builtin:
    instructions, or ``hf:`` (a saved folder, memory-mapped; a hub id, opened streaming) — and whether its rows are
    JSONL lines (``text`` and ``path``), parsed by the driver so that types may differ from row to row."""
    import ray

    if source.startswith("hf:"):
        return ray.data.from_huggingface(_hf_dataset(source[3:], split, field, streaming=True)), False
    path = INSTRUCTIONS_FILE if source == "builtin:instructions" else Path(source).expanduser()
    if not path.exists():
        raise PromptDataError(f"prompt file {path} does not exist")
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    kinds = {f.suffix.lower() for f in files if f.suffix.lower() in STREAM_FORMATS}
    if len(kinds) != 1 or (not path.is_dir() and path.suffix.lower() not in STREAM_FORMATS):
        raise PromptDataError(f"data.streaming reads a .jsonl or .parquet file, a folder of one of them, or hf:; "
                              f"{path} is {'a folder of both' if len(kinds) == 2 else 'neither'}")
    paths = [str(f) for f in files if f.suffix.lower() in kinds]
    if kinds == {".jsonl"}:
        return ray.data.read_text(paths, drop_empty_lines=False, include_paths=True, file_extensions=None), True
    return ray.data.read_parquet(paths, file_extensions=None), False


def _write_shard(pa, pq, folder: Path, index: int, rows: list[dict]) -> None:
    schema = pa.schema([("prompt_id", pa.string()), ("prompt", pa.string()), ("messages", pa.string())])
    path = folder / f"shard-{index:05d}.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema), path.with_suffix(".tmp"), row_group_size=GROUP_ROWS)
    os.replace(path.with_suffix(".tmp"), path)


def _digest(prompt_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(prompt_id.encode(), digest_size=8).digest(), "little")


def _check_unique_ids(prompts: ShardedPrompts, digests: np.ndarray, where: str) -> None:
    """Duplicate ids found through 8-byte digests (16 bytes a row where a set of ids would cost ~100), each clash
    confirmed on the ids themselves."""
    order = np.argsort(digests, kind="stable")
    clashes = np.flatnonzero(digests[order][1:] == digests[order][:-1])
    for c in clashes:
        first, second = sorted((int(order[c]), int(order[c + 1])))
        if prompts[first].prompt_id == prompts[second].prompt_id:
            raise PromptDataError(f"{where} row {second + 1}: duplicate prompt_id {prompts[second].prompt_id!r} "
                                  f"(row {first + 1} has it too)")


def split_campaign_prompts(prompts: Sequence[Prompt], cfg, source: str) -> PromptSplit:
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
