"""patch_training/fused_loss.py: the LM head fused with the K-way loss.

Two independent references: the unfused path of today (`F.linear`, the same logit processing, then
`kway_cross_entropy`) and a naive loop of the paper's Eq. 3 in float64, one (row, offset) at a time. Loss,
per-offset losses and the gradients of hidden states, weight and bias are compared in float32 (tight) and
bfloat16 (the fused result must be about as close to the float64 truth as the unfused bf16 path is), at K = 1
and K = 4, with -100 labels (whole rows and single offsets), num_items_in_batch, tied embeddings, a bias,
scaling and soft-capping, autocast, frozen inputs, gradient accumulation, DDP, and the memory target. Both chunk
kernels are checked: "eager" and "compiled" (torch.compile's Inductor, here its C++ code generator on the CPU; on a
GPU Triton, whose tests at the end run where CUDA is available and skip elsewhere).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT

from modeling_llama_patch import IGNORE_INDEX, kway_cross_entropy
from patch_training import fused_loss
from patch_training.fused_loss import (
    FUSED_CHUNKS,
    default_chunk_rows,
    fused_kway_linear_cross_entropy,
    resolve_kernel,
)

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import throughput  # noqa: E402

FP32_TOL = dict(rtol=1e-5, atol=1e-6)
ROWS, HIDDEN, VOCAB, CHUNK = 11, 16, 50, 3  # 4 chunks of 3 rows, the last partial
KERNELS = ["eager", "compiled"]


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test compiles the chunk kernel afresh: dynamo's per-function limit of compilations (8) would otherwise
    be reached by the many configurations of this module, after which dynamo runs the function uncompiled."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def process(logits, logit_scale=None, softcap=None):
    """The architectures' elementwise processing after the head (Cohere/Granite scale, Gemma-2 soft-cap)."""
    if logit_scale is not None:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def unfused(hidden, weight, targets, bias=None, logit_scale=None, softcap=None, num_items=None):
    """Today's path: the (N, V) logits, then the chunked K-way loss."""
    return kway_cross_entropy(process(F.linear(hidden, weight, bias), logit_scale, softcap), targets, num_items)


