"""Tests of `PatchLlamaForCausalLM` and its loss helpers (modeling_llama_patch.py).

Every check compares the patch model against an *independent* reference, never against itself:
  * stock `transformers.LlamaForCausalLM` holding the very same weights (`make_pair`), fed either the token
    ids (K = 1) or, for K > 1, `inputs_embeds` = per-patch means of token embeddings computed with Python loops;
  * the paper's Eq. 3 written as a naive loop over (sequence, patch, offset) with a float64 log-softmax;
  * `F.cross_entropy` row by row for `kway_cross_entropy`;
  * a fresh Python process that does not import this project, for saved checkpoints.

Configs are tiny (hidden 32, 2 layers, the LLaMA-2 vocabulary of 32000) so the file runs on CPU in seconds.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaForCausalLM

from conftest import tiny_llama_config
from modeling_llama_patch import (
    IGNORE_INDEX,
    PatchLlamaForCausalLM,
    count_loss_targets,
    get_patch_size,
    kway_cross_entropy,
    patchify_embeddings,
)

VOCAB = 32000
# float32 model outputs vs references computed along a different (but mathematically equal) path
FP32_TOL = dict(rtol=1e-5, atol=1e-5)
# gradients: the loss is ~log(32000) and most gradient entries are tiny, so an absolute floor is needed
GRAD_TOL = dict(rtol=1e-4, atol=1e-7)
# identical code path (K = 1 is the stock forward): equal up to float noise at most
SAME_TOL = dict(rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------
# Helpers: model pairs, data, and the naive references
# ---------------------------------------------------------------------------------------------------------


def seed_all(seed: int = 0) -> None:
    torch.manual_seed(seed)


def make_pair(patch_size="absent", seed: int = 0, attn_implementation: str | None = None, **overrides):
    """(stock LlamaForCausalLM, PatchLlamaForCausalLM) with identical weights, both in eval mode.

    `patch_size="absent"` leaves `patch_size` out of the patch model's config (a stock Llama config)."""
    seed_all(seed)
    values = dict(initializer_range=0.1)  # larger than the default 0.02, so logits are far from uniform
    values.update(overrides)
    stock = LlamaForCausalLM(tiny_llama_config(**values))
    if patch_size != "absent":
        values["patch_size"] = patch_size
    patch = PatchLlamaForCausalLM(tiny_llama_config(**values))
    patch.load_state_dict(stock.state_dict(), strict=True)
    if attn_implementation is not None:
        stock.set_attn_implementation(attn_implementation)
        patch.set_attn_implementation(attn_implementation)
    return stock.eval(), patch.eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def naive_patch_embeds(weight: torch.Tensor, input_ids: torch.Tensor, patch_size: int, attention_mask=None):
    """(B, n, H): for each patch, the mean of the embedding rows of its visible tokens (zeros if none),
    by explicit Python loops over sequences, patches and tokens."""
    batch, length = input_ids.shape
    sequences = []
    for b in range(batch):
        patches = []
        for i in range(length // patch_size):
            vectors = [
                weight[int(input_ids[b, j])]
                for j in range(i * patch_size, (i + 1) * patch_size)
                if attention_mask is None or int(attention_mask[b, j]) != 0
            ]
            if vectors:
                total = vectors[0]
                for vector in vectors[1:]:
                    total = total + vector
                patches.append(total / len(vectors))
            else:
                patches.append(torch.zeros_like(weight[0]))
        sequences.append(torch.stack(patches))
    return torch.stack(sequences)


def naive_patch_mask(attention_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, n): 1 where any token of the patch is visible, by loops."""
    batch, length = attention_mask.shape
    rows = [
        [int(any(int(attention_mask[b, j]) for j in range(i * patch_size, (i + 1) * patch_size)))
         for i in range(length // patch_size)]
        for b in range(batch)
    ]
    return torch.tensor(rows, dtype=attention_mask.dtype)


def naive_patch_loss(logits: torch.Tensor, labels: torch.Tensor, patch_size: int):
    """Eq. 3 by loops: from patch i < n-1 predict every token of patch i+1 with one distribution.

    Returns (mean loss over counted (patch, offset) pairs, (K,) per-offset means, count), in float64.
    For K = 1 this is the ordinary shifted next-token loss."""
    log_probs = F.log_softmax(logits.double(), dim=-1)
    batch, num_patches, _ = logits.shape
    total, count = 0.0, 0
    offset_sums = [0.0] * patch_size
    offset_counts = [0] * patch_size
    for b in range(batch):
        for i in range(num_patches - 1):
            for k in range(patch_size):
                target = int(labels[b, (i + 1) * patch_size + k])
                if target == IGNORE_INDEX:
                    continue
                nll = -log_probs[b, i, target]
                total = total + nll
                count += 1
                offset_sums[k] = offset_sums[k] + nll.detach()
                offset_counts[k] += 1
    per_offset = torch.tensor(
        [float(s) / c if c else float("nan") for s, c in zip(offset_sums, offset_counts)], dtype=torch.float64
    )
    return total / count, per_offset, count


def naive_count(labels: torch.Tensor, patch_size: int) -> int:
    """Targets that count: labels after the first patch that are not -100, by loops."""
    return sum(
        1
        for b in range(labels.shape[0])
        for j in range(patch_size, labels.shape[1])
        if int(labels[b, j]) != IGNORE_INDEX
    )


def grads(model) -> dict[str, torch.Tensor]:
    return {name: param.grad.detach().clone() for name, param in model.named_parameters()}


def assert_grads_close(actual: dict, expected: dict, **tol) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=lambda m, n=name: f"{n}: {m}", **tol)


def stock_patch_reference(stock, input_ids, patch_size, attention_mask=None):
    """Stock Llama logits (B, n, V) on naive per-patch mean embeddings (and the naive patch mask)."""
    embeds = naive_patch_embeds(stock.model.embed_tokens.weight, input_ids, patch_size, attention_mask)
    mask = None if attention_mask is None else naive_patch_mask(attention_mask, patch_size)
    return stock(inputs_embeds=embeds, attention_mask=mask).logits


# ---------------------------------------------------------------------------------------------------------
# 1. K = 1 is the stock model
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch_size", ["absent", 1, None])
def test_k1_logits_loss_grads_equal_stock(patch_size):
    """K = 1 (no patch_size, None, or 1): logits, loss and every parameter gradient equal stock
    LlamaForCausalLM with the same state_dict; the loss also equals the naive loop."""
    stock, patch = make_pair(patch_size)
    assert patch.patch_size == 1
    ids = random_ids(2, 12)
    labels = ids.clone()
    labels[0, 3] = labels[1, 7:9] = IGNORE_INDEX

    ref = stock(ids, labels=labels)
    ref.loss.backward()
    out = patch(ids, labels=labels)
    out.loss.backward()

    torch.testing.assert_close(out.logits, ref.logits, **SAME_TOL)
    torch.testing.assert_close(out.loss, ref.loss, **SAME_TOL)
    assert_grads_close(grads(patch), grads(stock), **SAME_TOL)
    naive_loss, _, _ = naive_patch_loss(ref.logits, labels, 1)
    torch.testing.assert_close(out.loss.double(), naive_loss.detach(), **FP32_TOL)


def test_k1_attention_mask_equals_stock():
    """K = 1 with a padded attention mask: logits equal stock's on the same mask."""
    stock, patch = make_pair(1)
    ids = random_ids(2, 8)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        torch.testing.assert_close(
            patch(ids, attention_mask=mask).logits, stock(ids, attention_mask=mask).logits, **SAME_TOL
        )


@pytest.mark.parametrize("patch_size", ["absent", 1])
def test_k1_generate_equals_stock(patch_size):
    """K = 1 greedy generate() returns the same tokens as stock generate()."""
    stock, patch = make_pair(patch_size)
    ids = random_ids(2, 6)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=2, attention_mask=torch.ones_like(ids))
    expected = stock.generate(ids, **kwargs)
    actual = patch.generate(ids, **kwargs)
    assert actual.shape == (2, 11)
    assert torch.equal(actual, expected)


