#!/usr/bin/env python
"""Throughput of the token stage and the patch stage through the project's real training path.

For each stage it builds what `run_clm.py` builds: the tokenised on-disk cache, `TokenBlocks`, the
`PatchTrainer` step (data loader, forward, K-way loss, backward, optimizer) and `PatchLlamaForCausalLM`, on
the same model config and micro-batch (in sequences: the patch stage's sequences are K times longer, so
both stages run the same number of positions per step). It reports tokens/s, positions/s, step time, peak
memory, model FLOPs utilisation (GPU), the share of step time spent waiting for data, and the patch/token
tokens-per-second ratio (the physical limit is K). A second table compares the peak memory of the loss
alone: stock transformers' causal-LM loss against our K-way loss at the same (positions x vocab).

Timing: the device is synchronised only at the start and the end of the timed window, never inside it, so
the CPU queues work ahead exactly as in a real run (a sync per step would add a bubble per step that real
training does not have). Step time = window / steps; data wait = time the main process spends fetching
batches (loader, collation, host-to-device copy) / window.

Two references make the numbers honest: `--data synthetic` feeds one batch already on the device through
the same Trainer step (what the loader costs = 1 - real/synthetic tokens/s), and `--reference_loop` adds a
bare PyTorch loop (autocast, fused AdamW, clipping, no Trainer) over stock `LlamaForCausalLM` for the token
stage and our model for the patch stage: the setup of the usual published reference numbers.

The training loss is the model's default (the fused LM-head + K-way loss, its chunk kernel compiled on a GPU):
`--loss_implementation unfused` measures the stock head + chunked loss, `--fused_loss_kernel eager` the fused
loss's eager kernel; each stage records which it trained with (`loss_path`, `fused_kernel`). `--model_config`
and `--vocab_size` choose the model, `--stages token` measures one stage, `--sdpa_backend` and `--liger_layers`
try other attention and layer kernels. `--head_loss_memory VOCAB...` measures only the LM head + loss (peak
memory, and with `--head_loss_repeats` time; `--head_loss_autocast` in a --bf16 step's dtypes). Every report
records the versions (and on a GPU the driver) it was measured with. `benchmarks/gpu_suite.sh` runs the GPU
variants.

    python benchmarks/throughput.py                              # CPU: tiny model, a few steps
    python benchmarks/throughput.py --model_config configs/model/llama-370m.json --block_size 2048 \
        --micro_batch 4 --bf16 --steps 30                        # one GPU: the paper's 370M model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import transformers  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainerCallback, default_data_collator  # noqa: E402

from patch_training.blocks import StreamingTokenBlocks, TokenBlocks  # noqa: E402
from patch_training.cli import UsageError, run_cli  # noqa: E402
from patch_training.flops import peak_flops, training_flops_per_position  # noqa: E402  (one formula with run_clm's MFU)
from patch_training.fused_loss import FUSED_KERNELS, resolve_kernel  # noqa: E402
from patch_training.liger import LIGER_LOSS_SWITCHES, check_liger_environment, liger_config_for_stage  # noqa: E402
from patch_training.models import resolve_attn_implementation  # noqa: E402
from patch_training.readers import DataSource  # noqa: E402
from patch_training.token_cache import cached_token_stream  # noqa: E402
from patch_training.trainer import PatchTrainer, fresh_compilation  # noqa: E402
from patch_training.training_args import RunTrainingArguments  # noqa: E402

from modeling_llama_patch import PatchLlamaForCausalLM, kway_cross_entropy  # noqa: E402

def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class TimedTrainer(PatchTrainer):
    """PatchTrainer that times a window of optimizer steps and the time spent fetching their batches.

    With `synthetic_batch` (a micro-batch already on the device) it skips the data loader: every
    micro-batch is that batch, and the rest of the step (counting targets, forward, loss, backward,
    clipping, optimizer, scheduler) is unchanged.
    """

    def __init__(self, *args, window: tuple[int, int], synthetic_batch: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.window = window  # (first, last) global step: the clock runs from the end of `first` to the end of `last`
        self.synthetic_batch = synthetic_batch
        self.data_time = 0.0
        self.window_start = self.window_time = None
        self.train_start = time.perf_counter()  # warmup_s: from here to the end of the untimed steps
        self.add_callback(WindowTimer(self))

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        start = time.perf_counter()
        if self.synthetic_batch is None:
            result = super().get_batch_samples(epoch_iterator, num_batches, device)
        else:
            batches = [self.synthetic_batch] * num_batches
            result = batches, self._get_num_items_in_batch(batches, device)
        self.data_time += time.perf_counter() - start
        return result


class WindowTimer(TrainerCallback):
    """Synchronises the device only at the two ends of the timed window."""

    def __init__(self, trainer: TimedTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        trainer, (first, last) = self.trainer, self.trainer.window
        if state.global_step == first:
            synchronize()
            trainer.window_start, trainer.data_time = time.perf_counter(), 0.0
            trainer.warmup_time = trainer.window_start - trainer.train_start
        elif state.global_step == last:
            synchronize()
            trainer.window_time = time.perf_counter() - trainer.window_start


def stage_model(config, patch_size: int, args, stock: bool = False):
    """The model of one stage, seeded: ours at `patch_size`, or stock `LlamaForCausalLM` (token stage)."""
    torch.manual_seed(0)
    model_config = config.__class__.from_dict(config.to_dict())
    model_config.patch_size = None if stock else patch_size
    model_config._attn_implementation = args.attn_implementation
    model = LlamaForCausalLM(model_config) if stock else PatchLlamaForCausalLM(model_config)
    if not stock:
        model.loss_implementation = args.loss_implementation  # run_clm.py's --loss_implementation
        model.fused_loss_kernel = args.fused_loss_kernel
    if args.liger or args.liger_layers:
        from transformers.integrations.liger import apply_liger_kernel

        if args.liger:  # what `run_clm.py --use_liger_kernel` applies (Liger's loss kernels only at K = 1)
            apply_liger_kernel(model, liger_config_for_stage(None, 1 if stock else patch_size))
        else:  # RoPE, RMSNorm and SwiGLU only: the loss stays the model's own
            apply_liger_kernel(model, {switch: False for switch in LIGER_LOSS_SWITCHES})
    return model


def stage_result(name: str, patch_size: int, args, model_config, step_time: float, data_time: float | None,
                 final_loss: float | None, warmup_time: float | None = None) -> dict:
    """The row of one measured stage. `step_time` is the mean wall time of one optimizer step (s);
    `warmup_time` the wall time of the untimed steps before it (s), torch.compile's compilation included."""
    positions = args.micro_batch * args.block_size
    tokens = positions * patch_size
    flops = training_flops_per_position(model_config, args.block_size) * positions / step_time
    peak = peak_flops()
    return {
        "stage": name,
        "patch_size": patch_size,
        "data": args.data,
        "sequence_tokens": patch_size * args.block_size,
        "step_time_s": step_time,
        "tokens_per_s": tokens / step_time,
        "positions_per_s": positions / step_time,
        "model_tflops_per_s": flops / 1e12,
        "mfu": flops / peak if peak else None,
        "data_wait_share": None if data_time is None else data_time / (step_time * args.steps),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "final_loss": final_loss,
        "warmup_s": warmup_time,
    }