def naive(hidden, weight, targets, bias=None, logit_scale=None, softcap=None, num_items=None):
    """Eq. 3 one (row, offset) at a time: sum of logsumexp(z_r) - z_r[t] over targets != -100, / count or
    num_items; per offset, the mean over its targets."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1, targets.shape[-1])
    total, count = 0.0, 0
    sums, counts = [0.0] * targets.shape[1], [0] * targets.shape[1]
    for r in range(hidden.shape[0]):
        z = hidden[r] @ weight.T + (0 if bias is None else bias)
        z = process(z, logit_scale, softcap)
        for k in range(targets.shape[1]):
            t = int(targets[r, k])
            if t == IGNORE_INDEX:
                continue
            nll = torch.logsumexp(z, dim=0) - z[t]
            total, count = total + nll, count + 1
            sums[k], counts[k] = sums[k] + nll.item(), counts[k] + 1
    per_offset = torch.tensor([s / c if c else float("nan") for s, c in zip(sums, counts)])
    return total / (count if num_items is None else int(num_items)), per_offset


def make_inputs(num_offsets, dtype=torch.float32, with_bias=False, rows=ROWS, seed=0, repeated_target=False):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, HIDDEN, generator=generator)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator) / HIDDEN**0.5
    bias = torch.randn(VOCAB, generator=generator) if with_bias else None
    targets = torch.randint(0, VOCAB, (rows, num_offsets), generator=generator)
    targets[torch.rand(targets.shape, generator=generator) < 0.2] = IGNORE_INDEX
    targets[4] = IGNORE_INDEX  # a whole row ignored (the last patch's row in the model)
    targets[5, 0] = IGNORE_INDEX  # a row with some offsets ignored (for K = 1: ignored)
    targets[5, -1] = 7
    if repeated_target:
        targets[6] = 9  # every offset the same token (a repeated token in a patch): K one-hots on one logit
    targets[rows - 1, 0] = 3  # the last, partial chunk counts
    leaves = [t.to(dtype).requires_grad_() for t in (hidden, weight) + ((bias,) if with_bias else ())]
    return leaves, targets


def run(fn, leaves, targets, upstream=2.5, **kwargs):
    """(loss, per_offset, grads) of fn on fresh copies of the leaves; backward of upstream * loss."""
    leaves = [leaf.detach().clone().requires_grad_() for leaf in leaves]
    loss, per_offset = fn(*leaves[:2], targets, *leaves[2:], **kwargs)
    (upstream * loss).backward()
    return loss, per_offset, [leaf.grad for leaf in leaves]


def to64(leaves):
    return [leaf.detach().double() for leaf in leaves]


CASES = {
    "plain": {},
    "bias": dict(with_bias=True),
    "items": dict(num_items=37),
    "items-tensor": dict(num_items="tensor"),
    "scale": dict(logit_scale=0.37),
    "softcap": dict(softcap=2.0),
    "scale-softcap-bias": dict(logit_scale=3.0, softcap=1.5, with_bias=True),
}


def case_kwargs(case):
    spec = dict(CASES[case])
    with_bias = spec.pop("with_bias", False)
    if spec.get("num_items") == "tensor":
        spec["num_items"] = torch.tensor(37)
    return with_bias, spec


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("num_offsets", [1, 4])
def test_float32_matches_unfused_and_naive(case, num_offsets, kernel):
    """float32: loss, per-offset losses and every gradient equal the unfused path's and the naive loop's (a row
    whose K targets are one token included)."""
    with_bias, spec = case_kwargs(case)
    leaves, targets = make_inputs(num_offsets, with_bias=with_bias, repeated_target=True)
    num_items = spec.pop("num_items", None)
    fused = run(fused_kway_linear_cross_entropy, leaves, targets, chunk_rows=CHUNK, num_items_in_batch=num_items,
                kernel=kernel, **spec)
    ref = run(unfused, leaves, targets, num_items=num_items, **spec)
    exact = run(naive, to64(leaves), targets, num_items=num_items, **spec)
    loss, per_offset, grads = fused
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert per_offset.shape == (num_offsets,) and not per_offset.requires_grad
    for other in (ref, exact):
        torch.testing.assert_close(loss.double(), other[0].double(), **FP32_TOL)
        torch.testing.assert_close(per_offset.double(), other[1].double(), **FP32_TOL)
        for g, g_ref in zip(grads, other[2]):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g.double(), g_ref.double(), **FP32_TOL)
    assert torch.equal(grads[0][4], torch.zeros(HIDDEN)), "a row with no target gets no gradient"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", ["plain", "items", "scale-softcap-bias"])
@pytest.mark.parametrize("num_offsets", [1, 4])
def test_bfloat16_as_accurate_as_unfused(case, num_offsets, kernel):
    """bfloat16 inputs: against the float64 truth on the same (bf16-rounded) inputs, the fused path's error is at
    most about the unfused bf16 path's (2x + a bf16 ulp's worth), and the two agree within bf16 tolerance.
    Gradients come back in bf16."""
    with_bias, spec = case_kwargs(case)
    leaves, targets = make_inputs(num_offsets, dtype=torch.bfloat16, with_bias=with_bias, rows=40)
    num_items = spec.pop("num_items", None)
    fused = run(fused_kway_linear_cross_entropy, leaves, targets, chunk_rows=CHUNK, num_items_in_batch=num_items,
                kernel=kernel, **spec)
    ref = run(unfused, leaves, targets, num_items=num_items, **spec)
    exact = run(naive, to64(leaves), targets, num_items=num_items, **spec)
    assert all(g.dtype == torch.bfloat16 for g in fused[2])

    def error(a, b):
        return (a.double() - b.double()).abs().max().item()

    scale = lambda t: t.double().abs().max().item()  # noqa: E731
    assert error(fused[0], exact[0]) <= 2 * error(ref[0], exact[0]) + 1e-3 * scale(exact[0])
    torch.testing.assert_close(fused[1].double(), exact[1].double(), rtol=1e-2, atol=1e-2)
    for g, g_ref, g_exact in zip(fused[2], ref[2], exact[2]):
        assert error(g, g_exact) <= 2 * error(g_ref, g_exact) + 2**-8 * scale(g_exact), (error(g, g_exact), error(g_ref, g_exact))
        torch.testing.assert_close(g.float(), g_ref.float(), rtol=2e-2, atol=2e-2 * scale(g_ref))


def test_three_dimensional_inputs_and_non_contiguous_views():
    """(B, n, H) hidden states with (B, n, K) targets, a transposed (non-contiguous) hidden view and a weight
    stored transposed: the same loss and gradients as contiguous 2-D inputs."""
    (hidden, weight), targets = make_inputs(4, rows=12)
    ref = run(fused_kway_linear_cross_entropy, [hidden, weight], targets, chunk_rows=5)
    hidden_t = hidden.detach().T.contiguous().requires_grad_()  # (H, N)
    weight_t = weight.detach().T.contiguous().requires_grad_()  # (H, V)
    loss, per_offset = fused_kway_linear_cross_entropy(
        hidden_t.T.view(3, 4, HIDDEN), weight_t.T, targets.view(3, 4, 4), chunk_rows=5
    )  # hidden (3, 4, H) with strides (4, 1, 12): its (12, H) rows are not contiguous either
    (2.5 * loss).backward()
    torch.testing.assert_close(loss, ref[0], **FP32_TOL)
    torch.testing.assert_close(per_offset, ref[1], equal_nan=True, **FP32_TOL)
    torch.testing.assert_close(hidden_t.grad.T, ref[2][0], **FP32_TOL)
    torch.testing.assert_close(weight_t.grad.T, ref[2][1], **FP32_TOL)


def test_tied_embeddings_accumulate_both_uses():
    """The same Parameter as input embedding and head: its gradient is the sum of both uses, as unfused."""
    generator = torch.Generator().manual_seed(3)
    embedding = torch.nn.Parameter(torch.randn(VOCAB, HIDDEN, generator=generator) / 4)
    mixer = torch.randn(HIDDEN, HIDDEN, generator=generator) / 4
    input_ids = torch.randint(0, VOCAB, (2, 8), generator=generator)
    targets = torch.randint(0, VOCAB, (2, 8, 4), generator=generator)
    targets[:, -1] = IGNORE_INDEX

    def grad_of(loss_fn):
        embedding.grad = None
        hidden = torch.tanh(F.embedding(input_ids, embedding) @ mixer)  # (B, n, H): "the decoder"
        loss_fn(hidden, embedding, targets)[0].backward()
        return embedding.grad.clone()

    fused = grad_of(lambda h, w, t: fused_kway_linear_cross_entropy(h, w, t, chunk_rows=5))
    ref = grad_of(lambda h, w, t: kway_cross_entropy(F.linear(h, w), t))
    head_only = grad_of(lambda h, w, t: fused_kway_linear_cross_entropy(h.detach(), w, t, chunk_rows=5))
    torch.testing.assert_close(fused, ref, **FP32_TOL)
    assert (fused - head_only).abs().max() > 1e-3, "the embedding's share of the gradient is missing"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("num_offsets", [1, 4])
def test_gradient_accumulation_two_micro_batches_equal_one_batch(num_offsets, kernel):
    """Two micro-batches with num_items_in_batch = the whole batch's targets: the summed losses and the
    accumulated gradients equal one call on the whole batch."""
    (hidden, weight, bias), targets = make_inputs(num_offsets, with_bias=True, rows=20)
    leaves = [leaf.detach().clone().requires_grad_() for leaf in (hidden, weight, bias)]
    items = targets.ne(IGNORE_INDEX).sum()
    total = 0
    for rows in (slice(0, 9), slice(9, 20)):
        loss, _ = fused_kway_linear_cross_entropy(leaves[0][rows], leaves[1], targets[rows], leaves[2],
                                                  num_items_in_batch=items, chunk_rows=4, kernel=kernel)
        loss.backward()
        total = total + loss.detach()
    whole = run(fused_kway_linear_cross_entropy, [hidden, weight, bias], targets, upstream=1.0, chunk_rows=4,
                kernel=kernel)
    torch.testing.assert_close(total, whole[0], **FP32_TOL)
    for leaf, g in zip(leaves, whole[2]):
        torch.testing.assert_close(leaf.grad, g, **FP32_TOL)


@pytest.mark.parametrize("kernel", KERNELS)
def test_all_targets_ignored(kernel):
    """No target counts: loss nan (0/0, as unfused and stock), per-offset nan, gradients exactly zero; with
    num_items_in_batch the loss is 0."""
    (hidden, weight), targets = make_inputs(4)
    targets = torch.full_like(targets, IGNORE_INDEX)
    loss, per_offset, grads = run(fused_kway_linear_cross_entropy, [hidden, weight], targets, chunk_rows=CHUNK,
                                  kernel=kernel)
    assert torch.isnan(loss) and torch.isnan(per_offset).all()
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    loss, _, grads = run(fused_kway_linear_cross_entropy, [hidden, weight], targets, num_items_in_batch=5,
                         kernel=kernel)
    assert loss.item() == 0 and all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_frozen_inputs_and_no_grad():
    """A frozen weight or frozen hidden states get no gradient (the other still does, unchanged); under
    no_grad only the loss is computed."""
    (hidden, weight, bias), targets = make_inputs(4, with_bias=True)
    ref = run(fused_kway_linear_cross_entropy, [hidden, weight, bias], targets, chunk_rows=CHUNK)
    h, w, b = (leaf.detach().clone() for leaf in (hidden, weight, bias))
    h.requires_grad_()
    loss, _ = fused_kway_linear_cross_entropy(h, w, targets, b, chunk_rows=CHUNK)
    (2.5 * loss).backward()
    torch.testing.assert_close(h.grad, ref[2][0], **FP32_TOL)
    assert w.grad is None and b.grad is None
    h, w = hidden.detach().clone(), weight.detach().clone().requires_grad_()
    loss, _ = fused_kway_linear_cross_entropy(h, w, targets, bias.detach(), chunk_rows=CHUNK)
    (2.5 * loss).backward()
    torch.testing.assert_close(w.grad, ref[2][1], **FP32_TOL)
    with torch.no_grad():
        loss, _ = fused_kway_linear_cross_entropy(hidden, weight, targets, bias, chunk_rows=CHUNK)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref[0], **FP32_TOL)


def test_second_backward_through_the_graph_is_refused():
    (hidden, weight), targets = make_inputs(4)
    loss, _ = fused_kway_linear_cross_entropy(hidden, weight, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("kernel", KERNELS)
def test_bf16_autocast_with_float32_weights(kernel):
    """CPU autocast (bf16) over float32 master weights, as `--bf16` training: the head's matmuls run in bf16 as
    nn.Linear's would, the gradients come back in float32 and agree with the unfused path under autocast."""
    (hidden, weight, bias), targets = make_inputs(4, with_bias=True, rows=40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = run(fused_kway_linear_cross_entropy, [hidden, weight, bias], targets, chunk_rows=CHUNK, softcap=3.0,
                    kernel=kernel)
        ref = run(unfused, [hidden, weight, bias], targets, softcap=3.0)
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-2, atol=1e-2)
    for g, g_ref in zip(fused[2], ref[2]):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, g_ref, rtol=2e-2, atol=2e-2 * g_ref.abs().max().item())


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(weight=torch.zeros(VOCAB, HIDDEN + 1)), "share H"),
        (dict(targets=torch.zeros(ROWS + 1, 4, dtype=torch.long)), "leading dimensions"),
        (dict(targets=torch.zeros(ROWS, 4)), "integer token ids"),
        (dict(bias=torch.zeros(VOCAB + 1)), "bias must have shape"),
        (dict(softcap=0.0), "softcap must be > 0"),
        (dict(weight=torch.zeros(VOCAB, HIDDEN, dtype=torch.bfloat16)), "share a dtype"),
        (dict(chunk_rows=0), "chunk_rows must be >= 1"),
        (dict(kernel="triton"), "kernel must be one of auto, compiled, eager, got 'triton'"),
    ],
)
def test_bad_arguments_are_refused(change, message):
    args = dict(hidden=torch.zeros(ROWS, HIDDEN), weight=torch.zeros(VOCAB, HIDDEN),
                targets=torch.zeros(ROWS, 4, dtype=torch.long))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        fused_kway_linear_cross_entropy(**args)


