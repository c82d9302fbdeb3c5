#!/usr/bin/env python
"""Throughput of the token stage and the patch stage through the project's real training path.

For each stage it builds what `run_clm.py` builds: the tokenised on-disk cache, `TokenBlocks`, the
`PatchTrainer` step (data loader, forward, K-way loss, backward, optimizer) and `PatchLlamaForCausalLM`, on
the same model config and micro-batch (in sequences: the patch stage's sequences are K times longer, so
both stages run the same number of positions per step). It reports tokens/s, positions/s, step time, peak
memory, model FLOPs utilisation (GPU), the share of step time spent waiting for data, and the patch/token
tokens-per-second ratio (the physical limit is K). A second table compares the peak memory of the loss
alone: stock transformers' causal-LM loss against our K-way loss at the same (positions x vocab).

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

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import run_clm  # noqa: E402
from modeling_llama_patch import PatchLlamaForCausalLM, kway_cross_entropy  # noqa: E402

# Dense bf16 peak of the accelerator, for MFU (FLOP/s).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((value for key, value in PEAK_BF16_FLOPS.items() if key in name), None)


def training_flops_per_position(config, context: int) -> float:
    """Model FLOPs of one training position (forward + backward = 3x forward): 6 x (non-embedding weights,
    LM head included) + 12 x layers x hidden x context for attention scores and values (PaLM appendix B)."""
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = hidden // heads
    attention_weights = hidden * head_dim * (heads + 2 * kv_heads) + heads * head_dim * hidden
    mlp_weights = 3 * hidden * config.intermediate_size
    matmul_weights = layers * (attention_weights + mlp_weights) + hidden * vocab
    return 6 * matmul_weights + 12 * layers * hidden * context


class TimedTrainer(run_clm.PatchTrainer):
    """PatchTrainer that records, per optimizer step, the wall time and the time spent fetching batches."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_times: list[float] = []
        self.data_times: list[float] = []
        self._data_time = 0.0
        self._step_start = None

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        start = time.perf_counter()
        result = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._data_time += time.perf_counter() - start
        return result


class StepTimer(run_clm.transformers.TrainerCallback):
    """Synchronises the device at step boundaries so that each step's time is the real time."""

    def __init__(self, trainer_ref):
        self.trainer_ref = trainer_ref

    @staticmethod
    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        trainer = self.trainer_ref[0]
        self._sync()
        if trainer._step_start is None:  # the first batch was fetched before this point
            trainer._step_start = time.perf_counter() - trainer._data_time

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer_ref[0]
        self._sync()
        now = time.perf_counter()
        trainer.step_times.append(now - trainer._step_start)
        trainer.data_times.append(trainer._data_time)
        trainer._data_time = 0.0
        trainer._step_start = now


def run_stage(name, patch_size, args, config, stream, output_dir) -> dict:
    """Train `warmup + steps` optimizer steps of one stage; statistics over the last `steps`."""
    block_len = patch_size * args.block_size
    total_blocks = (args.warmup + args.steps) * args.micro_batch
    dataset = run_clm.TokenBlocks(stream, 0, total_blocks, block_len)
    torch.manual_seed(0)
    model_config = config.__class__.from_dict(config.to_dict())
    model_config.patch_size = patch_size
    model_config._attn_implementation = args.attn_implementation
    model = PatchLlamaForCausalLM(model_config)
    if args.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        # Fused linear cross-entropy replaces the forward: only for the token stage (K = 1), whose loss it is.
        apply_liger_kernel_to_llama(model=model, fused_linear_cross_entropy=patch_size == 1, cross_entropy=False)
    use_cuda = torch.cuda.is_available()
    training_args = run_clm.RunTrainingArguments(
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
        optim="adamw_torch_fused" if use_cuda else "adamw_torch",
        torch_compile=args.torch_compile,
        save_strategy="no",
        logging_steps=10_000,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=args.dataloader_num_workers,
        dataloader_pin_memory=use_cuda,
        seed=0,
    )
    trainer_ref = []
    trainer = TimedTrainer(model=model, args=training_args, train_dataset=dataset,
                           data_collator=run_clm.default_data_collator, callbacks=[StepTimer(trainer_ref)])
    trainer_ref.append(trainer)
    if use_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    step_times = trainer.step_times[args.warmup:]
    data_times = trainer.data_times[args.warmup:]
    step_time = sum(step_times) / len(step_times)
    positions = args.micro_batch * args.block_size
    tokens = positions * patch_size
    flops = training_flops_per_position(model_config, args.block_size) * positions / step_time
    peak = peak_flops()
    result = {
        "stage": name,
        "patch_size": patch_size,
        "sequence_tokens": block_len,
        "step_time_s": step_time,
        "tokens_per_s": tokens / step_time,
        "positions_per_s": positions / step_time,
        "model_tflops_per_s": flops / 1e12,
        "mfu": flops / peak if peak else None,
        "data_wait_share": sum(data_times) / sum(step_times),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if use_cuda else None,
        "final_loss": trainer.state.log_history[-1].get("train_loss"),
    }
    del trainer, model
    if use_cuda:
        torch.cuda.empty_cache()
    return result