# ---------------------------------------------------------------------------------------------------------
# 2. K > 1: logits, Eq. 3 loss, gradients and per-offset losses
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch_size", [2, 4])
def test_patch_forward_matches_naive_reference(patch_size):
    """K > 1: logits equal stock Llama on naive per-patch mean embeddings; loss, offset_losses and all
    gradients equal those of the naive Eq. 3 loop (float64 log-softmax of the stock logits)."""
    stock, patch = make_pair(patch_size)
    batch, length = 2, 16
    num_patches = length // patch_size
    ids = random_ids(batch, length, seed=patch_size)
    labels = ids.clone()

    out = patch(ids, labels=labels)
    out.loss.backward()
    ref_logits = stock_patch_reference(stock, ids, patch_size)
    ref_loss, ref_offsets, count = naive_patch_loss(ref_logits, labels, patch_size)
    ref_loss.backward()

    assert out.logits.shape == (batch, num_patches, VOCAB)
    assert count == batch * (num_patches - 1) * patch_size
    torch.testing.assert_close(out.logits, ref_logits, **FP32_TOL)
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    torch.testing.assert_close(out.loss.double(), ref_loss.detach(), **FP32_TOL)
    assert out.offset_losses.shape == (patch_size,)
    assert not out.offset_losses.requires_grad
    torch.testing.assert_close(out.offset_losses.double(), ref_offsets, **FP32_TOL)
    # with all targets counted, the loss is the mean of the per-offset losses
    torch.testing.assert_close(out.offset_losses.mean(), out.loss.detach(), **FP32_TOL)
    assert_grads_close(grads(patch), grads(stock), **GRAD_TOL)


@pytest.mark.parametrize("patch_size", [1, 4])
def test_skip_logits_keeps_the_loss(patch_size):
    """`skip_logits=True` (what transformers' Trainer passes when evaluating under --use_liger_kernel) returns
    the same loss without logits (before, it was passed on to the decoder and the logits returned anyway)."""
    stock, patch = make_pair(patch_size)
    ids = random_ids(2, 16)
    full = patch(ids, labels=ids)
    lean = patch(ids, labels=ids, skip_logits=True)
    assert lean.logits is None
    torch.testing.assert_close(lean.loss, full.loss, **SAME_TOL)
    if patch_size == 1:
        torch.testing.assert_close(lean.loss, stock(ids, labels=ids).loss, **SAME_TOL)


