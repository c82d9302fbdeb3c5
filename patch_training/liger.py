"""Liger-Kernel for each stage: which of its switches a stage may use (the patch stage keeps its K-way loss),
and the checks that refuse a configuration or a machine Liger cannot serve."""

from __future__ import annotations

import torch
from transformers.utils import is_liger_kernel_available

from .cli import UsageError


# The switches of Liger-Kernel's `apply_liger_kernel_to_llama` (liger silently drops any other key).
LIGER_LLAMA_SWITCHES = ("rope", "rms_norm", "swiglu", "cross_entropy", "fused_linear_cross_entropy")


# The switches that replace the model's loss (`fused_linear_cross_entropy` replaces its whole forward):
# token-level losses, so they are turned off in the patch stage, which keeps its K-way loss.
LIGER_LOSS_SWITCHES = ("cross_entropy", "fused_linear_cross_entropy")


def check_liger_kernel_config(liger_kernel_config: dict | None) -> None:
    """Refuse a `--liger_kernel_config` that Liger-Kernel would silently ignore (unknown keys) or reject."""
    config = liger_kernel_config or {}
    if not isinstance(config, dict):
        raise UsageError(f"--liger_kernel_config must be a JSON object of switches, got {config!r}")
    unknown = sorted(set(config) - set(LIGER_LLAMA_SWITCHES))
    if unknown:
        raise UsageError(
            f"--liger_kernel_config has unknown keys for Llama: {', '.join(unknown)} (known: {', '.join(LIGER_LLAMA_SWITCHES)})"
        )
    not_bool = sorted(key for key, value in config.items() if not isinstance(value, bool))
    if not_bool:
        raise UsageError(f"--liger_kernel_config: {', '.join(not_bool)} must be true or false")
    if config.get("cross_entropy") and config.get("fused_linear_cross_entropy", True):
        raise UsageError(
            "--liger_kernel_config: cross_entropy and fused_linear_cross_entropy cannot both be true "
            "(fused_linear_cross_entropy defaults to true: set it to false to use cross_entropy)"
        )


def check_liger_environment(use_cpu: bool) -> None:
    """Refuse `--use_liger_kernel` where it cannot run: Liger-Kernel is Triton code for GPUs."""
    if use_cpu or not torch.cuda.is_available():
        raise UsageError(
            "--use_liger_kernel needs a CUDA (or ROCm) GPU: Liger-Kernel's kernels are Triton GPU code, and "
            + ("--use_cpu is set" if use_cpu else "torch sees no GPU on this machine")
        )
    if not is_liger_kernel_available():
        raise UsageError("--use_liger_kernel: liger-kernel is not installed (pip install -r requirements-gpu.txt)")


def liger_config_for_stage(liger_kernel_config: dict | None, patch_size: int) -> dict | None:
    """The Liger-Kernel switches of a stage. Liger's loss kernels compute the token-level loss (the fused
    one by replacing the model's forward, which would also skip the patching), so at K > 1 they are off:
    the patch stage gets Liger's RoPE, RMSNorm and SwiGLU kernels and keeps the K-way loss."""
    if patch_size == 1:
        return liger_kernel_config
    return {**(liger_kernel_config or {}), **{switch: False for switch in LIGER_LOSS_SWITCHES}}
