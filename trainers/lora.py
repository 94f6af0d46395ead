"""LoRA through peft: the adapted policy, π_ref as the same model with its adapters off, merged weights or the
adapters alone out.

Checkpoints' ``model.safetensors`` and exports keep the plain HF layout (W + ΔW for every adapted weight), so
nothing downstream of the learner needs to know adapters exist; the adapters themselves are saved beside them for
peft and vLLM's LoRA loading, and are what a push carries with ``learner.lora.push: adapter``."""

from __future__ import annotations

import tempfile
from pathlib import Path

from nashray.cluster.config import LoraConfig


def add_adapters(model, lora: LoraConfig):
    """``model`` wrapped by peft with fresh LoRA adapters (B = 0: the wrapped model computes exactly what it did);
    only the adapters require grad."""
    import peft
    config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=lora.target_modules, task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def is_adapted(module) -> bool:
    from peft import PeftModel
    return isinstance(module, PeftModel)


class AdaptersOff:
    """π_ref for a LoRA policy: its forward with the adapters switched off, i.e. the frozen base weights the
    campaign started from, without holding a second copy of the model."""

    def __init__(self, engine):
        self.engine = engine
        self.module = engine.module.get_base_model()  # what the scorer inspects for the forward's signature

    def parameters(self):
        return self.engine.module.parameters()

    def __call__(self, **inputs):
        with self.engine.module.disable_adapter():
            return self.engine(**inputs)


def merged_state_dict(peft_model) -> dict:
    """The base model's state dict under its HF names, each adapted weight W replaced by W + ΔW (computed in
    float32, stored in W's dtype); the adapters themselves are left out. The model is not modified: merging in place
    and unmerging would round the base weights a little each round in bf16."""
    from peft.tuners.lora import LoraLayer
    base = peft_model.get_base_model()
    adapter = peft_model.active_adapter
    deltas = {f"{name}.weight": module.get_delta_weight(adapter)
              for name, module in base.named_modules() if isinstance(module, LoraLayer) and adapter in module.lora_A}
    state = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        value = value.detach().cpu()
        if key in deltas:
            value = (value.float() + deltas[key].detach().float().cpu()).to(value.dtype)
        state[key] = value
    return state


def adapter_files(peft_model) -> dict[str, bytes]:
    """The active adapters as the files peft's ``save_pretrained`` writes (what vLLM's LoRA loader reads), by name."""
    with tempfile.TemporaryDirectory(prefix="nashray-adapter-") as folder:
        peft_model.save_pretrained(folder, safe_serialization=True)
        return {path.name: path.read_bytes() for path in Path(folder).iterdir() if path.is_file()}


def adapted_module_names(model_path: str, lora: LoraConfig, trust_remote_code: bool = False) -> list[str]:
    """The names (last dotted part) of the modules the adapters go on: ``target_modules`` as given, or for
    ``all-linear`` every linear layer but the output embedding, as peft resolves it, read off the model built on the
    meta device (no weights loaded)."""
    if lora.target_modules != "all-linear":
        return sorted(lora.target_modules)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    output = model.get_output_embeddings()
    return sorted({name.rpartition(".")[2] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not output})
