"""r1v/decode.py: the decode step on one static KV cache a run, compiled once (torch's "eager"
backend: dynamo's graphs and guards as inductor sees them, without its minutes of codegen),
equal to eager generation; the compile and graph-break counters in metrics.jsonl."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import demo
import eval as evaluation
import train
from r1v import decode, policy
from r1v import model as models

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(56, 56), (84, 56), (112, 84), (140, 112)]  # four prompt lengths: 4, 6, 12, 20 tokens


def lora_model(model_dir, seed=0):
    """The model with a LoRA adapter that changes its outputs (lora_B is 0 when fresh)."""
    torch.manual_seed(seed)
    model = models.add_lora(models.load_base_model(model_dir, torch.device("cpu")), 8, 16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model, models.load_processor(model_dir)


def examples_of_sizes(sizes, seed=1):
    rows = demo.synthetic_dataset(len(sizes), seed=seed, image_size=56)
    return [{**rows[i], "image": rows[i]["image"].resize(size)} for i, size in enumerate(sizes)]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_compiled_greedy_decoding_gives_the_eager_tokens_with_one_compile(
        family, tiny_model_dir, tiny_qwen25_dir):
    model_dir = tiny_model_dir if family == "qwen2_vl" else tiny_qwen25_dir
    model, processor = lora_model(model_dir)
    gen = policy.generation_config(processor, max_new_tokens=10, greedy=True)
    decoder = decode.Decoder(model, 4, 200, compile=True, backend="eager")
    for sizes in (SIZES[:2], SIZES[2:], SIZES[1:3]):  # other prompt lengths each call
        examples = examples_of_sizes(sizes)
        eager, eager_texts = policy.generate(model, processor, examples, gen, group_size=2)
        compiled, texts = policy.generate(model, processor, examples, gen, group_size=2,
                                          decoder=decoder)
        assert torch.equal(compiled.completion_ids, eager.completion_ids) and texts == eager_texts
        assert len(set(texts)) > 1  # the adapter makes the completions differ
    assert decoder.stats() == {"decode_compiles": 1, "decode_graph_breaks": 0}


def test_sampling_through_the_compiled_step_draws_the_same_tokens(tiny_model_dir):
    """Sampling happens outside the compiled step, from its logits: with the same seed and the
    same logits the same tokens (on CPU the logits are the same bits; see README)."""
    model, processor = lora_model(tiny_model_dir)
    gen = policy.generation_config(processor, max_new_tokens=10)
    decoder = decode.Decoder(model, 8, 200, compile=True, backend="eager")
    examples = examples_of_sizes(SIZES[:2])
    torch.manual_seed(3)
    eager, _ = policy.generate(model, processor, examples, gen, group_size=4)
    torch.manual_seed(3)
    compiled, _ = policy.generate(model, processor, examples, gen, group_size=4, decoder=decoder)
    assert torch.equal(compiled.completion_ids, eager.completion_ids)
    assert decoder.stats()["decode_compiles"] == 1


def test_a_batch_the_cache_cannot_hold_recompiles_with_a_warning(tiny_model_dir, capsys):
    model, processor = lora_model(tiny_model_dir)
    gen = policy.generation_config(processor, max_new_tokens=4, greedy=True)
    decoder = decode.Decoder(model, 2, 200, compile=True, backend="eager")
    policy.generate(model, processor, examples_of_sizes(SIZES[:1]), gen, 2, decoder=decoder)
    assert decoder.stats()["decode_compiles"] == 1 and "warning" not in capsys.readouterr().out
    policy.generate(model, processor, examples_of_sizes(SIZES[:2]), gen, 2, decoder=decoder)
    out = capsys.readouterr().out
    assert decoder.stats()["decode_compiles"] == 2
    assert "cache is made again for 4 sequences" in out and "compiled again (compile 2)" in out


def test_the_compiled_decode_leaves_training_passes_eager(tiny_model_dir):
    """The dispatch sends only one-token calls on the run's cache to the compiled step."""
    model, processor = lora_model(tiny_model_dir)
    decoder = decode.Decoder(model, 2, 200, compile=True, backend="eager")
    rollout, _ = policy.generate(model, processor, examples_of_sizes(SIZES[:1]),
                                 policy.generation_config(processor, max_new_tokens=3), 2,
                                 decoder=decoder)
    rollout.completion_mask = torch.ones_like(rollout.completion_ids)
    compiles = decoder.stats()["decode_compiles"]
    logp = policy.token_logps(model, rollout)
    logp.sum().backward()  # the update's pass: through the eager forward, with gradients
    assert decoder.stats()["decode_compiles"] == compiles == 1
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)


def write_rows(folder, sizes, count):
    """A JSONL task whose images have the given sizes, in turn (so prompts of as many lengths)."""
    lines = []
    for i in range(count):
        color = ["red", "green", "blue", "yellow"][i % 4]
        Image.new("RGB", sizes[i % len(sizes)], color).save(folder / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "question": "What color is the background?",
                                 "choices": ["red", "green", "blue", "yellow"], "answer": color}))
    path = folder / "task.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_run_compiles_the_decode_step_once_over_prompt_lengths_and_evaluations(
        tiny_model_dir, tmp_path):
    rows, held = tmp_path / "rows", tmp_path / "held"
    rows.mkdir(), held.mkdir()
    out = tmp_path / "run"
    train.main(["--model", tiny_model_dir, "--dataset", str(write_rows(rows, SIZES, 16)),
                "--eval_dataset", str(write_rows(held, SIZES[::-1], 5)), "--eval_steps", "2",
                "--eval_limit", "5", "--output_dir", str(out), "--num_generations", "2",
                "--prompts_per_step", "2", "--micro_batch_size", "4", "--max_steps", "6",
                "--max_completion_length", "6", "--lora_r", "4", "--lora_alpha", "8",
                "--save_steps", "0", "--compile_decode", "--compile_backend", "eager"])
    logged = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5, 6]
    assert all(m["decode_compiles"] == 1 and m["decode_graph_breaks"] == 0 for m in logged)
    assert all("eval/accuracy" in m for m in logged[1::2])
    for m in logged:  # the phases add up to no more than the step
        phases = m["time/generation"] + m["time/logp"] + m["time/update"]
        assert 0 < phases <= m["step_time"] and m["time/generation"] > 0
        assert m["generated_tokens"] > 0
        assert m["tokens_per_second"] == pytest.approx(m["generated_tokens"]
                                                       / m["time/generation"])
    assert json.loads((out / "config.json").read_text())["compile_decode"] is True


