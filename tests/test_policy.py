"""r1v/policy.py and train.py's update on the tiny model: generation, the Rollout's layout,
log-probs, the reference under disable_adapter, micro-batch invariance of the loss and its
gradients, the Liger loss."""

import json
import math
import random

import pytest
import torch
from PIL import Image

import data
import demo
import grpo
import train
from r1v import metrics, policy, processes
from r1v import model as models
from tests.vlm import count_vision_calls, plain_completions

PROCS = processes.Processes(None)  # this one process


def tiny_config(model_dir, tmp_path, **overrides):
    args = [
        "--model", model_dir, "--dataset", "synthetic", "--dataset_limit", "64",
        "--synthetic_image_size", "56", "--output_dir", str(tmp_path / "run"),
        "--num_generations", "2", "--prompts_per_step", "3", "--micro_batch_size", "6",
        "--max_completion_length", "6", "--lora_r", "4", "--lora_alpha", "8",
    ]
    for key, value in overrides.items():
        args += [f"--{key}"] + ([str(value)] if value is not True else [])
    return train.parse_config(args)


def generation(processor, cfg):
    return policy.generation_config(
        processor, max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
        top_k=cfg.top_k,
    )


@pytest.fixture
def rollout(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(tiny_model_dir, tmp_path)
    model = train.load_model(cfg, torch.device("cpu"))
    processor = models.load_processor(tiny_model_dir)
    with torch.no_grad():  # a non-zero adapter, so that disabling it matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ds = demo.synthetic_dataset(8, seed=1, tasks=("count", "leftright", "bigger"), image_size=56)
    examples = [ds[0], ds[1], demo.synthetic_dataset(1, seed=2, image_size=84)[0]]  # two sizes
    rollout, texts = train.generate(
        model, processor, examples, generation(processor, cfg), cfg, eos_ids(processor)
    )
    return cfg, model, processor, rollout, texts, examples


def eos_ids(processor):
    return [models.special_tokens(processor).eos]


def logps(model, rollout, cfg, micro_batch_size=None):
    return policy.rollout_logps(
        model, rollout, micro_batch_size or cfg.micro_batch_size, cfg.temperature,
        cfg.logp_chunk_size,
    )


def test_generate_returns_prompt_major_groups_and_position_masks(rollout):
    cfg, model, processor, batch, texts, examples = rollout
    N = len(examples) * cfg.num_generations
    assert batch.completion_ids.shape[0] == N and len(batch) == N and len(texts) == N
    tokens = models.special_tokens(processor)
    assert torch.equal(
        batch.completion_mask, grpo.completion_mask(batch.completion_ids, tokens.eos)
    )
    assert not torch.isin(batch.completion_ids, torch.tensor(tokens.vision)).any()  # suppressed
    assert batch.images_per_seq.tolist() == [1] * N


def test_micro_batches_of_several_prompts_give_the_full_batch_logps(rollout):
    cfg, model, processor, batch, texts, examples = rollout
    full = logps(model, batch, cfg)
    mask = batch.completion_mask.bool()
    for size in (1, 2, 4):
        torch.testing.assert_close(
            logps(model, batch, cfg, size)[mask], full[mask], atol=1e-5, rtol=1e-5
        )


def expected_logps(model, batch):
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits  # (N, P+C, V)
    P, C = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    return torch.gather(
        logits[:, P - 1 : P + C - 1].log_softmax(-1), 2, batch.completion_ids.unsqueeze(-1)
    ).squeeze(-1)


def test_logps_equal_the_models_own_logits(rollout):
    cfg, model, processor, batch, texts, examples = rollout
    mask = batch.completion_mask.bool()
    torch.testing.assert_close(
        logps(model, batch, cfg)[mask], expected_logps(model, batch)[mask], atol=1e-5, rtol=1e-5
    )


def test_disable_adapter_gives_the_base_models_logps(rollout, tiny_model_dir):
    from transformers import Qwen2VLForConditionalGeneration

    cfg, model, processor, batch, texts, examples = rollout
    with model.disable_adapter():
        ref = logps(model, batch, cfg)
    adapted = logps(model, batch, cfg)
    base = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    mask = batch.completion_mask.bool()
    torch.testing.assert_close(ref[mask], expected_logps(base, batch)[mask], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(adapted[mask], ref[mask], atol=1e-3)


@pytest.mark.parametrize("use_liger", [False, True])
def test_update_changes_every_lora_weight_and_only_those(rollout, use_liger):
    cfg, model, processor, batch, texts, examples = rollout
    cfg = train.dataclasses.replace(cfg, use_liger=use_liger, micro_batch_size=2)
    batch.advantages = torch.tensor([1.0, -1.0] * len(examples))
    train.add_old_and_ref_logps(model, batch, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: 1.0)
    stats = train.update(model, optimizer, scheduler, batch, cfg, PROCS)
    assert stats["nonfinite"] == 0 and stats["grad_norm"] > 0
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == p.requires_grad, name
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert not any("visual" in n for n, p in model.named_parameters() if p.requires_grad)


def batch_gradients(model, batch, cfg, micro_batch_size, loss_type, use_liger=False):
    model.zero_grad(set_to_none=True)
    cfg = train.dataclasses.replace(cfg, micro_batch_size=micro_batch_size, use_liger=use_liger,
                                    beta=0.04, loss_type=loss_type)
    loss, stats = train.accumulate_gradients(model, batch, cfg, len(batch),
                                             batch.completion_mask.sum())
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return loss, grads, stats


@pytest.mark.parametrize("use_liger", [False, True])
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_loss_and_gradients_do_not_depend_on_the_micro_batch_size(rollout, loss_type, use_liger):
    cfg, model, processor, batch, texts, examples = rollout
    batch.advantages = torch.tensor([1.5, -0.5, 0.3, -1.0, 0.7, -0.2])
    with model.disable_adapter():
        batch.ref_logp = logps(model, batch, cfg)
    batch.old_logp = logps(model, batch, cfg) + 0.3 * torch.randn(batch.completion_ids.shape)
    whole_loss, whole_grads, whole_stats = batch_gradients(
        model, batch, cfg, 6, loss_type, use_liger
    )
    assert any(g.abs().sum() > 0 for g in whole_grads)
    for size in (3, 2, 4, 5):  # 6 = 3+3 = 2+2+2 = 4+2 = 5+1
        loss, grads, stats = batch_gradients(model, batch, cfg, size, loss_type, use_liger)
        assert loss == pytest.approx(whole_loss, rel=1e-5, abs=1e-7), size
        for a, b in zip(grads, whole_grads):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
        assert stats["kl"] == pytest.approx(whole_stats["kl"], rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_liger_fused_loss_matches_the_plain_path_in_loss_and_lora_gradients(rollout, loss_type):
    cfg, model, processor, batch, texts, examples = rollout
    batch.advantages = torch.tensor([1.5, -0.5, 0.3, -1.0, 0.7, -0.2])
    with model.disable_adapter():
        batch.ref_logp = logps(model, batch, cfg)
    batch.old_logp = logps(model, batch, cfg) + 0.3 * torch.randn(batch.completion_ids.shape)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    num_tokens, kwargs = batch.completion_mask.sum(), dict(
        beta=0.04, loss_type=loss_type, max_completion_length=6
    )
    hidden, weight = policy.completion_hidden(model, batch)
    liger_loss, liger_stats = models.liger_grpo_loss(
        hidden, weight, batch, cfg.temperature, len(batch), num_tokens, **kwargs
    )
    logp = policy.token_logps(model, batch, cfg.temperature)
    plain, plain_stats = grpo.policy_loss(
        logp, batch.old_logp, batch.ref_logp, batch.advantages, batch.completion_mask,
        num_tokens=num_tokens, **kwargs,
    )
    torch.testing.assert_close(liger_loss, plain, atol=1e-5, rtol=1e-4)
    for a, b in zip(torch.autograd.grad(liger_loss, params),
                    torch.autograd.grad(plain, params)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)
    assert liger_stats["kl"] == pytest.approx(plain_stats["kl"], rel=1e-4, abs=1e-7)
    assert liger_stats["clip_ratio/region_mean"] == pytest.approx(
        plain_stats["clip_ratio/region_mean"], abs=1e-6
    )


def test_vision_inputs_follow_their_sequences_with_several_prompts(tiny_model_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    sizes = [(56, 56), (112, 56), (56, 84)]
    examples = [
        data.make_example(
            Image.new("RGB", s, c), dict(question="q", choices=["a", "b"], answer="a"),
            random.Random(0), data.View(784, 50176),
        )
        for s, c in zip(sizes, ["red", "green", "blue"])
    ]
    G = 2
    enc = policy.encode_prompts(processor, examples, G)
    N = len(examples) * G
    batch = policy.Rollout.from_encoding(
        enc, torch.ones(N, 2, dtype=torch.long), torch.ones(N, 2, dtype=torch.long),
        policy.special_tokens(processor).vision_start,
    )
    for start, end in [(0, 2), (1, 4), (2, 6), (5, 6)]:
        part = batch.select(start, end)
        alone = policy.encode_prompts(processor, [examples[i // G] for i in range(start, end)], 1)
        assert torch.equal(part.image_grid_thw, alone["image_grid_thw"])
        assert torch.equal(torch.cat(part.images), torch.cat(alone["images"]))
        assert len(part) == end - start and part.completion_ids.shape[0] == end - start


def test_prompts_are_encoded_once_and_repeated_as_the_processor_would(tiny_model_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    examples = [
        demo.synthetic_dataset(3, seed=5, image_size=s)[i] for i, s in enumerate((56, 84, 112))
    ]
    repeated = processor(
        text=[ex["prompt"] for ex in examples for _ in range(3)],
        images=[ex["image"] for ex in examples for _ in range(3)], padding=True,
        padding_side="left",
        return_tensors="pt",
    )
    encoded = policy.encode_prompts(processor, examples, 3)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(encoded[key], repeated[key]), key
    assert torch.equal(torch.cat(encoded["images"]), repeated["pixel_values"])
    images = encoded["images"]  # a group shares its prompt's tensor: no copy, one encoding
    assert images[0] is images[1] is images[2] and images[2] is not images[3]


def test_greedy_generation_equals_the_repeated_image_path(rollout):
    cfg, model, processor, batch, texts, examples = rollout
    greedy = policy.generation_config(processor, max_new_tokens=8, greedy=True)
    calls, hook = count_vision_calls(model)
    ours, _ = policy.generate(model, processor, examples, greedy, group_size=2)
    hook.remove()
    assert len(calls) == 1  # every image of the batch in one call, each once
    assert torch.equal(ours.completion_ids,  # each image once per sequence there
                       plain_completions(model, processor, examples, 2, greedy))


def test_the_static_cache_generates_what_the_dynamic_one_does(rollout):
    from r1v import decode

    cfg, model, processor, batch, texts, examples = rollout
    greedy = policy.generation_config(processor, max_new_tokens=8, greedy=True)
    ours, _ = policy.generate(model, processor, examples, greedy, group_size=2)
    static = decode.Decoder(model, len(ours), ours.prompt_ids.shape[1] + 8)  # not compiled
    for _ in range(2):  # the second call on the same cache, emptied
        again, _ = policy.generate(model, processor, examples, greedy, group_size=2,
                                   decoder=static)
        assert torch.equal(again.completion_ids, ours.completion_ids)
    assert static.stats() == {"decode_compiles": 0, "decode_graph_breaks": 0}


def test_the_reference_stays_the_initial_model_through_updates(rollout, tiny_model_dir):
    from transformers import Qwen2VLForConditionalGeneration

    cfg, model, processor, batch, texts, examples = rollout
    base = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        initial = base(**batch.model_inputs()).logits                          # (N, P+C, V)
    batch.advantages = torch.tensor([1.0, -1.0] * len(examples))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: 1.0)
    for _ in range(3):
        assert train.update(model, optimizer, scheduler, batch, cfg, PROCS)["nonfinite"] == 0
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(**batch.model_inputs()).logits, initial)  # bit for bit


@pytest.mark.parametrize("train_vision", [False, True])
def test_the_vision_tower_runs_once_per_step_when_frozen(tiny_model_dir, tmp_path, train_vision):
    cfg = tiny_config(tiny_model_dir, tmp_path, micro_batch_size=2, num_iterations=2)
    cfg = train.dataclasses.replace(cfg, train_vision=train_vision)
    model = train.load_model(cfg, torch.device("cpu"))
    processor = models.load_processor(tiny_model_dir)
    examples = [demo.synthetic_dataset(3, seed=1, image_size=56)[i] for i in range(3)]
    calls, hook = count_vision_calls(model)
    batch, _ = train.generate(model, processor, examples, generation(processor, cfg), cfg,
                              eos_ids(processor))
    batch.advantages = torch.tensor([1.0, -1.0] * 3)
    train.add_old_and_ref_logps(model, batch, cfg)  # old (mu 2) and reference log-probs
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: 1.0)
    train.update(model, optimizer, scheduler, batch, cfg, PROCS)
    hook.remove()
    # Trained: generation, then each pass (old, reference, 2 updates) per micro-batch of 2.
    passes = 4 * len(batch) // 2
    assert len(calls) == (1 + passes if train_vision else 1)


def test_update_reports_the_mean_of_its_iterations_stats(rollout, monkeypatch):
    cfg, model, processor, batch, texts, examples = rollout
    cfg = train.dataclasses.replace(cfg, num_iterations=2)
    calls = iter([(0.5, {"kl": 1.0}), (1.5, {"kl": 3.0})])
    monkeypatch.setattr(train, "accumulate_gradients", lambda *args, **kwargs: next(calls))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: 1.0)
    stats = train.update(model, optimizer, scheduler, batch, cfg, PROCS)
    assert stats["kl"] == 2.0 and stats["loss"] == 1.0 and stats["nonfinite"] == 0


def test_liger_kernels_replace_every_norm_mlp_and_the_rotary_embedding(tiny_model_dir,
                                                                        rope_families):
    from liger_kernel.transformers.layer_norm import LigerLayerNorm
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    model = models.load_base_model(tiny_model_dir, torch.device("cpu"))
    text, vision = model.config.text_config, model.config.vision_config
    patched = models.apply_liger_kernels(model)

    def kind(module):
        return getattr(module.forward, "__func__", None)
    forwards = [kind(m) for m in model.modules()]
    layers, depth = text.num_hidden_layers, vision.depth
    assert forwards.count(LigerRMSNorm.forward) == 2 * layers + 1  # + the final norm
    assert forwards.count(LigerSwiGLUMLP.forward) == layers  # the vision MLP is GELU: untouched
    assert forwards.count(LigerLayerNorm.forward) == 2 * depth + 1  # + the merger's
    assert patched == 3 * layers + 2 * depth + 2
    assert rope_families[0].apply_rotary_pos_emb is liger_rotary_pos_emb  # Qwen2-VL's


def test_liger_is_off_by_default_on_cpu(tiny_model_dir, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=1)
    assert cfg.use_liger is None  # decided by the device when the run starts
    monkeypatch.setattr(models, "liger_grpo_loss",
                        lambda *a, **k: pytest.fail("Liger's loss ran on CPU"))
    train.train(cfg)  # one step: the code that picks the default, as a run does
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["use_liger"] is False
    model = train.load_model(train.dataclasses.replace(cfg, use_liger=True), torch.device("cpu"))
    assert not any(hasattr(m, "casting_mode") for m in model.modules())  # no Triton on CPU


def test_update_logs_entropy_and_the_extreme_sequence_clip_ratios(rollout):
    cfg, model, processor, batch, texts, examples = rollout
    batch.advantages = torch.tensor([1.0, -1.0] * len(examples))
    logp = logps(model, batch, cfg)
    batch.old_logp = logp + torch.randn_like(logp) * 0.5  # an off-policy batch: some clipping
    stats = {}
    for size in (2, len(batch)):
        model.zero_grad()
        cut = train.dataclasses.replace(cfg, micro_batch_size=size, beta=0.0)
        _, stats[size] = train.accumulate_gradients(model, batch, cut, len(batch),
                                                    batch.completion_mask.sum())
    cut, whole = stats[2], stats[len(batch)]
    assert 0 < cut["entropy"] == pytest.approx(whole["entropy"], rel=1e-5)
    assert cut["clip_ratio/low_min"] <= cut["clip_ratio/low_mean"]
    assert cut["clip_ratio/high_max"] >= cut["clip_ratio/high_mean"]
    assert cut["clip_ratio/region_mean"] > 0
    # the extremes over sequences (TRL's), whatever the micro-batch size
    assert cut["clip_ratio/low_min"] == whole["clip_ratio/low_min"]
    assert cut["clip_ratio/high_max"] == whole["clip_ratio/high_max"]


# --- the chunked projection (detail 9) ------------------------------------------------------

def _full_logps(hidden, weight, ids, temperature):
    logits = hidden @ weight.T / temperature  # (N, C, V)
    return torch.gather(logits.log_softmax(-1), 2, ids.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
def test_chunked_completion_logps_match_full_logits_in_value_and_gradient(chunk_size):
    torch.manual_seed(0)
    N, C, H, V = 3, 4, 8, 11
    hidden = torch.randn(N, C, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    ids = torch.randint(0, V, (N, C))
    chunked = policy.completion_logps(hidden, weight, ids, temperature=0.7, chunk_size=chunk_size)
    full = _full_logps(hidden, weight, ids, 0.7)
    torch.testing.assert_close(chunked, full)
    upstream = torch.randn(N, C)
    g_chunked = torch.autograd.grad((chunked * upstream).sum(), (hidden, weight))
    g_full = torch.autograd.grad((full * upstream).sum(), (hidden, weight))
    for a, b in zip(g_chunked, g_full):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_entropy_from_the_chunks_equals_the_full_softmax_entropy(chunk_size):
    torch.manual_seed(1)
    hidden = torch.randn(2, 3, 8, requires_grad=True)
    weight, ids = torch.randn(11, 8), torch.randint(0, 11, (2, 3))
    logp, entropy, top1 = policy.completion_logps(hidden, weight, ids, 0.7, chunk_size,
                                                with_stats=True)
    probs = torch.softmax(hidden @ weight.T / 0.7, -1)                          # (N, C, V)
    torch.testing.assert_close(entropy, -(probs * probs.log()).sum(-1))
    assert torch.equal(top1, (probs.argmax(-1) == ids).float())
    torch.testing.assert_close(logp, _full_logps(hidden, weight, ids, 0.7))
    assert not entropy.requires_grad and logp.requires_grad  # a metric, not part of the loss
    # hand-computed: a uniform distribution over V tokens has entropy log V
    flat = policy.completion_logps(torch.zeros(1, 1, 8), weight, ids[:1, :1], with_stats=True)[1]
    torch.testing.assert_close(flat, torch.tensor([[math.log(11)]]))


def test_completion_logps_apply_the_temperature():
    hidden, weight, ids = torch.randn(1, 2, 4), torch.randn(5, 4), torch.tensor([[1, 2]])
    hot = policy.completion_logps(hidden, weight, ids, temperature=2.0)
    torch.testing.assert_close(hot, _full_logps(hidden, weight, ids, 2.0))
    assert not torch.allclose(hot, policy.completion_logps(hidden, weight, ids, temperature=1.0))


# --- sampling is ours; every EOS ends a completion (detail 10) ------------------------------

def copy_of(model_dir, folder, **generation):
    """The model folder with these fields in its generation_config.json."""
    import json
    import shutil

    shutil.copytree(model_dir, folder)
    path = folder / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **generation}))
    return str(folder)


def test_the_checkpoints_generation_config_never_decides_the_sampling(tmp_path, tiny_model_dir):
    """VisualThinker's checkpoint sets top_k 1: every completion of a group would be the same
    (advantages all 0). --top_k 0 turns top-k off; a field left unset is not the checkpoint's."""
    folder = copy_of(tiny_model_dir, tmp_path / "topk1", top_k=1, do_sample=True)
    model = models.load_base_model(folder, torch.device("cpu"))
    processor = models.load_processor(folder)
    examples = [demo.synthetic_dataset(2, seed=3, image_size=56)[i] for i in range(2)]
    for top_k in (0, 50):
        gen = policy.generation_config(processor, max_new_tokens=6, top_k=top_k)
        torch.manual_seed(0)
        batch, _ = policy.generate(model, processor, examples, gen, group_size=8)
        groups = batch.completion_ids.view(2, 8, -1)
        assert all(len({tuple(c.tolist()) for c in group}) > 1 for group in groups), top_k


def test_every_eos_id_the_checkpoint_lists_ends_a_completion(tmp_path, tiny_model_dir):
    examples = [demo.synthetic_dataset(2, seed=3, image_size=56)[i] for i in range(2)]
    processor = models.load_processor(tiny_model_dir)
    model = models.load_base_model(tiny_model_dir, torch.device("cpu"))
    greedy = policy.generation_config(processor, max_new_tokens=6, greedy=True)
    batch, _ = policy.generate(model, processor, examples, greedy)
    first = int(batch.completion_ids[0, 0])  # the token the model writes first
    eos = processor.tokenizer.eos_token_id
    assert first != eos and batch.completion_ids.shape[1] == 6  # it did not stop there
    folder = copy_of(tiny_model_dir, tmp_path / "two_eos", eos_token_id=[eos, first])
    ids = models.eos_ids(folder, processor)
    assert ids == sorted({eos, first})
    batch, _ = policy.generate(model, processor, examples[:1],
                               policy.generation_config(processor, ids, max_new_tokens=6,
                                                        greedy=True))
    assert batch.completion_ids.tolist() == [[first]]  # stopped at the second EOS
    batch.completion_mask = grpo.completion_mask(batch.completion_ids, ids)
    assert batch.completion_mask.tolist() == [[1]]
    assert metrics.completion_lengths(batch, ids) == ([1], [True])  # terminated, not clipped


def test_a_bf16_base_trains_its_vision_tower_in_fp32(tiny_model_dir):
    """On a GPU the base is bf16: --train_vision's copy of the tower trains in fp32 (as the
    adapter does), or AdamW's small updates round away on bf16 weights (a LayerNorm's 1.0 moves
    by 2**-7 at least). The fp32 tower's features go into the bf16 language model."""
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model = models.add_lora(base, 2, 4, train_vision=True, gradient_checkpointing=False)
    tower = {n: p for n, p in model.named_parameters() if p.requires_grad and ".visual." in n}
    assert tower and {p.dtype for p in tower.values()} == {torch.float32}
    before = {n: p.detach().clone() for n, p in tower.items()}
    processor = models.load_processor(tiny_model_dir)
    example = demo.synthetic_dataset(1, seed=1, image_size=56)[0]
    inputs = processor(text=[example["prompt"]], images=[example["image"]], return_tensors="pt")
    optimizer = torch.optim.AdamW(tower.values(), lr=1e-5)
    model(**inputs).logits.float().square().mean().backward()
    optimizer.step()
    for name, p in tower.items():
        moved = p.detach() != before[name]
        assert moved[p.grad != 0].all(), name  # every weight with a gradient moved
    with torch.no_grad(), model.disable_adapter():  # the reference: the bf16 tower, untouched
        model(**inputs)
