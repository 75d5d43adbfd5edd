"""grpo.py on hand-computed numbers."""

import math

import pytest
import torch

import grpo


def test_group_advantages_group_scale_uses_unbiased_std_and_zero_std_groups_get_zero():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = grpo.group_advantages(rewards, group_size=4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)  # group std (N-1) of [1,0,0,1] is sqrt(1/3)
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]))
    assert not torch.isnan(adv).any()


def test_group_advantages_batch_and_none_scales():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    centred = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    batch_std = math.sqrt(5.5 / 7)  # mean 1.25, sum of squared deviations 5.5
    torch.testing.assert_close(
        grpo.group_advantages(rewards, 4, scale="batch"), centred / (batch_std + 1e-4)
    )
    torch.testing.assert_close(grpo.group_advantages(rewards, 4, scale="none"), centred)


def test_group_advantages_all_equal_batch_is_zero_not_nan():
    for scale in grpo.SCALES:
        adv = grpo.group_advantages(torch.ones(6), 3, scale=scale)
        assert torch.equal(adv, torch.zeros(6))


def test_group_advantages_rejects_ragged_groups_and_unknown_scale():
    with pytest.raises(ValueError, match="groups of 4"):
        grpo.group_advantages(torch.ones(6), 4)
    with pytest.raises(ValueError, match="scale"):
        grpo.group_advantages(torch.ones(4), 2, scale="std")


def test_kl_k3_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    # delta = log(0.5): 0.5 - log(0.5) - 1 = 0.193147...; equal log-probs give exactly 0
    torch.testing.assert_close(grpo.kl_k3(logp, ref), torch.tensor([[0.5 + math.log(2) - 1, 0.0]]))
    assert (grpo.kl_k3(torch.randn(4, 5), torch.randn(4, 5)) >= 0).all()


def _ragged():
    logp = torch.log(torch.tensor([[0.5, 0.4, 0.3], [0.2, 0.9, 0.9]])).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    return logp, mask, torch.tensor([2.0, -1.0])


@pytest.mark.parametrize(
    "loss_type,kwargs,expected",
    [
        ("grpo", {}, (-2.0 + 1.0) / 2),  # per-sequence means -2 and +1, then their mean
        ("bnpo", {}, (-2 - 2 + 1) / 3),  # token mean over the micro-batch
        ("dr_grpo", {"max_completion_length": 4}, (-2 - 2 + 1) / (2 * 4)),
        ("dapo", {"num_tokens": 6}, (-2 - 2 + 1) / 6),  # normalised by the whole generation batch
    ],
)
def test_policy_loss_aggregations_on_ragged_mask(loss_type, kwargs, expected):
    logp, mask, adv = _ragged()
    loss, stats = grpo.policy_loss(logp, None, None, adv, mask, loss_type=loss_type, **kwargs)
    assert loss.item() == pytest.approx(expected)
    assert (
        stats["kl"] == 0.0
        and stats["clip_ratio/low_mean"] == 0.0
        and stats["clip_ratio/high_mean"] == 0.0
    )


def test_on_policy_gradient_is_advantage_over_length_and_masked_tokens_get_none():
    logp, mask, adv = _ragged()
    loss, _ = grpo.policy_loss(logp, None, None, adv, mask)
    loss.backward()
    # d/dlogp_t of mean_i (1/|m_i|) sum_t -A_i * rho_t, rho == 1: -A_i / (|m_i| * N)
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5, -0.5, 0.0], [0.5, 0.0, 0.0]]))


def test_clipping_on_both_sides():
    old = torch.zeros(2, 2)
    logp = torch.log(
        torch.tensor([[1.5, 0.5], [0.5, 1.5]])
    ).requires_grad_()  # ratios, since old = 0
    adv = torch.tensor([1.0, -1.0])
    loss, stats = grpo.policy_loss(logp, old, None, adv, torch.ones(2, 2, dtype=torch.long))
    # seq 0 (A=+1): rho 1.5 clipped to 1.2 -> -1.2; rho 0.5 not clipped -> -0.5
    # seq 1 (A=-1): rho 0.5 clipped to 0.8 -> +0.8; rho 1.5 not clipped -> +1.5
    assert loss.item() == pytest.approx(((-1.2 - 0.5) / 2 + (0.8 + 1.5) / 2) / 2)
    assert stats["clip_ratio/high_mean"] == pytest.approx(0.25)
    assert stats["clip_ratio/low_mean"] == pytest.approx(0.25)
    assert stats["clip_ratio/region_mean"] == pytest.approx(0.5)
    loss.backward()
    # clipped tokens get no gradient; the others get -A * rho / (2 tokens * 2 sequences)
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.125], [0.0, 0.375]]))


