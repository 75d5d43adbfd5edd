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
    decay goes on from the rate it had reached to 0 at the new last update, or, when it had
    reached 0 (a finished run extended), decays again from the peak: else nothing would train."""
    warmup, knot = int(warmup_ratio * total), None
    if state and "schedule" in state:
        saved, done = state["schedule"], state["scheduler"]["last_epoch"]
        warmup, knot = saved["warmup"], saved["knot"]
        if saved["total"] != total and kind == "linear" and warmup <= done < total:
            knot = (done, lr_factor(done, warmup, saved["total"], "linear", knot))
            how = f"from {knot[1]:.3g} x its peak" if knot[1] else "again from its peak"
            knot = (done, knot[1] or 1.0)
            tqdm.write(f"note: the learning rate decays {how} to 0 over the {total - done} "
                       f"updates left (the checkpoint's run: {saved['total']} updates)")
    schedule = {"warmup": warmup, "total": total, "knot": knot}
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda index: lr_factor(
        index, warmup, total, kind, knot)), schedule


def continue_schedule(scheduler):
    """After a checkpoint's optimizer and scheduler states are loaded: each rate is the
    schedule's at the update reached, which a new horizon can change (an extended finished
    run's 0 becomes the peak), so the rate logged is the one used."""
    groups = scheduler.optimizer.param_groups
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() returns
