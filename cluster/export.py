"""``nashray export``: a round checkpoint of a campaign as a plain HF model folder with a model card.

The folder holds what the learner saved with ``save_pretrained`` — the weights (``model.safetensors``, or shards and
their index), ``config.json``, the generation config and the tokenizer files — without DeepSpeed's optimizer state
or the checkpoint's marker, and a ``README.md`` model card with the campaign's config and the round's metrics. It
loads wherever an HF model does: ``transformers.AutoModelForCausalLM.from_pretrained(OUT)``, ``vllm.LLM(OUT)``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from nashray.cluster.config import load_config
from nashray.layout import CHECKPOINT_DONE, RunDir, complete_checkpoints, newest_checkpoint
from nashray.models import SMOLLM2
from nashray.trainers.checkpoints import validate_checkpoint


class ExportError(ValueError):
    """A run directory or round that cannot be exported; the message names it."""


def _checkpoint(run: RunDir, round_index: int | None) -> Path:
    complete = [p.name for p in complete_checkpoints(run.checkpoints_root)]
    ckpt = newest_checkpoint(run.checkpoints_root) if round_index is None else run.complete_checkpoint(round_index)
    if ckpt is None:
        which = "any round" if round_index is None else f"round {round_index}"
        raise ExportError(f"{run.root} has no complete checkpoint of {which} (complete: {complete or 'none'}; "
                          f"storage.keep_checkpoints keeps the newest few)")
    return ckpt


def _copy_weights(ckpt: Path, out: Path) -> str:
    """The checkpoint's model files into ``out``; returns what the card says of the weights. The learner trains every
    parameter, so the files are copied as they are; a learner that trains adapters (LoRA) would merge them into the
    base weights here, so that the export stays a plain model."""
    for path in sorted(ckpt.iterdir()):
        if path.is_file() and path.name != CHECKPOINT_DONE:
            shutil.copy2(path, out / path.name)
    return ("Full weights: nashray's learner trains every parameter of the policy (no LoRA adapters), so these are "
            "the checkpoint's weights as saved.")


def _hub_id(model_path: str) -> str | None:
    """``model_path`` when it names a model on the HF hub (the card's ``base_model``), else None."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if model_path.lower() == SMOLLM2 or Path(model_path).expanduser().exists():
        return None
    try:
        validate_repo_id(model_path)
    except HFValidationError:
        return None
    return model_path


def model_card(run: RunDir, cfg, ckpt: Path, round_index: int, weights_note: str) -> str:
    """README.md of an export of ``run`` (its config ``cfg``): metadata, what the model is, the round's metrics and
    the campaign's config."""
    import yaml
    config_text = run.config_path.read_text(encoding="utf-8")
    algorithm, base = cfg.algorithm.name, cfg.model.path
    metadata = {"library_name": "transformers", "tags": ["nashray", algorithm, "preference-alignment"]}
    if _hub_id(base):
        metadata["base_model"] = base
    metrics = [m for m in run.metrics() if m["round"] == round_index]
    if metrics:
        rows = "\n".join(f"| `{k}` | {v:.6g} |" if isinstance(v, float) else f"| `{k}` | {json.dumps(v)} |"
                         for k, v in sorted(metrics[-1].items()))
        metrics_text = f"| metric | value |\n|---|---|\n{rows}"
    else:
        metrics_text = (f"Not recorded: the campaign stopped after saving round {round_index}'s checkpoint and "
                        f"before writing its metrics.")
    return f"""---
{yaml.safe_dump(metadata, sort_keys=False).strip()}
---

# {base}, aligned with {algorithm} by nashray

The policy after round {round_index} of a {cfg.schedule.rounds}-round `{algorithm}` campaign (nashray, online
alignment with general preferences), exported by `nashray export` from checkpoint `{ckpt.name}` of the run directory
`{run.root}`.

{weights_note}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```

vLLM serves it as it is: `vllm.LLM(model="path/to/this/folder")`.

## Metrics of round {round_index}

From `metrics.jsonl` of the run directory (win rates are on the campaign's held-out prompts, judged by its oracle).

{metrics_text}

## Campaign config

The run directory's `config.yaml` (the config in force, with every default filled in):

```yaml
{config_text.rstrip()}
```
"""


def export_model(run_dir: str | Path, out: str | Path, round_index: int | None = None) -> Path:
    """Write round ``round_index``'s checkpoint (default: the newest complete one) of the campaign in ``run_dir`` as
    an HF model folder ``out``, which must not exist yet (or be empty); returns ``out``."""
    run = RunDir(run_dir)
    cfg = load_config(run.config_path)
    if cfg.generators.engine == "tabular":
        raise ExportError(f"{run.root} is a tabular campaign: its policy is a logit table, not an HF model")
    ckpt = _checkpoint(run, round_index)
    validate_checkpoint(ckpt, cfg)  # a torn or foreign checkpoint is named, never exported
    out = Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not an empty folder: an export never overwrites")
    done = json.loads((ckpt / CHECKPOINT_DONE).read_text())
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    note = _copy_weights(ckpt, tmp)
    (tmp / "README.md").write_text(model_card(run, cfg, ckpt, done["round"], note), encoding="utf-8")
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
