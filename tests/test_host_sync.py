"""No host synchronisation in the training step.

A GPU step is fast only if the CPU can queue the next step's work while the device runs this one. Any op that
reads a device value into Python (`.item()`, `bool(t)`, `float(t)`) or whose output shape depends on values
(`nonzero`, boolean-mask indexing, `unique`) makes the host wait for the device. Such ops reach the
dispatcher on CPU exactly as on CUDA, so a TorchDispatchMode that records them finds every sync that the
Trainer, accelerate, transformers or our code would make on a GPU, here in CI without one.
"""

import traceback

import numpy as np
import pytest
import torch
from conftest import tiny_llama_config
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainerCallback, default_data_collator

from modeling_llama_patch import PatchLlamaForCausalLM
from patch_training.blocks import TokenBlocks
from patch_training.trainer import PatchTrainer
from patch_training.training_args import RunTrainingArguments

# aten ops that wait for the device: a scalar read into Python, or an output whose shape depends on values.
SYNCING_OPS = frozenset({
    "_local_scalar_dense", "is_nonzero", "equal", "nonzero", "nonzero_static", "masked_select",
    "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave",
})
# Stock transformers' check for packed sequences in the causal mask (one `.all()` per forward). It is
# skipped under torch.compile (the benchmarked path) and is not ours to remove.
ALLOWED_FRAMES = frozenset({"find_packed_sequence_indices"})


class HostSyncRecorder(TorchDispatchMode, TrainerCallback):
    """Records syncing ops (with the Python frames that issued them) from the first optimizer step's start
    to the last step's end: data fetching, forward, loss, backward, clipping, optimizer and scheduler."""

    def __init__(self):
        TorchDispatchMode.__init__(self)
        self.active = False
        self.syncs: list[tuple[str, tuple[str, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if self.active and name in SYNCING_OPS:
            frames = tuple(f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}:{frame.name}"
                           for frame in traceback.extract_stack()[-12:-1])
            if not any(frame.rsplit(":", 1)[-1] in ALLOWED_FRAMES for frame in frames):
                self.syncs.append((name, frames))
        return func(*args, **(kwargs or {}))

    def on_step_begin(self, args, state, control, **kwargs):
        self.active = True

    def on_step_end(self, args, state, control, **kwargs):
        self.active = state.global_step < state.max_steps  # stop before the end-of-training summary


def record_training_syncs(tmp_path, patch_size: int, **training_overrides) -> list:
    """Train 4 optimizer steps of 2 micro-batches each through run_clm's PatchTrainer and defaults."""
    torch.manual_seed(0)
    config = tiny_llama_config()
    config.patch_size = patch_size
    tokens = np.random.RandomState(0).randint(3, config.vocab_size, 50_000).astype(np.uint16)
    dataset = TokenBlocks(tokens, 0, 16, 16 * patch_size)
    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                  max_steps=4, max_grad_norm=1.0, lr_scheduler_type="cosine", warmup_steps=1,
                  logging_steps=1000, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True)
    values.update(training_overrides)
    recorder = HostSyncRecorder()
    trainer = PatchTrainer(model=PatchLlamaForCausalLM(config), args=RunTrainingArguments(**values),
                                   train_dataset=dataset, data_collator=default_data_collator,
                                   callbacks=[recorder])
    with recorder:
        trainer.train()
    assert trainer.state.global_step == 4
    return recorder.syncs


@pytest.mark.parametrize("patch_size", [1, 4])
def test_training_step_has_no_host_sync(tmp_path, patch_size):
    syncs = record_training_syncs(tmp_path, patch_size)
    assert syncs == [], "host syncs in the training step:\n" + "\n".join(
        f"{name} <- {' <- '.join(reversed(frames))}" for name, frames in syncs[:5])


def test_recorder_catches_transformers_nan_filter(tmp_path):
    """The reference: transformers' default logging_nan_inf_filter=True reads each micro-batch loss on the
    host (isnan, isinf); the recorder must see those 2 syncs x 2 micro-batches x 4 steps."""
    syncs = record_training_syncs(tmp_path, 4, logging_nan_inf_filter=True)
    assert len(syncs) == 16 and {name for name, _ in syncs} == {"_local_scalar_dense"}
    assert all(any("_run_epoch" in frame for frame in frames) for _, frames in syncs)


def test_run_defaults_avoid_syncs_and_keep_user_choice():
    args = RunTrainingArguments(output_dir="unused", report_to="none")
    assert args.logging_nan_inf_filter is False
    assert RunTrainingArguments(output_dir="unused", report_to="none", logging_nan_inf_filter=True).logging_nan_inf_filter
    if not torch.accelerator.is_available():
        assert args.accelerator_config.non_blocking is False  # nothing to overlap without a GPU
        assert args.dataloader_pin_memory is False  # nor to pin for (torch warns on every loader otherwise)


class AllSyncs(HostSyncRecorder):
    """Records syncing ops over the whole of train(), logging steps included."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.active = True

    def on_step_begin(self, args, state, control, **kwargs):
        pass

    def on_step_end(self, args, state, control, **kwargs):
        pass

    def on_train_end(self, args, state, control, **kwargs):
        self.active = False


@pytest.mark.parametrize("patch_size", [1, 4])
def test_the_throughput_meter_adds_no_sync(tmp_path, patch_size):
    """tokens_per_second, positions_per_second (and mfu) at every step's log: the syncs of the whole of train() are
    transformers' own reads of the logged loss and gradient norm, as many with the meter as without."""
    import json

    from patch_training.stages import StagePlan
    from patch_training.throughput import ThroughputMeter

    counts = {}
    for metered in (False, True):
        torch.manual_seed(0)
        config = tiny_llama_config()
        config.patch_size = patch_size
        tokens = np.random.RandomState(0).randint(3, config.vocab_size, 50_000).astype(np.uint16)
        dataset = TokenBlocks(tokens, 0, 16, 16 * patch_size)
        args = RunTrainingArguments(output_dir=str(tmp_path / str(metered)), per_device_train_batch_size=2,
                                    gradient_accumulation_steps=2, max_steps=4, logging_steps=1, save_strategy="no",
                                    report_to="none", disable_tqdm=True, use_cpu=True)
        recorder = AllSyncs()
        model = PatchLlamaForCausalLM(config)
        trainer = PatchTrainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator,
                               callbacks=[recorder])
        if metered:
            plan = StagePlan("patch" if patch_size > 1 else "token", patch_size, 16 * patch_size, 0, 16 * 16 * patch_size, 16)
            ThroughputMeter(plan, 4, 1e6, 1e12, 1).attach(trainer)  # a peak given: the mfu path runs too
        with recorder:
            trainer.train()
        counts[metered] = len(recorder.syncs)
        trainer.save_state()
        logged = [e for e in json.loads((tmp_path / str(metered) / "trainer_state.json").read_text())["log_history"]
                  if "grad_norm" in e]
        assert len(logged) == 4 and all(("mfu" in e) is metered for e in logged)
    assert counts[True] == counts[False] > 0
