"""Per-sequence log-probabilities log π(y | x) = Σ_t log π(y_t | x, y_<t), the quantity every loss consumes."""

from __future__ import annotations

import sys

import torch


def first_fit_rows(lengths: list[int], width: int) -> list[list[int]]:
    """Sequence indices per row, longest first, each into the first row with room for it within ``width``."""
    rows, room = [], []
    for s in sorted(range(len(lengths)), key=lambda s: -lengths[s]):
        row = next((i for i, free in enumerate(room) if free >= lengths[s]), None)
        if row is None:
            rows.append([])
            room.append(width)
            row = len(rows) - 1
        rows[row].append(s)
        room[row] -= lengths[s]
    return rows


def lay_out_rows(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int, rows: list[list[int]]):
    """The sequences of each row of ``rows`` end to end, each row's tail padded: ``input_ids``, positions restarting
    at 0 for each sequence (and for the tail), each token's sequence (-1: the tail) and a mask of the response tokens
    (the ones scored)."""
    width = max(sum(len(prompt_ids[s]) + len(response_ids[s]) for s in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros(input_ids.shape, dtype=torch.long)
    owner = torch.full(input_ids.shape, -1, dtype=torch.long)
    scored = torch.zeros(input_ids.shape, dtype=torch.bool)
    for r, row in enumerate(rows):
        at = 0
        for s in row:
            p, y = prompt_ids[s], response_ids[s]
            n = len(p) + len(y)
            input_ids[r, at: at + n] = torch.tensor(list(p) + list(y), dtype=torch.long)
            positions[r, at: at + n] = torch.arange(n)
            owner[r, at: at + n] = s
            scored[r, at + len(p): at + n] = True
            at += n
        positions[r, at:] = torch.arange(width - at)
    return input_ids, positions, owner, scored


# Packing runs attention over rows twice the longest sequence, so it must save this share of the padded layout's
# token slots to pay. SmolLM2, bf16, 2 threads, forward + backward of 16 sequences of 45–84 tokens (19 % padding):
# 3.67 s padded, 3.26 s packed in rows of 2× the longest (13 % fewer slots), 3.56 s at 3×, 3.60 s at 1.5×.
PACKING_MIN_SAVING = 0.05


def sequence_layout(model, prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int):
    """The model's inputs, each token's sequence and the response tokens' mask. Packed rows (``position_ids``: the
    model's masks keep each sequence to itself) where the model's masks come from transformers' masking utils, which
    read sequence starts off the positions, and packing saves :data:`PACKING_MIN_SAVING` of the slots; one
    right-padded row per sequence (``attention_mask``) otherwise."""
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    rows = first_fit_rows(lengths, 2 * max(lengths))
    packed_slots = len(rows) * max(sum(lengths[s] for s in row) for row in rows)
    if _masks_from_positions(model) and packed_slots <= (1 - PACKING_MIN_SAVING) * len(lengths) * max(lengths):
        input_ids, positions, owner, scored = lay_out_rows(prompt_ids, response_ids, pad_id, rows)
        return {"input_ids": input_ids, "position_ids": positions}, owner, scored
    input_ids, _, owner, scored = lay_out_rows(prompt_ids, response_ids, pad_id, [[s] for s in range(len(lengths))])
    return {"input_ids": input_ids, "attention_mask": (owner >= 0).long()}, owner, scored


# Up to this many columns, eager attention (two bmm and a softmax) beats SDPA on CPU, whose flash-attention backward
# is slower than the matmuls it avoids on short sequences. SmolLM2, bf16, 2 threads, forward + backward of 1 400–1 500
# tokens: 2.14 vs 2.67 s at 88 columns, 2.41 vs 2.54 at 256; 2.81 vs 2.73 at 512, 8.4 vs 3.5 at 1 536.
EAGER_ATTENTION_MAX_COLUMNS = 384


def _transformers_model(model):
    module = getattr(model, "module", model)  # a DeepSpeed engine's model
    return module.get_base_model() if hasattr(module, "get_base_model") else module  # peft passes kwargs through


def _masks_from_positions(model) -> bool:
    decoder = getattr(_transformers_model(model), "base_model", None)
    return decoder is not None and hasattr(sys.modules.get(type(decoder).__module__), "create_causal_mask")


def pick_cpu_attention(model, columns: int, device: torch.device) -> None:
    """On CPU, eager attention for batches up to :data:`EAGER_ATTENTION_MAX_COLUMNS` columns and SDPA above; a model
    on an accelerator, or loaded with another implementation (flash-attention, a kernel), keeps its own."""
    module = _transformers_model(model)
    current = getattr(getattr(module, "config", None), "_attn_implementation", None)
    # False for a model whose attention code does not go through transformers' attention functions
    switchable = getattr(module, "_can_set_attn_implementation", lambda: False)()
    if device.type != "cpu" or current not in ("eager", "sdpa") or not switchable:
        return
    wanted = "eager" if columns <= EAGER_ATTENTION_MAX_COLUMNS else "sdpa"
    if wanted != current:
        module.set_attn_implementation(wanted)


def causal_lm_sequence_logprobs(model, prompt_ids: list[list[int]], response_ids: list[list[int]],
                                pad_id: int) -> torch.Tensor:
    """Σ log π(y_t | x, y_<t) over each response's tokens, in float32 whatever the model's dtype; shape [B].

    The sequences go in packed rows where that saves slots (:func:`sequence_layout`). The LM head with its
    vocabulary-wide log-softmax is the widest layer of a small model, so a pre-hook on the output embeddings hands
    it only the hidden states that predict a response token (not the prompts, not the padding).
    log π(y_t) = logit[y_t] − logsumexp(logits)."""
    device = next(model.parameters()).device
    inputs, owner, scored = sequence_layout(model, prompt_ids, response_ids, pad_id)
    inputs = {name: t.to(device) for name, t in inputs.items()}
    owner, scored = owner.to(device), scored.to(device)
    pick_cpu_attention(model, owner.shape[1], device)
    # column c's logits predict token c + 1, a response token of the same sequence
    rows, columns = (scored[:, 1:] & (owner[:, 1:] == owner[:, :-1])).nonzero(as_tuple=True)
    targets = inputs["input_ids"][rows, columns + 1]
    sequence = owner[rows, columns + 1]

    def scored_positions_only(_head, args):
        # an index gather, so the head's matmul gets one contiguous [positions, hidden] operand
        return (args[0][rows, columns],) + tuple(args[1:])

    hook = _transformers_model(model).get_output_embeddings().register_forward_pre_hook(scored_positions_only)
    try:
        # no KV cache: a forward with one skips transformers' packed-sequence masks, and none is reused here
        logits = model(**inputs, use_cache=False).logits.float()
    finally:
        hook.remove()
    if logits.shape != (len(rows), logits.shape[-1]):
        raise RuntimeError(f"{type(_transformers_model(model)).__name__} reshapes its LM head's output "
                           f"({tuple(logits.shape)} for {len(rows)} scored positions); nashray's log-probs need "
                           f"the logits as the head returns them")
    token_logp = logits.gather(1, targets.unsqueeze(1)).squeeze(1) - logits.logsumexp(-1)
    return torch.zeros(len(prompt_ids), device=device).index_add(0, sequence, token_logp)
