"""The learning-rate schedule: linear warmup, then a linear decay to 0 (the paper's) or constant;
a resumed run continues its checkpoint's, also when its horizon (--max_steps) changed."""

import torch
from tqdm import tqdm


def lr_factor(index, warmup, total, kind, knot=None):
    """The peak learning rate's multiplier at optimizer update `index` (0-based): linear warmup
    from 1/warmup, then constant or a linear decay to 0 at update `total`, from 1 at the end of
    the warmup, or from `knot` (update, multiplier) for a resumed run whose horizon changed."""
    if index < warmup:
        return (index + 1) / warmup
    start, factor = knot or (warmup, 1.0)
    return 1.0 if kind == "constant" else max(0.0, factor * (total - index) / (total - start))


def lr_schedule(optimizer, kind, warmup_ratio, total, state=None):
    """The learning-rate schedule over `total` updates, and what a checkpoint keeps of it. A
    resumed run continues its checkpoint's; if its horizon changed (--max_steps), the linear
    decay goes on from the rate it had reached to 0 at the new last update."""
    warmup, knot = int(warmup_ratio * total), None
    if state and "schedule" in state:
        saved, done = state["schedule"], state["scheduler"]["last_epoch"]
        warmup, knot = saved["warmup"], saved["knot"]
        if saved["total"] != total and kind == "linear" and warmup <= done < total:
            knot = (done, lr_factor(done, warmup, saved["total"], "linear", knot))
            tqdm.write(f"note: the learning rate decays from {knot[1]:.3g} x its peak to 0 over "
                       f"the {total - done} updates left (the checkpoint's run: "
                       f"{saved['total']} updates)")
    schedule = {"warmup": warmup, "total": total, "knot": knot}
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda index: lr_factor(
        index, warmup, total, kind, knot)), schedule