def test_default_chunk_bounds_the_logits():
    """The default chunk: 1/32 of the (N, V) logits, between 8M and 128M elements (262 and 4,194 rows at 32,000),
    at least 256 rows; without N, the smallest chunk."""
    assert default_chunk_rows(32000) == 262 and default_chunk_rows(128256) == 256 and default_chunk_rows(50) > ROWS
    assert default_chunk_rows(32000, 8192) == 262  # the memory benchmark's 8,192 positions: as small as before
    assert default_chunk_rows(32000, 65536) == 2048  # a 370M step at micro-batch 32: 32 chunks
    assert default_chunk_rows(32000, 10**7) == 128 * 1024 * 1024 // 32000  # bounded temporaries
    assert default_chunk_rows(128256, 32768) == 1024 and default_chunk_rows(128256, 10**7) == 1046
    for vocab, rows in [(32000, 65536), (128256, 32768), (32000, 8192), (50, 11)]:
        chunk = default_chunk_rows(vocab, rows)
        assert math.ceil(rows / chunk) <= FUSED_CHUNKS or chunk * vocab >= 128 * 1024 * 1024 - vocab


def test_kernel_choice():
    """"auto" is the compiled kernel on a CUDA device with Triton, else the eager one; the others as named."""
    from torch.utils._triton import has_triton

    assert resolve_kernel("auto", "cpu") == "eager"
    assert resolve_kernel("auto", "cuda") == ("compiled" if has_triton() else "eager")
    assert resolve_kernel("compiled", "cpu") == "compiled" and resolve_kernel("eager", "cuda") == "eager"


