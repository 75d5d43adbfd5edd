"""Qwen2.5-VL beside Qwen2-VL, on a tiny random Qwen2.5-VL: the family comes from the config,
LoRA stays on the language model (its vision blocks have gate/up/down_proj too), the reference
under disable_adapter, generation and log-probs over images of different sizes, QLoRA."""

import json

import pytest
import torch

import demo
import grpo
from r1v import model as models
from r1v import policy, tiny
from r1v.cli import UserError
from tests.vlm import chat_examples, fixed_rollout, randomise_lora

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def qwen25_dir(tmp_path_factory):
    """A tiny random Qwen2.5-VL (an Instruct model: its processor has a chat template), in a
    folder whose name does not say which family it is."""
    folder = tmp_path_factory.mktemp("tiny-vlm")
    return str(tiny.build_tiny_model(folder, demo.synthetic_vocabulary(), family="qwen2_5_vl"))


@pytest.fixture(scope="module")
def lora_model(qwen25_dir):
    lora = randomise_lora(models.add_lora(models.load_base_model(qwen25_dir, CPU), r=4, alpha=8))
    return lora.eval(), models.load_processor(qwen25_dir)


def test_model_family_comes_from_the_config(qwen25_dir, tiny_model_dir, tmp_path):
    assert models.load_config(qwen25_dir).model_type == "qwen2_5_vl"
    assert models.load_config(tiny_model_dir).model_type == "qwen2_vl"
    other = tmp_path / "Qwen2.5-VL-3B-Instruct"  # the name says Qwen2.5-VL, the config does not
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match=r"model_type 'llama' is not supported.*qwen2_5_vl"):
        models.load_config(str(other))
    (other / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot load its config"):
        models.load_config(str(other), "--ref_model")


def test_chat_template_survives_save_and_reload(qwen25_dir):
    processor = models.load_processor(qwen25_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hello"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hello<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_load_base_model_builds_the_familys_class(qwen25_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    assert type(models.load_base_model(qwen25_dir, CPU)) is Qwen2_5_VLForConditionalGeneration
    assert isinstance(models.load_processor(qwen25_dir), Qwen2_5_VLProcessor)


def test_lora_is_on_the_language_model_only(lora_model):
    model, processor = lora_model
    names = [n for n, _ in model.named_modules()]
    # The vision blocks have the projection names LM_LORA_TARGETS lists: the test means something.
    assert any("visual" in n and n.endswith("mlp.gate_proj") for n in names)
    lora = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert lora and not any("visual" in n for n in lora)
    assert all(".language_model.layers." in n for n in lora)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def generate(model, processor, examples, gen, group_size):
    """policy.generate, and the completion mask the trainer makes (detail 7)."""
    batch, texts = policy.generate(model, processor, examples, gen, group_size)
    batch.completion_mask = grpo.completion_mask(batch.completion_ids,
                                                 models.special_tokens(processor).eos)
    return batch, texts


def test_disable_adapter_gives_exactly_the_base_logits(lora_model, qwen25_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model, processor = lora_model
    batch = fixed_rollout(processor, chat_examples(processor, [(56, 56), (112, 84)]))
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen25_dir).eval()
    with torch.no_grad():
        expected = base(**batch.model_inputs()).logits                        # (N, P+C, V)
        with model.disable_adapter():
            ref = model(**batch.model_inputs()).logits
        adapted = model(**batch.model_inputs()).logits
    assert torch.equal(ref, expected)
    assert not torch.allclose(adapted, expected, atol=1e-3)


def test_prompts_are_encoded_once_and_repeated_as_the_processor_would(lora_model):
    model, processor = lora_model
    examples = chat_examples(processor, [(56, 56), (84, 112)])
    repeated = processor(text=[ex["prompt"] for ex in examples for _ in range(2)],
                         images=[ex["image"] for ex in examples for _ in range(2)],
                         padding=True, padding_side="left", return_tensors="pt")
    encoded = policy.encode_prompts(processor, examples, 2)
    # The forward inputs for images are Qwen2-VL's: no second_per_grid_ts (videos only).
    assert set(repeated) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values",
                             "image_grid_thw"}
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(encoded[key], repeated[key]), key
    assert torch.equal(torch.cat(encoded["images"]), repeated["pixel_values"])


def test_generate_and_micro_batches_give_the_full_batch_logps(lora_model):
    model, processor = lora_model
    examples = chat_examples(processor, [(56, 56), (112, 84)])  # 4 and 12 visual tokens
    gen = policy.generation_config(processor, max_new_tokens=5)
    torch.manual_seed(0)
    batch, texts = generate(model, processor, examples, gen, group_size=2)
    assert len(batch) == len(texts) == 4 and batch.images_per_seq.tolist() == [1] * 4
    assert batch.image_grid_thw.tolist() == [[1, 4, 4], [1, 4, 4], [1, 6, 8], [1, 6, 8]]
    full = policy.rollout_logps(model, batch, micro_batch_size=4)              # (N, C)
    mask = batch.completion_mask.bool()
    assert torch.isfinite(full[mask]).all()
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits                         # (N, P+C, V)
    P, C = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    own = logits[:, P - 1:P + C - 1].log_softmax(-1).gather(
        2, batch.completion_ids.unsqueeze(-1)).squeeze(-1)                     # (N, C)
    torch.testing.assert_close(full[mask], own[mask], atol=1e-5, rtol=1e-5)
    for size in (1, 2, 3):  # 3: a micro-batch that cuts a group in two
        torch.testing.assert_close(policy.rollout_logps(model, batch, size)[mask], full[mask],
                                   atol=1e-5, rtol=1e-5)


def test_qlora_keeps_the_vision_tower_unquantised_and_trains(qwen25_dir):
    import bitsandbytes as bnb

    model = models.load_base_model(qwen25_dir, CPU, load_in_4bit=True)
    processor = models.load_processor(qwen25_dir)
    four_bit = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and all(".language_model." in n for n in four_bit)
    assert not any("visual" in n or "lm_head" in n for n in four_bit)
    model = randomise_lora(models.add_lora(model, r=4, alpha=8))
    examples = chat_examples(processor, [(56, 56), (84, 56)])
    torch.manual_seed(0)
    batch, _ = generate(model, processor, examples,
                               policy.generation_config(processor, max_new_tokens=3), 2)
    model.train()
    logp = policy.token_logps(model, batch)                                    # (N, C)
    (logp * batch.completion_mask).sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