def test_clip_higher_widens_only_the_upper_side():
    old = torch.zeros(1, 1)
    logp = torch.log(torch.tensor([[1.25]]))
    loose, stats = grpo.policy_loss(
        logp, old, None, torch.tensor([1.0]), torch.ones(1, 1), eps_high=0.28
    )
    tight, _ = grpo.policy_loss(
        logp, old, None, torch.tensor([1.0]), torch.ones(1, 1), eps_high=0.2
    )
    assert loose.item() == pytest.approx(-1.25) and tight.item() == pytest.approx(-1.2)
    assert stats["clip_ratio/high_mean"] == 0.0


def test_kl_term_is_added_with_beta_and_reported():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    mask = torch.ones(1, 2)
    kl0 = 0.5 + math.log(2) - 1
    loss, stats = grpo.policy_loss(logp, None, ref, torch.tensor([0.0]), mask, beta=0.1)
    assert loss.item() == pytest.approx(0.1 * kl0 / 2)
    assert stats["kl"] == pytest.approx(kl0 / 2)
    loss, stats = grpo.policy_loss(logp, None, ref, torch.tensor([0.0]), mask, beta=0.0)
    assert loss.item() == 0.0 and stats["kl"] == 0.0


def test_policy_loss_asks_for_its_normalisers():
    logp, mask, adv = _ragged()
    with pytest.raises(ValueError, match="num_tokens"):
        grpo.policy_loss(logp, None, None, adv, mask, loss_type="dapo")
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo.policy_loss(logp, None, None, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="loss_type"):
        grpo.policy_loss(logp, None, None, adv, mask, loss_type="ppo")


def test_completion_mask_includes_first_eos_even_when_pad_is_eos():
    eos = 0  # Qwen pads with its EOS
    ids = torch.tensor([[5, 0, 0, 0], [5, 6, 7, 8], [0, 0, 0, 0], [5, 6, 0, 9]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]])
    assert torch.equal(grpo.completion_mask(ids, eos), expected)


def test_huge_log_prob_gaps_past_eos_give_a_finite_loss_and_gradient():
    # a position after EOS where the reference's log-prob exceeds the policy's by 99:
    # exp(99) overflows float32, and inf * 0 would be NaN
    logp = torch.tensor([[-1.0, -100.0], [-2.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0], [-2.5, -1.0]])
    old = torch.tensor([[-1.0, 50.0], [-2.0, -0.5]])  # a ratio of exp(-150) there too
    mask = torch.tensor([[1, 0], [1, 1]])
    for loss_type, kwargs in [
        ("grpo", {}), ("bnpo", {}), ("dapo", {"num_tokens": 3}),
        ("dr_grpo", {"max_completion_length": 2}),
    ]:
        for old_logp in (None, old):
            loss, stats = grpo.policy_loss(
                logp, old_logp, ref, torch.tensor([1.0, -1.0]), mask, beta=0.04,
                loss_type=loss_type,
                **kwargs
            )
            (grad,) = torch.autograd.grad(loss, logp)
            assert torch.isfinite(loss) and torch.isfinite(grad).all(), loss_type
            assert grad[0, 1] == 0.0 and all(map(math.isfinite, stats.values()))


@pytest.mark.parametrize(
    "loss_type,kwargs", [("grpo", {}), ("dr_grpo", {"max_completion_length": 5}), ("dapo", {})]
)
@pytest.mark.parametrize("cuts", [[4], [2, 2], [3, 1], [1, 1, 1, 1]])
def test_micro_batch_losses_add_up_to_the_batch_loss(loss_type, kwargs, cuts):
    torch.manual_seed(0)
    logp = torch.randn(4, 5).requires_grad_()
    old, ref, adv = logp.detach() + 0.1 * torch.randn(4, 5), torch.randn(4, 5), torch.randn(4)
    mask = grpo.completion_mask(
        torch.tensor([[1, 0, 2, 2, 2], [1, 1, 1, 1, 1], [0, 3, 3, 3, 3], [1, 1, 0, 4, 4]]), 0
    )
    totals = dict(num_sequences=4, num_tokens=mask.sum(), **kwargs)
    whole, _ = grpo.policy_loss(logp, old, ref, adv, mask, beta=0.04, loss_type=loss_type, **totals)
    (whole_grad,) = torch.autograd.grad(whole, logp)
    parts, start = 0.0, 0
    for n in cuts:
        part, _ = grpo.policy_loss(
            logp[start : start + n], old[start : start + n], ref[start : start + n],
            adv[start : start + n], mask[start : start + n], beta=0.04, loss_type=loss_type,
            **totals
        )
        parts, start = parts + part, start + n
    (grad,) = torch.autograd.grad(parts, logp)
    torch.testing.assert_close(parts, whole)
    torch.testing.assert_close(grad, whole_grad)


