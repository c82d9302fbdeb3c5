"""What stops a run before its plan, on purpose: divergence and preemption.

- Divergence (`DivergenceWatch`): a non-finite loss or gradient norm stops the stage, with one line naming the
  stage, the step, what was non-finite and the newest checkpoint (`cli.Diverged`, exit code 3), before anything
  non-finite is saved: the watch is read before every checkpoint and before a stage's model is saved, and the
  weights themselves are checked there too (`check_finite_weights`). Between those points it only accumulates a
  flag on the device: no host synchronisation per step (Megatron checks every step; here the check costs one
  device-to-host read at logging and saving steps, where transformers already reads the loss).
- Preemption (`preemption_signals`, `PreemptionCallback`): SIGTERM (what SLURM and Kubernetes send before
  SIGKILL) and SIGUSR1 (what `sbatch --signal` sends) are caught. During training every rank stops at the next
  optimizer-step boundary, together (a tiny CPU all-reduce over a gloo group agrees on it, one per step, no GPU
  synchronisation), a complete checkpoint is saved, and the run ends with one line and exit code 75
  (`cli.Preempted`: re-running the same command resumes). Outside the training loop (reading data, between
  stages) the run stops at once with the same line: nothing since the last saved state is lost.

`run_dir.RunDir` then decides what is complete: a stage that returned before its planned steps is never marked
complete, whatever stopped it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading

import torch
from transformers import TrainerCallback

from .cli import Diverged, Preempted

logger = logging.getLogger("run_clm")

PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1")  # the kill warning of SLURM (--signal), Kubernetes, most schedulers


# ---------------------------------------------------------------------------------------------------------
# Divergence
# ---------------------------------------------------------------------------------------------------------


class DivergenceWatch:
    """A device-side record of the first optimizer step whose loss or gradient norm was not finite.

    `observe(step, loss, grad_norm)` after each optimizer step only launches a few elementwise kernels (no
    synchronisation); `check(stage, step, where)` reads the record once (a device-to-host copy; under several
    ranks a max all-reduce, so that every rank stops together) and raises `cli.Diverged` with one line."""

    def __init__(self):
        self._first_bad = None  # (3,) int64 on the device: first bad step, loss bad, gradient norm bad; -1 = none

    def observe(self, step: int, loss: torch.Tensor, grad_norm) -> None:
        """Record step `step` if `loss` (the running loss sum, a device tensor) or `grad_norm` (a tensor, a float
        or None) is not finite."""
        device = loss.device
        loss_bad = ~torch.isfinite(loss.detach()).all()
        if grad_norm is None:
            norm_bad = torch.zeros((), dtype=torch.bool, device=device)
        elif torch.is_tensor(grad_norm):
            norm_bad = ~torch.isfinite(grad_norm.detach().to(device)).all()
        else:  # a float: DeepSpeed's norm, already on the host
            norm_bad = torch.tensor(not math.isfinite(grad_norm), device=device)
        if self._first_bad is None:
            self._first_bad = torch.full((3,), -1, dtype=torch.int64, device=device)
        new = torch.stack([torch.full((), step, dtype=torch.int64, device=device), loss_bad.long(), norm_bad.long()])
        first = self._first_bad
        self._first_bad = torch.where((first[0] < 0) & (loss_bad | norm_bad), new, first)

    def first_bad_step(self, world_size: int = 1) -> tuple[int, bool, bool] | None:
        """(step, loss was non-finite, gradient norm was non-finite) of the first bad step on any rank, or None.
        A synchronisation (and under several ranks a collective: every rank calls it at the same point)."""
        if self._first_bad is None:
            return None
        record = self._first_bad.clone()
        if world_size > 1 and torch.distributed.is_initialized():
            # -1 means none: the max over ranks is some bad step (steps advance together on every rank)
            torch.distributed.all_reduce(record, op=torch.distributed.ReduceOp.MAX)
        step, loss_bad, norm_bad = record.tolist()
        return None if step < 0 else (step, bool(loss_bad), bool(norm_bad))

    def check(self, stage: str, last_good, world_size: int = 1) -> None:
        """Raise `cli.Diverged` (one line) if a bad step was observed: the stage, the step, what was non-finite,
        and `last_good()` (the newest saved state, or None; asked only then)."""
        bad = self.first_bad_step(world_size)
        if bad is None:
            return
        step, loss_bad, norm_bad = bad
        what = " and ".join(name for name, is_bad in (("loss", loss_bad), ("gradient norm", norm_bad)) if is_bad)
        raise Diverged(diverged_message(stage, step, f"a non-finite {what}", last_good()))


def check_finite_weights(model, stage: str, step: int, last_good, world_size: int = 1) -> None:
    """Raise `cli.Diverged` if a parameter of `model` holds a NaN or an infinity (every rank checks its own
    parameters or shards; a collective under several ranks). One reduction per parameter, read once.
    `last_good()`: the newest saved state, for the message."""
    flags = [(~torch.isfinite(p.detach())).any() for p in model.parameters() if p.numel()]
    if not flags:
        return
    bad = torch.stack(flags).any().long()
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    if bad.item():
        raise Diverged(diverged_message(stage, step, "non-finite weights", last_good()))


def diverged_message(stage: str, step: int, what: str, last_good: str | None) -> str:
    kept = f"the newest saved state, {last_good}, is kept" if last_good else "no checkpoint of it was saved"
    return (f"the {stage} stage diverged: {what} at optimizer step {step}; nothing non-finite was saved and {kept}. "
            "Lower --learning_rate (or --max_grad_norm) and start again with --overwrite_output_dir or another "
            "--output_dir")


# ---------------------------------------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------------------------------------


class PreemptionState:
    """The preemption signal received (its name, or None) and whether acting on it is deferred to a safe point
    (the training loop's next step boundary, or the end of a stage's saving)."""

    def __init__(self):
        self.signal_name: str | None = None
        self.deferred = False


PREEMPTION = PreemptionState()


def _on_signal(signum, frame) -> None:
    name = signal.Signals(signum).name
    first = PREEMPTION.signal_name is None
    PREEMPTION.signal_name = PREEMPTION.signal_name or name
    if not PREEMPTION.deferred:  # reading data, building models: stop here, nothing is lost
        raise Preempted(preempted_message(name, None))
    if first:
        logger.warning("%s received: the run stops at the next optimizer step's end (or once the stage's model is "
                       "saved), with its state saved", name)


@contextlib.contextmanager
def preemption_signals():
    """Within the block, SIGTERM and SIGUSR1 stop the run (see the module docstring) instead of killing it; the
    handlers in place before are restored after. Outside the main thread (where Python cannot install signal
    handlers) nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {name: signal.signal(getattr(signal, name), _on_signal) for name in PREEMPTION_SIGNALS}
    PREEMPTION.signal_name, PREEMPTION.deferred = None, False
    try:
        yield
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)
        PREEMPTION.signal_name, PREEMPTION.deferred = None, False


