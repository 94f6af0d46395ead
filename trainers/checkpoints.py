"""Checking a round checkpoint before a campaign resumes from it, and reading DeepSpeed's part of it without running
code from the files.

A checkpoint (``checkpoints/round-t/``, written by :mod:`nashray.trainers.learner`) holds

    COMPLETE                           JSON marker {"round", "metrics", "probe"}, written last
    model.safetensors                  the policy's weights (or shards listed in model.safetensors.index.json)
    config.json, tokenizer files       LLM policies: a plain HF folder
    deepspeed/state/*.pt               DeepSpeed's module, optimizer and ZeRO partition state (torch.save files)

:func:`validate_checkpoint` raises :class:`CheckpointError` naming the file that is missing, unreadable, or does not
belong to the campaign's model or learner layout; it reads headers and pickle opcodes only, never a tensor's data.

DeepSpeed 0.19 loads its files with ``torch.load(weights_only=False)``: plain unpickling, which imports and calls
whatever the file names, so a planted file runs code on resume. DeepSpeed has no public way to change how its
checkpoint engine reads; :func:`load_deepspeed_state` sets torch's documented ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` while
the engine loads, so that its ``torch.load`` calls use torch's weights-only unpickler, allowing only tensors,
containers and the few plain DeepSpeed types it stores (:data:`DEEPSPEED_STATE_TYPES`); a file naming anything else
is a :class:`CheckpointError`, naming the file, before anything is unpickled.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nashray.cluster.config import CampaignConfig
from nashray.layout import CHECKPOINT_DONE, DEEPSPEED_DIR, DEEPSPEED_TAG
from nashray.models import resolve_model_path

INDEX_FILE = "model.safetensors.index.json"
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch.load reads weights-only even when told weights_only=False

# Architecture fields of config.json a checkpoint must share with the campaign's model.
CONFIG_FIELDS = ("model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size",
                 "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")

# What DeepSpeed pickles besides tensors and containers (ZeRO 1–3 optimizer partitions): plain data classes,
# restored attribute by attribute by the weights-only unpickler, never through their own code.
DEEPSPEED_STATE_TYPES = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                         "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                         "deepspeed.runtime.zero.config.ZeroStageEnum",
                         "deepspeed.utils.tensor_fragment.fragment_address")


class CheckpointError(ValueError):
    """A checkpoint a campaign cannot resume from; the message names the file."""


def _deepspeed_types() -> list[type]:
    types = []
    for dotted in DEEPSPEED_STATE_TYPES:
        module, name = dotted.rsplit(".", 1)
        types.append(getattr(importlib.import_module(module), name))
    return types


def load_deepspeed_file(path: str | Path, map_location: Any = None):
    """``torch.load`` of a DeepSpeed state file through the weights-only unpickler, allowing
    :data:`DEEPSPEED_STATE_TYPES`."""
    import pickle

    import torch
    with torch.serialization.safe_globals(_deepspeed_types()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            named = re.search(r"GLOBAL (\S+)", str(err))
            what = named.group(1) if named else str(err).strip().splitlines()[-1]
            raise CheckpointError(f"{path} pickles {what}, which is not a tensor, a container or one of DeepSpeed's "
                                  f"state types: refused without running it") from None
        except (RuntimeError, EOFError, ValueError) as err:
            raise CheckpointError(f"{path} is not a readable torch.save file: {err}") from None


def _refuse_unsafe_globals(folder: Path, allowed: list[type]) -> None:
    """Raise CheckpointError naming the first state file under ``folder`` that pickles a global the weights-only
    unpickler refuses (read from the pickle's opcodes: nothing is unpickled)."""
    for path in sorted(folder.rglob("*.pt")):
        unsafe = _unsafe_globals(path, allowed)
        if unsafe:
            raise CheckpointError(f"{path} pickles {', '.join(sorted(unsafe))}, which is not a tensor, a container "
                                  f"or one of DeepSpeed's state types: refused without running it")


def _unsafe_globals(path: Path, allowed: list[type]) -> list[str]:
    """The globals a torch.save file pickles that the weights-only unpickler would refuse, ``allowed`` aside."""
    import torch
    with torch.serialization.safe_globals(allowed):
        try:
            return torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except (ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path} is not a readable torch.save file: {err}") from None


@contextmanager
def _weights_only_loads():
    """Every ``torch.load`` in this process reads weights-only while inside, ``weights_only=False`` callers included
    (torch's documented ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``), allowing :data:`DEEPSPEED_STATE_TYPES`."""
    import torch
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_types()):
            yield
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


