"""Per-sequence log-probabilities log π(y | x) = Σ_t log π(y_t | x, y_<t), the quantity every loss consumes."""

from __future__ import annotations

import torch


def pad_sequences(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int):
    """Right-padded ``input_ids``, ``attention_mask`` and a mask of the response tokens (the ones scored)."""
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(lengths), width), dtype=torch.long)
    scored = torch.zeros((len(lengths), width), dtype=torch.bool)
    for row, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[row, : len(p) + len(r)] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attention[row, : len(p) + len(r)] = 1
        scored[row, len(p): len(p) + len(r)] = True
    return input_ids, attention, scored


def causal_lm_sequence_logprobs(model, prompt_ids: list[list[int]], response_ids: list[list[int]],
                                pad_id: int) -> torch.Tensor:
    """Σ log π(y_t | x, y_<t) over each response's tokens, in float32 whatever the model's dtype; shape [B]."""
    device = next(model.parameters()).device
    input_ids, attention, scored = (t.to(device) for t in pad_sequences(prompt_ids, response_ids, pad_id))
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
    targets = input_ids[:, 1:]
    token_logp = torch.gather(logits.log_softmax(-1), 2, targets.unsqueeze(-1)).squeeze(-1)
    return (token_logp * scored[:, 1:]).sum(-1)
