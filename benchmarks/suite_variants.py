#!/usr/bin/env python
"""The variants of `benchmarks/gpu_suite.sh`: what each name runs, and about how long it takes on one H200.

    python benchmarks/suite_variants.py [VARIANT...]      # one line per variant: NAME SECONDS KIND ARGS...

No variant: the default list. An unknown name is refused (exit code 2) before anything runs. KIND is `bench`
(ARGS are `benchmarks/throughput.py` flags, after the suite's common ones), `fsdp` (`benchmarks/fsdp_check.py`)
or `pytest` (ARGS are pytest's). SECONDS is the estimate `estimate_seconds` gives, from the H200 suite logs.

Names:
  [MODEL-]COMPILE[-OPTION...]-mbN   one throughput.py run (token and patch stage) at micro-batch N sequences
    MODEL    (none) the paper's 370M Llama; 1.3b: configs/model/llama-1.3b.json (fewer timed steps);
             v128k: the 370M body with Llama-3's 128,256-token vocabulary (fewer timed steps)
    COMPILE  regional: torch.compile by regions (run_clm.py's --torch_compile_regions); compile: the whole model;
             eager: no torch.compile
    OPTION   unfused: --loss_implementation unfused (the stock head + chunked K-way loss);
             eagerloss: the fused loss with its eager chunk kernel (the default is compiled on a GPU);
             cudnn: SDPA restricted to cuDNN attention; ligerlayers: Liger-Kernel's RoPE, RMSNorm and SwiGLU;
             token: the token stage only
  unfused-mbN   compile-unfused-mbN (an older name)
  memory        the head + loss peak memory at 8,192 positions x 32,000 and 128,256 (bf16 tensors, H 1,024)
  headloss      the head + loss time and memory at 16,384 positions x 32,000 and 128,256, H 1,024, as a --bf16
                training step has them (float32 weights, bf16 autocast), each fused kernel, with Liger's and Cut
                Cross-Entropy's single-target kernels where installed
  reference     compiled whole, one batch on the GPU, and a bare PyTorch loop (micro-batch 16)
  cudnn         compiled whole with cuDNN attention (micro-batch 16; see regional-cudnn-mbN)
  liger         eager + Liger-Kernel with its loss at K = 1 (micro-batch 16)
  fsdp          benchmarks/fsdp_check.py: FSDP1 and FSDP2 for real (two-stage job, kill, exact resume, loading)
  gputests      the GPU tests of the fused loss (tests/test_fused_loss.py -k cuda)
"""

from __future__ import annotations

import re
import sys

DEFAULT = ("regional-unfused-mb32", "regional-mb32", "regional-cudnn-mb32", "fsdp", "v128k-regional-token-mb16",
           "v128k-regional-unfused-token-mb16", "1.3b-regional-mb16", "gputests", "headloss")