def training_blocks(args, stream, tokenizer, block_len: int, num_blocks: int) -> torch.utils.data.Dataset:
    """A stage's data: `TokenBlocks` of the token cache, or with `--data streaming` run_clm's
    `StreamingTokenBlocks`, which tokenises `--train_file` on the fly."""
    if args.data != "streaming":
        return TokenBlocks(stream, 0, num_blocks, block_len)
    source = DataSource.from_files(args.train_file, "train_file")
    return StreamingTokenBlocks(source.documents, tokenizer, source.text_column, 0, num_blocks, block_len)


def loss_path(model) -> str:
    """Which training loss `model` (as the Trainer wrapped it: torch.compile, accelerate's regional compilation)
    computes: "fused" (the fused LM-head + K-way loss) or "unfused" (the stock head, then the chunked K-way loss),
    by the model's own decision (`_fused_loss_arguments`, what its training forward asks)."""
    model = unwrapped(model)
    if not hasattr(model, "_fused_loss_arguments"):
        return "unfused"
    labels = torch.zeros(1, 2, dtype=torch.long)
    training, model.training = model.training, True  # the decision of a training forward
    try:
        return "unfused" if model._fused_loss_arguments(labels, {}) is None else "fused"
    finally:
        model.training = training


def unwrapped(model):
    """`model` without the Trainer's wrappers (torch.compile's OptimizedModule, DDP's `module`)."""
    from torch._dynamo.eval_frame import OptimizedModule

    model = model._orig_mod if isinstance(model, OptimizedModule) else model
    return getattr(model, "module", model)


