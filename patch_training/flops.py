"""Model FLOPs of a training position and the accelerators' peak: the model FLOPs utilisation (MFU) that run_clm.py
logs every logging step and `benchmarks/throughput.py` reports, from one formula.

Model FLOPs count the matrix multiplications of the model's definition, forward and backward (the backward costs
twice the forward), not what an implementation adds (activation checkpointing's recomputation) or saves (skipping
masked attention scores): the MFU of PaLM (Chowdhery et al. 2022, appendix B), as nanoGPT and torchtitan count it.
Per training position of a sequence of `context` positions:

    6 x (the weights that multiply each position's activations: every nn.Linear, the LM head included)
    + 12 x layers x (attention heads x head dimension) x context      (the scores QK^T and their product with V)

A patch-stage position is a patch: its embedding is the mean of K token embeddings (no multiplication), and its
K-way loss reads one row of logits per patch, so the formula holds in both stages with context = T positions;
the patch stage's tokens per second are K times its positions per second at the same FLOPs.
"""

from __future__ import annotations

import torch

# Dense BF16 (= FP16) tensor-core peak of one device, FLOP/s, from the vendors' datasheets (the table torchtitan's
# `get_peak_flops` uses). Matched against `torch.cuda.get_device_name()` in this order, so that the H100's PCIe and
# NVL variants are found before the SXM one. A device not listed has no known peak: no MFU is logged.
PEAK_BF16_FLOPS = (
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("MI300X", 1300e12),
    ("MI325X", 1300e12),
    ("MI355X", 2500e12),
)

# Config attributes of a mixture of experts: the FLOPs of a position then depend on the router, not on the weights.
MOE_CONFIG_ATTRIBUTES = ("num_experts_per_tok", "num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def peak_flops_of(device_name: str) -> float | None:
    """The dense BF16 peak (FLOP/s) of the device named `device_name` (`PEAK_BF16_FLOPS`), or None."""
    return next((value for key, value in PEAK_BF16_FLOPS if key in device_name), None)


def peak_flops(device: torch.device | str | None = None) -> float | None:
    """The dense BF16 peak (FLOP/s) of the CUDA (or ROCm) `device` (default: the current one); None on a CPU, or
    for a device that `PEAK_BF16_FLOPS` does not list."""
    device = torch.device(device) if device is not None else None
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def is_mixture_of_experts(config) -> bool:
    """Whether `config` (a transformers PretrainedConfig) routes each position through some of several experts."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return any((getattr(config, name, None) or 0) > 1 for name in MOE_CONFIG_ATTRIBUTES)


def matmul_weights(model: torch.nn.Module) -> int:
    """The weights that multiply each position's activations once: in_features x out_features of every nn.Linear
    (and transformers' Conv1D, GPT-2's linear layer) of `model`: attention and MLP projections, the LM head, tied or
    not. Embeddings are look-ups and norms are element-wise, so neither counts. Read from the modules' sizes, not
    their weights' storage, so a sharded model (FSDP, DeepSpeed ZeRO-3) counts its whole weights."""
    from transformers.pytorch_utils import Conv1D

    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            total += module.in_features * module.out_features
        elif isinstance(module, Conv1D):
            total += module.nx * module.nf
    return total


def model_on_meta_device(config) -> torch.nn.Module:
    """The stock causal LM of `config` with its parameters on the meta device (shapes only, no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def training_flops_per_position(model_or_config, context: int) -> float | None:
    """Model FLOPs of one training position (forward and backward) of a causal LM reading sequences of `context`
    positions (T, in both stages): 6 x `matmul_weights` + 12 x layers x heads x head_dim x context (see the module
    docstring). `model_or_config`: the model, or its config (the model is then built on the meta device).
    None for a mixture of experts (`is_mixture_of_experts`), whose cost per position depends on the routing."""
    model = model_or_config if isinstance(model_or_config, torch.nn.Module) else None
    config = model.config if model is not None else model_or_config
    if is_mixture_of_experts(config) or (model is not None and any(p.dim() > 2 for p in model.parameters())):
        return None  # (fused experts hold 3-D weights, which no nn.Linear shows)
    if model is None:
        model = model_on_meta_device(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 6.0 * matmul_weights(model) + 12.0 * text.num_hidden_layers * heads * head_dim * context
