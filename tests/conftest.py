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


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory):
    """A tiny random Qwen3-VL (Instruct: a chat template, <|im_end|> its EOS), in a folder whose
    name does not say which family it is; its vocabulary covers the grounding prompts."""
    folder = tmp_path_factory.mktemp("tiny-vlm")
    return str(tiny.build_tiny_model(folder, demo.synthetic_vocabulary(grounding_tasks=True),
                                     family="qwen3_vl"))


@pytest.fixture
def rope_families(monkeypatch):
    """The families' modeling modules, whose module-level RoPE function apply_liger_kernels
    replaces for the whole process: put back after the test."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
    from transformers.models.qwen2_vl import modeling_qwen2_vl
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    families = (modeling_qwen2_vl, modeling_qwen2_5_vl, modeling_qwen3_vl)
    for module in families:
        monkeypatch.setattr(module, "apply_rotary_pos_emb", module.apply_rotary_pos_emb)
    return families
