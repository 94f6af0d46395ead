"""Test helpers: a tiny random language model that transformers and vLLM load like any hub model, and (tabular)
games and policies written to files."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tiny_model(target: str | Path, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """A tiny random Llama (2 heads of 32: vLLM-CPU needs head_dim ≥ 32) with a byte-level BPE trained here and a
    ChatML template; a complete HF folder that transformers and vLLM load like any hub model."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog", "what is two plus two? four.",
              "a short answer is better than a long answer", "user assistant system hello world",
              "0 1 2 3 4 5 6 7 8 9 + - * / = ? !"] * 20
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        bos_token="<|im_start|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32,
                         head_dim=32, max_position_embeddings=512, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def save_game(game, path: str | Path) -> Path:
    """``game`` (a :class:`nashray.oracles.games.Game`) written as a JSON game file that ``load_game`` reads back."""
    import json

    from nashray.oracles.games import game_to_json
    path = Path(path)
    path.write_text(json.dumps(game_to_json(game), indent=1), encoding="utf-8")
    return path


def policy_to_json(policy, game) -> dict[str, list[float]]:
    """{prompt name: probability vector} of a :class:`nashray.trainers.tabular.TabularPolicy` over ``game``."""
    if policy.logits.shape != game.pi_ref.shape:
        raise ValueError(f"policy shape {tuple(policy.logits.shape)} does not match the game's {game.pi_ref.shape}")
    probs = policy.probs().detach().cpu().numpy()
    return {name: probs[p].tolist() for p, name in enumerate(game.prompts)}