def test_patch_embeddings_are_not_token_embeddings():
    """Sanity of the reference: K = 4 logits differ from stock logits on the first token of each patch,
    so the comparisons above would catch a model that skipped the averaging."""
    stock, patch = make_pair(4)
    ids = random_ids(1, 16)
    with torch.no_grad():
        patch_logits = patch(ids).logits
        first_tokens = stock(ids[:, ::4]).logits
    assert not torch.allclose(patch_logits, first_tokens, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------
# 3. -100 labels
# ---------------------------------------------------------------------------------------------------------


def test_ignore_index_matches_naive_loop():
    """Random -100 labels (a whole patch, and positions inside the first patch): loss, offset_losses and
    gradients equal the naive loop's mean over counted targets only."""
    patch_size = 4
    stock, patch = make_pair(patch_size)
    ids = random_ids(2, 20, seed=3)
    labels = ids.clone()
    generator = torch.Generator().manual_seed(7)
    labels[torch.rand(labels.shape, generator=generator) < 0.3] = IGNORE_INDEX
    labels[1, 4:8] = IGNORE_INDEX  # a whole patch: patch 0 of sequence 1 predicts nothing
    labels[0, 0:2] = IGNORE_INDEX  # inside the first patch, which never counts anyway
    labels[0, 12:16] = IGNORE_INDEX  # another whole patch
    labels[1, 17] = IGNORE_INDEX

    out = patch(ids, labels=labels)
    out.loss.backward()
    ref_logits = stock_patch_reference(stock, ids, patch_size)
    ref_loss, ref_offsets, count = naive_patch_loss(ref_logits, labels, patch_size)
    ref_loss.backward()

    assert count == naive_count(labels, patch_size) == int(count_loss_targets(labels, patch_size))
    torch.testing.assert_close(out.loss.double(), ref_loss.detach(), **FP32_TOL)
    torch.testing.assert_close(out.offset_losses.double(), ref_offsets, **FP32_TOL, equal_nan=True)
    assert_grads_close(grads(patch), grads(stock), **GRAD_TOL)


def test_first_patch_labels_never_count():
    """Labels of the first patch are never targets (nothing precedes it): changing them from -100 to
    arbitrary ids leaves the loss unchanged, while changing a label of patch 1 changes it."""
    patch_size = 4
    _, patch = make_pair(patch_size)
    ids = random_ids(2, 12)
    labels = ids.clone()
    labels[:, :patch_size] = IGNORE_INDEX
    other = labels.clone()
    other[:, :patch_size] = random_ids(2, patch_size, seed=9)
    with torch.no_grad():
        base = patch(ids, labels=labels).loss
        torch.testing.assert_close(patch(ids, labels=other).loss, base, rtol=0, atol=0)
        changed = labels.clone()
        changed[0, patch_size] = (changed[0, patch_size] + 1) % VOCAB
        assert not torch.equal(patch(ids, labels=changed).loss, base)


@pytest.mark.parametrize("with_num_items", [False, True])
def test_all_labels_ignored_beyond_first_patch(with_num_items):
    """All labels after the first patch are -100. Like stock LlamaForCausalLM with all labels -100, the loss
    is nan (0/0, also when num_items_in_batch=0 is passed) and every gradient is exactly zero, not nan
    (regression: 0 * inf used to give nan gradients that would poison the optimizer); offset_losses are nan."""
    patch_size = 4
    stock, patch = make_pair(patch_size)
    ids = random_ids(2, 12)
    labels = ids.clone()
    labels[:, patch_size:] = IGNORE_INDEX
    assert int(count_loss_targets(labels, patch_size)) == 0
    extra = dict(num_items_in_batch=torch.tensor(0)) if with_num_items else {}

    stock_out = stock(ids, labels=torch.full_like(ids, IGNORE_INDEX), **extra)
    stock_out.loss.backward()
    out = patch(ids, labels=labels, **extra)
    out.loss.backward()

    assert torch.isnan(stock_out.loss) and torch.isnan(out.loss)
    assert torch.isnan(out.offset_losses).all()
    for name, grad in grads(patch).items():
        assert torch.equal(grad, torch.zeros_like(grad)), name
    for name, grad in grads(stock).items():  # the stock behaviour we match
        assert torch.equal(grad, torch.zeros_like(grad)), name


def test_all_ignored_micro_batch_with_positive_num_items_is_zero():
    """A micro-batch with no counted target inside an accumulation step (num_items_in_batch > 0 from the
    other micro-batches) contributes loss 0 and zero gradients."""
    _, patch = make_pair(4)
    ids = random_ids(1, 12)
    labels = torch.full_like(ids, IGNORE_INDEX)
    out = patch(ids, labels=labels, num_items_in_batch=torch.tensor(17))
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads(patch).values())