def loss_memory(positions: int, vocab: int, patch_size: int, device: str, dtype) -> dict:
    """Peak memory (GiB) above the logits themselves of forward + backward of the loss alone: stock
    transformers' causal-LM loss (float32 upcast + cross-entropy) vs our K-way loss (K targets/position)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    def measure(fn):
        torch.manual_seed(0)
        logits = torch.randn(1, positions, vocab, device=device, dtype=dtype, requires_grad=True)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        loss = fn(logits)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 2**30
        return None

    labels = torch.randint(0, vocab, (1, positions), device=device)
    targets = torch.randint(0, vocab, (1, positions, patch_size), device=device)
    stock = measure(lambda z: ForCausalLMLoss(z, labels, vocab))
    ours_k1 = measure(lambda z: kway_cross_entropy(z, targets[..., :1])[0])
    ours_k = measure(lambda z: kway_cross_entropy(z, targets)[0])
    logits_gib = positions * vocab * torch.finfo(dtype).bits / 8 / 2**30
    return {"positions": positions, "vocab": vocab, "dtype": str(dtype), "logits_gib": logits_gib,
            "stock_causal_lm_loss_gib": stock, "kway_loss_k1_gib": ours_k1, f"kway_loss_k{patch_size}_gib": ours_k}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_config", default="configs/model/llama-tiny.json", help="LlamaConfig JSON")
    parser.add_argument("--train_file", default="data/sample_train.jsonl", help="text to tokenise into the cache")
    parser.add_argument("--tokenizer", default="data/llama2_tokenizer")
    parser.add_argument("--data_cache_dir", default=None, help="token cache (default: run_clm's)")
    parser.add_argument("--block_size", type=int, default=128, help="T: positions per sequence in both stages")
    parser.add_argument("--micro_batch", type=int, default=4, help="sequences per step in both stages")
    parser.add_argument("--patch_size", type=int, default=4, help="K")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per stage")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (as --bf16 in run_clm.py)")
    parser.add_argument("--torch_compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--liger", action="store_true", help="Liger-Kernel RMSNorm/SwiGLU/RoPE + fused linear CE (K=1)")
    parser.add_argument("--attn_implementation", default="auto", help="auto, eager, sdpa or flash_attention_2")
    parser.add_argument("--dataloader_num_workers", type=int, default=2)
    parser.add_argument("--skip_loss_memory", action="store_true")
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)
    args.attn_implementation = run_clm.resolve_attn_implementation(args.attn_implementation)

    config = run_clm.LlamaConfig.from_pretrained(args.model_config)
    tokenizer = run_clm.AutoTokenizer.from_pretrained(args.tokenizer)
    with tempfile.TemporaryDirectory() as output_dir:
        data_args = run_clm.DataArguments(train_file=args.train_file, data_cache_dir=args.data_cache_dir)
        stream, _ = run_clm.cached_token_stream(
            [os.path.abspath(args.train_file)], run_clm.file_format(args.train_file), data_args, tokenizer,
            run_clm.RunTrainingArguments(output_dir=output_dir, report_to="none"),
        )
        stages = [run_stage("token", 1, args, config, stream, output_dir),
                  run_stage("patch", args.patch_size, args, config, stream, output_dir)]
    token, patch = stages
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    report = {
        "device": device,
        "versions": {"torch": torch.__version__, "transformers": run_clm.transformers.__version__, "python": platform.python_version()},
        "settings": {k: v for k, v in vars(args).items() if k != "output_json"},
        "stages": stages,
        "patch_token_tokens_per_s_ratio": patch["tokens_per_s"] / token["tokens_per_s"],
    }
    if not args.skip_loss_memory:
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        report["loss_memory"] = loss_memory(args.micro_batch * args.block_size, config.vocab_size, args.patch_size, device_name, dtype)

    print(f"\ndevice: {device}; torch {torch.__version__}, transformers {run_clm.transformers.__version__}")
    print(f"model {args.model_config}, T={args.block_size}, micro-batch {args.micro_batch}, K={args.patch_size}, "
          f"bf16={args.bf16}, compile={args.torch_compile}, liger={args.liger}, attention={args.attn_implementation}\n")
    header = f"{'stage':<6} {'tokens/s':>12} {'positions/s':>12} {'step ms':>9} {'peak GiB':>9} {'MFU':>6} {'data wait':>9}"
    print(header)
    print("-" * len(header))
    for s in stages:
        peak = f"{s['peak_memory_gib']:.2f}" if s["peak_memory_gib"] is not None else "-"
        mfu = f"{100 * s['mfu']:.1f}%" if s["mfu"] is not None else "-"
        print(f"{s['stage']:<6} {s['tokens_per_s']:>12,.0f} {s['positions_per_s']:>12,.0f} {1000 * s['step_time_s']:>9.1f} "
              f"{peak:>9} {mfu:>6} {100 * s['data_wait_share']:>8.2f}%")
    print(f"\npatch/token tokens-per-second ratio: {report['patch_token_tokens_per_s_ratio']:.3f} (limit K={args.patch_size})")
    if "loss_memory" in report and report["loss_memory"]["stock_causal_lm_loss_gib"] is not None:
        m = report["loss_memory"]
        print(f"loss peak memory at {m['positions']} positions x {m['vocab']} vocab ({m['dtype']}; logits {m['logits_gib']:.2f} GiB): "
              f"stock causal-LM loss {m['stock_causal_lm_loss_gib']:.2f} GiB, K-way K=1 {m['kway_loss_k1_gib']:.2f} GiB, "
              f"K={args.patch_size} {m[f'kway_loss_k{args.patch_size}_gib']:.2f} GiB")
    print(json.dumps(report, indent=2))
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
    return report


if __name__ == "__main__":
    main()