def fused_kernel_used(model) -> str | None:
    """The fused loss's chunk kernel a stage trained with ("compiled" or "eager", as `resolve_kernel` decided it
    on the model's device, after any compiler failure), or None where the loss was not the fused one."""
    if loss_path(model) != "fused":
        return None
    model = unwrapped(model)
    kernel = resolve_kernel(model.fused_loss_kernel, next(model.parameters()).device)
    from patch_training import fused_loss

    return "eager (the compiler failed)" if kernel == "compiled" and fused_loss._COMPILE_FAILED else kernel


def run_stage(name, patch_size, args, config, stream, tokenizer, output_dir) -> dict:
    """Train `warmup + steps` optimizer steps of one stage through PatchTrainer; time the last `steps`."""
    block_len = patch_size * args.block_size
    total_blocks = (args.warmup + args.steps) * args.micro_batch
    dataset = training_blocks(args, stream, tokenizer, block_len, total_blocks)
    model = stage_model(config, patch_size, args)
    use_cuda = torch.cuda.is_available()
    training_args = RunTrainingArguments(
        output_dir=os.path.join(output_dir, name),
        per_device_train_batch_size=args.micro_batch,
        max_steps=args.warmup + args.steps,
        learning_rate=3e-4,
        weight_decay=0.1,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        warmup_steps=2,
        lr_scheduler_type="cosine",
        bf16=args.bf16,
        use_cpu=not use_cuda,  # transformers refuses --bf16 on CPU unless asked for the CPU explicitly
        optim="adamw_torch_fused" if use_cuda else "adamw_torch",
        torch_compile=args.torch_compile,
        torch_compile_mode=args.compile_mode if args.torch_compile else None,
        torch_compile_regions=args.compile_regions,  # run_clm.py's --torch_compile_regions
        save_strategy="no",
        logging_steps=10_000,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=args.dataloader_num_workers,
        seed=0,
    )
    synthetic_batch = None
    if args.data == "synthetic":
        device = training_args.device
        batch = default_data_collator([dataset[i] for i in range(args.micro_batch)])  # TokenBlocks
        synthetic_batch = {key: value.to(device) for key, value in batch.items()}
    trainer = TimedTrainer(model=model, args=training_args, train_dataset=dataset,
                           data_collator=default_data_collator,
                           window=(args.warmup, args.warmup + args.steps), synthetic_batch=synthetic_batch)
    if use_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    fresh_compilation(training_args)  # each stage compiles as in a fresh process, as run_clm.py's stages do
    trainer.train()
    result = stage_result(name, patch_size, args, model.config, trainer.window_time / args.steps, trainer.data_time,
                          trainer.state.log_history[-1].get("train_loss"), trainer.warmup_time)
    result["loss_path"] = loss_path(trainer.model_wrapped)
    result["fused_kernel"] = fused_kernel_used(trainer.model_wrapped)
    del trainer, model
    if use_cuda:
        torch.cuda.empty_cache()
    return result


