"""On a CUDA GPU only (skipped elsewhere): Liger's Triton kernels against the unpatched model,
and a few training steps of each benchmark variant on the tiny model."""

import json

import pytest
import torch

import demo
import grpo
import train
from r1v import policy
from r1v import model as models

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


def lora_model(model_dir):
    torch.manual_seed(0)
    model = models.add_lora(models.load_base_model(model_dir, CUDA), 8, 16)  # bf16 on CUDA
    processor = models.load_processor(model_dir)
    with torch.no_grad():  # a non-zero adapter, so that its gradients flow everywhere
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model, processor


def logps_and_lora_grads(model, rollout):
    model.zero_grad(set_to_none=True)
    logp = policy.token_logps(model, rollout)                                  # (N, C)
    (logp * rollout.completion_mask).sum().backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp.detach().float(), grads


def test_liger_kernels_match_the_unpatched_model(tiny_model_dir, rope_families):
    model, processor = lora_model(tiny_model_dir)
    examples = [demo.synthetic_dataset(4, seed=1, image_size=56)[i] for i in range(4)]
    gen = policy.generation_config(processor, max_new_tokens=12)
    rollout, _ = policy.generate(model, processor, examples, gen, group_size=2)
    rollout.completion_mask = grpo.completion_mask(rollout.completion_ids,
                                                   models.special_tokens(processor).eos)
    logp, grads = logps_and_lora_grads(model, rollout)
    assert models.apply_liger_kernels(model) > 0
    liger_logp, liger_grads = logps_and_lora_grads(model, rollout)
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(liger_logp[mask], logp[mask], atol=5e-2, rtol=2e-2)  # bf16
    assert grads.keys() == liger_grads.keys() and len(grads) > 0
    for name, g in grads.items():
        cosine = torch.nn.functional.cosine_similarity(g.flatten(), liger_grads[name].flatten(), 0)
        assert cosine > 0.99, name
        torch.testing.assert_close(liger_grads[name].norm(), g.norm(), rtol=5e-2, atol=1e-6)


@pytest.mark.parametrize("variant", [dict(use_liger=False), dict(use_liger=True),
                                     dict(use_liger=True, load_in_4bit=True)],
                         ids=["lora", "lora+liger", "qlora+liger"])
def test_each_variant_trains_a_few_steps(tiny_model_dir, tmp_path, variant):
    args = ["--model", tiny_model_dir, "--dataset", "synthetic", "--dataset_limit", "32",
            "--synthetic_image_size", "56", "--output_dir", str(tmp_path / "run"),
            "--num_generations", "4", "--prompts_per_step", "2", "--micro_batch_size", "4",
            "--max_completion_length", "16", "--max_steps", "3", "--lora_r", "8",
            "--lora_alpha", "16", "--learning_rate", "1e-3"]
    args += ["--use_liger" if variant["use_liger"] else "--no-use_liger"]
    args += ["--load_in_4bit"] if variant.get("load_in_4bit") else []
    train.main(args)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["nonfinite_steps"] == 0 and m["grad_norm"] > 0 for m in metrics)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["use_liger"] == variant["use_liger"]


def test_the_compiled_decode_replays_one_graph_and_follows_the_adapter(tiny_model_dir):
    """inductor's CUDA graph of the decode step, on the run's static cache, over generate calls
    with the adapter changed in between (as the optimizer does, in place): one compile, no graph
    break, and the tokens of eager decoding (bf16: a near-tie may round the other way)."""
    from r1v import decode

    model, processor = lora_model(tiny_model_dir)
    examples = [demo.synthetic_dataset(4, seed=1, image_size=56)[i] for i in range(2)]
    gen = policy.generation_config(processor, max_new_tokens=16, greedy=True)
    gen.min_new_tokens = 16
    decoder = decode.Decoder(model, 4, 256, compile=True)
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]
    for _ in range(3):
        eager, _ = policy.generate(model, processor, examples, gen, group_size=2)
        compiled, _ = policy.generate(model, processor, examples, gen, group_size=2,
                                      decoder=decoder)
        same = (compiled.completion_ids == eager.completion_ids).float().mean().item()
        assert same > 0.8, same
        with torch.no_grad():  # a large step: a stale graph would keep the old tokens
            for p in lora:
                p.add_(torch.randn_like(p) * 0.2)
    assert decoder.stats() == {"decode_compiles": 1, "decode_graph_breaks": 0}
