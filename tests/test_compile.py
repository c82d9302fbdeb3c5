"""--torch_compile across the two stages: each stage compiles as a fresh process would (`trainer.fresh_compilation`).

Without it, the token stage (sequences K times shorter than the patch stage's, another micro-batch) failed the
patch stage's shape guards, and dynamo's automatic dynamic shapes recompiled the model with symbolic batch and
sequence sizes for the whole token stage; both stages also shared one recompile limit. The fused loss's compiled
chunk kernel lives through those resets: it compiles again in each stage and stays exact.
"""

import os
import subprocess
import sys
from types import SimpleNamespace

import torch
import torch._dynamo

from conftest import REPO_ROOT
from patch_training.trainer import fresh_compilation


def compiled_shapes(reset_between: bool) -> list[bool]:
    """Compile a function, call it at a patch-stage-like shape and then a token-stage-like one; for each
    compilation, whether dynamo gave the graph a symbolic size (an input that is a SymInt)."""
    symbolic = []

    def recording_backend(graph, example_inputs):  # dynamo's own inputs: a dynamic size arrives as a SymInt
        symbolic.append(any(isinstance(x, torch.SymInt) for x in example_inputs))
        return graph.forward

    def loss(x):
        return (x.float() * 2).sum()

    torch._dynamo.reset()
    step = torch.compile(loss, backend=recording_backend)
    step(torch.ones(2, 512))  # the patch stage: 2 sequences of K*T = 512 tokens
    if reset_between:
        fresh_compilation(SimpleNamespace(torch_compile=True))
    step(torch.ones(8, 128))  # the token stage: 8 sequences of T = 128
    torch._dynamo.reset()
    return symbolic


def test_without_a_fresh_compilation_the_second_shape_compiles_dynamic():
    """The reference: what dynamo does with no reset (the fault's mechanism, so the next test can see the fix)."""
    assert compiled_shapes(reset_between=False) == [False, True]


def test_fresh_compilation_compiles_the_next_stage_with_static_shapes():
    assert compiled_shapes(reset_between=True) == [False, False]


def test_fresh_compilation_does_nothing_without_torch_compile():
    calls = []

    def backend(graph, example_inputs):
        calls.append(1)
        return graph.forward

    torch._dynamo.reset()
    step = torch.compile(lambda x: x + 1, backend=backend)
    step(torch.ones(2))
    fresh_compilation(SimpleNamespace(torch_compile=False))
    step(torch.ones(2))  # still cached: no second compilation
    torch._dynamo.reset()
    assert calls == [1]


def test_run_clm_token_stage_does_not_recompile_the_patch_stage_graph(tmp_path):
    """A two-stage job with --torch_compile (dynamo's eager backend: tracing and guards, no code generation):
    no recompilation in the job is triggered by the patch stage's micro-batch of 2 sequences meeting the token
    stage's 8 (the guard failure dynamo logs as "expected 2, actual 8"), and none marks the token stage's
    inputs dynamic because of it."""
    env = {**os.environ, "TORCH_LOGS": "recompiles", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "run_clm.py", "configs/train/tiny-patch.json", "--output_dir", str(tmp_path / "run"),
         "--torch_compile", "true", "--torch_compile_backend", "eager", "--max_steps", "12", "--eval_strategy", "no",
         "--max_eval_blocks", "2", "--save_strategy", "no"],
        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[run_clm] done" in done.stdout + done.stderr
    reasons = [line for line in done.stderr.splitlines() if "size mismatch" in line]
    assert not [line for line in reasons if "expected 2, actual 8" in line], reasons


def test_fused_loss_compiled_kernel_across_stages_under_regional_compilation(monkeypatch):
    """The two stages of a job, each after `fresh_compilation` (dynamo reset), with the model compiled by regions
    and the fused loss's compiled chunk kernel (Inductor, its own torch.compile inside the loss): each stage's loss
    and gradients equal the uncompiled model's with the stock head and the chunked K-way loss, K = 4 then K = 1."""
    from accelerate.utils import compile_regions
    from conftest import tiny_llama_config

    from modeling_llama_patch import PatchLlamaForCausalLM
    from patch_training import fused_loss

    torch.manual_seed(0)
    model = PatchLlamaForCausalLM(tiny_llama_config(vocab_size=512)).train()
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, 7] = -100

    def step(forward, implementation):
        forward.loss_implementation = implementation  # on the compiled copy itself: compile_regions copies attributes
        model.zero_grad(set_to_none=True)
        out = forward(ids, labels=labels, num_items_in_batch=torch.tensor(40))
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.fused_loss_kernel = "compiled"
    calls = [0]
    original = fused_loss._compiled_chunk

    def counted(*args):  # the compiled kernel's entry point, counted
        calls[-1] += 1
        return original(*args)

    monkeypatch.setattr(fused_loss, "_compiled_chunk", counted)
    try:
        for patch_size in (4, 1):  # the patch stage, then the token stage
            model.config.patch_size = patch_size
            calls.append(0)
            ref_loss, ref_grads = step(model, "unfused")
            fresh_compilation(SimpleNamespace(torch_compile=True))
            compiled = compile_regions(model, backend="eager")  # the layers traced; the loss kernel by Inductor
            assert compiled.fused_loss_kernel == "compiled"
            loss, grads = step(compiled, "fused")
            assert calls.pop() > 0, "the compiled chunk kernel did not run"
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
            assert grads.keys() == ref_grads.keys()
            for name, grad in grads.items():
                torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    finally:
        torch._dynamo.reset()
