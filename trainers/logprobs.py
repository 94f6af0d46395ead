"""Per-sequence log-probabilities log π(y | x) = Σ_t log π(y_t | x, y_<t), the quantity every loss consumes."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch


def first_fit_rows(lengths: list[int], width: int) -> list[list[int]]:
    """Item indices per row, longest first, each into the first row with room for it within ``width``."""
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


def prompt_units(prompt_ids: list[list[int]]) -> list[list[int]]:
    """Sequence indices grouped by equal prompt, in first-seen order: a unit is one prompt and all its responses."""
    units: dict[tuple[int, ...], list[int]] = {}
    for s, prompt in enumerate(prompt_ids):
        units.setdefault(tuple(prompt), []).append(s)
    return list(units.values())


@dataclass
class Layout:
    """A batch of sequences laid out for one forward.

    ``input_ids`` and ``positions`` [rows, width]; per token, its ``unit`` (-1: a row's padded tail) and its
    ``branch`` (-1: a prompt token, else the sequence whose response it is); and the scored predictions: the hidden
    state at (``rows``, ``columns``) predicts token ``targets`` of sequence ``sequence``."""
    input_ids: torch.Tensor
    positions: torch.Tensor
    unit: torch.Tensor
    branch: torch.Tensor
    rows: torch.Tensor
    columns: torch.Tensor
    targets: torch.Tensor
    sequence: torch.Tensor

    def shared_prefix_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The additive [rows, 1, width, width] attention mask of the layout: a token sees the earlier tokens of its
        unit's prompt and of its own response, nothing else (a padded tail token sees itself)."""
        unit, branch = self.unit, self.branch
        causal = torch.ones(unit.shape[1], unit.shape[1], dtype=torch.bool).tril()
        same_unit = (unit[:, :, None] == unit[:, None, :]) & (unit[:, :, None] >= 0)
        visible = (branch[:, None, :] < 0) | (branch[:, :, None] == branch[:, None, :])
        allowed = (causal & same_unit & visible) | torch.eye(unit.shape[1], dtype=torch.bool)
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        return mask[:, None]


def unit_sizes(prompt_ids: list[list[int]], response_ids: list[list[int]], units: list[list[int]]) -> list[int]:
    """Tokens each unit lays out: its prompt once and each of its responses."""
    return [len(prompt_ids[u[0]]) + sum(len(response_ids[s]) for s in u) for u in units]


def lay_out_units(prompt_ids: list[list[int]], response_ids: list[list[int]], units: list[list[int]],
                  rows: list[list[int]], pad_id: int) -> Layout:
    """Each row's units end to end, its tail padded. A unit is its prompt once, then each of its sequences' response;
    positions restart at 0 for every unit and each response continues from its prompt's end."""
    sizes = unit_sizes(prompt_ids, response_ids, units)
    width = max(sum(sizes[u] for u in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros(input_ids.shape, dtype=torch.long)
    unit_of = torch.full(input_ids.shape, -1, dtype=torch.long)
    branch = torch.full(input_ids.shape, -1, dtype=torch.long)
    rows_at, columns, targets, sequence = [], [], [], []
    for r, row in enumerate(rows):
        at = 0
        for u in row:
            prompt = list(prompt_ids[units[u][0]])
            input_ids[r, at: at + len(prompt)] = torch.tensor(prompt, dtype=torch.long)
            positions[r, at: at + len(prompt)] = torch.arange(len(prompt))
            unit_of[r, at: at + sizes[u]] = u
            at += len(prompt)
            prompt_end = at
            for s in units[u]:
                response = list(response_ids[s])
                n = len(response)
                input_ids[r, at: at + n] = torch.tensor(response, dtype=torch.long)
                positions[r, at: at + n] = torch.arange(len(prompt), len(prompt) + n)
                branch[r, at: at + n] = s
                # the first response token is predicted from the prompt's last token, the others from their own
                # previous token (a sequence without prompt has nothing to predict its first token from)
                predictors = ([prompt_end - 1] if prompt and n else []) + list(range(at, at + n - 1))
                rows_at += [r] * len(predictors)
                columns += predictors
                targets += response[n - len(predictors):]
                sequence += [s] * len(predictors)
                at += n
        positions[r, at:] = torch.arange(width - at)

    def as_tensor(values):
        return torch.tensor(values, dtype=torch.long)

    return Layout(input_ids, positions, unit_of, branch, as_tensor(rows_at), as_tensor(columns), as_tensor(targets),
                  as_tensor(sequence))


# Rows are laid out wider than one sequence only if that saves this share of the padded layout's token slots.
# SmolLM2, bf16, 2 threads, forward + backward of 16 sequences of 45–84 tokens with distinct prompts (19 % padding):
# 3.67 s padded, 3.26 s packed in rows of 2× the longest (13 % fewer slots), 3.56 s at 3×, 3.60 s at 1.5×.
PACKING_MIN_SAVING = 0.05


def sequence_layout(model, prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int
                    ) -> tuple[dict[str, torch.Tensor], Layout]:
    """The model's inputs and the layout behind them.

    Where the model takes a custom 4D attention mask (its masks come from transformers' masking utils), the
    sequences go by prompt: each prompt once, its responses after it, each seeing the prompt and itself alone
    (:meth:`Layout.shared_prefix_mask`) — a prompt's K samples cost its tokens once, not K times — and these units
    go end to end in rows of twice the longest sequence (first fit, longest first), when that saves
    :data:`PACKING_MIN_SAVING` of the padded layout's slots. Otherwise one right-padded row per sequence."""
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    padded_slots = len(lengths) * max(lengths)
    if _takes_custom_masks(model):
        units = prompt_units(prompt_ids)
        sizes = unit_sizes(prompt_ids, response_ids, units)
        rows = first_fit_rows(sizes, max(2 * max(lengths), max(sizes)))
        if len(rows) * max(sum(sizes[u] for u in row) for row in rows) <= (1 - PACKING_MIN_SAVING) * padded_slots:
            layout = lay_out_units(prompt_ids, response_ids, units, rows, pad_id)
            dtype = _transformers_model(model).get_input_embeddings().weight.dtype
            return ({"input_ids": layout.input_ids, "position_ids": layout.positions,
                     "attention_mask": layout.shared_prefix_mask(dtype)}, layout)
    alone = [[s] for s in range(len(lengths))]
    layout = lay_out_units(prompt_ids, response_ids, alone, alone, pad_id)
    return {"input_ids": layout.input_ids, "attention_mask": (layout.unit >= 0).long()}, layout


# Up to this many columns, eager attention (two bmm and a softmax) beats SDPA on CPU, whose flash-attention backward
# is slower than the matmuls it avoids on short sequences. SmolLM2, bf16, 2 threads, forward + backward of 1 400–1 500
# tokens: 2.14 vs 2.67 s at 88 columns, 2.41 vs 2.54 at 256; 2.81 vs 2.73 at 512, 8.4 vs 3.5 at 1 536.
EAGER_ATTENTION_MAX_COLUMNS = 384


def _transformers_model(model):
    module = getattr(model, "module", model)  # a DeepSpeed engine's model
    return module.get_base_model() if hasattr(module, "get_base_model") else module  # peft passes kwargs through


def _takes_custom_masks(model) -> bool:
    """Whether the model's decoder builds its masks with transformers' masking utils, which pass a 4D mask through."""
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

    The sequences are laid out by :func:`sequence_layout` (a prompt shared by its responses where the model allows).
    The LM head with its vocabulary-wide log-softmax is the widest layer of a small model, so a pre-hook on the output
    embeddings hands it only the hidden states that predict a response token (not the prompts, not the padding).
    log π(y_t) = logit[y_t] − logsumexp(logits)."""
    device = next(model.parameters()).device
    inputs, layout = sequence_layout(model, prompt_ids, response_ids, pad_id)
    inputs = {name: t.to(device) for name, t in inputs.items()}
    rows, columns = layout.rows.to(device), layout.columns.to(device)
    pick_cpu_attention(model, layout.input_ids.shape[1], device)

    def scored_positions_only(_head, args):
        # an index gather, so the head's matmul gets one contiguous [positions, hidden] operand
        return (args[0][rows, columns],) + tuple(args[1:])

    hook = _transformers_model(model).get_output_embeddings().register_forward_pre_hook(scored_positions_only)
    try:
        # no KV cache: none is reused here, and the masks are the layout's
        logits = model(**inputs, use_cache=False).logits.float()
    finally:
        hook.remove()
    if logits.shape != (len(rows), logits.shape[-1]):
        raise RuntimeError(f"{type(_transformers_model(model)).__name__} reshapes its LM head's output "
                           f"({tuple(logits.shape)} for {len(rows)} scored positions); nashray's log-probs need "
                           f"the logits as the head returns them")
    token_logp = logits.gather(1, layout.targets.to(device).unsqueeze(1)).squeeze(1) - logits.logsumexp(-1)
    return torch.zeros(len(prompt_ids), device=device).index_add(0, layout.sequence.to(device), token_logp)
