"""Per-offset weights of the K-way loss (issue 17): `--patch_offset_weights`, in both loss paths.

References: a naive float64 loop of sum_k w_k * -log p(t_rk) / denominator, one (row, offset) at a time; and
for equal weights, the paper's Eq. 3 as computed without weights (bit for bit). Both the unfused
`kway_cross_entropy` and the fused `fused_kway_linear_cross_entropy` are checked, against the loop and against
each other, with -100 targets and num_items_in_batch; the per-offset losses stay unweighted; the model's
forward takes the weights on both paths; bad weights are refused.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama_config

from modeling_llama_patch import IGNORE_INDEX, PatchLlamaForCausalLM, kway_cross_entropy, normalise_offset_weights
from patch_training.cli import UsageError
from patch_training.fused_loss import fused_kway_linear_cross_entropy
from patch_training.offset_weights import parse_offset_weights

ROWS, HIDDEN, VOCAB, K = 9, 8, 40, 4


def naive_weighted(hidden, weight, targets, weights, num_items=None):
    """sum over (r, k) of w_k * (logsumexp(z_r) - z_r[t_rk]) / (num_items or the number of targets), float64,
    and the unweighted mean of each offset."""
    hidden, weight = hidden.double(), weight.double()
    total, count = 0.0, 0
    sums, counts = [0.0] * targets.shape[1], [0] * targets.shape[1]
    for r in range(hidden.shape[0]):
        z = hidden[r] @ weight.T
        for k in range(targets.shape[1]):
            t = int(targets[r, k])
            if t == IGNORE_INDEX:
                continue
            nll = torch.logsumexp(z, dim=0) - z[t]
            total, count = total + weights[k] * nll, count + 1
            sums[k], counts[k] = sums[k] + nll.item(), counts[k] + 1
    return total / (count if num_items is None else num_items), torch.tensor([s / c for s, c in zip(sums, counts)])


def inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(ROWS, HIDDEN, generator=generator).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=generator) / HIDDEN**0.5).requires_grad_()
    targets = torch.randint(0, VOCAB, (ROWS, K), generator=generator)
    targets[torch.rand(targets.shape, generator=generator) < 0.25] = IGNORE_INDEX
    targets[3] = IGNORE_INDEX  # a whole row ignored
    return hidden, weight, targets


def unfused(hidden, weight, targets, weights, num_items=None):
    return kway_cross_entropy(F.linear(hidden, weight), targets, num_items, chunk_elements=3 * VOCAB, offset_weights=weights)


def fused(hidden, weight, targets, weights, num_items=None):
    return fused_kway_linear_cross_entropy(hidden, weight, targets, num_items_in_batch=num_items, chunk_rows=4,
                                           offset_weights=weights)


def loss_and_grads(path, weights, num_items=None):
    hidden, weight, targets = inputs()
    loss, per_offset = path(hidden, weight, targets, weights, num_items)
    loss.backward()
    return loss.detach(), per_offset, hidden.grad, weight.grad


@pytest.mark.parametrize("path", [unfused, fused])
@pytest.mark.parametrize("num_items", [None, 50])
def test_weighted_loss_matches_naive_loop(path, num_items):
    """A power-law weighting (w_k ~ k^-1, mean 1): loss and gradients equal the naive weighted loop; the
    per-offset losses are the unweighted means."""
    weights = normalise_offset_weights([k**-1.0 for k in range(1, K + 1)])
    loss, per_offset, grad_hidden, grad_weight = loss_and_grads(path, weights, num_items)
    hidden, weight, targets = inputs()
    reference, reference_offsets = naive_weighted(hidden, weight, targets, weights, num_items)
    reference.backward()
    torch.testing.assert_close(loss, reference.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_offset, reference_offsets.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_hidden, hidden.grad.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_weight, weight.grad.float(), rtol=1e-4, atol=1e-6)
    unweighted = loss_and_grads(path, None, num_items)[0]
    assert not torch.allclose(loss, unweighted), "the weights changed nothing"


def test_weighted_fused_equals_weighted_unfused():
    weights = (0.1, 2.5, 0.0, 1.4)
    for a, b in zip(loss_and_grads(unfused, weights, 40), loss_and_grads(fused, weights, 40)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", [unfused, fused])
@pytest.mark.parametrize("num_items", [None, 50])
def test_equal_weights_are_eq3_exactly(path, num_items):
    """Equal weights normalise to None (the paper's mean), and explicit weights of 1 give the unweighted loss,
    per-offset losses and gradients bit for bit."""
    assert normalise_offset_weights([0.3] * K) is None and normalise_offset_weights([7] * K) is None
    plain = loss_and_grads(path, None, num_items)
    ones = loss_and_grads(path, (1.0,) * K, num_items)
    for a, b in zip(plain, ones):
        assert torch.equal(a, b)


def test_normalised_weights_have_mean_one():
    weights = normalise_offset_weights([1, 2, 3, 4])
    assert weights == pytest.approx((0.4, 0.8, 1.2, 1.6)) and sum(weights) == pytest.approx(4)


@pytest.mark.parametrize("values, expected", [
    ([1e308, 1e308, 1e308, 5e307], (8 / 7, 8 / 7, 8 / 7, 4 / 7)),  # the sum overflowed: OverflowError in fsum
    ([1e308, 1.7e308, 0, 0], (4 / 2.7, 4 * 1.7 / 2.7, 0, 0)),
    ([1e-320, 3e-320, 0, 0], (1.0, 3.0, 0, 0)),  # subnormal: the same rule
])
def test_weights_at_the_ends_of_the_float_range(values, expected):
    """Regression: finite weights whose sum overflows (`--patch_offset_weights "[1e308,1e308,1e308,1e308]"`
    passes the finiteness check) gave a traceback; they are scaled by their largest first, which changes no
    weight (K * v / sum v), so they give the weights of their ratios."""
    assert normalise_offset_weights(values) == pytest.approx(expected, rel=1e-6)
    assert normalise_offset_weights([1e308] * 4) is None  # equal: the paper's mean


@pytest.mark.parametrize("loss_implementation", ["fused", "unfused"])
def test_model_forward_uses_the_weights(loss_implementation):
    """PatchLlamaForCausalLM.offset_weights reaches the loss on both paths: the loss equals the naive weighted
    loop over the model's own logits (the unfused eval-mode forward gives them)."""
    torch.manual_seed(0)
    model = PatchLlamaForCausalLM(tiny_llama_config(vocab_size=64, patch_size=K))
    model.loss_implementation = loss_implementation
    ids = torch.randint(0, 64, (2, 4 * K))
    weights = normalise_offset_weights([1, 0.5, 0.25, 0.125])
    model.eval()
    logits = model(input_ids=ids).logits  # (2, 4, 64)
    targets = torch.cat([ids.view(2, 4, K)[:, 1:], torch.full((2, 1, K), IGNORE_INDEX)], dim=1)
    reference = 0.0
    for b in range(2):
        for i in range(3):
            for k in range(K):
                z = logits[b, i].double()
                reference += weights[k] * (torch.logsumexp(z, 0) - z[targets[b, i, k]])
    reference /= 2 * 3 * K
    model.train()
    model.offset_weights = weights
    out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss, reference.float(), rtol=1e-5, atol=1e-6)
    model.offset_weights = None
    assert not torch.allclose(model(input_ids=ids, labels=ids).loss, out.loss)