# ---------------------------------------------------------------------------------------------------------
# 4. Gradient accumulation with num_items_in_batch
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch_size", [1, 2, 4])
def test_count_loss_targets_matches_naive_count(patch_size):
    """count_loss_targets equals a naive loop count of labels after the first patch that are not -100
    (for K = 1: transformers' own `labels[..., 1:] != -100` count)."""
    labels = random_ids(3, 16, seed=5)
    generator = torch.Generator().manual_seed(11)
    labels[torch.rand(labels.shape, generator=generator) < 0.4] = IGNORE_INDEX
    labels[2, :] = IGNORE_INDEX
    assert int(count_loss_targets(labels, patch_size)) == naive_count(labels, patch_size)
    if patch_size == 1:
        assert int(count_loss_targets(labels)) == naive_count(labels, 1)


@pytest.mark.parametrize("patch_size", [1, 4])
def test_activation_checkpointing_recomputes_layers_and_keeps_gradients(patch_size):
    """transformers' activation checkpointing (what --gradient_checkpointing enables) works on the patch
    model: each decoder layer's input norm runs twice per step (forward, then again when backward recomputes
    the layer), and the loss and every gradient are those of the same model without it, which at K = 1 are
    stock Llama's."""
    stock, patch = make_pair(patch_size)
    stock.train(), patch.train()
    ids = random_ids(2, 16, seed=3)
    calls = []
    # Inside the checkpointed forward (hooks on the layer itself stay outside); the first module of the layer,
    # as the recomputation stops once it has the tensors backward needs.
    for layer in patch.model.layers:
        layer.input_layernorm.register_forward_hook(lambda module, args, output: calls.append(module))

    reference = (stock if patch_size == 1 else patch)(ids, labels=ids)
    reference.loss.backward()
    reference_grads = grads(stock if patch_size == 1 else patch)
    patch.zero_grad()
    calls.clear()

    # transformers >= 5.23 names it activation_checkpointing_enable (the old name warns); 5.17 has only the old one.
    (getattr(patch, "activation_checkpointing_enable", None) or patch.gradient_checkpointing_enable)()
    out = patch(ids, labels=ids)
    out.loss.backward()
    assert len(calls) == 2 * len(patch.model.layers)
    torch.testing.assert_close(out.loss, reference.loss, **SAME_TOL)
    assert_grads_close(grads(patch), reference_grads, **SAME_TOL)


@pytest.mark.parametrize("patch_size", [1, 4])
def test_gradient_accumulation_is_exact(patch_size):
    """Two micro-batches of one sequence each (losses summed, one backward) with num_items_in_batch = the
    summed count_loss_targets give the same loss and gradients as one micro-batch of both sequences; the
    two sequences have very different numbers of -100 labels, so a mean of means would differ."""
    _, patch = make_pair(patch_size)
    ids = random_ids(2, 16, seed=21)
    labels = ids.clone()
    labels[0, 9] = IGNORE_INDEX  # sequence 0: one ignored target
    labels[1, 5:14] = IGNORE_INDEX  # sequence 1: nine ignored targets
    counts = [count_loss_targets(labels[b : b + 1], patch_size) for b in range(2)]
    assert [int(c) for c in counts] == [naive_count(labels[b : b + 1], patch_size) for b in range(2)]
    assert int(counts[0]) != int(counts[1])
    num_items = counts[0] + counts[1]

    micro_loss = sum(
        patch(ids[b : b + 1], labels=labels[b : b + 1], num_items_in_batch=num_items).loss for b in range(2)
    )
    micro_loss.backward()
    micro_grads = grads(patch)

    patch.zero_grad()
    full = patch(ids, labels=labels, num_items_in_batch=num_items)
    full.loss.backward()
    torch.testing.assert_close(micro_loss, full.loss, **FP32_TOL)
    assert_grads_close(micro_grads, grads(patch), **GRAD_TOL)

    with torch.no_grad():
        plain_mean = patch(ids, labels=labels).loss  # no num_items_in_batch: mean over counted targets
        mean_of_means = sum(patch(ids[b : b + 1], labels=labels[b : b + 1]).loss for b in range(2)) / 2
    torch.testing.assert_close(full.loss.detach(), plain_mean, **FP32_TOL)
    assert abs(mean_of_means.item() - plain_mean.item()) > 1e-4


# ---------------------------------------------------------------------------------------------------------
# 5. kway_cross_entropy
# ---------------------------------------------------------------------------------------------------------