@contextlib.contextmanager
def deferred_preemption():
    """Within the block (a stage's training and saving) a preemption signal is only recorded: the training loop
    acts on it at the next step boundary (`PreemptionCallback`), the stage loop once the stage is saved
    (`check_preempted`)."""
    PREEMPTION.deferred = True
    try:
        yield
    finally:
        PREEMPTION.deferred = False


def preemption_signal() -> str | None:
    """The name of the preemption signal received, or None."""
    return PREEMPTION.signal_name


def check_preempted(checkpoint: str | None = None) -> None:
    """Raise `cli.Preempted` if a preemption signal arrived; `checkpoint`: where the state is saved."""
    if PREEMPTION.signal_name is not None:
        raise Preempted(preempted_message(PREEMPTION.signal_name, checkpoint))


def preempted_message(signal_name: str, saved: str | None) -> str:
    state = f"its state is saved ({saved})" if saved else "nothing since the last saved state is lost"
    return f"preempted ({signal_name}): {state}; re-run the same command to resume"


class PreemptionCallback(TrainerCallback):
    """At each optimizer step's end, every rank learns whether any rank received a preemption signal (a max
    all-reduce of one integer over a gloo group of its own: CPU only, no GPU synchronisation); if one did, the
    step's checkpoint is saved and training stops, on every rank at the same step."""

    def __init__(self):
        self._group = None

    def on_train_begin(self, args, state, control, **kwargs):
        if args.world_size > 1 and torch.distributed.is_initialized() and self._group is None:
            self._group = torch.distributed.new_group(backend="gloo")  # every rank makes it, at the same point

    def on_step_end(self, args, state, control, **kwargs):
        asked = PREEMPTION.signal_name is not None
        if self._group is not None:  # a CPU tensor over gloo: no device synchronisation
            flag = torch.tensor([int(asked)])
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group)
            asked = bool(flag.numpy()[0])
        if asked:
            PREEMPTION.signal_name = PREEMPTION.signal_name or "a preemption signal to another rank"
            control.should_save = True
            control.should_training_stop = True
        return control