@pytest.mark.parametrize(
    "spec, k, expected",
    [
        ("power:1", 4, normalise_offset_weights([1, 1 / 2, 1 / 3, 1 / 4])),
        ("power:0.5", 2, normalise_offset_weights([1, 2**-0.5])),
        ("power:0", 4, None),
        ("[4, 3, 2, 1]", 4, (1.6, 1.2, 0.8, 0.4)),
        ("[1, 1, 1]", 3, None),
        (None, 4, None),
    ],
)
def test_parse_offset_weights(spec, k, expected):
    result = parse_offset_weights(spec, k)
    assert result == (pytest.approx(expected) if expected else None)


@pytest.mark.parametrize(
    "spec, k, message",
    [
        ("[1, 2, 3]", 4, "3 weights for K=4"),
        ("[1, -1, 1, 1]", 4, "finite and >= 0"),
        ("[0, 0]", 2, "not all be 0"),
        ("power:1", 1, "needs --patch_size K > 1"),
        ("power:-1", 4, "alpha >= 0"),
        ("power:x", 4, "not a number"),
        ("linear", 4, "power:<alpha>"),
        ("[1, \"a\"]", 2, "numbers"),
    ],
)
def test_bad_offset_weights_are_one_line(spec, k, message):
    with pytest.raises(UsageError, match=message) as caught:
        parse_offset_weights(spec, k)
    assert "\n" not in str(caught.value)
