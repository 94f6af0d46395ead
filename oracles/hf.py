"""Batched transformers forward passes shared by the model-backed oracles."""

from __future__ import annotations

from typing import Iterator

import torch


def length_sorted_batches(sequences: list[list[int]], batch_size: int) -> Iterator[list[int]]:
    """Indices into ``sequences`` in batches of similar length (less padding); every index exactly once."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(order), batch_size):
        yield order[start: start + batch_size]


def left_padded(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``position_ids`` for left-padded sequences: each sequence's last token
    sits in the last column, and positions count from each sequence's own first token, so a padded row computes
    exactly what the unpadded sequence would."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        attention[row, width - len(seq):] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention, "position_ids": positions}


def chat_text(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    if not tokenizer.chat_template:
        raise ValueError(f"tokenizer of {tokenizer.name_or_path!r} has no chat template")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def single_token_id(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"verdict {text!r} is {len(ids)} tokens {ids} for tokenizer {tokenizer.name_or_path!r}; "
                         "a judge reads the probability of a single verdict token")
    return ids[0]
