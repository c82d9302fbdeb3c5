"""The model FLOPs formula of the MFU (patch_training/flops.py) against an independent count: torch's FlopCounterMode
over a real forward and backward of the stock causal LM head and loss, with eager attention (whose T x T score
matmuls it sees), at K = 1 and at K = 4, on architectures with and without their own head_dim; the benchmark uses
the same formula; MFU is logged on a GPU whose peak is known."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig

from modeling_llama_patch import AutoPatchModelForCausalLM
from patch_training import flops

ARCHITECTURES = ["llama-tiny", "qwen3-tiny", "gemma2-tiny", "olmo2-tiny", "mistral-tiny"]


def counted_training_flops(config, patch_size: int, batch: int, positions: int) -> int:
    """FLOPs torch counts for one training step (forward and backward) of the patch model on `batch` sequences of
    `positions` positions (K x positions tokens): the stock head and loss (`unfused`: the fused loss accumulates its
    weight gradient in place, which FlopCounterMode does not count), eager attention."""
    config.patch_size = patch_size
    torch.manual_seed(0)
    model = AutoPatchModelForCausalLM.from_config(config, attn_implementation="eager")
    model.loss_implementation = "unfused"
    model.train()
    ids = torch.randint(0, config.vocab_size, (batch, positions * patch_size))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize("patch_size", [1, 4])
def test_the_formula_equals_torch_s_count(name, patch_size):
    config = AutoConfig.from_pretrained(REPO_ROOT / "configs" / "model" / f"{name}.json")
    batch, positions = 2, 16
    expected = counted_training_flops(config, patch_size, batch, positions)
    model = AutoPatchModelForCausalLM.from_config(config)
    assert flops.training_flops_per_position(model, positions) * batch * positions == expected
    assert flops.training_flops_per_position(config, positions) * batch * positions == expected, "from the config alone"


def test_a_head_dim_of_its_own_counts():
    """Qwen3's heads x head_dim (4 x 16 = 64 here) need not be hidden_size: doubling head_dim changes the attention
    term, as torch's count does."""
    config = AutoConfig.from_pretrained(REPO_ROOT / "configs" / "model" / "qwen3-tiny.json")
    config.head_dim = 32
    assert flops.training_flops_per_position(config, 16) * 2 * 16 == counted_training_flops(config, 1, 2, 16)


def test_mixture_of_experts_has_no_formula():
    """Routed experts make a position's FLOPs depend on the router: None, so no MFU is logged (tokens/s still is)."""
    config = AutoConfig.from_pretrained(REPO_ROOT / "configs" / "model" / "qwen3_moe-tiny.json")
    assert flops.is_mixture_of_experts(config)
    assert flops.training_flops_per_position(config, 16) is None
    assert flops.training_flops_per_position(AutoPatchModelForCausalLM.from_config(config), 16) is None
    assert not flops.is_mixture_of_experts(AutoConfig.from_pretrained(REPO_ROOT / "configs" / "model" / "llama-tiny.json"))


@pytest.mark.parametrize("device, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA B200", 2250e12), ("AMD Instinct MI300X", 1300e12), ("NVIDIA GeForce RTX 4090", None), ("Tesla T4", None),
])
def test_peaks_are_found_by_device_name(device, peak):
    assert flops.peak_flops_of(device) == peak


def test_no_peak_on_a_cpu():
    assert flops.peak_flops("cpu") is None


def test_the_benchmark_uses_the_package_s_formula():
    """benchmarks/throughput.py reports MFU with the very functions run_clm.py logs it with."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import throughput

    assert throughput.training_flops_per_position is flops.training_flops_per_position
    assert throughput.peak_flops is flops.peak_flops


@pytest.mark.skipif(not torch.cuda.is_available() or flops.peak_flops() is None,
                    reason="MFU needs a GPU whose peak is known")
def test_a_gpu_run_logs_mfu(tmp_path):
    """On a GPU with a known peak, every training log of both stages carries mfu, a fraction in (0, 1)."""
    out = tmp_path / "gpu"
    command = [sys.executable, "run_clm.py", "configs/train/tiny-patch.json", "--output_dir", str(out),
               "--data_cache_dir", str(tmp_path / "cache"), "--max_steps", "8", "--logging_steps", "2",
               "--eval_strategy", "no", "--max_eval_blocks", "4", "--bf16", "true", "--disable_tqdm", "true"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    for folder in (out / "patch_stage", out):
        training = [e for e in json.loads((folder / "trainer_state.json").read_text())["log_history"] if "grad_norm" in e]
        assert training and all(0 < e["mfu"] < 1 for e in training), training