def load_deepspeed_state(engine, checkpoint: str | Path) -> None:
    """Resume a DeepSpeed engine from ``checkpoint``'s ``deepspeed/`` folder without running code from its files:
    every state file is first checked for pickled globals beyond tensors, containers and
    :data:`DEEPSPEED_STATE_TYPES` (a :class:`CheckpointError` naming the file and the global), then the engine loads
    them with every ``torch.load`` forced weights-only (DeepSpeed 0.19 asks for ``weights_only=False``)."""
    import pickle
    folder = Path(checkpoint) / DEEPSPEED_DIR
    _refuse_unsafe_globals(folder / DEEPSPEED_TAG, _deepspeed_types())
    with _weights_only_loads():
        try:
            load_path, _ = engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG)
        except pickle.UnpicklingError as err:  # a global pushed dynamically, which the opcode scan cannot see
            named = re.search(r"GLOBAL (\S+)", str(err))
            what = named.group(1) if named else str(err).strip().splitlines()[-1]
            raise CheckpointError(f"{folder / DEEPSPEED_TAG}: a state file pickles {what}, which is not a tensor, a "
                                  f"container or one of DeepSpeed's state types: refused without running it") from None
    if load_path is None:
        raise CheckpointError(f"{folder / DEEPSPEED_TAG}: DeepSpeed found no state to load")


# ------------------------------------------------------------------------------------------------ validation

def _read_json(path: Path, what: str):
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None


def _weight_files(ckpt: Path) -> list[Path]:
    index = ckpt / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index, "").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        files = [ckpt / name for name in sorted(set(weight_map.values()))]
    else:
        files = [ckpt / "model.safetensors"]
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the checkpoint has no weights")
    return files