def naive_kway(logits: torch.Tensor, targets: torch.Tensor, num_items=None):
    """Sum of F.cross_entropy over (row, offset) pairs that count, in float32, divided by num_items or the
    count; and the per-offset means."""
    vocab, num_offsets = logits.shape[-1], targets.shape[-1]
    rows, row_targets = logits.reshape(-1, vocab).float(), targets.reshape(-1, num_offsets)
    total, count = 0.0, 0
    offset_sums, offset_counts = [0.0] * num_offsets, [0] * num_offsets
    for r in range(rows.shape[0]):
        for k in range(num_offsets):
            target = int(row_targets[r, k])
            if target == IGNORE_INDEX:
                continue
            nll = F.cross_entropy(rows[r : r + 1], torch.tensor([target]), reduction="sum")
            total = total + nll
            count += 1
            offset_sums[k] += nll.item()
            offset_counts[k] += 1
    per_offset = torch.tensor([s / c if c else float("nan") for s, c in zip(offset_sums, offset_counts)])
    return total / (count if num_items is None else num_items), per_offset


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(10,), (2, 5)], ids=["rows", "batch-patches"])
@pytest.mark.parametrize("num_items", [None, 37, "tensor"])
def test_kway_cross_entropy_matches_naive(dtype, shape, num_items):
    """kway_cross_entropy vs a row-by-row F.cross_entropy loop, with chunks of 3 rows over 10 rows (4 chunks,
    the last partial), float32 and bfloat16 logits; gradients (scaled by an upstream factor) agree within
    the logits dtype's tolerance; the logits tensor passed in is not modified."""
    vocab, num_offsets = 50, 3
    generator = torch.Generator().manual_seed(13)
    logits = (3 * torch.randn(*shape, vocab, generator=generator)).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (*shape, num_offsets), generator=generator)
    targets[torch.rand(targets.shape, generator=generator) < 0.3] = IGNORE_INDEX
    flat = targets.view(-1, num_offsets)
    flat[4] = IGNORE_INDEX  # a row with no target
    flat[9, 0] = 7  # the last (partial) chunk counts
    before = logits.detach().clone()
    items = torch.tensor(37) if num_items == "tensor" else num_items

    loss, per_offset = kway_cross_entropy(logits, targets, items, chunk_elements=3 * vocab + 7)
    (2.5 * loss).backward()
    actual_grad = logits.grad.clone()
    assert torch.equal(logits.detach(), before), "kway_cross_entropy modified its input logits"

    logits.grad = None
    ref_loss, ref_per_offset = naive_kway(logits, targets, items)
    (2.5 * ref_loss).backward()

    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert per_offset.shape == (num_offsets,) and not per_offset.requires_grad
    torch.testing.assert_close(loss, ref_loss.float(), **FP32_TOL)
    torch.testing.assert_close(per_offset, ref_per_offset, **FP32_TOL)
    assert actual_grad.dtype == dtype
    grad_tol = FP32_TOL if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-4)
    torch.testing.assert_close(actual_grad.float(), logits.grad.float(), **grad_tol)
    assert torch.equal(actual_grad.view(-1, vocab)[4], torch.zeros(vocab, dtype=dtype))


def test_kway_cross_entropy_repeated_target_counts_twice():
    """Two offsets with the same target id count twice (a bag, not a set): loss = 2 * cross entropy."""
    logits = torch.randn(1, 20, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[5, 5]])
    loss, _ = kway_cross_entropy(logits, targets, num_items_in_batch=1)
    torch.testing.assert_close(loss, 2 * F.cross_entropy(logits, torch.tensor([5])), **FP32_TOL)


def test_kway_cross_entropy_all_ignored():
    """No target counts: loss nan (0/0, like F.cross_entropy with mean reduction), per-offset nan,
    gradient exactly zero (like F.cross_entropy's)."""
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(0), requires_grad=True)
    targets = torch.full((4, 2), IGNORE_INDEX)
    loss, per_offset = kway_cross_entropy(logits, targets, chunk_elements=10)
    loss.backward()
    ref_logits = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_logits, targets[:, 0])
    ref.backward()
    assert torch.isnan(loss) and torch.isnan(ref) and torch.isnan(per_offset).all()
    assert torch.equal(logits.grad, torch.zeros_like(logits)) and torch.equal(ref_logits.grad, logits.grad)


# ---------------------------------------------------------------------------------------------------------
# 6. Attention masks
# ---------------------------------------------------------------------------------------------------------


