"""Proof that ``pip install "nashray[gpu]"`` resolves: pip's resolver in a dry run (nothing is installed) over
this checkout with the ``gpu`` extra, from scratch (``--ignore-installed``), against the package index this machine
reaches. Writes bench/results/gpu-extra.json: the command, pip's exit status and the versions it would install of
the packages that decide the GPU image (torch, vllm, ray, deepspeed, transformers and the CUDA runtime).

    python bench/gpu_extra.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEY_PACKAGES = ("torch", "vllm", "ray", "deepspeed", "transformers", "peft", "pydantic", "nvidia-nccl-cu13",
                "nvidia-cuda-runtime")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                   "--report", str(report), f"{ROOT}[gpu]"]
        start = time.time()
        done = subprocess.run(command, capture_output=True, text=True)
        installs = json.loads(report.read_text())["install"] if report.exists() else []
    versions = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in installs}
    result = {
        "what": 'pip install --dry-run "nashray[gpu]": pip\'s resolver over pyproject.toml with the gpu extra',
        "command": " ".join(["pip"] + command[3:-1] + ['".[gpu]"']),
        "pip": subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True,
                              text=True).stdout.split(" from ")[0],
        "date": time.strftime("%Y-%m-%d"),
        "resolves": done.returncode == 0 and bool(installs),
        "returncode": done.returncode,
        "seconds": round(time.time() - start, 1),
        "packages_to_install": len(installs),
        "versions": {name: versions.get(name) for name in KEY_PACKAGES},
        "stderr_tail": done.stderr[-2000:],
    }
    out = ROOT / "bench" / "results" / "gpu-extra.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("resolves", "returncode", "versions")}, indent=2))
    sys.exit(0 if result["resolves"] else 1)


if __name__ == "__main__":
    main()