def safetensors_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape from the headers of safetensors files (no tensor data is read)."""
    from safetensors import SafetensorError, safe_open
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if name in shapes:
                        raise CheckpointError(f"{path}: tensor {name!r} is also in another shard")
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except SafetensorError as err:
            raise CheckpointError(f"{path} is not a readable safetensors file (corrupted or truncated): "
                                  f"{err}") from None
    return shapes


def _expected_shapes(cfg) -> tuple[dict[str, tuple[int, ...]], dict[str, set[str]]]:
    """The campaign model's tensor names and shapes, and for each name the names tied to it (one parameter)."""
    if cfg.generators.engine == "tabular":
        from nashray.oracles.games import load_game  # lazy: scipy.optimize, seconds at `nashray --help`
        from nashray.trainers.tabular import TabularPolicy  # lazy: imports torch
        state = TabularPolicy.from_game(load_game(cfg.data.game)).state_dict()
        return {k: tuple(v.shape) for k, v in state.items()}, {k: {k} for k in state}
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    base = AutoConfig.from_pretrained(resolve_model_path(cfg.model.path),
                                      trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(base, trust_remote_code=cfg.model.trust_remote_code)
    names_of: dict[int, set[str]] = {}
    shapes = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        shapes[name] = tuple(tensor.shape)
        names_of.setdefault(id(tensor), set()).add(name)
    return shapes, {name: names for names in names_of.values() for name in names}


def _check_config(ckpt: Path, cfg) -> None:
    base_dir = Path(resolve_model_path(cfg.model.path))
    saved = _read_json(ckpt / "config.json", "an LLM checkpoint is an HF folder with its model config")
    base = _read_json(base_dir / "config.json", "the campaign's model has no config")
    for field in CONFIG_FIELDS:
        if saved.get(field) != base.get(field):
            raise CheckpointError(f"{ckpt / 'config.json'}: {field} is {saved.get(field)!r} but the campaign's "
                                  f"model ({cfg.model.path}) has {base.get(field)!r}: the checkpoint is of "
                                  f"another model")


def _check_weights(ckpt: Path, cfg) -> None:
    files = _weight_files(ckpt)
    found = safetensors_shapes(files)
    expected, tied = _expected_shapes(cfg)
    where = files[0] if len(files) == 1 else ckpt / INDEX_FILE
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise CheckpointError(f"{where}: tensors {unexpected[:5]} are not in the campaign's model "
                              f"({cfg.model.path}): the checkpoint is of another model")
    missing = sorted(name for name in expected if not tied[name] & set(found))
    if missing:
        raise CheckpointError(f"{where}: tensors {missing[:5]} of the campaign's model ({cfg.model.path}) "
                              f"are missing")
    for name, shape in found.items():
        if shape != expected[name]:
            raise CheckpointError(f"{where}: tensor {name!r} has shape {list(shape)} but the campaign's model "
                                  f"({cfg.model.path}) has {list(expected[name])}")


def _deepspeed_files(learner, present: list[str]) -> list[str]:
    """The state files DeepSpeed writes (and needs back) for the learner section, per its file naming. Precision
    ``auto`` was resolved on the learner's host, which may not be this one: the checkpoint's own files say which."""
    workers = range(learner.workers)
    if learner.zero_stage == 3:
        files = [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in workers]
    else:
        files = ["mp_rank_00_model_states.pt"]
    if learner.zero_stage >= 1:
        bf16 = (any(name.startswith("bf16_") for name in present) if learner.precision == "auto"
                else learner.precision == "bf16")
        prefix = "bf16_" if bf16 else ""
        files += [f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in workers]
    return files


def _check_deepspeed(ckpt: Path, cfg) -> None:
    folder = ckpt / DEEPSPEED_DIR / DEEPSPEED_TAG
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is missing: the checkpoint has no optimizer state to resume from")
    present = sorted(p.name for p in folder.glob("*.pt"))
    learner = cfg.learner
    missing = [name for name in _deepspeed_files(learner, present) if name not in present]
    if missing:
        raise CheckpointError(
            f"{folder / missing[0]} is missing: the checkpoint was written by a learner other than the one "
            f"configured (learner.workers={learner.workers}, learner.zero_stage={learner.zero_stage}, "
            f"learner.precision={learner.precision!r}); DeepSpeed cannot re-split optimizer state, so resume with "
            f"the learner section it was written with (found {present})")
    allowed = _deepspeed_types()
    for name in present:
        path = folder / name
        unsafe = _unsafe_globals(path, allowed)
        if unsafe:
            raise CheckpointError(f"{path} names {sorted(unsafe)}, which a weights-only load refuses: the file "
                                  f"was not written by the learner, and is not loaded")


def validate_checkpoint(path: str | Path, config) -> None:
    """Raise :class:`CheckpointError` naming the file when the checkpoint at ``path`` cannot resume the campaign
    ``config`` (a ``CampaignConfig`` or its dict): no COMPLETE marker, a missing or corrupted weights file, weights
    or config.json of another model, DeepSpeed state of another learner layout, or a state file that pickles
    anything but tensors and DeepSpeed's plain state types."""
    cfg = config if isinstance(config, CampaignConfig) else CampaignConfig.model_validate(config)
    ckpt = Path(path)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint {ckpt} does not exist")
    marker = _read_json(ckpt / CHECKPOINT_DONE, "the checkpoint was never completed (a crash while writing it?)")
    if not isinstance(marker, dict) or not isinstance(marker.get("round"), int) \
            or not isinstance(marker.get("metrics"), dict):
        raise CheckpointError(f"{ckpt / CHECKPOINT_DONE} must be a JSON object with an integer 'round' and 'metrics'")
    if cfg.generators.engine != "tabular":
        _check_config(ckpt, cfg)
    _check_weights(ckpt, cfg)
    _check_deepspeed(ckpt, cfg)
