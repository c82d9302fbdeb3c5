"""The loss of patch-level training (Shao, Meng, Zhou, ICLR 2025, arXiv:2407.12665, Eq. 3): next-patch targets
and the K-way cross-entropy, with optional per-offset weights. Pure tensor functions: no model, no transformers.

From patch i the model predicts every one of the K tokens of patch i+1 with one distribution:

    loss = mean over (i, k) of  -log p(x_{(i+1)K+k} | patches 0..i),   i < n-1, k = 0..K-1

Since all K targets share one distribution, the loss of patch i is  K_i*logsumexp(z_i) - sum_k z_i[t_ik]
(K_i = its targets that count). `kway_cross_entropy` computes that in row chunks, in float32, and keeps only the
gradient of the logits (in the logits' dtype) for the backward pass: never the float32 copy plus float32
log-softmax that the reference code and stock transformers hold. The fused LM-head version, which never holds
the logits at all, is `fused_loss.py`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Float32 elements of one loss chunk (64 MiB): bounds the temporaries of the K-way loss whatever
# the number of positions. 16M / 32000 (LLaMA-2 vocabulary) = 524 positions per chunk.
LOSS_CHUNK_ELEMENTS = 16 * 1024 * 1024


def check_length(length: int, patch_size: int) -> int:
    """Number of patches n = L / K; raise if L is not a multiple of K (never truncate silently)."""
    if length % patch_size != 0:
        raise ValueError(
            f"sequence length L={length} is not a multiple of the patch size K={patch_size}: "
            f"make the block size a multiple of K (e.g. L={length - length % patch_size} or "
            f"L={length + patch_size - length % patch_size}); nothing is truncated silently"
        )
    return length // patch_size



def next_patch_targets(labels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, L) labels -> (B, n, K) targets: row i holds the K labels of patch i+1; the last row is ignored."""
    batch, length = labels.shape
    n = check_length(length, patch_size)
    patches = labels.view(batch, n, patch_size)  # (B, n, K)
    return F.pad(patches[:, 1:], (0, 0, 0, 1), value=IGNORE_INDEX)  # (B, n, K)


def loss_target_labels(labels: torch.Tensor, patch_size: int = 1) -> torch.Tensor:
    """The labels that are loss targets: all but the first patch's (B, L - K), -100 still to be ignored."""
    return labels[..., patch_size:]


def count_loss_targets(labels: torch.Tensor, patch_size: int = 1) -> torch.Tensor:
    """Number of (position, target) pairs the loss averages over: labels after the first patch != -100.

    This is the `num_items_in_batch` of one micro-batch; for K = 1 it is transformers' own count
    (`labels[..., 1:] != -100`), for K > 1 the first patch is never a target.
    """
    return loss_target_labels(labels, patch_size).ne(IGNORE_INDEX).sum()


class _KWayCrossEntropy(torch.autograd.Function):
    """Sum over rows r and offsets k of  w_k * -log softmax(z_r)[t_rk]  (t_rk = -100 ignored; w_k = 1 without
    weights), chunked over rows.

    forward returns (total, per_offset): total is the differentiable weighted sum; per_offset (K,) the
    unweighted sum of each offset, for logging. The gradient
    d total / d z_r = (sum_k w_k [t_rk counts]) softmax(z_r) - sum_k w_k onehot(t_rk)  (K_r softmax - ... unweighted) is
    computed chunk by chunk during forward (float32) and stored in the logits' dtype: the only
    (rows x vocab) tensor kept for backward.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int, weights: torch.Tensor | None):
        # logits: (N, V) any float dtype; targets: (N, K) int64; weights: (K,) float32 or None (all 1)
        rows = logits.shape[0]
        valid = targets.ne(IGNORE_INDEX)  # (N, K)
        safe_targets = targets.clamp(min=0)  # (N, K)
        # w_k * [t_rk counts]: the weight of each target in the sum (N, K), float32
        target_weight = valid.to(torch.float32) if weights is None else valid * weights
        per_offset = torch.zeros(targets.shape[1], dtype=torch.float32, device=logits.device)  # (K,)
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        for start in range(0, rows, chunk_rows):
            chunk = slice(start, start + chunk_rows)
            z = logits[chunk].to(torch.float32, copy=True)  # (c, V)
            lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (c, 1)
            chunk_valid = valid[chunk]  # (c, K)
            picked = z.gather(1, safe_targets[chunk])  # (c, K)
            per_offset += ((lse - picked) * chunk_valid).sum(dim=0)
            if grad is not None:
                probs = z.sub_(lse).exp_()  # (c, V), in place: softmax
                chunk_weight = target_weight[chunk]  # (c, K)
                probs.mul_(chunk_weight.sum(dim=1, keepdim=True))  # (sum_k w_k) * softmax; K_r * softmax unweighted
                probs.scatter_add_(1, safe_targets[chunk], -chunk_weight)
                grad[chunk] = probs
        # With no target that counts, the loss is 0/0 = nan (like stock) and grad_total is inf: the
        # gradient must stay zero (as stock's), not 0 * inf = nan, which would poison the optimizer.
        ctx.save_for_backward(grad, valid.any())
        ctx.mark_non_differentiable(per_offset)
        total = per_offset.sum() if weights is None else (per_offset * weights).sum()
        return total, per_offset

    @staticmethod
    def backward(ctx, grad_total, grad_per_offset):
        grad, any_valid = ctx.saved_tensors
        scale = torch.where(any_valid, grad_total, torch.zeros_like(grad_total))
        return grad * scale.to(grad.dtype), None, None, None


def normalise_offset_weights(values) -> tuple[float, ...] | None:
    """Per-offset weights of the K-way loss, scaled to mean 1: w_k = K * v_k / sum(v). None when all K values
    are equal: the paper's plain mean (Eq. 3), computed exactly as without weights.

    `values`: K >= 1 finite, non-negative numbers, not all zero. Raises ValueError otherwise."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("offset weights: need K >= 1 values, got none")
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"offset weights must be finite and >= 0, got {values}")
    largest = max(values)
    if largest == 0:
        raise ValueError(f"offset weights must not all be 0, got {values}")
    if all(v == values[0] for v in values):
        return None
    scaled = [v / largest for v in values]  # in [0, 1]: their sum cannot overflow (K values of 1e308 did)
    total = math.fsum(scaled)
    return tuple(len(values) * v / total for v in scaled)


