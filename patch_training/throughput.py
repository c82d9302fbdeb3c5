"""Throughput in the training logs: every logging step of every stage carries `tokens_per_second`,
`positions_per_second` and, on a device whose peak is known, `mfu` (model FLOPs utilisation, `flops.py`), on the
console, in trainer_state.json and in the `--report_to` trackers, as nanoGPT and torchtitan log them.

No device synchronisation is added: the rates are host time between two logging steps, which transformers'
Trainer already synchronises (it reads the loss with `.item()` to log it), and the tokens of each step come from
the stage's plan (`results.tokens_seen`: steps x global batch x sequence length, the stage's last partial step
counted as what it holds). The clock starts when a stage's training starts (its first interval includes the first
batches' loading and, with --torch_compile, the compilation) and restarts after each evaluation and checkpoint,
which do not count as training time.
"""

from __future__ import annotations

import time

from transformers import TrainerCallback

from .flops import peak_flops, training_flops_per_position
from .results import tokens_seen
from .stages import global_batch_size


class ThroughputMeter(TrainerCallback):
    """Measures a stage's throughput between logging steps (`fields`, added to the training logs by PatchTrainer).

    plan: the stage's `StagePlan` (its K and sequence length); global_batch: sequences per optimizer step over all
    ranks; flops_per_position: model FLOPs of a training position (`flops.training_flops_per_position`, None where
    unknown); peak_flops: one device's peak FLOP/s (None: no MFU); world_size: the devices sharing the work."""

    def __init__(self, plan, global_batch: int, flops_per_position: float | None, peak_flops: float | None,
                 world_size: int):
        self.plan = plan
        self.global_batch = global_batch
        self.flops_per_position = flops_per_position
        self.peak_flops = peak_flops
        self.world_size = world_size
        self._start_step = 0
        self._start_time = time.perf_counter()

    @classmethod
    def for_stage(cls, plan, stage_args, model) -> ThroughputMeter:
        """The meter of the stage `plan` trained with TrainingArguments `stage_args` on `model`."""
        context = plan.block_len // plan.patch_size  # T positions in both stages
        return cls(plan, global_batch_size(stage_args), training_flops_per_position(model, context),
                   peak_flops(stage_args.device), stage_args.world_size)

    def restart_clock(self, step: int) -> None:
        self._start_step, self._start_time = step, time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.restart_clock(state.global_step)

    def on_evaluate(self, args, state, control, **kwargs):
        self.restart_clock(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        self.restart_clock(state.global_step)

    def fields(self, step: int) -> dict:
        """The throughput since the clock last started, at optimizer step `step`: `tokens_per_second` and
        `positions_per_second` over all ranks (int), and `mfu` (a fraction of the devices' peak) where both the
        FLOPs and the peak are known; {} when no step was taken since."""
        seconds = time.perf_counter() - self._start_time
        if step <= self._start_step or seconds <= 0:
            return {}
        tokens_then, positions_then = tokens_seen(self.plan, self._start_step, self.global_batch)
        tokens_now, positions_now = tokens_seen(self.plan, step, self.global_batch)
        positions_per_second = (positions_now - positions_then) / seconds
        fields = {"tokens_per_second": round((tokens_now - tokens_then) / seconds),
                  "positions_per_second": round(positions_per_second)}
        if self.flops_per_position is not None and self.peak_flops:
            fields["mfu"] = round(self.flops_per_position * positions_per_second / (self.peak_flops * self.world_size), 4)
        self.restart_clock(step)
        return fields

    def attach(self, trainer) -> None:
        """Measure `trainer`'s training (a PatchTrainer, which adds `fields` to each training log)."""
        trainer.throughput = self
        trainer.add_callback(self)
