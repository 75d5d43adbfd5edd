"""One update of the tiny model on a fixed batch of 8 sequences, by as many processes as launched
it: `python tests/one_update.py MODEL OUT` is one, `torchrun --nproc_per_node 2 ...` two. Each
process takes its share of the batch (Processes.share) and calls train.update, as train.py does;
the first saves, per case, the gradient (the weights' change under SGD at learning rate 1, no
clipping) and the stats, for tests/test_processes.py to compare."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
import demo  # noqa: E402
import train  # noqa: E402
from r1v import model as models  # noqa: E402
from r1v import policy, processes  # noqa: E402

CASES = {  # the micro-batch of 3 cuts one process's 8 and two processes' 4 + 4 differently
    "grpo": dict(beta=0.04),
    "dapo+liger": dict(beta=0.04, loss_type="dapo", use_liger=True),
    "qlora": dict(beta=0.04, load_in_4bit=True),
    "sft": dict(objective="sft"),
}


def batch(model_dir, processor, model):
    """4 prompts x 2 completions of different lengths, random advantages, and the reference's
    log-probs under a perturbed adapter (so that the KL term has a gradient)."""
    view = data.model_view(models.load_config(model_dir), processor, "r1", 0, 56 * 56)
    rows = demo.synthetic_dataset(4, seed=0, tasks=("color",), image_size=56, view=view)
    examples = [rows[i // 2] for i in range(8)]
    texts = [f"</think> <answer> {' '.join(ex['choices'][:1 + i % 3])} </answer>"
             for i, ex in enumerate(examples)]
    rollout = policy.answer_rollout(processor, examples, texts)
    rollout.advantages = torch.randn(8, generator=torch.Generator().manual_seed(1))   # (N,)
    with model.disable_adapter():
        rollout.ref_logp = policy.rollout_logps(model, rollout, 8)                    # (N, C)
    return rollout


def main(model_dir, out):
    procs = processes.Processes(None)
    results = {}
    for name, extra in CASES.items():
        cfg = train.Config(model=model_dir, dataset="synthetic", num_generations=2,
                           prompts_per_step=4, micro_batch_size=3, lora_r=4, lora_alpha=8,
                           gradient_checkpointing=False, max_grad_norm=1e9, **extra)
        torch.manual_seed(0)
        model = train.load_model(cfg, torch.device("cpu"))
        processor = models.load_processor(model_dir)
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            for p in params:  # LoRA's B starts at zero: move off the reference model
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
        rollout = batch(model_dir, processor, model)
        mine = procs.share(range(len(rollout)))
        before = [p.detach().clone() for p in params]
        optimizer = torch.optim.SGD(params, lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        stats = train.update(model, optimizer, scheduler, rollout.select(mine.start, mine.stop),
                             cfg, procs)
        results[name] = {"grads": [b - p.detach() for b, p in zip(before, params)],
                         "stats": stats}
    if procs.main:
        torch.save(results, out)
    procs.accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:])
