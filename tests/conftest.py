import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import demo  # noqa: E402
from r1v import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen2-VL with an offline word-level tokenizer, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-qwen2vl")
    return str(tiny.build_tiny_model(folder, demo.synthetic_vocabulary()))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: end-to-end runs of the real command line (minutes on CPU)"
    )
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_qwen25_dir(tmp_path_factory):
    """A tiny random Qwen2.5-VL (Instruct: a chat template; answers boxes in pixels) whose
    vocabulary covers the grounding prompts, JSON and numbers."""
    folder = tmp_path_factory.mktemp("tiny-qwen25vl")
    return str(tiny.build_tiny_model(folder, demo.synthetic_vocabulary(grounding_tasks=True),
                                     family="qwen2_5_vl"))