def test_clip_extremes_are_over_sequences_as_trl():
    """clip_ratio/low_min, /high_max: the min/max over sequences of each sequence's fraction of
    clipped tokens (TRL 1.16), not of token means."""
    ratios = torch.tensor([[0.5, 0.5, 1.0, 1.0],    # A < 0: 2 of 4 clipped below
                           [0.5, 1.0, 1.0, 1.0],    # A < 0: 1 of 4
                           [1.5, 1.0, 3.0, 3.0]])   # A > 0: 1 of its 2 tokens clipped above
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])
    adv = torch.tensor([-1.0, -1.0, 1.0])
    _, stats = grpo.policy_loss(torch.log(ratios), torch.zeros(3, 4), None, adv, mask)
    assert stats["clip_ratio/low_mean"] == pytest.approx(3 / 10)  # token means
    assert stats["clip_ratio/high_mean"] == pytest.approx(1 / 10)
    assert stats["clip_ratio/low_min"] == 0.0  # sequence 2 (A > 0) has no low clipping
    assert stats["clip_ratio/high_max"] == pytest.approx(0.5)
    _, stats = grpo.policy_loss(torch.log(ratios[:2]), torch.zeros(2, 4), None, adv[:2], mask[:2])
    assert stats["clip_ratio/low_min"] == pytest.approx(0.25)
    assert stats["clip_ratio/high_max"] == 0.0


def test_clip_extremes_do_not_depend_on_the_micro_batch_size(monkeypatch):
    """train.accumulate_gradients on one batch of 12 sequences, cut in 12, 4 or 5: the same
    extremes, those of the 12 sequences' clipped fractions."""
    import types

    import train
    from r1v import policy

    torch.manual_seed(0)
    N, C = 12, 6
    lengths = torch.randint(1, C + 1, (N,))
    mask = (torch.arange(C) < lengths.unsqueeze(1)).long()                    # (N, C)
    rollout = policy.Rollout(torch.ones(N, 2, dtype=torch.long), torch.ones(N, 2, dtype=torch.long),
                             torch.zeros(N, 2, dtype=torch.long), [], torch.zeros(0, 3),
                             torch.zeros(N, dtype=torch.long), torch.ones(N, C, dtype=torch.long),
                             mask, advantages=torch.randn(N), old_logp=0.4 * torch.randn(N, C))

    def loss(model, mb, cfg, num_sequences, num_tokens):  # logp 0: the ratio is exp(-old_logp)
        logp = torch.zeros(mb.old_logp.shape, requires_grad=True)
        return grpo.policy_loss(logp, mb.old_logp, None, mb.advantages, mb.completion_mask,
                                loss_type="dapo", num_sequences=num_sequences,
                                num_tokens=num_tokens)
    monkeypatch.setattr(train, "micro_batch_loss", loss)
    signs, old_logp = rollout.advantages, rollout.old_logp
    # as sampled; then every advantage < 0 and lower ratios, so that low_min > 0
    for advantages, shift in ((signs, 0.0), (-signs.abs(), 0.8)):
        rollout.advantages, rollout.old_logp = advantages, old_logp + shift
        ratio, adv = torch.exp(-rollout.old_logp), advantages.unsqueeze(1)
        low = ((ratio < 0.8) & (adv < 0) & mask.bool()).sum(1) / lengths      # (N,)
        high = ((ratio > 1.2) & (adv > 0) & mask.bool()).sum(1) / lengths     # (N,)
        assert high.max() > 0 or low.min() > 0
        for size in (12, 4, 5):
            cfg = types.SimpleNamespace(micro_batch_size=size)
            _, stats = train.accumulate_gradients(torch.nn.Linear(1, 1), rollout, cfg, N,
                                                  mask.sum())
            assert stats["clip_ratio/low_min"] == pytest.approx(low.min().item()), size
            assert stats["clip_ratio/high_max"] == pytest.approx(high.max().item()), size
