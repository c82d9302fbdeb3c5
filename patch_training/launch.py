"""What the launcher says about the device, read so that a launch config is enough by itself.

`accelerate launch` passes a config's `use_cpu: true` to the script as ACCELERATE_USE_CPU only for a launch it runs
itself (one process, or mpirun); for several processes it starts torchrun (`distributed_type: MULTI_GPU`, the only
way to get 2 local CPU processes, configs/accelerate/cpu_ddp_2proc.yaml) and passes nothing about the CPU
(accelerate 1.16). transformers' TrainingArguments then sees no GPU and `use_cpu` false and leaves each process
alone (world size 1), which `job.check_world_size` refuses. Several processes on a machine without an accelerator
can only be one job on the CPU, over gloo: `launched_on_cpu` says so, and `RunTrainingArguments` sets `use_cpu`.
"""

from __future__ import annotations

import os

USE_CPU_ENV = "ACCELERATE_USE_CPU"  # set by `accelerate launch --cpu` and by a config's use_cpu (one-process launches)


def env_flag(name: str) -> bool:
    """Whether the environment variable `name` holds a true value as accelerate reads it (y, yes, t, true, on, 1)."""
    return os.environ.get(name, "").strip().lower() in ("y", "yes", "t", "true", "on", "1")


def launched_processes() -> int:
    """The processes the launcher started (WORLD_SIZE; 1 without a launcher or for a value that is not a count)."""
    value = os.environ.get("WORLD_SIZE", "1")
    return int(value) if value.isdigit() else 1


def launched_on_cpu(deepspeed: bool = False) -> bool:
    """Whether the launcher asked for the CPU (ACCELERATE_USE_CPU), or started several processes on a machine
    without an accelerator: the processes then form one job on the CPU, as `--use_cpu true` makes them. A DeepSpeed
    run (`deepspeed`) is left to DeepSpeed, which joins its processes itself (on a CPU, through its CPU accelerator:
    `use_cpu` would take the run off DeepSpeed's process group, and ZeRO-3's partitioned init would see one rank)."""
    if env_flag(USE_CPU_ENV):
        return True
    if launched_processes() > 1 and not deepspeed:
        import torch

        return not torch.accelerator.is_available()
    return False