MODELS = {
    "": [],
    "1.3b": ["--model_config", "configs/model/llama-1.3b.json", "--steps", "10", "--warmup", "3"],
    "v128k": ["--vocab_size", "128256", "--steps", "15", "--warmup", "4"],
}
COMPILES = {"regional": ["--torch_compile", "--compile_regions"], "compile": ["--torch_compile"], "eager": []}
OPTIONS = {
    "unfused": ["--loss_implementation", "unfused"],
    "eagerloss": ["--fused_loss_kernel", "eager"],
    "cudnn": ["--sdpa_backend", "cudnn"],
    "ligerlayers": ["--liger_layers"],
    "token": ["--stages", "token"],
}
SPECIAL = {
    "memory": ("bench", ["--micro_batch", "4", "--loss_hidden_size", "1024", "--head_loss_memory", "32000", "128256"]),
    "headloss": ("bench", ["--micro_batch", "8", "--loss_hidden_size", "1024", "--head_loss_memory", "32000", "128256",
                           "--head_loss_autocast", "--head_loss_repeats", "5"]),
    "reference": ("bench", ["--micro_batch", "16", "--torch_compile", "--skip_loss_memory", "--data", "synthetic",
                            "--reference_loop"]),
    "cudnn": ("bench", ["--micro_batch", "16", "--torch_compile", "--skip_loss_memory", "--sdpa_backend", "cudnn"]),
    "liger": ("bench", ["--micro_batch", "16", "--liger", "--skip_loss_memory"]),
    "fsdp": ("fsdp", []),
    "gputests": ("pytest", ["-q", "-p", "no:cacheprovider", "tests/test_fused_loss.py", "-k", "cuda"]),
}
PATTERN = re.compile(
    r"^(?:(?P<model>1\.3b|v128k)-)?(?P<compile>regional|compile|eager)(?P<options>(?:-(?:%s))*)-mb(?P<mb>[1-9][0-9]*)$"
    % "|".join(OPTIONS)
)
# Seconds on one H200 (benchmarks/results/throughput-h200/suite-*.log): a throughput.py run of the 370M model
# spends ~20 s starting (imports, the token cache, the model), its token stage ~15 s warming up by regions (the
# patch stage ~3 s), and a step takes ~12 ms a sequence of 2,048 (376 ms at micro-batch 32), the whole model
# compiled ~130 s + 160 s warming up. The other models scale the step by their FLOPs per position.
STEP_S_PER_SEQUENCE = {"": 0.012, "1.3b": 0.041, "v128k": 0.0146}
FIXED_S = {"memory": 15, "headloss": 40, "reference": 380, "cudnn": 330, "liger": 90, "fsdp": 75, "gputests": 45}


class UnknownVariant(ValueError):
    """A name that is not a variant (its message lists the grammar)."""


def parse(name: str) -> tuple[str, list[str]]:
    """(kind, arguments) of variant `name` (module docstring); UnknownVariant for another name."""
    if name in SPECIAL:
        kind, arguments = SPECIAL[name]
        return kind, list(arguments)
    if re.fullmatch(r"unfused-mb[1-9][0-9]*", name):
        return parse(f"compile-{name}")
    match = PATTERN.match(name)
    if not match:
        raise UnknownVariant(
            f"unknown variant '{name}' ([1.3b-|v128k-]regional|compile|eager[-{'|-'.join(OPTIONS)}...]-mbN, "
            f"unfused-mbN, {', '.join(SPECIAL)})"
        )
    options = [option for option in match["options"].split("-") if option]
    if len(set(options)) != len(options) or ("unfused" in options and "eagerloss" in options):
        raise UnknownVariant(f"variant '{name}': an option twice, or both unfused and eagerloss")
    arguments = ["--micro_batch", match["mb"], *COMPILES[match["compile"]]]
    if match["compile"] != "eager":  # eager runs also measure the loss-only memory (loss_memory), as they did
        arguments.insert(2, "--skip_loss_memory")
    arguments += MODELS[match["model"] or ""]
    for option in options:
        arguments += OPTIONS[option]
    return "bench", arguments


def estimate_seconds(name: str) -> int:
    """About how long variant `name` takes on one H200 (see STEP_S_PER_SEQUENCE), start to end."""
    parse(name)
    if name in FIXED_S:
        return FIXED_S[name]
    if name.startswith("unfused-"):
        name = f"compile-{name}"
    match = PATTERN.match(name)
    model, compile_, micro_batch = match["model"] or "", match["compile"], int(match["mb"])
    stages = 1 if "-token" in match["options"] else 2
    steps = {"": 25, "1.3b": 13, "v128k": 19}[model]  # warm-up + timed steps at the suite's STEPS=20
    warmup = {"regional": 15 + 3 * (stages - 1), "compile": 130 + 160 * (stages - 1), "eager": 5}[compile_]
    start = {"": 20, "1.3b": 35, "v128k": 25}[model]
    return round(start + warmup + stages * steps * STEP_S_PER_SEQUENCE[model] * micro_batch)


def main(argv: list[str]) -> int:
    names = argv or list(DEFAULT)
    try:
        lines = [(name, estimate_seconds(name), *parse(name)) for name in names]
    except UnknownVariant as error:
        print(f"gpu_suite.sh: {error}", file=sys.stderr)
        return 2
    for name, seconds, kind, arguments in lines:
        print(" ".join([name, str(seconds), kind, *arguments]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