def test_phase_times_are_logged_without_generation_too(tiny_model_dir, tmp_path):
    out = tmp_path / "sft"
    train.main(["--model", tiny_model_dir, "--dataset", "synthetic", "--dataset_limit", "8",
                "--synthetic_image_size", "56", "--objective", "sft", "--output_dir", str(out),
                "--prompts_per_step", "2", "--max_steps", "2", "--lora_r", "4",
                "--lora_alpha", "8"])
    logged = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    for m in logged:
        assert m["time/generation"] == 0 and m["time/logp"] == 0 and m["time/update"] > 0
        assert m["generated_tokens"] == 0 and m["tokens_per_second"] == 0
        assert m["decode_compiles"] == 0 and m["decode_graph_breaks"] == 0


def test_eval_predictions_are_the_same_compiled_or_not(tiny_model_dir, tmp_path):
    model, processor = lora_model(tiny_model_dir)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    common = ["--model", tiny_model_dir, "--adapter", str(adapter), "--dataset", "synthetic",
              "--synthetic_image_size", "56", "--limit", "7", "--batch_size", "3",
              "--max_new_tokens", "6"]
    eager = evaluation.main(common + ["--output_dir", str(tmp_path / "eager")])
    compiled = evaluation.main(common + ["--output_dir", str(tmp_path / "compiled"),
                                         "--compile_decode", "--compile_backend", "eager"])
    assert eager == compiled

    def responses(folder):
        return [json.loads(line)["response"] for line in (folder / "predictions.jsonl").open()]
    assert responses(tmp_path / "eager") == responses(tmp_path / "compiled")
    assert len(set(responses(tmp_path / "eager"))) > 1


def test_a_compiler_that_fails_leaves_the_decode_eager_and_says_so(tiny_model_dir, capsys):
    model, processor = lora_model(tiny_model_dir)
    gen = policy.generation_config(processor, max_new_tokens=6, greedy=True)
    examples = examples_of_sizes(SIZES[:2])
    eager, _ = policy.generate(model, processor, examples, gen, 2)

    def broken(graph, example_inputs):
        raise RuntimeError("no C++ compiler found\nmore lines")
    decoder = decode.Decoder(model, 4, 200, compile=True, backend=broken)
    for _ in range(2):
        again, _ = policy.generate(model, processor, examples, gen, 2, decoder=decoder)
        assert torch.equal(again.completion_ids, eager.completion_ids)
    out = capsys.readouterr().out
    assert out.count("could not be compiled") == 1 and "no C++ compiler found" in out
    assert decoder.stats() == {"decode_compiles": 0, "decode_graph_breaks": 0}


def test_cudagraphs_on_a_cpu_is_one_line(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "train.py", "--demo", "--compile_decode",
                           "--compile_backend", "cudagraphs", "--output_dir", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: --compile_backend cudagraphs needs a CUDA GPU; on a CPU use inductor, aot_eager "
        "or eager"]
    assert not (tmp_path / "o").exists()


def test_a_prefill_whose_last_chunk_is_one_token_stays_eager(tiny_model_dir):
    """The dispatch counts the prompt's tokens: a prefill chunk of one token (the prompt one
    longer than a multiple of --prefill_chunk_size) is not a decode step, and compiles nothing."""
    model, processor = lora_model(tiny_model_dir)
    examples = examples_of_sizes(SIZES[:2])
    P = policy.encode_prompts(processor, examples, 1)["input_ids"].shape[1]
    whole = policy.generation_config(processor, max_new_tokens=6, greedy=True)
    chunked = policy.generation_config(processor, max_new_tokens=6, greedy=True,
                                       prefill_chunk_size=P - 1)
    decoder = decode.Decoder(model, 4, 200, compile=True, backend="eager")
    eager, _ = policy.generate(model, processor, examples, whole, 2)
    for gen in (whole, chunked, whole):
        again, _ = policy.generate(model, processor, examples, gen, 2, decoder=decoder)
        assert torch.equal(again.completion_ids, eager.completion_ids)
    assert decoder.stats()["decode_compiles"] == 1


def test_eval_fills_its_last_batch_to_the_cache_it_made(tiny_model_dir, tmp_path, capsys):
    """3 items, --batch_size 16: a cache of 3 sequences, and every call fits it."""
    model, processor = lora_model(tiny_model_dir)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    evaluation.main(["--model", tiny_model_dir, "--adapter", str(adapter), "--dataset",
                     "synthetic", "--synthetic_image_size", "56", "--limit", "3",
                     "--batch_size", "16", "--max_new_tokens", "4", "--compile_decode",
                     "--compile_backend", "eager", "--output_dir", str(tmp_path / "e")])
    out = capsys.readouterr().out
    assert "a static KV cache of 3 sequences" in out and "made again" not in out