def check_offset_weights(offset_weights, num_offsets: int, device) -> torch.Tensor | None:
    """`offset_weights` (K numbers, or None) as a (K,) float32 tensor on `device`; ValueError if not K of them."""
    if offset_weights is None:
        return None
    weights = torch.as_tensor(offset_weights, dtype=torch.float32, device=device).reshape(-1)
    if weights.numel() != num_offsets:
        raise ValueError(f"offset weights: {weights.numel()} given for K={num_offsets} offsets")
    return weights


def loss_denominator(per_offset_count: torch.Tensor, num_items_in_batch, device):
    """What the summed K-way loss is divided by: `num_items_in_batch` when given (an int, or a tensor moved to
    `device`: the targets of the whole accumulated batch, so that gradient accumulation is exact, as in
    transformers' causal-LM loss), else the targets that count here, `per_offset_count.sum()`."""
    if num_items_in_batch is None:
        return per_offset_count.sum()
    if torch.is_tensor(num_items_in_batch):
        return num_items_in_batch.to(device)
    return num_items_in_batch


def kway_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_elements: int = LOSS_CHUNK_ELEMENTS,
    offset_weights=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's Eq. 3 for logits (..., V) and targets (..., K) of -100-masked token ids, optionally with
    per-offset weights (Token Superposition Training's weighting of the K targets).

    `offset_weights`: (K,) non-negative weights w_1..w_K used as given (a sequence or tensor), or None (all 1).
    Scale them to mean 1 (`normalise_offset_weights`) so that equal weights give Eq. 3 exactly.

    Returns (loss, per_offset_loss):
      loss: scalar float32, the sum of w_k * -log p over the targets that count divided by
        `num_items_in_batch` when given (exact gradient accumulation, like transformers' causal-LM loss), else
        by their number.
      per_offset_loss: (K,) float32, detached: the unweighted mean loss of each offset k = 1..K (nan if none
        counts).
    Raises ValueError if `offset_weights` does not hold K values.
    """
    vocab, num_offsets = logits.shape[-1], targets.shape[-1]
    logits_2d = logits.reshape(-1, vocab)  # (N, V): a view for the contiguous logits of the LM head
    targets_2d = targets.reshape(-1, num_offsets).to(logits.device)  # (N, K)
    chunk_rows = max(1, chunk_elements // vocab)
    weights = check_offset_weights(offset_weights, num_offsets, logits.device)
    total, per_offset_sum = _KWayCrossEntropy.apply(logits_2d, targets_2d, chunk_rows, weights)
    per_offset_count = targets_2d.ne(IGNORE_INDEX).sum(dim=0)  # (K,)
    denominator = loss_denominator(per_offset_count, num_items_in_batch, total.device)
    per_offset_loss = per_offset_sum / per_offset_count
    return total / denominator, per_offset_loss