def test_right_padding_matches_unpadded():
    """Batch [A: 3K tokens, B: 2K tokens + K padding (mask 0)]: B's first 2 patch logits equal B alone
    (length 2K, no mask) and A's equal A alone; all visible patches equal stock Llama on the naive masked
    patch means and naive patch mask."""
    patch_size = 4
    stock, patch = make_pair(patch_size)
    seq_a = random_ids(1, 3 * patch_size, seed=31)
    seq_b = random_ids(1, 2 * patch_size, seed=32)
    ids = torch.cat([seq_a, torch.cat([seq_b, torch.zeros(1, patch_size, dtype=torch.long)], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, 2 * patch_size :] = 0
    with torch.no_grad():
        batched = patch(ids, attention_mask=mask).logits
        alone_a = patch(seq_a).logits
        alone_b = patch(seq_b).logits
        reference = stock_patch_reference(stock, ids, patch_size, mask)
    assert batched.shape == (2, 3, VOCAB)
    torch.testing.assert_close(batched[1, :2], alone_b[0], **FP32_TOL)
    torch.testing.assert_close(batched[0], alone_a[0], **FP32_TOL)
    torch.testing.assert_close(batched[0], reference[0], **FP32_TOL)
    torch.testing.assert_close(batched[1, :2], reference[1, :2], **FP32_TOL)


def test_left_padding_with_patch_position_ids():
    """Batch [A: 3K tokens, B: K padding + 2K tokens] with patch position ids [[0, 1, 2], [0, 0, 1]]: B's real
    patch logits equal B alone and A's equal A alone; the logits of visible patches and the loss (padding
    labels -100) equal stock Llama on the naive masked patch means and naive patch mask. With default
    positions, visible logits still equal the stock reference, which differs from stock without the mask."""
    patch_size = 4
    stock, patch = make_pair(patch_size)
    seq_a = random_ids(1, 3 * patch_size, seed=33)
    seq_b = random_ids(1, 2 * patch_size, seed=34)
    ids = torch.cat([seq_a, torch.cat([torch.zeros(1, patch_size, dtype=torch.long), seq_b], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :patch_size] = 0
    position_ids = torch.tensor([[0, 1, 2], [0, 0, 1]])
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    with torch.no_grad():
        out = patch(ids, attention_mask=mask, position_ids=position_ids, labels=labels)
        alone_a = patch(seq_a).logits
        alone_b = patch(seq_b).logits
        embeds = naive_patch_embeds(stock.model.embed_tokens.weight, ids, patch_size, mask)
        ref_logits = stock(
            inputs_embeds=embeds, attention_mask=naive_patch_mask(mask, patch_size), position_ids=position_ids
        ).logits
    torch.testing.assert_close(out.logits[1, 1:], alone_b[0], **FP32_TOL)
    torch.testing.assert_close(out.logits[0], alone_a[0], **FP32_TOL)
    visible = naive_patch_mask(mask, patch_size).bool()
    torch.testing.assert_close(out.logits[visible], ref_logits[visible], **FP32_TOL)
    ref_loss, _, _ = naive_patch_loss(ref_logits, labels, patch_size)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss.double(), ref_loss, **FP32_TOL)

    # Default positions 0..n-1: transformers cannot infer the padding from position ids, so only the patch
    # attention mask keeps B's real patches from attending to the padded one.
    with torch.no_grad():
        out = patch(ids, attention_mask=mask).logits
        ref_logits = stock(inputs_embeds=embeds, attention_mask=naive_patch_mask(mask, patch_size)).logits
        unmasked = stock(inputs_embeds=embeds).logits
    torch.testing.assert_close(out[visible], ref_logits[visible], **FP32_TOL)
    assert not torch.allclose(unmasked[1, 1:], ref_logits[1, 1:], atol=1e-3)  # the mask matters here


def test_half_padded_patch_is_mean_of_visible_tokens():
    """A patch with only some visible tokens: patchify_embeddings gives the mean of its visible tokens
    (naive loop); a fully padded patch gives zeros; the model's logits and loss (padding labels -100) equal
    stock Llama on the naive masked means with the naive 'any visible' patch mask. A bool mask works too."""
    patch_size = 4
    stock, patch = make_pair(patch_size)
    ids = random_ids(2, 4 * patch_size, seed=41)
    mask = torch.ones_like(ids)
    mask[1, 2 * patch_size + 1 :] = 0  # sequence 1: patch 2 has 1 visible token, patch 3 none
    mask[0, 4 * patch_size - 2 :] = 0  # sequence 0: patch 3 has 2 visible tokens
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)

    embeds = patch.model.embed_tokens(ids).detach()
    weight = patch.model.embed_tokens.weight.detach()
    expected = naive_patch_embeds(weight, ids, patch_size, mask)
    torch.testing.assert_close(patchify_embeddings(embeds, patch_size, mask), expected, **FP32_TOL)
    torch.testing.assert_close(expected[1, 2], weight[ids[1, 2 * patch_size]])  # the one visible token
    torch.testing.assert_close(patchify_embeddings(embeds, patch_size, mask)[1, 3], torch.zeros(32))

    out = patch(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    ref_logits = stock_patch_reference(stock, ids, patch_size, mask)
    ref_loss, _, _ = naive_patch_loss(ref_logits, labels, patch_size)
    ref_loss.backward()
    visible = naive_patch_mask(mask, patch_size).bool()
    torch.testing.assert_close(out.logits[visible], ref_logits[visible], **FP32_TOL)
    torch.testing.assert_close(out.loss.double(), ref_loss.detach(), **FP32_TOL)
    assert_grads_close(grads(patch), grads(stock), **GRAD_TOL)

    with torch.no_grad():
        bool_logits = patch(ids, attention_mask=mask.bool()).logits
    torch.testing.assert_close(bool_logits[visible], out.logits.detach()[visible], **FP32_TOL)


# ---------------------------------------------------------------------------------------------------------
# 7. No labels, generate and caches
# ---------------------------------------------------------------------------------------------------------


def test_no_labels_returns_logits_only():
    """labels=None: logits (B, n, V) equal to the naive reference, loss and offset_losses None;
    logits_to_keep=1 keeps the last patch only."""
    stock, patch = make_pair(4)
    ids = random_ids(2, 12)
    with torch.no_grad():
        out = patch(ids)
        last = patch(ids, logits_to_keep=1).logits
        reference = stock_patch_reference(stock, ids, 4)
    assert out.loss is None and out.offset_losses is None
    assert out.logits.shape == (2, 3, VOCAB)
    torch.testing.assert_close(out.logits, reference, **FP32_TOL)
    # To float rounding, as stock: the head on one row and on all rows takes different matmul kernels (stock
    # Llama's logits_to_keep=1 differs from its full logits' last row by 6e-7 with transformers 5.25, torch 2.13).
    torch.testing.assert_close(last, out.logits[:, -1:], **FP32_TOL)


def test_generate_refused_for_patch_model():
    """generate() with K > 1 raises a ValueError that names the patch size."""
    _, patch = make_pair(4)
    with pytest.raises(ValueError, match=r"patch_size K=4"):
        patch.generate(random_ids(1, 4), max_new_tokens=2)


@pytest.mark.parametrize("cache", ["use_cache", "past_key_values"])
def test_cache_refused_for_patch_model(cache):
    """use_cache=True or past_key_values with K > 1 raise a ValueError."""
    _, patch = make_pair(4)
    kwargs = dict(use_cache=True) if cache == "use_cache" else dict(past_key_values=DynamicCache())
    with pytest.raises(ValueError, match=r"K=4"):
        patch(random_ids(1, 8), **kwargs)


# ---------------------------------------------------------------------------------------------------------
# 8. Bad inputs
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_labels", [False, True])
def test_length_not_multiple_of_patch_size(with_labels):
    """L = 10 with K = 4 raises a ValueError naming both values (nothing is truncated)."""
    _, patch = make_pair(4)
    ids = random_ids(1, 10)
    with pytest.raises(ValueError) as error:
        patch(ids, labels=ids if with_labels else None)
    assert "L=10" in str(error.value) and "K=4" in str(error.value)


@pytest.mark.parametrize("bad", [0, -1, 2.5, "4", True])
def test_invalid_patch_size(bad):
    """patch_size 0, -1, 2.5, "4" (and True) raise a ValueError from get_patch_size and from the model
    (regression: 0 used to be read as "absent", i.e. K = 1)."""
    config = tiny_llama_config(patch_size=bad)
    with pytest.raises(ValueError, match="patch_size"):
        get_patch_size(config)
    with pytest.raises(ValueError, match="patch_size"):
        model = PatchLlamaForCausalLM(config)
        model(random_ids(1, 8))


def test_position_ids_wrong_length():
    """position_ids of token length (L) instead of patch length (n) raise; patch positions 0..n-1 given
    explicitly equal the default."""
    _, patch = make_pair(4)
    ids = random_ids(1, 16)
    with pytest.raises(ValueError, match="position_ids"):
        patch(ids, position_ids=torch.arange(16)[None])
    with torch.no_grad():
        torch.testing.assert_close(patch(ids, position_ids=torch.arange(4)[None]).logits, patch(ids).logits)


def test_labels_wrong_shape():
    """labels whose shape is not (B, L) raise a ValueError."""
    _, patch = make_pair(4)
    ids = random_ids(1, 16)
    with pytest.raises(ValueError, match="labels"):
        patch(ids, labels=ids[:, :8])


# ---------------------------------------------------------------------------------------------------------
# 9. dtypes and attention implementations
# ---------------------------------------------------------------------------------------------------------


def _fp32_loss(patch, ids):
    with torch.no_grad():
        return patch(ids, labels=ids).loss.item()


def test_bf16_weights_forward_backward():
    """model.to(bfloat16): forward and backward run, the loss is finite and close to the float32 model's,
    gradients are bf16 and finite."""
    _, patch = make_pair(4)
    ids = random_ids(2, 16)
    reference = _fp32_loss(patch, ids)
    model = copy.deepcopy(patch).to(torch.bfloat16)
    out = model(ids, labels=ids)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss)
    assert abs(out.loss.item() - reference) < 2e-2 * reference
    for name, param in model.named_parameters():
        assert param.grad.dtype == torch.bfloat16 and torch.isfinite(param.grad).all(), name


def test_bf16_autocast_cpu():
    """torch.autocast('cpu', bfloat16): forward and backward run, float32 gradients are finite and the loss
    is close to the plain float32 loss."""
    _, patch = make_pair(4)
    ids = random_ids(2, 16)
    reference = _fp32_loss(patch, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = patch(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert abs(out.loss.item() - reference) < 2e-2 * reference
    for name, param in patch.named_parameters():
        assert param.grad.dtype == torch.float32 and torch.isfinite(param.grad).all(), name


def test_eager_and_sdpa_agree():
    """attn_implementation 'eager' and 'sdpa' give the same K = 4 logits (with a padded attention mask) and
    loss."""
    ids = random_ids(2, 16)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    results = {}
    for implementation in ("eager", "sdpa"):
        _, patch = make_pair(4, attn_implementation=implementation)
        assert patch.config._attn_implementation == implementation
        with torch.no_grad():
            results[implementation] = patch(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    visible = naive_patch_mask(mask, 4).bool()
    torch.testing.assert_close(results["eager"].logits[visible], results["sdpa"].logits[visible], **FP32_TOL)
    torch.testing.assert_close(results["eager"].loss, results["sdpa"].loss, **FP32_TOL)


def _flash_attn_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


@pytest.mark.skipif(not _flash_attn_available(), reason="needs CUDA and the flash_attn package")
def test_flash_attention_2_matches_sdpa_on_gpu():
    """On GPU in bf16, flash_attention_2 gives the same K = 4 logits and loss as sdpa (bf16 tolerance), with
    right padding."""
    ids = random_ids(2, 32).cuda()
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    results = {}
    for implementation in ("sdpa", "flash_attention_2"):
        _, patch = make_pair(4)
        patch = patch.to("cuda", torch.bfloat16)
        patch.set_attn_implementation(implementation)
        with torch.no_grad():
            results[implementation] = patch(ids, attention_mask=mask, labels=labels)
    visible = naive_patch_mask(mask.cpu(), 4).bool().cuda()
    flash, sdpa = results["flash_attention_2"].logits[visible].float(), results["sdpa"].logits[visible].float()
    # different bf16 kernels: a few logits differ by a couple of bf16 ulps, the mean difference is tiny
    torch.testing.assert_close(flash, sdpa, rtol=5e-2, atol=5e-2)
    assert (flash - sdpa).abs().mean() < 1e-2  # eager vs sdpa on an H100: max 0.03, mean 0.003
    torch.testing.assert_close(results["flash_attention_2"].loss, results["sdpa"].loss, rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------------------------
# 10. No new parameters
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_no_new_parameters(tie):
    """state_dict keys, parameter names and parameter count equal stock LlamaForCausalLM's."""
    stock, patch = make_pair(4, tie_word_embeddings=tie)
    assert list(patch.state_dict().keys()) == list(stock.state_dict().keys())
    assert [n for n, _ in patch.named_parameters()] == [n for n, _ in stock.named_parameters()]
    assert sum(p.numel() for p in patch.parameters()) == sum(p.numel() for p in stock.parameters())


# ---------------------------------------------------------------------------------------------------------
# 11. Checkpoints are stock Llama checkpoints
# ---------------------------------------------------------------------------------------------------------

_LOADER = r"""
import importlib.util, json, sys
import torch, transformers

path, prompt = sys.argv[1], sys.argv[2]
result = {"project_importable": importlib.util.find_spec("modeling_llama_patch") is not None}
model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
result["class"] = type(model).__name__
result["loading_info"] = {key: sorted(map(str, value)) for key, value in info.items()}
result["patch_size"] = getattr(model.config, "patch_size", None)
torch.save(model.state_dict(), "loaded_state_dict.pt")
generated = {}
for name, kwargs in {"folder": {}, "tokenizer_dir": {"tokenizer": sys.argv[3]}}.items():
    pipe = transformers.pipeline("text-generation", model=path, **kwargs)
    out = pipe(prompt, max_new_tokens=5, do_sample=False, return_tensors=True)
    generated[name] = out[0]["generated_token_ids"]
    text = pipe(prompt, max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith(prompt), text
result["generated"] = generated
result["project_imported"] = "modeling_llama_patch" in sys.modules
print("RESULT " + json.dumps(result))
"""


def test_checkpoint_round_trip_is_stock_llama(tmp_path, tokenizer, tokenizer_dir):
    """save_pretrained of a K = 4 model writes a stock Llama checkpoint: config.json says model_type 'llama'
    and architectures ['LlamaForCausalLM']; a fresh Python process that cannot import this project loads it
    with AutoModelForCausalLM (no missing/unexpected keys, class LlamaForCausalLM, identical weights) and
    pipeline('text-generation') generates the same greedy tokens as stock generate(), without
    trust_remote_code. PatchLlamaForCausalLM.from_pretrained gets K = 4 back."""
    stock, patch = make_pair(4)
    folder = tmp_path / "checkpoint"
    patch.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["patch_size"] == 4  # kept as a record; stock Llama ignores it

    prompt = "The quick brown fox"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    completed = subprocess.run(
        [sys.executable, "-c", _LOADER, str(folder), prompt, tokenizer_dir],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(completed.stdout.split("RESULT ", 1)[1])
    assert result["project_importable"] is False and result["project_imported"] is False
    assert result["class"] == "LlamaForCausalLM"
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert result["loading_info"].get(key, []) == [], (key, result["loading_info"])

    loaded = torch.load(tmp_path / "loaded_state_dict.pt")
    saved = patch.state_dict()
    assert loaded.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name

    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = stock.generate(
        prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=5, do_sample=False, pad_token_id=2
    )[0].tolist()
    assert len(expected) == prompt_ids.shape[1] + 5
    assert result["generated"]["folder"] == expected
    assert result["generated"]["tokenizer_dir"] == expected

    reloaded = PatchLlamaForCausalLM.from_pretrained(folder)
    assert reloaded.patch_size == 4
    ids = random_ids(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, patch(ids).logits, **SAME_TOL)