def test_compiled_kernel_equals_eager_kernel_at_default_chunks():
    """The two kernels on one problem with several default-sized chunks (300 rows, vocabulary 40,000: 256-row
    chunks, the last of 44) and the model's dtypes (autocast over float32 weights): the same loss, and gradients
    within bf16 rounding of each other."""
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(300, 8, generator=generator)
    weight = torch.randn(40000, 8, generator=generator) / 3
    targets = torch.randint(0, 40000, (300, 4), generator=generator)
    targets[::7, 1] = IGNORE_INDEX
    assert default_chunk_rows(40000, 300) == 256
    results = {}
    for kernel in KERNELS:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[kernel] = run(fused_kway_linear_cross_entropy, [hidden, weight], targets, kernel=kernel)
    (loss, offsets, grads), (ref_loss, ref_offsets, ref_grads) = results["compiled"], results["eager"]
    torch.testing.assert_close(loss, ref_loss, **FP32_TOL)
    torch.testing.assert_close(offsets, ref_offsets, **FP32_TOL)
    for g, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-2, atol=1e-2 * g_ref.abs().max().item())


def test_a_compiler_failure_falls_back_to_the_eager_kernel(monkeypatch, caplog):
    """A compiler that fails (here a torch.compile backend that raises) costs one log line, not the step: the
    chunk is computed by the eager kernel, as is every later call ("auto" then resolves to "eager")."""

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no code generator here")

    monkeypatch.setattr(fused_loss, "_COMPILED", torch.compile(fused_loss.chunk_loss_and_grad, backend=broken_backend,
                                                               fullgraph=True))
    monkeypatch.setattr(fused_loss, "_COMPILE_FAILED", False)
    monkeypatch.setattr(fused_loss, "_COMPILE_WORKED", False)
    (hidden, weight), targets = make_inputs(4)
    ref = run(fused_kway_linear_cross_entropy, [hidden, weight], targets, chunk_rows=CHUNK, kernel="eager")
    with caplog.at_level("WARNING", logger="patch_training.fused_loss"):
        fused = run(fused_kway_linear_cross_entropy, [hidden, weight], targets, chunk_rows=CHUNK, kernel="compiled")
    torch.testing.assert_close(fused[0], ref[0], **FP32_TOL)
    for g, g_ref in zip(fused[2], ref[2]):
        torch.testing.assert_close(g, g_ref, **FP32_TOL)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith("fused LM-head loss: compiling its chunk kernel failed (")
    assert said[0].endswith("); using the eager kernel") and "\n" not in said[0]
    assert fused_loss._COMPILE_FAILED and resolve_kernel("auto", "cuda") == "eager"


