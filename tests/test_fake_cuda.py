"""The step's tensors between generation and the loss as a GPU sees them, without a GPU: under
torch's FakeTensorMode on the `cuda` device, a tensor made on the CPU that meets one on the GPU
raises "Expected all tensors to be on the same device", as CUDA does; a value copied to the host
(.tolist()) is 0, fake tensors having none. (The model's own passes cannot run so here: torch's
bindings open the CUDA runtime for fake CUDA tensors too, indexing's device guard, the
backward's streams: README "Speed".)"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily

import grpo
import rewards
import train
from r1v import policy

EOS = [0, 7]  # two EOS ids, as an Instruct checkpoint has


@pytest.fixture
def fake_cuda(monkeypatch):
    def zeros(tensor):
        with unset_fake_temporarily():
            return torch.zeros(tensor.shape, dtype=tensor.dtype).tolist()
    monkeypatch.setattr(FakeTensor, "tolist", zeros)
    return FakeTensorMode(allow_non_fake_inputs=True)


def rollout_on_the_gpu(N=4, C=6):
    """What policy.generate hands the step: the completions on the model's device."""
    ids = torch.randint(1, 10, (N, C), device="cuda")                         # (N, C)
    prompt = torch.ones(N, 3, dtype=torch.long, device="cuda")                 # (N, P)
    return policy.Rollout(prompt, prompt, torch.zeros_like(prompt), [], None,
                          torch.ones(N, device="cuda"), ids, None)


def test_scoring_and_advantages_keep_to_the_completions_device(fake_cuda):
    examples = [{"task_type": "choice", "choices": ["a", "b"], "answer": "a",
                 "question": "q"}] * 2
    scoring = rewards.load_rewards(["format", "accuracy"], None)
    texts = ["</think> <answer> a </answer>", "no", "</think> <answer> b </answer>", "x"]
    with fake_cuda:
        rollout = rollout_on_the_gpu()
        rollout.completion_mask = grpo.completion_mask(rollout.completion_ids, EOS)  # (N, C)
        assert rollout.completion_mask.device.type == "cuda"
        # the EOS ids once met the completions as a CPU tensor here (metrics.completion_lengths)
        scored = train.score(texts, examples, rollout, EOS, *scoring, 2, None)
        advantages = grpo.group_advantages(torch.tensor(scored.total, device="cuda"), 2)
        assert advantages.device.type == "cuda" and advantages.shape == (4,)
    assert scored.total == [2.0, 0.0, 1.0, 0.0]  # format + accuracy, on the host


def test_the_fake_cuda_check_finds_a_cpu_tensor_meeting_a_gpu_one(fake_cuda):
    """The check itself: the mistake that was in the scoring raises under it."""
    with fake_cuda, pytest.raises(RuntimeError, match="same device"):
        torch.isin(rollout_on_the_gpu().completion_ids, torch.tensor(EOS))
