"""Several processes (detail 15), the --report_to tracker, and Ctrl-C or SIGTERM.

`accelerate launch` or `torchrun` starts one copy of train.py per GPU (or CPU process). Each
takes its share of the step's prompts, generates and scores their completions, and the update
sums the gradients over the processes. With one process, every method here is the identity.
"""

import contextlib
import signal
import time
import warnings

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, gather_object, reduce
from tqdm import tqdm

from r1v.cli import UserError


def share(items, rank, world):
    """Process `rank`'s contiguous share of `items` (the first shares one longer when uneven): a
    prompt's G completions stay on the process that got the prompt."""
    size, extra = divmod(len(items), world)
    start = rank * size + min(rank, extra)
    return items[start:start + size + (rank < extra)]


class Processes:
    """This process among the others: one Accelerator, joined to them under a launcher (NCCL on
    GPUs, gloo on CPU), alone otherwise; it holds the --report_to tracker."""

    def __init__(self, project_dir=None, report_to="none", prompts_per_step=None):
        with warnings.catch_warnings():  # a tracker not installed: start_tracker's error says it
            warnings.filterwarnings("ignore", "`log_with=")
            self.accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                                           project_dir=project_dir,
                                           log_with=None if report_to == "none" else report_to)
        self.device, self.rank = self.accelerator.device, self.accelerator.process_index
        self.world, self.main = self.accelerator.num_processes, self.accelerator.is_main_process
        if prompts_per_step and prompts_per_step % self.world:
            raise UserError(f"--prompts_per_step {prompts_per_step} does not split over "
                            f"{self.world} processes (each takes the same number of whole "
                            "prompts): use a multiple of the number of processes")

    def share(self, items):
        return share(items, self.rank, self.world)

    def gather(self, value):
        """Every process's `value`, in process order (a list, one item a process)."""
        return gather_object([value])

    def sum(self, values):
        """Numbers (or tensors) summed over the processes, as a list of tensors."""
        tensors = [torch.as_tensor(v, device=self.device) for v in values]
        return reduce(tensors, "sum") if self.world > 1 else tensors

    def sum_gradients(self, params):
        """Each gradient becomes its sum over the processes: the losses were normalised by the
        whole batch's totals, so the sum is the one-process gradient (detail 15). DDP would do it
        during the backward, but the policy runs through generate, the inner model (for the
        chunked projection) and disable_adapter, which a DDP wrapper does not see; one sum per
        update is the same arithmetic."""
        if self.world > 1:
            for p in params:
                if p.grad is None:  # the same collectives on every process
                    p.grad = torch.zeros_like(p)
                p.grad = reduce(p.grad, "sum")

    def start_equal(self, params):
        """Process 0's trainable weights on every process. The seed makes them equal already;
        this is DDP's guarantee, so that summed gradients move one and the same model."""
        if self.world > 1:
            for p in params:
                broadcast(p.data)

    def start_tracker(self, report_to, config, out, start_step):
        """--report_to's run: the config as its hyper-parameters; tensorboard's event files in
        OUTPUT_DIR/r1v, where a resumed run drops what was logged after its checkpoint."""
        if report_to == "none":
            return
        if not self.accelerator.log_with:  # accelerate drops one not installed, and logs nowhere
            raise UserError(f"--report_to {report_to}: {report_to} is not installed (pip install "
                            f"{report_to}), so nothing would be logged there")
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)  # tensorboard's
                   for k, v in config.items()}
        try:
            self.accelerator.init_trackers("r1v", hparams, init_kwargs={
                "tensorboard": {"purge_step": start_step + 1},
                "wandb": {"name": out.name, "dir": str(out)}})
        except Exception as e:  # wandb without a login, a tracker's own checks
            raise UserError(f"--report_to {report_to}: cannot start it ({e}); for wandb: "
                            "`wandb login`, or WANDB_MODE=offline") from e


# Stats that are extremes over the batch's sequences (grpo.policy_loss): the extreme of the
# extremes of its parts, micro-batches or processes.
EXTREMES = {"clip_ratio/low_min": min, "clip_ratio/high_max": max}


def gather_stats(procs, loss, stats):
    """The whole batch's loss and stats from the processes' shares: each is a share of a
    whole-batch mean, so they add up; the clip ratios' extremes are the extremes."""
    shares = procs.gather((loss, stats))
    return (sum(loss for loss, _ in shares),
            {k: EXTREMES.get(k, sum)(s[k] for _, s in shares) for k in stats})


@contextlib.contextmanager
def stop_on_signals(main_process=True):
    """While inside, the first Ctrl-C (SIGINT) or SIGTERM (a cluster's preemption, `kill`) only
    sets a flag: the loop finishes its step, saves and exits with 128 + the signal's number; a
    second one, a second or more later, stops at once. (Under a launcher each process gets the
    signal twice at once: from the terminal or the scheduler, and forwarded by the launcher.)"""
    stop = {"requested": False, "at": 0.0, "status": 130}
    names = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def handle(signum, _):
        if stop["requested"]:
            if time.time() - stop["at"] >= 1.0:
                raise KeyboardInterrupt
            return
        stop.update(requested=True, at=time.time(), status=128 + signum)
        if main_process:
            tqdm.write(f"{names[signum]}: stopping after this step and saving a checkpoint "
                       f"({names[signum]} again to stop at once, unsaved)")

    previous = {signum: signal.signal(signum, handle) for signum in names}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
