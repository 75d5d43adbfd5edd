"""GRPO as pure tensor functions: one function per equation, no model, tokenizer or I/O.

Shapes, one alphabet throughout the project: B prompts, G completions per prompt (the group), N = B*G sequences
(prompt-major: the G completions of a prompt are consecutive), P prompt length, C completion length, V vocab,
H hidden size.

Papers: DeepSeekMath (arXiv 2402.03300) for GRPO and the k3 KL; DAPO (arXiv 2503.14476) for token-level
aggregation and clip-higher (eps_high > eps_low); Dr. GRPO (arXiv 2503.20783) for dropping the std and the
constant normaliser.
"""

import torch
from torch.utils.checkpoint import checkpoint

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALES = ("group", "batch", "none")


def group_advantages(rewards, group_size, scale="group", eps=1e-4):
    """A_i = (r_i - mean_group(r)) / (std + eps)                                   (DeepSeekMath, eq. 3 / GRPO)

    `rewards` (N,) is prompt-major. `scale`: "group" divides by the group's std, "batch" by the std over all N,
    "none" does not divide (Dr. GRPO). The std is the unbiased one (N-1), as in the reference library. A group
    whose rewards are all equal gets advantage exactly 0: its numerator is 0, and eps keeps the division finite.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)                                          # (B, G)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)             # (N,)
    if scale == "group":
        std = grouped.std(dim=1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(rewards)
        advantages = advantages / (std + eps)                                       # (N,)
    elif scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
        advantages = advantages / (std + eps)
    return advantages


def kl_k3(logp, ref_logp):
    """Per-token k3 estimate of KL(pi || pi_ref):  exp(ref - logp) - (ref - logp) - 1  >= 0      (DeepSeekMath)

    Unbiased for samples drawn from pi, and never negative (x - 1 - log x >= 0). Inputs (N, C), output (N, C).
    """
    delta = ref_logp - logp                                                         # (N, C)
    return torch.exp(delta) - delta - 1


def policy_loss(logp, old_logp, ref_logp, advantages, completion_mask, beta=0.0, eps_low=0.2, eps_high=0.2,
                loss_type="grpo", max_completion_length=None, num_tokens=None):
    """The clipped surrogate with a KL penalty, aggregated over tokens as `loss_type` says.

        rho = exp(logp - old_logp)
        l_t = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) + beta * kl_k3(logp, ref_logp)

    `logp`, `old_logp`, `ref_logp`, `completion_mask` are (N, C), `advantages` (N,). `old_logp=None` means
    on-policy: old_logp = logp.detach(), so rho == 1 in value while its gradient is A * grad(logp).
    `ref_logp=None` or `beta=0` drops the KL term. Aggregation (m = completion_mask):
      grpo    mean over sequences of (sum_t l*m / sum_t m)                           (DeepSeekMath)
      bnpo    sum l*m / sum m over this micro-batch
      dapo    sum l*m / num_tokens, num_tokens = completion tokens of the WHOLE generation batch, so the
              micro-batches' losses add up to the token mean over the batch              (DAPO)
      dr_grpo sum l*m / (N * max_completion_length)                                  (Dr. GRPO)
    Returns (loss, stats); stats are floats: kl, clip_ratio/low_mean, clip_ratio/high_mean, clip_ratio/region_mean.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    mask = completion_mask.to(logp.dtype)                                           # (N, C)
    if old_logp is None:
        old_logp = logp.detach()
    ratio = torch.exp(logp - old_logp)                                              # (N, C)
    adv = advantages.unsqueeze(1)                                                   # (N, 1)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)                         # (N, C)
    per_token = -torch.min(ratio * adv, clipped * adv)                              # (N, C)
    kl = None
    if ref_logp is not None and beta != 0.0:
        kl = kl_k3(logp, ref_logp)                                                  # (N, C)
        per_token = per_token + beta * kl

    n_tokens = mask.sum().clamp(min=1.0)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / n_tokens
    elif loss_type == "dapo":
        if num_tokens is None:
            raise ValueError("loss_type='dapo' needs num_tokens: the completion tokens of the whole generation batch")
        loss = (per_token * mask).sum() / num_tokens
    else:  # dr_grpo
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        loss = (per_token * mask).sum() / (logp.shape[0] * max_completion_length)

    def masked_mean(x):
        return ((x * mask).sum() / n_tokens).item()

    low = ((ratio < 1 - eps_low) & (adv < 0)).to(logp.dtype)                        # (N, C)
    high = ((ratio > 1 + eps_high) & (adv > 0)).to(logp.dtype)                      # (N, C)
    stats = {"kl": masked_mean(kl.detach()) if kl is not None else 0.0,
             "clip_ratio/low_mean": masked_mean(low),
             "clip_ratio/high_mean": masked_mean(high),
             "clip_ratio/region_mean": masked_mean(torch.clamp(low + high, max=1.0))}
    return loss, stats


def completion_mask(completion_ids, eos_id):
    """1 up to and including the first EOS of each row, 0 after it; all 1 if a row has no EOS.   (N, C)

    Built from positions, never by comparing tokens with the pad id: with pad == EOS (Qwen) a mask from
    `ids != pad` would drop the EOS itself, and the model would never be taught to stop.
    """
    is_eos = completion_ids == eos_id                                               # (N, C)
    C = completion_ids.shape[1]
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), C)               # (N,)
    positions = torch.arange(C, device=completion_ids.device)                       # (C,)
    return (positions.unsqueeze(0) <= first_eos.unsqueeze(1)).long()                # (N, C)


def _token_logps(hidden, weight, ids, temperature):
    logits = (hidden @ weight.T).float() / temperature                              # (n, V)
    return torch.gather(logits.log_softmax(-1), 1, ids.unsqueeze(1)).squeeze(1)     # (n,)


def completion_logps(hidden, weight, completion_ids, temperature=1.0, chunk_size=1024):
    """log pi(c_t | prompt, c_<t) / at the sampling temperature, for every completion token.        (N, C)

    `hidden` (N, C, H) are the final hidden states at the positions that PREDICT the completion tokens (the last
    prompt position up to the second-last completion position), `weight` (V, H) the output projection. Logits are
    divided by the sampling temperature, as when the tokens were sampled. The vocabulary projection runs on
    `chunk_size` tokens at a time under activation checkpointing, so at most a (chunk_size, V) logits block exists
    at once, in the forward AND the backward pass, instead of an (N, C, V) tensor kept alive for backward.
    """
    N, C, H = hidden.shape
    flat_hidden, flat_ids = hidden.reshape(N * C, H), completion_ids.reshape(N * C)  # (N*C, H), (N*C,)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    chunks = []
    for start in range(0, N * C, chunk_size):
        h, ids = flat_hidden[start:start + chunk_size], flat_ids[start:start + chunk_size]
        if needs_grad:
            chunks.append(checkpoint(_token_logps, h, weight, ids, temperature, use_reentrant=False))
        else:
            chunks.append(_token_logps(h, weight, ids, temperature))
    return torch.cat(chunks).view(N, C)                                             # (N, C)

