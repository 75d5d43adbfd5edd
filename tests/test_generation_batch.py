"""--generation_batch_size: a step's N completions generated in calls of S sequences, each group
whole in one call, so that the KV cache holds S sequences; the Rollout and texts are one call's
(greedy: the same tokens), on the static cache too; the flag checked; the memory plan counts it."""

import json

import pytest
import torch

import train
from r1v import decode, policy
from r1v import model as models
from r1v.cli import UserError
from tests.test_decode import SIZES, examples_of_sizes
from tests.vlm import chat_examples, randomise_lora

CPU = torch.device("cpu")


def lora_model(model_dir):
    model = randomise_lora(models.add_lora(models.load_base_model(model_dir, CPU), 4, 8))
    return model.eval(), models.load_processor(model_dir)


def assert_same_rollout(a, b):
    for name in ("prompt_ids", "prompt_mask", "mm_token_type_ids", "image_grid_thw",
                 "images_per_seq", "completion_ids"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert all(torch.equal(x, y) for x, y in zip(a.images, b.images)) and \
        len(a.images) == len(b.images)
    assert (a.image_features is None) == (b.image_features is None)
    for x, y in zip(a.image_features or [], b.image_features or []):  # the tower in other
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)        # batch shapes


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_calls_of_whole_groups_give_one_calls_rollout(family, tiny_model_dir, tiny_qwen3_dir):
    """Prompts of four lengths (images of four sizes) in calls of one group, two groups, or
    one call: the same padded Rollout, the same greedy tokens and texts."""
    model, processor = lora_model(tiny_model_dir if family == "qwen2_vl" else tiny_qwen3_dir)
    examples = (examples_of_sizes(SIZES) if family == "qwen2_vl" else
                chat_examples(processor, [(56, 56), (96, 64), (128, 96)]))
    gen = policy.generation_config(processor, max_new_tokens=12, greedy=True)
    one, one_texts = policy.generate(model, processor, examples, gen, group_size=2)
    assert len(set(one_texts)) > 1
    for batch_size in (2, 4, 6):
        rollout, texts = policy.generate_in_calls(model, processor, examples, gen, 2, batch_size)
        assert texts == one_texts
        assert_same_rollout(rollout, one)


def test_a_short_last_call_is_filled_to_the_static_caches_shape(tiny_model_dir):
    """5 prompts x 2 in calls of 4 sequences on one compiled cache: calls of 2, 2 and 1 prompts,
    the last filled with a copy that is dropped; one compile, no new cache, one call's tokens."""
    model, processor = lora_model(tiny_model_dir)
    examples = examples_of_sizes([*SIZES, SIZES[0]])
    gen = policy.generation_config(processor, max_new_tokens=10, greedy=True)
    one, one_texts = policy.generate(model, processor, examples, gen, group_size=2)
    decoder = decode.Decoder(model, 4, 200, compile=True, backend="eager")
    made = []
    cache_for = decoder.cache_for
    decoder.cache_for = lambda *a: made.append(a) or cache_for(*a)
    rollout, texts = policy.generate_in_calls(model, processor, examples, gen, 2, 4,
                                              decoder=decoder)
    assert [a[0] for a in made] == [4, 4, 4] and decoder.batch_size == 4
    assert texts == one_texts and len(rollout) == 10
    assert_same_rollout(rollout, one)
    assert decoder.stats() == {"decode_compiles": 1, "decode_graph_breaks": 0}



@pytest.mark.parametrize("batch_size", [0, 4])
def test_a_batch_shorter_than_the_cache_is_filled_to_its_shape(tiny_model_dir, batch_size):
    """--preview_rewards' last batch may hold fewer prompts than the cache was sized for (5 of
    4-prompt batches): filled to the cache's shape, not a new cache and a second compile (on a
    GPU, another minute of CUDA-graph capture in a preview meant to be quick)."""
    model, processor = lora_model(tiny_model_dir)
    examples = examples_of_sizes(SIZES[:1])
    gen = policy.generation_config(processor, max_new_tokens=6, greedy=True)
    one, one_texts = policy.generate(model, processor, examples, gen, group_size=2)
    decoder = decode.Decoder(model, 4, 200, compile=True, backend="eager")
    rollout, texts = policy.generate_in_calls(model, processor, examples, gen, 2, batch_size,
                                              decoder=decoder)
    assert decoder.batch_size == 4 and texts == one_texts and len(rollout) == 2
    assert_same_rollout(rollout, one)
    assert decoder.stats() == {"decode_compiles": 1, "decode_graph_breaks": 0}

def test_the_flag_takes_whole_groups():
    with pytest.raises(UserError, match="--generation_batch_size 12: .* multiple of "
                                        "--num_generations 8"):
        train.parse_config(["--generation_batch_size", "12", "--num_generations", "8"])
    assert train.parse_config(["--generation_batch_size", "16"]).generation_batch_size == 16
    assert "generation_batch_size" in train.RESUMABLE  # it changes nothing a checkpoint keeps


def test_a_run_in_calls_trains_and_sizes_its_cache_by_the_call(tiny_model_dir, tmp_path, capsys):
    """2 steps of 3 prompts x 2 in calls of 2 sequences, on the static cache: a cache of 2
    sequences, every step's 6 completions scored."""
    out = tmp_path / "run"
    train.main(["--model", tiny_model_dir, "--dataset", "synthetic", "--dataset_limit", "12",
                "--prompts_per_step", "3", "--num_generations", "2", "--max_steps", "2",
                "--max_completion_length", "8", "--generation_batch_size", "2",
                "--static_cache", "--output_dir", str(out), "--cpu_threads", "1"])
    assert "a static KV cache of 2 sequences" in capsys.readouterr().out
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [1, 2]
    assert all(row["generated_tokens"] >= 6 for row in logged)
