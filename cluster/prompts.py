"""Prompt sources: files (JSONL, JSON, parquet), embedded sets, tabular games; split into train and held-out eval.

Bad rows fail at load with the file and row that are wrong, before any generation is paid for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    prompt: str

    def as_dict(self) -> dict:
        return {"prompt_id": self.prompt_id, "prompt": self.prompt}


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


def load_prompts(source: str, field: str = "prompt") -> list[Prompt]:
    """``builtin:demo``, ``game:SPEC`` (the prompts of a tabular game), or a JSONL/JSON/parquet file of rows with
    ``field`` (and optionally ``prompt_id``)."""
    if source == "builtin:demo":
        return [Prompt(f"demo-{i:03d}", text) for i, text in enumerate(DEMO_PROMPTS)]
    if source.startswith("game:"):
        from oracles.games import load_game
        return [Prompt(name, name) for name in load_game(source[len("game:"):]).prompts]
    if source.startswith("builtin:"):
        raise PromptDataError(f"unknown embedded prompt set {source!r}; known: builtin:demo")
    path = Path(source).expanduser()
    rows = _rows_from_file(path)
    if not rows:
        raise PromptDataError(f"prompt file {path} holds no rows")
    prompts, seen = [], set()
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise PromptDataError(f"prompt file {path} row {number} is a {type(row).__name__}, not an object")
        text = row.get(field)
        if text is None:
            raise PromptDataError(f"prompt file {path} row {number} has no field {field!r} "
                                  f"(fields: {sorted(row)})")
        if not isinstance(text, str) or not text.strip():
            raise PromptDataError(f"prompt file {path} row {number}: field {field!r} must be a non-empty string")
        prompt_id = str(row.get("prompt_id", f"row-{number}"))
        if prompt_id in seen:
            raise PromptDataError(f"prompt file {path} row {number}: duplicate prompt_id {prompt_id!r}")
        seen.add(prompt_id)
        prompts.append(Prompt(prompt_id, text))
    return prompts


def check_prompts_fit_model(prompts: list[Prompt], cfg, source: str) -> None:
    """Fail before any generation is paid for when the context of the campaign's model (``cfg``, a
    ``CampaignConfig``) cannot hold model.max_prompt_tokens plus generators.sampling.max_new_tokens, or when a prompt
    of ``source``, wrapped in the model's chat template as the generators wrap it, is longer than
    model.max_prompt_tokens (the error names the prompt)."""
    from transformers import AutoConfig

    from actors.engines import chat_prompt_ids
    from trainers.models import load_tokenizer, resolve_model_path
    model, limit, new_tokens = cfg.model.path, cfg.model.max_prompt_tokens, cfg.generators.sampling.max_new_tokens
    base = AutoConfig.from_pretrained(resolve_model_path(model), trust_remote_code=cfg.model.trust_remote_code)
    context = getattr(base, "max_position_embeddings", None)
    if context is not None and limit + new_tokens + 1 > context:
        raise PromptDataError(f"model.max_prompt_tokens ({limit}) + generators.sampling.max_new_tokens ({new_tokens}) "
                              f"+ 1 exceeds the context of model {model!r} ({context} tokens)")
    tokenizer = load_tokenizer(model)
    for prompt in prompts:
        n_tokens = len(chat_prompt_ids(tokenizer, prompt.prompt))
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


def split_prompts(prompts: list[Prompt], eval_fraction: float, seed: int) -> PromptSplit:
    order = np.random.default_rng(seed).permutation(len(prompts))
    n_eval = int(round(eval_fraction * len(prompts)))
    if len(prompts) - n_eval < 1:
        raise PromptDataError(f"{len(prompts)} prompts leave none for training with eval_fraction={eval_fraction}")
    shuffled = [prompts[i] for i in order]
    return PromptSplit(train=shuffled[n_eval:], eval=shuffled[:n_eval])
