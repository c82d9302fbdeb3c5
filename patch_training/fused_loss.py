"""The LM head fused with the K-way loss of patch-level training (Shao, Meng, Zhou, ICLR 2025, arXiv:2407.12665).

From each position r the patch stage predicts all K tokens t_r1..t_rK of the next patch with the one LM head
(the paper's Eq. 3). With z_r the logits of row r and K_r its targets that count (-100 is ignored):

    loss_r = sum_k -log softmax(z_r)[t_rk] = K_r * logsumexp(z_r) - sum_k z_r[t_rk]
    d loss_r / d z_r = K_r * softmax(z_r) - sum_k onehot(t_rk)

so the K-way loss needs one logsumexp per row, as the token-level loss does, plus K gathered logits.

The unfused path (`loss.kway_cross_entropy` on `lm_head(hidden)`) holds the (N, V) logits and their gradient:
2 x 0.49 GiB at 8,192 x 32,000 in bf16, four times that at 128,256. Here the hidden states (N, H) and the head's
weight (V, H) go in, and rows are processed in chunks, as Liger-Kernel's `fused_linear_cross_entropy` does for
K = 1: the chunk's logits (one matmul), their logsumexp, the K targets' logits and the logits' gradient, then
from that gradient the chunk's rows of d/d hidden and its share of d/d weight (two matmuls; and d/d bias). All
of it happens in forward; backward only scales the stored gradients by the incoming one. No (N, V) tensor ever
exists: the largest temporaries are one chunk's logits and their gradient.

Two kernels compute a chunk's loss and logits' gradient from its logits, with the same result:
  - "compiled": `torch.compile` (Inductor: Triton on a GPU, C++ on a CPU) of `chunk_loss_and_grad`, which
    reads the logits in the compute dtype and writes their gradient in it (8 to 10 bytes of memory traffic a
    logit in bf16, against about 38 for the eager kernel's float32 passes, counted from their reads and writes:
    at 4.8 TB/s, about 5 ms instead of about 20 ms for the 2.1G logits of a 370M step at micro-batch 32, an
    estimate from those counts);
  - "eager": the same arithmetic as in-place PyTorch ops on a float32 copy (no compiler needed).
"auto" (the default) is "compiled" on a CUDA device where Triton is installed and "eager" elsewhere; a compiler
failure falls back to "eager", said once in the log. The three matmuls are cuBLAS calls in both. On CUDA the
weight's float32 gradient (autocast over float32 weights) is accumulated inside the matmul (`torch.addmm`
with `out_dtype`), one read and write of (V, H) float32 a chunk instead of three passes.

Precision: the matmuls run in the compute dtype (the inputs', or autocast's), as `nn.Linear` would; the
logit processing, logsumexp and the logits' gradient in float32. The weight's gradient is accumulated chunk by
chunk in the weight's dtype (float32 for fp32 or autocast master weights; for bf16 weights one bf16 rounding
per chunk, as Liger) and the hidden states' gradient is written row by row in the hidden states' dtype.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from .loss import IGNORE_INDEX, check_offset_weights, loss_denominator

# Rows per chunk (`default_chunk_rows`): a chunk holds 1/FUSED_CHUNKS of the (N, V) logits, at least
# FUSED_CHUNK_ELEMENTS and at most FUSED_MAX_CHUNK_ELEMENTS logits, and never fewer than FUSED_MIN_CHUNK_ROWS rows.
# Why these bounds: each chunk rewrites the (V, H) float32 weight gradient once (8 bytes an element read and
# written), which on an H200 (~790 TFLOP/s measured in bf16, 4.8 TB/s) is hidden in the chunk's weight-gradient
# matmul (2 * rows * V * H FLOPs) from about 800 rows up; 1/32 of the logits is 2,048 rows at 65,536 positions
# (a 370M step at micro-batch 32), so the 32 rewrites cost about 2 ms at 32,000 x 1,024. The lower bound keeps
# the memory of the head + loss at 8,192 positions x 32,000 where it was (8M elements: 262 rows, 0.12 GiB with
# the head's gradients), and the upper one bounds a chunk's temporaries (logits and their gradient in bf16:
# 4 bytes an element, 0.5 GiB at 128M; the eager kernel's float32 copy adds 4-6 bytes). The 256-row floor
# is Liger's chunk at 8,192 positions x Llama-3's 128,256. These are estimates from those numbers; the GPU
# suite's `headloss` variant times them.
FUSED_CHUNKS = 32
FUSED_CHUNK_ELEMENTS = 8 * 1024 * 1024
FUSED_MAX_CHUNK_ELEMENTS = 128 * 1024 * 1024
FUSED_MIN_CHUNK_ROWS = 256
FUSED_KERNELS = ("auto", "compiled", "eager")

__all__ = [
    "FUSED_CHUNKS",
    "FUSED_CHUNK_ELEMENTS",
    "FUSED_KERNELS",
    "FUSED_MAX_CHUNK_ELEMENTS",
    "FUSED_MIN_CHUNK_ROWS",
    "chunk_loss_and_grad",
    "default_chunk_rows",
    "fused_kway_linear_cross_entropy",
    "resolve_kernel",
]

logger = logging.getLogger(__name__)


def default_chunk_rows(vocab: int, rows: int | None = None) -> int:
    """Rows per chunk for `rows` positions (N) at vocabulary `vocab` (V): ceil(N / FUSED_CHUNKS), clamped to
    [FUSED_CHUNK_ELEMENTS // V, FUSED_MAX_CHUNK_ELEMENTS // V] and at least FUSED_MIN_CHUNK_ROWS (see those
    constants); with `rows` None, the lower bound (the smallest chunk)."""
    low = max(FUSED_CHUNK_ELEMENTS // vocab, FUSED_MIN_CHUNK_ROWS)
    if rows is None:
        return low
    high = max(FUSED_MAX_CHUNK_ELEMENTS // vocab, FUSED_MIN_CHUNK_ROWS)
    return min(max(math.ceil(rows / FUSED_CHUNKS), low), high)


def resolve_kernel(kernel: str, device: torch.device | str) -> str:
    """"compiled" or "eager" for `kernel` ("auto", "compiled" or "eager") on `device`: "auto" is "compiled" on a
    CUDA device with Triton (Inductor's GPU code generator) installed, else "eager". Raises ValueError for
    another name."""
    if kernel not in FUSED_KERNELS:
        raise ValueError(f"fused loss kernel must be one of {', '.join(FUSED_KERNELS)}, got {kernel!r}")
    if kernel != "auto":
        return kernel
    if _COMPILE_FAILED:
        return "eager"
    from torch.utils._triton import has_triton

    return "compiled" if torch.device(device).type == "cuda" and has_triton() else "eager"


def chunk_loss_and_grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    row_weight: torch.Tensor,
    target_weight: torch.Tensor,
    logit_scale: float | None,
    softcap: float | None,
    with_grad: bool,
    with_bias_grad: bool,
):
    """One chunk of the K-way loss from its logits, as pure tensor code for `torch.compile` (one read of the
    logits, one write of their gradient: no float32 (c, V) tensor needs to exist).

    Args:
      logits: (c, V) the head's output z, any float dtype; processed in float32 as
        f(z) = softcap * tanh(logit_scale * z / softcap) (or logit_scale * z, or z).
      targets: (c, K) int64 token ids in [0, V) (ignored ones clamped to any valid id).
      valid: (c, K) float32, 1 where the target counts, else 0.
      row_weight: (c, 1) float32, sum_k w_k [t_rk counts] / denominator: the softmax's factor in the gradient.
      target_weight: (c, K) float32, w_k [t_rk counts] / denominator: each target's one-hot factor.
    Returns (terms, grad, grad_bias):
      terms: (K,) float32, sum over the chunk's rows of (logsumexp(f(z_r)) - f(z_r)[t_rk]) * valid_rk;
      grad: (c, V) d loss / d z in the logits' dtype, or None without `with_grad`;
      grad_bias: (V,) float32, grad summed over rows (in float32, before rounding), or None without `with_bias_grad`.
    """
    y = logits.float()  # (c, V)
    if logit_scale is not None:
        y = y * logit_scale
    tanh = None
    if softcap is not None:
        tanh = torch.tanh(y / softcap)
        y = tanh * softcap
    lse = torch.logsumexp(y, dim=1, keepdim=True)  # (c, 1)
    terms = ((lse - y.gather(1, targets)) * valid).sum(dim=0)  # (K,)
    if not with_grad:
        return terms, None, None
    grad = torch.exp(y - lse) * row_weight  # (c, V): (sum_k w_k) softmax / denominator
    vocab_ids = torch.arange(y.shape[1], device=y.device)  # (V,)
    for k in range(targets.shape[1]):  # K compares a logit: no scatter (atomic adds on a GPU) of repeated targets
        grad = grad - (vocab_ids == targets[:, k : k + 1]) * target_weight[:, k : k + 1]
    if tanh is not None:  # d softcap*tanh(s*z/softcap) / dz = s * (1 - tanh^2)
        grad = grad * ((1.0 - tanh * tanh) * (1.0 if logit_scale is None else logit_scale))
    elif logit_scale is not None:
        grad = grad * logit_scale
    grad_bias = grad.sum(dim=0) if with_bias_grad else None
    return terms, grad.to(logits.dtype), grad_bias


def _eager_chunk_loss_and_grad(logits, targets, valid, row_weight, target_weight, logit_scale, softcap, with_grad,
                               with_bias_grad):
    """`chunk_loss_and_grad` with in-place PyTorch ops on one float32 copy of the logits (plus tanh's
    derivative with soft-capping): the same result, no compiler."""
    z = logits.to(torch.float32, copy=True)  # (c, V)
    cap_grad = None
    if softcap is not None:
        if logit_scale is not None:
            z.mul_(logit_scale)
        tanh = z.div_(softcap).tanh_()  # (c, V), in place
        if with_grad:  # d softcap*tanh(s*y/softcap) / dy = s * (1 - tanh^2)
            cap_grad = torch.square(tanh).neg_().add_(1.0)  # (c, V)
            if logit_scale is not None:
                cap_grad.mul_(logit_scale)
        z = tanh.mul_(softcap)
    elif logit_scale is not None:
        z.mul_(logit_scale)
    picked = z.gather(1, targets)  # (c, K)
    row_max = z.amax(dim=1, keepdim=True)  # (c, 1)
    exp = z.sub_(row_max).exp_()  # (c, V), in place: exp(z - max)
    sum_exp = exp.sum(dim=1, keepdim=True)  # (c, 1)
    terms = ((row_max + sum_exp.log() - picked) * valid).sum(dim=0)  # (K,)
    if not with_grad:
        return terms, None, None
    grad = exp.mul_(row_weight / sum_exp)  # (c, V), in place: (sum_k w_k) softmax / denominator
    grad.scatter_add_(1, targets, target_weight.neg())
    if cap_grad is not None:
        grad.mul_(cap_grad)
        del cap_grad
    elif logit_scale is not None:
        grad.mul_(logit_scale)
    grad_bias = grad.sum(dim=0) if with_bias_grad else None
    return terms, grad.to(logits.dtype), grad_bias


_COMPILED = None  # torch.compile(chunk_loss_and_grad), made at first use
_COMPILE_FAILED = False  # a compiler failure sends every later call to the eager kernel
_COMPILE_WORKED = False  # the compiled kernel has run once in this process
_FP32_ADDMM: dict[str, bool] = {}  # device type -> torch.addmm(..., out_dtype=float32) works there


def _compiled_chunk(*args):
    """`chunk_loss_and_grad` compiled, with the chunk's rows a dynamic size (one compilation serves every chunk,
    the shorter last one included, and every number of positions; V stays static); on a compiler failure, the
    eager kernel from then on."""
    global _COMPILED, _COMPILE_FAILED, _COMPILE_WORKED
    if not _COMPILE_FAILED:
        import torch._dynamo

        if _COMPILED is None:
            _COMPILED = torch.compile(chunk_loss_and_grad, fullgraph=True)
        for tensor in args[:5]:  # logits, targets, valid, row_weight, target_weight: (c, ...)
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        if _COMPILE_WORKED:  # a failure after the first success is not the compiler's absence: raised
            return _COMPILED(*args)
        try:
            result = _COMPILED(*args)
            _COMPILE_WORKED = True
            return result
        # Dynamo's own errors (BackendCompilerFailed, Unsupported) and whatever a missing or broken code generator
        # raises at the first call (Triton's compilation errors, a missing C++ compiler): the eager kernel then.
        except Exception as error:  # noqa: BLE001
            _COMPILE_FAILED = True
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            logger.warning("fused LM-head loss: compiling its chunk kernel failed (%s); using the eager kernel",
                           first_line)
    return _eager_chunk_loss_and_grad(*args)


def _fp32_addmm_works(device: torch.device) -> bool:
    """Whether `torch.addmm(c, a, b, out_dtype=torch.float32, out=c)` accumulates a bf16 product into float32 `c`
    in place on `device` (CUDA in torch >= 2.8; not on CPU), checked once on a small case with a transposed `a`."""
    if device.type not in _FP32_ADDMM:
        try:
            a = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], device=device, dtype=torch.bfloat16)  # (3, 2)
            b = torch.tensor([[1.0, 0.5], [2.0, 0.25], [0.0, 1.0]], device=device, dtype=torch.bfloat16)  # (3, 2)
            c = torch.ones(2, 2, device=device)
            torch.addmm(c, a.t(), b, out_dtype=torch.float32, out=c)
            expected = 1.0 + a.t().float() @ b.float()
            _FP32_ADDMM[device.type] = bool(torch.equal(c, expected))
        except (RuntimeError, NotImplementedError, TypeError):
            _FP32_ADDMM[device.type] = False
    return _FP32_ADDMM[device.type]


def _accumulate_weight_grad(grad_weight: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """grad_weight (V, H) += grad_logits (c, V)^T @ hidden (c, H), in grad_weight's dtype."""
    if grad_weight.dtype == grad_logits.dtype:
        grad_weight.addmm_(grad_logits.t(), hidden)
    elif grad_weight.dtype == torch.float32 and _fp32_addmm_works(grad_weight.device):
        torch.addmm(grad_weight, grad_logits.t(), hidden, out_dtype=torch.float32, out=grad_weight)
    else:  # autocast elsewhere: a (V, H) product in the compute dtype, added to the float32 sum
        grad_weight += grad_logits.t() @ hidden


