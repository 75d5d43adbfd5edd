"""The trainer's infrastructure, one concern a module; a student reading GRPO can skip it.

    cli         a dataclass as the command line; user errors as one line
    flags       the flags that are not the algorithm's (model, data, run folder, logging, eval.py)
    model       loading: config, processor, base weights, QLoRA, LoRA; Liger's kernels and loss
    policy      prompts encoded, one batched generate (or a few calls), log-probs
    rollout     the Rollout: a generation batch's tensors, micro-batches, the forward's inputs
    rows        a dataset's stored rows, read lazily and checked
    images      images opened and verified, decoded upright in RGB, sized in visual tokens
    jsonl       a user's task as a JSONL file, rows kept in the file by byte offset
    hub         hub datasets: SAT, RefCOCO/+/g, CV-Bench
    grounding   boxes: VLM-R1's questions, frames, checks, IoU, COCO AP
    answers     what a completion answers: an option, a box, detections
    metrics     what a step logs, the "aha" reflection phrases, eval.py's table
    processes   several processes (torchrun, accelerate launch), trackers, Ctrl-C and SIGTERM
    runs        run folders (locked), logs, atomic writes, the hashes of a run's inputs
    checkpoints checkpoints written atomically, read back for an exact resume
    adapters    an adapter folder checked whole and fitting its base model
    schedule    the learning rate's warm-up and decay, by step
    memory      --plan_memory: a step's CUDA memory from the config alone, phase by phase
    fakes       the fake-tensor machinery the plan runs a step on
    synthetic   the offline demo's rows of coloured shapes
    tiny        tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL models, offline tokenizers
"""

import logging

# bitsandbytes (imported by peft) logs a warning at import on CPUs with AVX512-BF16 when it
# cannot fetch a kernel from the hub; its fallback works, and the line would break our one-line
# errors. Quieted before any module of ours imports peft.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
