"""Per-sequence log-probabilities log π(y | x) = Σ_t log π(y_t | x, y_<t), the quantity every loss consumes."""

from __future__ import annotations

import inspect

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


# Up to this many columns, eager attention (two bmm and a softmax) beats SDPA on CPU, whose flash-attention backward
# is slower than the matmuls it avoids on short sequences. SmolLM2, bf16, 2 threads, forward + backward of 1 400–1 500
# tokens: 2.14 vs 2.67 s at 88 columns, 2.41 vs 2.54 at 256; 2.81 vs 2.73 at 512, 8.4 vs 3.5 at 1 536.
EAGER_ATTENTION_MAX_COLUMNS = 384


def _transformers_model(model):
    module = getattr(model, "module", model)  # a DeepSpeed engine's model
    return module.get_base_model() if hasattr(module, "get_base_model") else module  # peft passes kwargs through


def _takes_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(_transformers_model(model).forward).parameters


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

    The LM head with its vocabulary-wide log-softmax is the widest layer of a small model, so it sees only the
    hidden states that predict a response token: HF ``logits_to_keep`` drops the columns before the shortest
    prompt's last token, and a pre-hook on the output embeddings keeps, of the rest, the scored positions alone
    (not the longer prompts' tails, not the padding). log π(y_t) = logit[y_t] − logsumexp(logits)."""
    device = next(model.parameters()).device
    input_ids, attention, scored = (t.to(device) for t in pad_sequences(prompt_ids, response_ids, pad_id))
    pick_cpu_attention(model, input_ids.shape[1], device)
    rows, columns = scored[:, 1:].nonzero(as_tuple=True)  # column c's logits predict token c + 1
    targets = input_ids[rows, columns + 1]
    first = max(min(len(p) for p in prompt_ids) - 1, 0)  # the first column whose logits predict a response token
    # The columns as an index tensor, not as a count: HF slices the hidden states with it, and the count's slice is
    # a non-contiguous view, which torch's matmul cannot fold into one mm when the LM head is frozen (π_ref, a LoRA
    # policy's base): it then copies the LM-head weight once per row, 4× SmolLM2's whole forward (measured).
    kept = _takes_logits_to_keep(model)
    extra = {"logits_to_keep": torch.arange(first, input_ids.shape[1], device=device)} if kept else {}
    offset = first if kept else 0

    def scored_positions_only(_head, args):
        return (args[0][rows, columns - offset],) + tuple(args[1:])

    hook = _transformers_model(model).get_output_embeddings().register_forward_pre_hook(scored_positions_only)
    try:
        logits = model(input_ids=input_ids, attention_mask=attention, **extra).logits.float()
    finally:
        hook.remove()
    if logits.shape != (len(rows), logits.shape[-1]):
        raise RuntimeError(f"{type(_transformers_model(model)).__name__} reshapes its LM head's output "
                           f"({tuple(logits.shape)} for {len(rows)} scored positions); nashray's log-probs need "
                           f"the logits as the head returns them")
    token_logp = logits.gather(1, targets.unsqueeze(1)).squeeze(1) - logits.logsumexp(-1)
    return torch.zeros(len(prompt_ids), device=device).index_add(0, rows, token_logp)
