#!/usr/bin/env python
"""`run_clm.py` as `benchmarks/fsdp_check.py` launches it: the same job (its arguments are run_clm.py's), plus two
things the check needs from inside the training process.

- The backend actually used: at the first optimizer step of each stage, rank 0 writes one JSON line to
  `$FSDP_CHECK_RECORD` (a file beside the run, never inside run_clm.py's output folder, which refuses foreign
  files): the Trainer's FSDP switch and version, the wrapped model's class, how many parameters are FSDP2 DTensors
  or FSDP1 flat parameters, the process group's backend and size, the device, the precision and the training loss
  (fused or unfused, and the fused loss's kernel).
- A kill: with `FSDP_CHECK_KILL=K:STEP` the process sends itself SIGKILL (no clean-up, no exception handler, as
  an out-of-memory killer or a lost node would) when the stage of patch size K reaches optimizer step STEP.
"""

from __future__ import annotations

import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import run_clm  # noqa: E402
from patch_training.trainer import PatchTrainer  # noqa: E402

_recorded: set[int] = set()


def backend_record(trainer, model) -> dict:
    """What this stage trains with (module docstring), from the Trainer and the model it hands to training_step."""
    import torch
    import torch.distributed as dist

    from patch_training.fused_loss import resolve_kernel

    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    parameters = list(model.parameters())
    inner = getattr(model, "module", model)  # FSDP1 wraps; FSDP2 (fully_shard) changes the model's class in place
    loss_path = None
    if hasattr(inner, "_fused_loss_arguments"):
        training, inner.training = inner.training, True
        try:
            fused = inner._fused_loss_arguments(torch.zeros(1, 2, dtype=torch.long), {}) is not None
        finally:
            inner.training = training
        device = parameters[0].device if parameters else torch.device("cpu")
        loss_path = f"fused ({resolve_kernel(inner.fused_loss_kernel, device)})" if fused else "unfused"
    return {
        "stage_patch_size": trainer.stage_patch_size,
        "is_fsdp_enabled": bool(getattr(trainer, "is_fsdp_enabled", False)),
        "fsdp_version": getattr(plugin, "fsdp_version", None) if plugin is not None else None,
        "wrapped_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "dtensor_parameters": sum(type(p).__name__ == "DTensor" for p in parameters),
        "flat_parameters": sum(type(p).__name__ == "FlatParameter" for p in parameters),
        "fsdp1_modules": sum(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()),
        "fsdp2_modules": sum(type(m).__name__.startswith("FSDP") and type(m).__name__ != "FSDPState"
                             for m in model.modules()),
        "process_group_backend": dist.get_backend() if dist.is_initialized() else None,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "device": str(parameters[0].device) if parameters else None,
        "mixed_precision": trainer.accelerator.mixed_precision,
        "loss_path": loss_path,
    }


def install() -> None:
    """Wrap `PatchTrainer.training_step` with the record and the kill of the module docstring."""
    record_path = os.environ.get("FSDP_CHECK_RECORD")
    kill = os.environ.get("FSDP_CHECK_KILL")
    kill_at = tuple(int(part) for part in kill.split(":")) if kill else None
    original = PatchTrainer.training_step

    def training_step(self, model, *args, **kwargs):
        patch_size = self.stage_patch_size
        if kill_at is not None and patch_size == kill_at[0] and self.state.global_step >= kill_at[1]:
            print(f"fsdp_job: killing this process (SIGKILL) at step {self.state.global_step} of the K={patch_size} "
                  "stage", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if record_path and patch_size not in _recorded and self.is_world_process_zero():
            _recorded.add(patch_size)
            with open(record_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(backend_record(self, model)) + "\n")
        return original(self, model, *args, **kwargs)

    PatchTrainer.training_step = training_step


if __name__ == "__main__":
    install()
    run_clm.cli()