def test_under_a_whole_model_compile_the_loss_breaks_the_graph():
    """torch.compile of a model that calls the fused loss: dynamo leaves the loss out of its graph (a graph break,
    `torch.compiler.disable`), and the loss and gradients are those of the uncompiled call."""
    (hidden, weight), targets = make_inputs(4)
    graphs = []

    def recording_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    def model(h, w, t):
        return fused_kway_linear_cross_entropy(torch.tanh(h), w, t, chunk_rows=CHUNK, kernel="eager")

    ref = run(model, [hidden, weight], targets)
    compiled = run(torch.compile(model, backend=recording_backend), [hidden, weight], targets)
    torch.testing.assert_close(compiled[0], ref[0], **FP32_TOL)
    for g, g_ref in zip(compiled[2], ref[2]):
        torch.testing.assert_close(g, g_ref, **FP32_TOL)
    traced = [node.target for graph in graphs for node in graph.graph.nodes if node.op == "call_function"]
    assert torch.tanh in traced and not [t for t in traced if "linear" in str(t) or "addmm" in str(t)]


def test_peak_memory_is_a_quarter_of_the_chunked_loss():
    """The memory target, small: head + loss forward and backward at 2,048 positions x 32,000 (bf16,
    H = 256, K = 4), measured by StoragePeak. The fused path peaks at <= 1/4 of today's (logits + chunked
    loss) and <= 1/8 of stock transformers', yet at least the gradients of hidden states and weight it must
    return, and below the (N, V) logits alone."""
    memory = throughput.head_loss_memory(2048, 32000, 256, 4, "cpu", torch.bfloat16)
    fused = memory["fused_head_loss_k4_gib"]
    assert memory["head_grads_gib"] <= fused < memory["logits_gib"], memory
    assert fused <= memory["chunked_head_loss_k4_gib"] / 4 and fused <= memory["stock_head_loss_gib"] / 8, memory


