"""Liger-Kernel for each stage: which of its switches a stage may use (the patch stage keeps its K-way loss),
and the checks that refuse a configuration or a machine Liger cannot serve."""

from __future__ import annotations

import torch
from transformers.utils import is_liger_kernel_available

from .cli import UsageError


# The switches that replace the model's loss (`fused_linear_cross_entropy` replaces its whole forward):
# token-level losses, so they are turned off in the patch stage, which keeps its K-way loss.
LIGER_LOSS_SWITCHES = ("cross_entropy", "fused_linear_cross_entropy")


def liger_switches(model_type: str | None = None) -> tuple[str, ...]:
    """The switches of Liger-Kernel's patching function for `model_type` (e.g. rope, rms_norm, swiglu and the
    two loss switches for llama; geglu instead of swiglu for gemma2), or of all of them together for None.
    Empty where Liger has no patching for `model_type` or is not installed."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return ()
    import inspect

    functions = MODEL_TYPE_TO_APPLY_LIGER_FN.values() if model_type is None else [MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)]
    names = {name for fn in functions if fn is not None for name in inspect.signature(fn).parameters if name != "model"}
    return tuple(sorted(names))


def check_liger_kernel_config(liger_kernel_config: dict | None, model_type: str | None = None) -> None:
    """Refuse a `--liger_kernel_config` that Liger-Kernel would silently ignore (keys that its patching
    function for `model_type` does not take; with None, keys that none of them takes) or reject."""
    config = liger_kernel_config or {}
    if not isinstance(config, dict):
        raise UsageError(f"--liger_kernel_config must be a JSON object of switches, got {config!r}")
    known = liger_switches(model_type)
    unknown = sorted(set(config) - set(known)) if known else []
    if unknown:
        raise UsageError(
            f"--liger_kernel_config has unknown keys for {model_type or 'any model'}: {', '.join(unknown)} "
            f"(known: {', '.join(known)})"
        )
    not_bool = sorted(key for key, value in config.items() if not isinstance(value, bool))
    if not_bool:
        raise UsageError(f"--liger_kernel_config: {', '.join(not_bool)} must be true or false")
    if config.get("cross_entropy") and config.get("fused_linear_cross_entropy", True):
        raise UsageError(
            "--liger_kernel_config: cross_entropy and fused_linear_cross_entropy cannot both be true "
            "(fused_linear_cross_entropy defaults to true: set it to false to use cross_entropy)"
        )


def check_liger_environment(use_cpu: bool, model_type: str | None = None) -> None:
    """Refuse `--use_liger_kernel` where it cannot run: Liger-Kernel is Triton code for GPUs, and it patches
    only the architectures it has kernels for (`model_type`; None: not checked)."""
    if use_cpu or not torch.cuda.is_available():
        raise UsageError(
            "--use_liger_kernel needs a CUDA (or ROCm) GPU: Liger-Kernel's kernels are Triton GPU code, and "
            + ("--use_cpu is set" if use_cpu else "torch sees no GPU on this machine")
        )
    if not is_liger_kernel_available():
        raise UsageError("--use_liger_kernel: liger-kernel is not installed (pip install -r requirements-gpu.txt)")
    if model_type is not None and not liger_switches(model_type):
        raise UsageError(f"--use_liger_kernel: Liger-Kernel has no kernels for model_type {model_type!r}")


def liger_config_for_stage(liger_kernel_config: dict | None, patch_size: int) -> dict | None:
    """The Liger-Kernel switches of a stage. Liger's loss kernels compute the token-level loss (the fused
    one by replacing the model's forward, which would also skip the patching), so at K > 1 they are off:
    the patch stage gets Liger's RoPE, RMSNorm and SwiGLU kernels and keeps the K-way loss."""
    if patch_size == 1:
        return liger_kernel_config
    return {**(liger_kernel_config or {}), **{switch: False for switch in LIGER_LOSS_SWITCHES}}
