"""The LM head fused with the K-way loss of patch-level training (Shao, Meng, Zhou, ICLR 2025, arXiv:2407.12665).

From each position r the patch stage predicts all K tokens t_r1..t_rK of the next patch with the one LM head
(the paper's Eq. 3). With z_r the logits of row r and K_r its targets that count (-100 is ignored):

    loss_r = sum_k -log softmax(z_r)[t_rk] = K_r * logsumexp(z_r) - sum_k z_r[t_rk]
    d loss_r / d z_r = K_r * softmax(z_r) - sum_k onehot(t_rk)

The unfused path (`loss.kway_cross_entropy` on `lm_head(hidden)`) holds the (N, V) logits and
their gradient: 2 x 0.49 GiB at 8,192 x 32,000 in bf16, four times that at 128,256. Here the hidden states
(N, H) and the head's weight (V, H) go in, and rows are processed in chunks, as Liger-Kernel's
`fused_linear_cross_entropy` does for K = 1: the chunk's logits, their logsumexp and the K targets' logits,
the logits' gradient, and from it the chunk's rows of d/d hidden and its share of d/d weight (and d/d bias).
All of it happens in forward; backward only scales the stored gradients by the incoming one. No (N, V)
tensor ever exists: the largest temporary is one chunk's logits.

Precision: the matmuls run in the compute dtype (the inputs', or autocast's), as `nn.Linear` would; the
logit processing, logsumexp and the logits' gradient in float32. The weight's gradient is accumulated chunk by
chunk in the weight's dtype (float32 for fp32 or autocast master weights; for bf16 weights one bf16 rounding
per chunk, as Liger) and the hidden states' gradient is written row by row in the hidden states' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .loss import IGNORE_INDEX, check_offset_weights, loss_denominator

# The chunk's logits hold at most max(FUSED_CHUNK_ELEMENTS, FUSED_MIN_CHUNK_ROWS * V) elements, and a chunk
# peaks at 6 bytes an element (its float32 logits plus their bf16 copy being made): 8M elements, 48 MiB, is
# 262 rows at LLaMA-2's 32,000, a tenth of the (N, V) logits' 0.49 GiB at 8,192 positions in bf16 (soft-capping
# adds 4 bytes an element: tanh's derivative, kept for the chain rule). Each chunk
# also rewrites the (V, H) weight gradient once, which on a GPU (H200: ~1 PFLOP/s bf16, 4.8 TB/s) costs as much
# as the chunk's three matmuls at about 140 rows: the 256-row floor (Liger's chunk at 8,192 positions x
# Llama-3's 128,256 x H 4,096; 32.8M elements, 197 MiB there) keeps that share small. The floor is an estimate
# from those two numbers, not yet timed on a GPU.
FUSED_CHUNK_ELEMENTS = 8 * 1024 * 1024
FUSED_MIN_CHUNK_ROWS = 256

__all__ = ["fused_kway_linear_cross_entropy", "default_chunk_rows", "FUSED_CHUNK_ELEMENTS", "FUSED_MIN_CHUNK_ROWS"]


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk: FUSED_CHUNK_ELEMENTS // V, at least FUSED_MIN_CHUNK_ROWS (see those constants)."""
    return max(FUSED_CHUNK_ELEMENTS // vocab, FUSED_MIN_CHUNK_ROWS)


class _FusedKWayLinearCrossEntropy(torch.autograd.Function):
    """loss = (sum over rows r and offsets k of -log softmax(f(h_r W^T + b))[t_rk]) / denominator, with the
    gradients of h, W and b computed chunk by chunk in forward. f is the optional elementwise processing
    z -> softcap * tanh(scale * z / softcap) (or z -> scale * z without soft-capping).

    forward returns (loss, per_offset_sum): loss differentiable, per_offset_sum (K,) float32 for logging.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, denominator, chunk_rows, compute_dtype, logit_scale, softcap,
                offset_weights):
        # hidden: (N, H); weight: (V, H); bias: (V,) or None; targets: (N, K) int64; denominator: 0-dim float32;
        # offset_weights: (K,) float32 or None (all 1)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_any = need_hidden or need_weight or need_bias
        rows = hidden.shape[0]
        valid = targets.ne(IGNORE_INDEX)  # (N, K)
        safe_targets = targets.clamp(min=0)  # (N, K)
        # w_k * [t_rk counts] (N, K) and its row sum (N, 1): K_r without weights
        target_weight = valid.to(torch.float32) if offset_weights is None else valid * offset_weights
        per_row = target_weight.sum(dim=1, keepdim=True)  # (N, 1)
        # With no target that counts and no num_items_in_batch, the loss is 0/0 = nan (like stock): the
        # gradient must then be zero, not 0 * inf = nan.
        inverse = torch.where(valid.any(), 1.0 / denominator, torch.zeros_like(denominator))  # 0-dim
        per_offset = torch.zeros(targets.shape[1], dtype=torch.float32, device=hidden.device)  # (K,)

        with torch.autocast(hidden.device.type, enabled=False):  # the dtypes below are chosen by hand
            weight_c = weight.to(compute_dtype)  # (V, H): a copy only under autocast, as nn.Linear's
            bias_c = None if bias is None else bias.to(compute_dtype)
            grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else None
            grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format) if need_weight else None
            grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=hidden.device) if need_bias else None
            for start in range(0, rows, chunk_rows):
                chunk = slice(start, start + chunk_rows)
                hidden_c = hidden[chunk].to(compute_dtype)  # (c, H)
                z = F.linear(hidden_c, weight_c, bias_c).to(torch.float32)  # (c, V), float32 (a copy unless fp32)
                if softcap is not None:
                    if logit_scale is not None:
                        z.mul_(logit_scale)
                    tanh = z.div_(softcap).tanh_()  # (c, V), in place
                    if need_any:  # d softcap*tanh(s*y/softcap) / dy = s * (1 - tanh^2)
                        cap_grad = torch.square(tanh).neg_().add_(1.0)  # (c, V)
                        if logit_scale is not None:
                            cap_grad.mul_(logit_scale)
                    z = tanh.mul_(softcap)
                elif logit_scale is not None:
                    z.mul_(logit_scale)
                chunk_targets, chunk_valid = safe_targets[chunk], valid[chunk]  # (c, K)
                picked = z.gather(1, chunk_targets)  # (c, K)
                row_max = z.amax(dim=1, keepdim=True)  # (c, 1)
                exp = z.sub_(row_max).exp_()  # (c, V), in place: exp(z - max)
                sum_exp = exp.sum(dim=1, keepdim=True)  # (c, 1)
                lse = row_max + sum_exp.log()  # (c, 1)
                per_offset += ((lse - picked) * chunk_valid).sum(dim=0)
                if not need_any:
                    continue
                # d loss / d z = (K_r * softmax - sum_k onehot(t_rk)) / denominator, in place, float32
                grad = exp.mul_(per_row[chunk] * inverse / sum_exp)  # (c, V)
                grad.scatter_add_(1, chunk_targets, target_weight[chunk] * -inverse)
                if softcap is not None:
                    grad.mul_(cap_grad)
                    del cap_grad
                elif logit_scale is not None:
                    grad.mul_(logit_scale)
                if need_bias:
                    grad_bias += grad.sum(dim=0)
                grad_c = grad.to(compute_dtype)  # (c, V)
                del exp, grad, z
                if need_hidden:  # (c, V) @ (V, H): the chunk's rows, whole
                    grad_hidden[chunk] = grad_c @ weight_c
                if need_weight:  # (V, c) @ (c, H), accumulated over chunks in the weight's dtype
                    if grad_weight.dtype == compute_dtype:
                        grad_weight.addmm_(grad_c.t(), hidden_c)
                    else:  # autocast: a (V, H) product in the compute dtype, added to the float32 sum
                        grad_weight += grad_c.t() @ hidden_c
                del grad_c
        ctx.grads = (grad_hidden, grad_weight, None if grad_bias is None else grad_bias.to(bias.dtype))
        ctx.any_valid = valid.any()
        ctx.mark_non_differentiable(per_offset)
        total = per_offset.sum() if offset_weights is None else (per_offset * offset_weights).sum()
        return total / denominator, per_offset

    @staticmethod
    def backward(ctx, grad_loss, grad_per_offset):
        if ctx.grads is None:
            raise RuntimeError(
                "fused_kway_linear_cross_entropy: backward ran twice through the same graph; its gradients are "
                "computed in forward and scaled in place, once. Call the loss again instead of retain_graph=True."
            )
        grads, ctx.grads = ctx.grads, None  # freed as soon as autograd has taken them
        scale = torch.where(ctx.any_valid, grad_loss, torch.zeros_like(grad_loss))  # 0-dim
        grads = tuple(None if g is None else g.mul_(scale.to(g.dtype)) for g in grads)
        return (*grads, None, None, None, None, None, None, None)


def fused_kway_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    logit_scale: float | None = None,
    softcap: float | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_rows: int | None = None,
    offset_weights=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's Eq. 3 on the LM head's output, without ever holding the (N, V) logits or their gradient.

    Equal (to float rounding) to `kway_cross_entropy(f(F.linear(hidden, weight, bias)), targets,
    num_items_in_batch)` with f(z) = softcap * tanh(logit_scale * z / softcap), or logit_scale * z without
    soft-capping, or z: Gemma-2's `final_logit_softcapping`, Cohere's `logit_scale`, Granite's
    1 / `logits_scaling`. f runs inside each chunk in float32, exactly, with its derivative in the chain rule.

    Args:
      hidden: (..., H) final hidden states (after the final norm), any float dtype; non-contiguous is fine.
      weight: (V, H) the LM head's weight (tied to the input embedding or not), same dtype as `hidden`
        unless autocast is on, when both are cast to autocast's dtype for the matmuls (as `nn.Linear`).
      targets: (..., K) token ids, -100 ignored; the leading dimensions match `hidden`'s.
      bias: (V,) the head's bias, or None.
      logit_scale: multiplies the logits (a float), or None.
      softcap: the soft-capping value c > 0 (logits -> c * tanh(logits / c), after the scale), or None.
      num_items_in_batch: the denominator (the targets of the whole accumulated batch, for exact gradient
        accumulation, as transformers' causal-LM loss); None: the targets that count here.
      chunk_rows: rows per chunk; None: `default_chunk_rows(V)`.
      offset_weights: (K,) non-negative weights w_k of the offsets (a sequence or tensor), or None (all 1): the
        loss sums w_k * -log p. As in `loss.kway_cross_entropy`, used as given (mean 1 after
        `normalise_offset_weights`, so that equal weights are Eq. 3 exactly).

    Returns (loss, per_offset_loss):
      loss: 0-dim float32, sum of w_k * -log p (nats) over the targets that count, divided by the denominator; nan
        when no target counts and `num_items_in_batch` is None, with zero gradients.
      per_offset_loss: (K,) float32, detached: the unweighted mean loss of each offset k = 1..K (nan where
        none counts).

    Gradients: for whichever of hidden, weight and bias require them, in their own dtypes. The backward
    pass can run once per call (it scales the gradients computed in forward, in place): a second backward
    through the same graph raises a RuntimeError.

    Raises ValueError for mismatched shapes or dtypes, non-integer targets, chunk_rows < 1, softcap <= 0 or
    offset_weights not of length K.
    """
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden (..., H) and weight (V, H) must share H, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.dim() < 1 or targets.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(f"targets (..., K) must match hidden (..., H) in the leading dimensions, got "
                         f"{tuple(targets.shape)} and {tuple(hidden.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape (V,)=({weight.shape[0]},), got {tuple(bias.shape)}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 (or None), got {softcap}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    elif hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(f"hidden, weight and bias must share a dtype outside autocast, got {hidden.dtype}, "
                         f"{weight.dtype}" + ("" if bias is None else f", {bias.dtype}"))
    else:
        compute_dtype = weight.dtype
    vocab, num_offsets = weight.shape[0], targets.shape[-1]
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(vocab)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")

    hidden_2d = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    targets_2d = targets.reshape(-1, num_offsets).to(device=hidden.device, dtype=torch.int64)  # (N, K)
    per_offset_count = targets_2d.ne(IGNORE_INDEX).sum(dim=0)  # (K,)
    denominator = torch.as_tensor(loss_denominator(per_offset_count, num_items_in_batch, hidden.device),
                                  device=hidden.device).to(torch.float32)
    weights = check_offset_weights(offset_weights, num_offsets, hidden.device)
    loss, per_offset_sum = _FusedKWayLinearCrossEntropy.apply(
        hidden_2d, weight, bias, targets_2d, denominator, chunk_rows, compute_dtype,
        None if logit_scale is None else float(logit_scale), None if softcap is None else float(softcap), weights,
    )
    return loss, per_offset_sum / per_offset_count