def reference_loop(name, patch_size, args, config, stream, tokenizer) -> dict:
    """The same stage in a bare PyTorch loop on one batch already on the device: bf16 autocast, fused
    AdamW (0.9, 0.95), clipping at 1.0, torch.compile as asked; stock `LlamaForCausalLM` for the token
    stage. What the Trainer, the loader and our model add is the difference to `run_stage`."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = stage_model(config, patch_size, args, stock=patch_size == 1).to(device)
    dataset = training_blocks(args, stream, tokenizer, patch_size * args.block_size, args.micro_batch)
    batch = {key: value.to(device) for key, value in default_data_collator(list(dataset)).items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                  fused=device == "cuda")
    fresh_compilation(args)  # as run_stage: a stage compiles as in a fresh process
    forward = compiled(model, args) if args.torch_compile else model
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    loop_start = time.perf_counter()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            synchronize()
            start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16):
            loss = forward(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize()
    step_time = (time.perf_counter() - start) / args.steps
    result = stage_result(name, patch_size, args, model.config, step_time, None, loss.item(), start - loop_start)
    result["loss_path"] = loss_path(forward)
    result["fused_kernel"] = fused_kernel_used(forward)
    result["data"] = "synthetic"
    del model, forward, optimizer
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def compiled(model, args):
    """The reference loop's torch.compile of `model`, as the Trainer's accelerate does it: the whole model, or
    with --compile_regions each repeated decoder layer and the other leaf modules (`accelerate.utils.compile_regions`)."""
    if args.compile_regions:
        from accelerate.utils import compile_regions

        return compile_regions(model, mode=args.compile_mode)
    return torch.compile(model, mode=args.compile_mode)


def choose_sdpa_backend(backend: str) -> None:
    """Restrict torch's scaled_dot_product_attention to one CUDA backend (before compiling), or keep its own
    choice ("default")."""
    if backend == "default":
        return
    if not torch.cuda.is_available():
        raise SystemExit(f"--sdpa_backend {backend} needs a CUDA device")
    cuda = torch.backends.cuda
    cuda.enable_flash_sdp(backend == "flash")
    cuda.enable_cudnn_sdp(backend == "cudnn")
    cuda.enable_mem_efficient_sdp(backend == "efficient")
    cuda.enable_math_sdp(False)


class StoragePeak(TorchDispatchMode):
    """Live and peak bytes of the tensor storage that the ops run inside this mode allocate, on any device
    (the CUDA allocator's peak has no CPU counterpart). A storage counts from the op that returns it until
    it is freed; tensors made before the mode, and views or in-place results of any op's inputs, do not
    count. (An op that grows an input's storage in place, such as `resize_`, is not seen.)"""

    def __init__(self):
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._counted: set[int] = set()  # data pointers of the storages counted and not yet freed

    def _freed(self, data_ptr: int, nbytes: int) -> None:
        self._counted.discard(data_ptr)
        self.live_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.layout == torch.strided}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
                continue
            storage = tensor.untyped_storage()
            data_ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or data_ptr in inputs or data_ptr in self._counted:
                continue
            self._counted.add(data_ptr)
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            weakref.finalize(storage, self._freed, data_ptr, nbytes)  # storages keep their Python object until freed
        return out


def loss_memory(positions: int, vocab: int, patch_size: int, device: str, dtype) -> dict:
    """Peak memory (GiB) above the logits themselves of forward + backward of the loss alone: stock
    transformers' causal-LM loss (float32 upcast + cross-entropy) vs our K-way loss (K targets/position).
    On CUDA from the allocator; elsewhere from the storages the loss's ops allocate (`StoragePeak`)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    def measure(fn):
        torch.manual_seed(0)
        logits = torch.randn(1, positions, vocab, device=device, dtype=dtype, requires_grad=True)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn(logits).backward()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 2**30
        with StoragePeak() as tracker:
            fn(logits).backward()
        return tracker.peak_bytes / 2**30

    labels = torch.randint(0, vocab, (1, positions), device=device)
    targets = torch.randint(0, vocab, (1, positions, patch_size), device=device)
    stock = measure(lambda z: ForCausalLMLoss(z, labels, vocab))
    ours_k1 = measure(lambda z: kway_cross_entropy(z, targets[..., :1])[0])
    ours_k = measure(lambda z: kway_cross_entropy(z, targets)[0])
    logits_gib = positions * vocab * torch.finfo(dtype).bits / 8 / 2**30
    return {"positions": positions, "vocab": vocab, "dtype": str(dtype), "logits_gib": logits_gib,
            "stock_causal_lm_loss_gib": stock, "kway_loss_k1_gib": ours_k1, f"kway_loss_k{patch_size}_gib": ours_k}


def head_loss_memory(positions: int, vocab: int, hidden_size: int, patch_size: int, device: str, dtype,
                     autocast: bool = False, repeats: int = 0) -> dict:
    """Peak memory (GiB) and time (ms) of forward + backward of the LM head *and* the loss, from hidden states (N, H)
    and the head's weight (V, H) that exist before (not counted) to their gradients (counted: every path returns
    them). The paths: stock transformers (`lm_head` then its causal-LM loss, K = 1), the stock head then the chunked
    `kway_cross_entropy` (K targets), and the fused head + loss (`fused_kway_linear_cross_entropy`, K targets, which
    never holds the (N, V) logits) with each chunk kernel: "auto" (the default, the `fused_*` keys), "eager" and,
    on CUDA with Triton, "compiled". On CUDA, where installed, two single-target fused kernels for reference (K = 1,
    so not the same loss at K > 1): Liger-Kernel's fused linear cross-entropy and Apple's Cut Cross-Entropy.

    `dtype`: the dtype of hidden states and weight; with `autocast`, they are float32 and the paths run under bf16
    autocast, as a `--bf16` training step (the fused loss then accumulates the weight's gradient in float32).
    Memory on CUDA from the allocator after an untimed pass, elsewhere from the storages the ops allocate
    (`StoragePeak`: code compiled by Inductor allocates outside it, so the compiled kernel is measured on CUDA only).
    Time: the mean of `repeats` forward + backward passes after two untimed ones (compilation included there); CUDA
    events on a GPU.
    `timings_ms` holds None for every path when `repeats` is 0."""
    import torch.nn.functional as F
    from transformers.loss.loss_utils import ForCausalLMLoss

    from patch_training.fused_loss import _fp32_addmm_works, default_chunk_rows, fused_kway_linear_cross_entropy

    generator = torch.Generator(device=device).manual_seed(0)
    dtype = torch.float32 if autocast else dtype
    hidden = torch.randn(positions, hidden_size, device=device, dtype=dtype, generator=generator).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device=device, dtype=dtype, generator=generator) / hidden_size**0.5).requires_grad_()
    labels = torch.randint(0, vocab, (1, positions), device=device, generator=generator)
    targets = torch.randint(0, vocab, (positions, patch_size), device=device, generator=generator)
    autocast_context = torch.autocast(device, dtype=torch.bfloat16, enabled=autocast)

    def step(fn):
        hidden.grad = weight.grad = None
        with autocast_context:
            loss = fn()
        loss.backward()
        hidden.grad = weight.grad = None

    def measure(fn) -> tuple[float, float | None]:
        hidden.grad = weight.grad = None
        if device == "cuda":  # untimed passes first: compilation (and its autotuning buffers), cuBLAS workspaces
            for _ in range(2 if repeats else 1):
                step(fn)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(max(repeats, 1)):
                with autocast_context:
                    loss = fn()
                loss.backward()
                hidden.grad = weight.grad = None
            end.record()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            return peak, start.elapsed_time(end) / max(repeats, 1) if repeats else None
        with StoragePeak() as tracker:
            with autocast_context:
                loss = fn()
            loss.backward()
        peak = tracker.peak_bytes / 2**30
        if not repeats:
            return peak, None
        for _ in range(2):
            step(fn)
        begin = time.perf_counter()
        for _ in range(repeats):
            step(fn)
        return peak, 1000 * (time.perf_counter() - begin) / repeats

    def fused(kernel):
        return lambda: fused_kway_linear_cross_entropy(hidden, weight, targets, kernel=kernel)[0]

    paths = {
        "stock": lambda: ForCausalLMLoss(F.linear(hidden, weight).unsqueeze(0), labels, vocab),
        f"chunked_k{patch_size}": lambda: kway_cross_entropy(F.linear(hidden, weight), targets)[0],
        f"fused_k{patch_size}": fused("auto"),
        f"fused_eager_k{patch_size}": fused("eager"),
    }
    if device == "cuda" and resolve_kernel("auto", device) == "compiled":
        paths[f"fused_compiled_k{patch_size}"] = fused("compiled")
    paths.update(single_target_references(hidden, weight, labels, device))
    measured = {name: measure(fn) for name, fn in paths.items()}
    peaks = {name: peak for name, (peak, _) in measured.items()}
    stock, chunked, fused_peak = peaks["stock"], peaks[f"chunked_k{patch_size}"], peaks[f"fused_k{patch_size}"]
    element = torch.finfo(weight.dtype).bits / 8
    grads = (vocab + positions) * hidden_size * element / 2**30  # d/d weight (V, H) and d/d hidden (N, H)
    return {"positions": positions, "vocab": vocab, "hidden_size": hidden_size, "patch_size": patch_size,
            "dtype": str(weight.dtype), "autocast": autocast,
            "logits_gib": positions * vocab * (2 if autocast else element) / 2**30, "head_grads_gib": grads,
            "fused_chunk_rows": default_chunk_rows(vocab, positions), "fused_kernel": resolve_kernel("auto", device),
            "fp32_weight_grad_in_matmul": autocast and _fp32_addmm_works(torch.device(device)),
            "stock_head_loss_gib": stock, f"chunked_head_loss_k{patch_size}_gib": chunked,
            f"fused_head_loss_k{patch_size}_gib": fused_peak,
            "fused_over_chunked": fused_peak / chunked, "fused_over_stock": fused_peak / stock,
            # the same ratios for the memory beyond the head's gradients, which every path returns
            "fused_over_chunked_beyond_grads": (fused_peak - grads) / (chunked - grads),
            "fused_over_stock_beyond_grads": (fused_peak - grads) / (stock - grads),
            "peaks_gib": peaks, "timings_ms": {name: ms for name, (_, ms) in measured.items()}, "repeats": repeats}


def single_target_references(hidden, weight, labels, device: str) -> dict:
    """Single-target (K = 1) fused linear cross-entropy kernels that are installed, on CUDA: name -> a loss of
    hidden (N, H) and weight (V, H) in bf16 (cast as autocast would; these kernels take no autocast)."""
    if device != "cuda":
        return {}
    targets = labels.reshape(-1)
    references = {}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        references["liger_k1"] = lambda: liger(weight.to(torch.bfloat16), hidden.to(torch.bfloat16), targets)
    except ImportError:
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy

        references["cut_cross_entropy_k1"] = lambda: linear_cross_entropy(
            hidden.to(torch.bfloat16), weight.to(torch.bfloat16), targets)
    except ImportError:
        pass
    return references


def print_head_loss_memory(rows: list[dict]) -> None:
    print(f"{'positions':>9} {'vocab':>8} {'H':>6} {'K':>2} {'dtype':>15} {'logits':>7} {'grads':>7} {'stock':>7} "
          f"{'chunked':>8} {'fused':>7} {'fused/chunked':>13} {'fused/stock':>11}   (GiB; ratios in brackets: "
          "beyond the gradients)")
    for m in rows:
        k = m["patch_size"]
        print(f"{m['positions']:>9} {m['vocab']:>8} {m['hidden_size']:>6} {k:>2} {m['dtype']:>15} {m['logits_gib']:>7.3f} "
              f"{m['head_grads_gib']:>7.3f} {m['stock_head_loss_gib']:>7.3f} {m[f'chunked_head_loss_k{k}_gib']:>8.3f} "
              f"{m[f'fused_head_loss_k{k}_gib']:>7.3f} {m['fused_over_chunked']:>5.3f} ({m['fused_over_chunked_beyond_grads']:.3f}) "
              f"{m['fused_over_stock']:>5.3f} ({m['fused_over_stock_beyond_grads']:.3f})")
    for m in rows:
        if m.get("repeats"):
            times = ", ".join(f"{name} {ms:.2f} ms ({m['peaks_gib'][name]:.2f} GiB)" for name, ms in m["timings_ms"].items())
            print(f"forward + backward at {m['positions']:,} x {m['vocab']:,} (mean of {m['repeats']}): {times}")


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script (`main`)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_config", default="configs/model/llama-tiny.json", help="LlamaConfig JSON")
    parser.add_argument("--train_file", default="data/sample_train.jsonl", help="text to tokenise into the cache")
    parser.add_argument("--tokenizer", default="data/llama2_tokenizer")
    parser.add_argument("--data_cache_dir", default=None, help="token cache (default: run_clm's)")
    parser.add_argument("--block_size", type=int, default=128, help="T: positions per sequence in both stages")
    parser.add_argument("--micro_batch", type=int, default=4, help="sequences per step in both stages")
    parser.add_argument("--patch_size", type=int, default=4, help="K")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per stage")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator); at least 1")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (as --bf16 in run_clm.py)")
    parser.add_argument("--torch_compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--compile_regions", action="store_true",
                        help="with --torch_compile: regional compilation (run_clm.py's --torch_compile_regions, "
                        "accelerate's use_regional_compilation): one compilation of the "
                        "decoder layer serves every layer, so compiling takes a fraction of the whole model's time")
    parser.add_argument("--compile_mode", default=None,
                        help="torch.compile mode, e.g. max-autotune-no-cudagraphs (default: torch's default)")
    parser.add_argument("--liger", action="store_true", help="Liger-Kernel RMSNorm/SwiGLU/RoPE + fused linear CE (K=1)")
    parser.add_argument("--liger_layers", action="store_true",
                        help="Liger-Kernel's RoPE, RMSNorm and SwiGLU kernels only; the loss stays the model's own")
    parser.add_argument("--attn_implementation", default="auto", help="auto, eager, sdpa or flash_attention_2")
    parser.add_argument("--dataloader_num_workers", type=int, default=0,
                        help="loader processes (0: in the main process, fastest for the memory-mapped cache)")
    parser.add_argument("--data", choices=["cache", "synthetic", "streaming"], default="cache",
                        help="cache: the real loader over the token cache; synthetic: one batch already on the "
                        "device; streaming: run_clm's --streaming loader, tokenising --train_file on the fly")
    parser.add_argument("--reference_loop", action="store_true",
                        help="also time a bare PyTorch loop (stock Llama for the token stage), no Trainer, no loader")
    parser.add_argument("--sdpa_backend", choices=["default", "flash", "cudnn", "efficient"], default="default",
                        help="restrict SDPA to one CUDA backend")
    parser.add_argument("--loss_implementation", choices=["auto", "fused", "unfused"], default="auto",
                        help="the training loss, as run_clm.py's --loss_implementation (auto: the fused LM-head loss)")
    parser.add_argument("--fused_loss_kernel", choices=list(FUSED_KERNELS), default="auto",
                        help="the fused loss's chunk kernel (auto: compiled on a CUDA GPU with Triton, else eager)")
    parser.add_argument("--stages", nargs="+", choices=["token", "patch"], default=["token", "patch"],
                        help="the stages to measure (both: the patch/token ratio too)")
    parser.add_argument("--vocab_size", type=int, default=None,
                        help="the model's vocabulary instead of the config's (e.g. 128256, Llama-3's); the data's "
                        "token ids are LLaMA-2's, below 32,000")
    parser.add_argument("--skip_loss_memory", action="store_true")
    parser.add_argument("--head_loss_memory", type=int, nargs="+", metavar="VOCAB", default=None,
                        help="only measure the peak memory of LM head + loss (stock, chunked, fused) at these "
                        "vocabularies, micro_batch x block_size positions, K = patch_size, H = --loss_hidden_size, "
                        "and exit")
    parser.add_argument("--loss_hidden_size", type=int, default=4096, help="H for --head_loss_memory")
    parser.add_argument("--head_loss_autocast", action="store_true",
                        help="--head_loss_memory with float32 hidden states and weight under bf16 autocast (a --bf16 "
                        "training step's dtypes) instead of bf16 (--bf16) or float32 tensors")
    parser.add_argument("--head_loss_repeats", type=int, default=0,
                        help="also time --head_loss_memory's paths: the mean of this many passes (0: memory only)")
    parser.add_argument("--output_json", default=None)
    return parser


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error(f"--warmup and --steps must be at least 1 (the clock starts at the end of a warm-up step), got "
                     f"--warmup {args.warmup} --steps {args.steps}")
    if args.liger and args.liger_layers:
        parser.error("--liger and --liger_layers: choose one (--liger_layers keeps the model's loss)")
    if args.liger or args.liger_layers:
        flag = "--liger" if args.liger else "--liger_layers"
        try:
            check_liger_environment(use_cpu=False)
        except UsageError as error:
            parser.error(str(error).replace("--use_liger_kernel", flag))
    if args.vocab_size is not None and args.vocab_size < 32000:
        parser.error(f"--vocab_size must hold the data's LLaMA-2 token ids (>= 32000), got {args.vocab_size}")
    if args.head_loss_repeats < 0:
        parser.error(f"--head_loss_repeats must be >= 0, got {args.head_loss_repeats}")
    if args.compile_regions and not args.torch_compile:
        parser.error("--compile_regions needs --torch_compile")
    if args.data == "streaming" and args.dataloader_num_workers > 1:
        parser.error("--data streaming reads one stream: --dataloader_num_workers must be 0 or 1")
    if args.patch_size < 1:
        parser.error(f"--patch_size must be >= 1 (K = 1: token level only), got {args.patch_size}")
    if not os.path.exists(args.model_config):  # a local LlamaConfig JSON or folder: nothing is downloaded
        parser.error(f"--model_config {args.model_config}: no such file (a LlamaConfig JSON)")
    if args.head_loss_memory:
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        rows = [head_loss_memory(args.micro_batch * args.block_size, vocab, args.loss_hidden_size, args.patch_size,
                                 device_name, dtype, autocast=args.head_loss_autocast, repeats=args.head_loss_repeats)
                for vocab in args.head_loss_memory]
        print_head_loss_memory(rows)
        report = {"device": torch.cuda.get_device_name() if device_name == "cuda" else "cpu (StoragePeak)",
                  "versions": versions(), "settings": {k: v for k, v in vars(args).items() if k != "output_json"},
                  "head_loss_memory": rows}
        if args.output_json:
            with open(args.output_json, "w", encoding="utf-8") as handle:
                json.dump(report, handle, indent=2)
        return report
    args.attn_implementation = resolve_attn_implementation(args.attn_implementation)
    choose_sdpa_backend(args.sdpa_backend)

    config = LlamaConfig.from_pretrained(args.model_config)
    if args.vocab_size is not None:
        config.vocab_size = args.vocab_size
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    with tempfile.TemporaryDirectory() as output_dir:
        stream = None
        if args.data != "streaming":
            stream, _ = cached_token_stream(
                DataSource.from_files(args.train_file, "train_file"), tokenizer,
                RunTrainingArguments(output_dir=output_dir, report_to="none"), cache_dir=args.data_cache_dir,
            )
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        report = {
            "device": device,
            "device_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None,
            "versions": versions(),
            "settings": {k: v for k, v in vars(args).items() if k != "output_json"},
            "stages": [],
            "complete": False,  # until every stage is measured: a report cut short keeps the stages it finished
        }
        runs = []
        if "token" in args.stages:
            runs.append(lambda: run_stage("token", 1, args, config, stream, tokenizer, output_dir))
        if "patch" in args.stages:
            runs.append(lambda: run_stage("patch", args.patch_size, args, config, stream, tokenizer, output_dir))
        if args.reference_loop:
            runs += [lambda: reference_loop("token-loop", 1, args, config, stream, tokenizer),
                     lambda: reference_loop("patch-loop", args.patch_size, args, config, stream, tokenizer)]
        for run in runs:
            stage = run()
            report["stages"].append(stage)
            write_report(report, args.output_json)  # before the line below, which says the stage is on disk
            print(f"throughput.py: {stage['stage']} stage: warm-up {stage['warmup_s']:.1f} s ({args.warmup} steps, "
                  f"compilation included), then {1000 * stage['step_time_s']:.1f} ms a step, "
                  f"{stage['tokens_per_s']:,.0f} tokens/s", flush=True)
    stages = report["stages"]
    by_name = {stage["stage"]: stage for stage in stages}
    if "token" in by_name and "patch" in by_name:
        report["patch_token_tokens_per_s_ratio"] = by_name["patch"]["tokens_per_s"] / by_name["token"]["tokens_per_s"]
    report["complete"] = True
    if not args.skip_loss_memory:
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        report["loss_memory"] = loss_memory(args.micro_batch * args.block_size, config.vocab_size, args.patch_size, device_name, dtype)

    print(f"\ndevice: {device}; torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"model {args.model_config} (vocabulary {config.vocab_size:,}), T={args.block_size}, micro-batch "
          f"{args.micro_batch}, K={args.patch_size}, bf16={args.bf16}, compile={args.torch_compile} (by regions: "
          f"{args.compile_regions}), fused loss kernel={args.fused_loss_kernel}, liger={args.liger}, "
          f"liger layers={args.liger_layers}, attention={args.attn_implementation} "
          f"(SDPA backend {args.sdpa_backend}), compile mode={args.compile_mode}, data={args.data}, loader workers={args.dataloader_num_workers}\n")
    header = (f"{'stage':<11} {'loss':>8} {'tokens/s':>12} {'positions/s':>12} {'step ms':>9} {'peak GiB':>9} "
              f"{'MFU':>6} {'data wait':>9}")
    print(header)
    print("-" * len(header))
    for s in stages:
        peak = f"{s['peak_memory_gib']:.2f}" if s["peak_memory_gib"] is not None else "-"
        mfu = f"{100 * s['mfu']:.1f}%" if s["mfu"] is not None else "-"
        wait = f"{100 * s['data_wait_share']:.2f}%" if s["data_wait_share"] is not None else "-"
        loss = s["loss_path"] + (f" ({s['fused_kernel']})" if s.get("fused_kernel") else "")
        print(f"{s['stage']:<11} {loss:>8} {s['tokens_per_s']:>12,.0f} {s['positions_per_s']:>12,.0f} "
              f"{1000 * s['step_time_s']:>9.1f} {peak:>9} {mfu:>6} {wait:>9}")
    if "patch_token_tokens_per_s_ratio" in report:
        print(f"\npatch/token tokens-per-second ratio: {report['patch_token_tokens_per_s_ratio']:.3f} "
              f"(limit K={args.patch_size})")
    if "loss_memory" in report:
        m = report["loss_memory"]
        print(f"loss peak memory at {m['positions']} positions x {m['vocab']} vocab ({m['dtype']}; logits {m['logits_gib']:.2f} GiB): "
              f"stock causal-LM loss {m['stock_causal_lm_loss_gib']:.2f} GiB, K-way K=1 {m['kway_loss_k1_gib']:.2f} GiB, "
              f"K={args.patch_size} {m[f'kway_loss_k{args.patch_size}_gib']:.2f} GiB")
    print(json.dumps(report, indent=2))
    write_report(report, args.output_json)
    return report


def versions() -> dict:
    """The versions a report was measured with: Python, torch (its CUDA and cuDNN), transformers, accelerate, and
    Triton, Liger-Kernel and Cut Cross-Entropy where installed; on a GPU the driver (from nvidia-smi)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    for package in ("accelerate", "triton", "liger-kernel", "cut-cross-entropy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        found["cuda"] = torch.version.cuda
        found["cudnn"] = torch.backends.cudnn.version()
        found["driver"] = nvidia_driver()
    return found


def nvidia_driver() -> str | None:
    """The NVIDIA driver's version as nvidia-smi reports it, or None without nvidia-smi."""
    import subprocess

    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def write_report(report: dict, path: str | None) -> None:
    """Write `report` as JSON to `path` (nothing without one), whole or not at all (a temporary file renamed)."""
    if path:
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    run_cli(main, "throughput.py")