def test_ddp_two_processes_equal_one_full_batch(tmp_path):
    """2 processes on CPU (gloo, torchrun): each rank's half batch through DDP with the global
    num_items_in_batch gives, after DDP's all-reduce, the single-process full batch's gradients."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO_ROOT / "tests" / "ddp_fused_loss.py")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert result.stdout.count("ddp fused loss: gradients equal the full batch's") == 2, result.stdout


# ---------------------------------------------------------------------------------------------------------
# The compiled kernel inside the patch model, for every architecture the fused loss serves
# ---------------------------------------------------------------------------------------------------------


def _architecture_cases():
    from modeling_llama_patch import FUSED_LOSS_ARCHITECTURES

    cases = [(model_type, 4) for model_type in sorted(FUSED_LOSS_ARCHITECTURES)]
    return cases + [("llama", 1), ("gemma2", 1), ("cohere", 1)]  # K = 1 with plain, soft-capped and scaled logits


@pytest.mark.parametrize("model_type, patch_size", _architecture_cases())
def test_compiled_kernel_equals_the_stock_head_in_the_model(model_type, patch_size):
    """A training step of the patch model with the fused loss's compiled kernel gives the loss, per-offset losses
    and every gradient of the stock head followed by the chunked K-way loss (as
    test_architectures.test_fused_loss_equals_the_stock_head does for the eager kernel), with -100 labels, with
    Gemma-2's soft-capping and Cohere's logit scale where the architecture has them."""
    from test_architectures import assert_grads_close, build_pair, random_ids, train_step

    _, patch = build_pair(model_type, patch_size)
    patch.train()
    ids = random_ids(2, 4 * 4)
    labels = ids.clone()
    labels[0, 5] = labels[1, 9] = IGNORE_INDEX
    patch.fused_loss_kernel = "compiled"
    loss, offsets, logits, gradients = train_step(patch, ids, labels, "fused")
    ref_loss, ref_offsets, _, ref_gradients = train_step(patch, ids, labels, "unfused")
    assert logits is None
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(offsets, ref_offsets, rtol=1e-5, atol=1e-5)
    assert_grads_close(gradients, ref_gradients)


# ---------------------------------------------------------------------------------------------------------
# On a CUDA GPU (skipped elsewhere): the Triton code of the compiled kernel, cuBLAS and the float32 accumulation
# ---------------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("num_offsets, softcap, with_bias", [(4, None, False), (1, 30.0, True), (4, 2.0, False)])
def test_cuda_training_conditions_match_unfused(kernel, num_offsets, softcap, with_bias):
    """bf16 autocast over float32 weights on the GPU, at a size with several default chunks (6,000 positions x
    32,000, H 256): loss and gradients of the fused path (either kernel) agree with the unfused path under the same
    autocast, and are at least about as close to a float64 reference."""
    device = "cuda"
    generator = torch.Generator(device=device).manual_seed(0)
    rows, vocab, hidden_size = 6000, 32000, 256
    hidden = torch.randn(rows, hidden_size, device=device, generator=generator)
    weight = torch.randn(vocab, hidden_size, device=device, generator=generator) / hidden_size**0.5
    bias = torch.randn(vocab, device=device, generator=generator) if with_bias else None
    targets = torch.randint(0, vocab, (rows, num_offsets), device=device, generator=generator)
    targets[torch.rand(targets.shape, device=device, generator=generator) < 0.1] = IGNORE_INDEX
    targets[7] = 11  # a repeated target
    leaves = [hidden, weight] + ([bias] if with_bias else [])
    spec = dict(softcap=softcap)
    with torch.autocast(device, dtype=torch.bfloat16):
        fused = run(fused_kway_linear_cross_entropy, leaves, targets, kernel=kernel, **spec)
        ref = run(unfused, leaves, targets, **spec)
    exact = run(unfused, [leaf.double() for leaf in leaves], targets, **spec)

    def error(a, b):
        return (a.double() - b.double()).abs().max().item()

    assert error(fused[0], exact[0]) <= 2 * error(ref[0], exact[0]) + 1e-4 * exact[0].abs().item()
    torch.testing.assert_close(fused[0], ref[0], rtol=2e-3, atol=2e-3)
    for g, g_ref, g_exact in zip(fused[2], ref[2], exact[2]):
        assert g.dtype == torch.float32
        scale = g_exact.abs().max().item()
        assert error(g, g_exact) <= 2 * error(g_ref, g_exact) + 2**-8 * scale, (error(g, g_exact), error(g_ref, g_exact))


@needs_cuda
def test_cuda_auto_is_the_compiled_kernel_and_the_weight_gradient_accumulates_in_float32():
    """On the GPU "auto" compiles the chunk kernel (where Triton is installed) and the float32 weight gradient is
    accumulated inside the matmul (`torch.addmm(..., out_dtype=torch.float32)`), checked on a small case."""
    from torch.utils._triton import has_triton

    assert resolve_kernel("auto", "cuda") == ("compiled" if has_triton() else "eager")
    assert fused_loss._fp32_addmm_works(torch.device("cuda")), "torch.addmm with out_dtype float32 failed on CUDA"
