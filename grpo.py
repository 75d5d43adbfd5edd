"""GRPO as pure tensor functions: one function per equation, no model, tokenizer or I/O.

Shapes, one alphabet throughout the project: B prompts, G completions per prompt (the group),
N = B*G sequences (prompt-major: the G completions of a prompt are consecutive), P prompt length,
C completion length, V vocab, H hidden size. A micro-batch holds n <= N of the N sequences.

Papers: DeepSeekMath (arXiv 2402.03300) for GRPO and the k3 KL; DAPO (arXiv 2503.14476) for
token-level aggregation and clip-higher (eps_high > eps_low); Dr. GRPO (arXiv 2503.20783) for
dropping the std and the constant normaliser.
"""

import math

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALES = ("group", "batch", "none")


def group_advantages(rewards, group_size, scale="group", eps=1e-4):
    """A_i = (r_i - mean_group(r)) / (std + eps)                  (DeepSeekMath eq. 3; detail 1)

    `rewards` (N,) is prompt-major. `scale`: "group" divides by the group's std, "batch" by the std
    over all N, "none" does not divide (Dr. GRPO). The std is the unbiased one (N-1), as in the
    reference library. A group whose rewards are all equal gets advantage exactly 0 (detail 2): its
    numerator is 0, and eps keeps the division finite.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)                                     # (B, G)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)        # (N,) (detail 1)
    if scale == "group":
        std = grouped.std(dim=1) if group_size > 1 else grouped.new_zeros(grouped.shape[0])
        advantages = advantages / (std.repeat_interleave(group_size) + eps)    # (N,) (detail 2)
    elif scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
        advantages = advantages / (std + eps)
    return advantages


def kl_k3(logp, ref_logp):
    """Per-token k3 estimate of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1 (detail 5)

    Unbiased for samples drawn from pi, and never negative (x - 1 - log x >= 0). (N, C) -> (N, C).
    """
    delta = ref_logp - logp                                                    # (N, C)
    return torch.exp(delta) - delta - 1


def clipped_surrogate(log_ratio, advantages, eps_low, eps_high):
    """-min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A), rho = exp(log_ratio)  (detail 4)

    Returns the per-token loss and the masks of tokens clipped below (A < 0) and above (A > 0).
    """
    ratio = torch.exp(log_ratio)                                               # (N, C)
    adv = advantages.unsqueeze(1)                                              # (N, 1)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)                    # (N, C)
    per_token = -torch.min(ratio * adv, clipped * adv)                         # (N, C)
    return per_token, (ratio < 1 - eps_low) & (adv < 0), (ratio > 1 + eps_high) & (adv > 0)


def aggregate(per_token, mask, loss_type, num_sequences, num_tokens=None,
              max_completion_length=None):
    """Reduce a micro-batch's per-token loss (n, C) to a scalar, normalised by WHOLE-batch totals
    (detail 6), so the losses of the micro-batches of a generation batch add up to its loss:

      grpo    sum_i (sum_t l*m / sum_t m) / N                       (DeepSeekMath)
      bnpo    (sum l*m / sum m over this micro-batch) * n / N: the token mean of each micro-batch,
              weighted by its share of the sequences (equal micro-batches: the mean of their
              token means, as the reference library, which normalises bnpo per micro-batch)
      dapo    sum l*m / num_tokens, the completion tokens of the whole batch          (DAPO)
      dr_grpo sum l*m / (N * max_completion_length)                                  (Dr. GRPO)

    N = `num_sequences`. Masked positions are selected out, never multiplied by zero.
    """
    masked = torch.where(mask, per_token, torch.zeros_like(per_token))         # (n, C)
    if loss_type == "grpo":
        return (masked.sum(1) / mask.sum(1).clamp(min=1)).sum() / num_sequences
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1) * mask.shape[0] / num_sequences
    if loss_type == "dapo":
        if num_tokens is None:
            raise ValueError("loss_type='dapo' needs num_tokens: the completion tokens of the "
                             "whole generation batch")
        return masked.sum() / num_tokens
    if max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length")
    return masked.sum() / (num_sequences * max_completion_length)


def policy_loss(logp, old_logp, ref_logp, advantages, completion_mask, beta=0.0, eps_low=0.2,
                eps_high=0.2, loss_type="grpo", max_completion_length=None, num_tokens=None,
                num_sequences=None):
    """The clipped surrogate with a KL penalty, aggregated over tokens as `loss_type` says.

        l_t = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) + beta * kl_k3(logp, ref)

    `logp`, `old_logp`, `ref_logp`, `completion_mask` are (n, C), `advantages` (n,).
    `old_logp=None` means on-policy (detail 3): old_logp = logp.detach(), so rho == 1 in value
    while its gradient is A * grad(logp). `ref_logp=None` or `beta=0` drops the KL term.
    `num_sequences` (default n) and `num_tokens` are the whole generation batch's, see `aggregate`.
    Positions past the mask are replaced before exp(), so a huge log-prob gap there can never
    turn into inf * 0 = NaN, in the loss or its gradient.
    Returns (loss, stats); stats are floats, token means over this micro-batch: kl,
    clip_ratio/low_mean, clip_ratio/high_mean, clip_ratio/region_mean; and the extremes over its
    sequences of each sequence's clipped fraction, as the reference library (TRL 1.16):

        clip_ratio/low_min  = min_i (sum_t m_it [rho_it < 1 - eps_low and A_i < 0]) / sum_t m_it
        clip_ratio/high_max = max_i (sum_t m_it [rho_it > 1 + eps_high and A_i > 0]) / sum_t m_it

    over the sequences i with a token; the min and max of these over micro-batches are the
    batch's, however it is cut.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    mask = completion_mask.bool()                                              # (n, C)
    zero = torch.zeros_like(logp)
    if old_logp is None:
        old_logp = logp.detach()                                               # (detail 3)
    log_ratio = torch.where(mask, logp - old_logp, zero)                       # (n, C)
    per_token, low, high = clipped_surrogate(log_ratio, advantages, eps_low, eps_high)  # (detail 4)
    kl = None
    if ref_logp is not None and beta != 0.0:
        kl = kl_k3(torch.where(mask, logp, zero), torch.where(mask, ref_logp, zero))  # (detail 5)
        per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, loss_type, num_sequences or logp.shape[0], num_tokens,
                     max_completion_length)                                    # (detail 6)
    n_tokens = mask.sum().clamp(min=1)

    def masked_mean(x):
        return (torch.where(mask, x.detach().to(logp.dtype), zero).sum() / n_tokens).item()

    stats = {"kl": masked_mean(kl) if kl is not None else 0.0,
             "clip_ratio/low_mean": masked_mean(low),
             "clip_ratio/high_mean": masked_mean(high),
             "clip_ratio/region_mean": masked_mean(low | high)}
    if mask.any():
        stats.update(clip_extremes(low, high, mask))
    return loss, stats