class _FusedKWayLinearCrossEntropy(torch.autograd.Function):
    """loss = (sum over rows r and offsets k of -log softmax(f(h_r W^T + b))[t_rk]) / denominator, with the
    gradients of h, W and b computed chunk by chunk in forward. f is the optional elementwise processing
    z -> softcap * tanh(scale * z / softcap) (or z -> scale * z without soft-capping).

    forward returns (loss, per_offset_sum): loss differentiable, per_offset_sum (K,) float32 for logging.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, denominator, chunk_rows, compute_dtype, logit_scale, softcap,
                offset_weights, kernel):
        # hidden: (N, H); weight: (V, H); bias: (V,) or None; targets: (N, K) int64; denominator: 0-dim float32;
        # offset_weights: (K,) float32 or None (all 1); kernel: "compiled" or "eager"
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_any = need_hidden or need_weight or need_bias
        rows = hidden.shape[0]
        valid = targets.ne(IGNORE_INDEX)  # (N, K)
        safe_targets = targets.clamp(min=0)  # (N, K)
        # With no target that counts and no num_items_in_batch, the loss is 0/0 = nan (like stock): the
        # gradient must then be zero, not 0 * inf = nan.
        inverse = torch.where(valid.any(), 1.0 / denominator, torch.zeros_like(denominator))  # 0-dim
        # w_k * [t_rk counts] / denominator (N, K) and its row sum (N, 1): K_r / denominator without weights
        target_weight = (valid.to(torch.float32) if offset_weights is None else valid * offset_weights) * inverse
        row_weight = target_weight.sum(dim=1, keepdim=True)  # (N, 1)
        valid_f = valid.to(torch.float32)  # (N, K)
        per_offset = torch.zeros(targets.shape[1], dtype=torch.float32, device=hidden.device)  # (K,)
        chunk_fn = _compiled_chunk if kernel == "compiled" else _eager_chunk_loss_and_grad

        with torch.autocast(hidden.device.type, enabled=False):  # the dtypes below are chosen by hand
            weight_c = weight.to(compute_dtype)  # (V, H): a copy only under autocast, as nn.Linear's
            bias_c = None if bias is None else bias.to(compute_dtype)
            grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else None
            grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format) if need_weight else None
            grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=hidden.device) if need_bias else None
            for start in range(0, rows, chunk_rows):
                chunk = slice(start, start + chunk_rows)
                hidden_c = hidden[chunk].to(compute_dtype)  # (c, H)
                logits = F.linear(hidden_c, weight_c, bias_c)  # (c, V), compute dtype
                terms, grad_c, grad_b = chunk_fn(
                    logits, safe_targets[chunk], valid_f[chunk], row_weight[chunk], target_weight[chunk], logit_scale,
                    softcap, need_any, need_bias,
                )
                del logits
                per_offset += terms
                if not need_any:
                    continue
                if need_bias:
                    grad_bias += grad_b
                if need_hidden:  # (c, V) @ (V, H): the chunk's rows, whole
                    grad_hidden[chunk] = grad_c @ weight_c
                if need_weight:  # (V, c) @ (c, H), accumulated over chunks in the weight's dtype
                    _accumulate_weight_grad(grad_weight, grad_c, hidden_c)
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
        return (*grads, None, None, None, None, None, None, None, None)


@torch.compiler.disable  # under a whole-model torch.compile: a graph break, and this runs as above (its own kernel)
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
    kernel: str = "auto",
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
      chunk_rows: rows per chunk; None: `default_chunk_rows(V, N)`.
      offset_weights: (K,) non-negative weights w_k of the offsets (a sequence or tensor), or None (all 1): the
        loss sums w_k * -log p. As in `loss.kway_cross_entropy`, used as given (mean 1 after
        `normalise_offset_weights`, so that equal weights are Eq. 3 exactly).
      kernel: the chunk kernel, "auto", "compiled" or "eager" (module docstring; `resolve_kernel`).

    Returns (loss, per_offset_loss):
      loss: 0-dim float32, sum of w_k * -log p (nats) over the targets that count, divided by the denominator; nan
        when no target counts and `num_items_in_batch` is None, with zero gradients.
      per_offset_loss: (K,) float32, detached: the unweighted mean loss of each offset k = 1..K (nan where
        none counts).

    Gradients: for whichever of hidden, weight and bias require them, in their own dtypes. The backward
    pass can run once per call (it scales the gradients computed in forward, in place): a second backward
    through the same graph raises a RuntimeError.

    Raises ValueError for mismatched shapes or dtypes, non-integer targets, chunk_rows < 1, softcap <= 0,
    offset_weights not of length K, or an unknown kernel.
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
    kernel = resolve_kernel(kernel, hidden.device)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    elif hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(f"hidden, weight and bias must share a dtype outside autocast, got {hidden.dtype}, "
                         f"{weight.dtype}" + ("" if bias is None else f", {bias.dtype}"))
    else:
        compute_dtype = weight.dtype
    vocab, num_offsets = weight.shape[0], targets.shape[-1]
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(vocab, hidden_2d.shape[0])
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")

    targets_2d = targets.reshape(-1, num_offsets).to(device=hidden.device, dtype=torch.int64)  # (N, K)
    per_offset_count = targets_2d.ne(IGNORE_INDEX).sum(dim=0)  # (K,)
    denominator = torch.as_tensor(loss_denominator(per_offset_count, num_items_in_batch, hidden.device),
                                  device=hidden.device).to(torch.float32)
    weights = check_offset_weights(offset_weights, num_offsets, hidden.device)
    loss, per_offset_sum = _FusedKWayLinearCrossEntropy.apply(
        hidden_2d, weight, bias, targets_2d, denominator, chunk_rows, compute_dtype,
        None if logit_scale is None else float(logit_scale), None if softcap is None else float(softcap), weights,
        kernel,
    )
    return loss, per_offset_sum / per_offset_count