def clip_extremes(low, high, mask):
    """The lowest fraction of a sequence's tokens clipped below and the highest clipped above,
    over the sequences with a token (policy_loss's equations; `low`, `high`, `mask` (n, C))."""
    lengths = mask.sum(1)                                                      # (n,)

    def per_sequence(x, empty):  # each sequence's fraction of its tokens; `empty` where none
        fraction = (x & mask).sum(1) / lengths.clamp(min=1)                    # (n,)
        return torch.where(lengths > 0, fraction, empty)  # no mask indexing: fixed shapes
    return {"clip_ratio/low_min": per_sequence(low, math.inf).min().item(),
            "clip_ratio/high_max": per_sequence(high, -math.inf).max().item()}


def completion_mask(completion_ids, eos_ids):
    """1 up to and including the first EOS of each row, 0 after it; all 1 if a row has no EOS.
    `eos_ids`: the id, or every id that ends a completion (an Instruct checkpoint has two).

    Built from positions, never by comparing tokens with the pad id (detail 7): with pad == EOS
    (Qwen) a mask from `ids != pad` would drop the EOS itself, and the model would never be
    taught to stop.                                                                     (N, C)
    """
    is_eos = torch.isin(completion_ids, torch.as_tensor(eos_ids, device=completion_ids.device))
    C = completion_ids.shape[1]
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), C)          # (N,)
    positions = torch.arange(C, device=completion_ids.device)                  # (C,)
    return (positions.unsqueeze(0) <= first_eos.unsqueeze(1)).long()   # (N, C) (detail 7)
