"""`PatchTrainer`: transformers' Trainer for the patch model. Exact gradient accumulation for the K-way loss,
per-offset losses, patch and token evaluation, the whole stage's figures across resumes (`StageProgress`), and
with `--patch_switch continue` one learning-rate schedule and one AdamW state across both stages. The stages of a
job are trained one after the other by `stage_loop.train_stages`."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

from modeling_llama_patch import get_patch_size

from . import compat, lazy_deepspeed
from .blocks import IgnoredPadding
from .cli import UsageError, write_json_atomic, writing
from .guards import DivergenceWatch, PreemptionCallback, check_finite_weights
from .loss import count_loss_targets, loss_target_labels
from .model_card import write_model_card
from .run_dir import (
    STAGE_PROGRESS_FILE, archive_problem, checkpoints_to_delete, last_complete_checkpoint, safetensors_problem,
)

logger = logging.getLogger("run_clm")
compat.install()  # transformers 5.17: a multi-process CPU run's optimizer state loads (see compat.py)
lazy_deepspeed.install()  # accelerate imports DeepSpeed (and prints its accelerator line) only in a DeepSpeed run


@dataclass
class StageProgress:
    """What a stage has done up to a checkpoint, kept in `<checkpoint>/stage_progress.json` so that a resumed
    stage reports the figures of the whole stage, not of its last attempt.

    transformers' Trainer sums the loss of each optimizer step into a device tensor (`_tr_loss`), drains it into
    a Python float (`_total_loss_scalar`) at each logging step, and reports `train_loss` = that sum / the steps
    of the train() call. Here both are kept: `loss_sum`, the drained sum, and `loss_pending`, the not yet
    logged part (averaged over ranks as transformers does), with `last_logged_step`. A resumed attempt restores
    all three, so it logs and sums exactly what the uninterrupted stage does: train_loss = loss_sum / steps,
    bit for bit. `train_seconds`: the wall time of the attempts up to the checkpoint (work lost after the last
    checkpoint is not counted)."""

    global_step: int = 0
    loss_sum: float = 0.0
    loss_pending: float = 0.0
    last_logged_step: int = 0
    train_seconds: float = 0.0

    @property
    def train_loss(self) -> float:
        return (self.loss_sum + self.loss_pending) / max(self.global_step, 1)

    @classmethod
    def of_checkpoint(cls, checkpoint: str | None) -> StageProgress:
        """The progress recorded in `checkpoint` (a fresh one for None)."""
        if checkpoint is None:
            return cls()
        return cls(**json.loads((Path(checkpoint) / STAGE_PROGRESS_FILE).read_text()))


class RestoreRunningLoss(TrainerCallback):
    """At the start of a resumed train(), put back the loss sums that transformers keeps outside its checkpoint
    (see `StageProgress`): after this the Trainer logs and sums as if it had never stopped. And apply this
    attempt's logging, evaluation and saving cadence: transformers restores the checkpoint's own from its
    trainer_state.json (`TrainerState.load_from_json`), so a resume with another --save_steps or --logging_steps,
    which may change (`identity.MAY_CHANGE`), would keep the old ones."""

    def __init__(self, trainer: PatchTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        state.compute_steps(args, state.max_steps)
        trainer, progress = self.trainer, self.trainer.resumed_progress
        if state.global_step == 0 or progress.global_step != state.global_step:
            return
        trainer._total_loss_scalar = progress.loss_sum
        trainer._tr_loss += progress.loss_pending
        trainer._globalstep_last_logged = progress.last_logged_step


@contextlib.contextmanager
def patch_size_as(model, patch_size: int):
    """Temporarily run `model` at another patch size (same weights), e.g. K = 1 for token perplexity."""
    config = model.config
    saved = getattr(config, "patch_size", None)
    config.patch_size = patch_size
    try:
        yield model
    finally:
        config.patch_size = saved


class PatchTrainer(Trainer):
    """Trainer for `PatchLlamaForCausalLM`: counts the K-way loss's targets for exact gradient
    accumulation, logs the per-offset losses (and the patch stage's loss as `patch_loss`), and evaluates
    the patch stage both at patch level and as a token-level model (perplexity).

    One schedule across the switch (`--patch_switch continue`):
      schedule_steps: the learning-rate schedule spans this many optimizer steps (both stages' together)
        instead of this Trainer's own; its warmup is `args.get_warmup_steps(schedule_steps)`.
      carry_state_from: a folder holding the previous stage's final `optimizer.pt` and `scheduler.pt`
        (`save_optimizer_state`), loaded when this stage starts (not when it resumes from its own checkpoint,
        which holds its own): AdamW's exp_avg, exp_avg_sq and step go on, and the schedule goes on from the
        previous stage's last step.

    throughput: a `throughput.ThroughputMeter` whose rates join each training log (None: none).
    model_card: the `huggingface_hub.ModelCard` of the model this Trainer saves (`model_card.py`), written by
    `create_model_card` in place of transformers' generic card (None: transformers' own)."""

    throughput = None
    model_card = None

    def __init__(self, *args, patch_eval_dataset=None, schedule_steps: int | None = None, carry_state_from=None,
                 stage_name: str = "training", **kwargs):
        super().__init__(*args, **kwargs)
        self.stage_name = stage_name  # "patch" or "token", for the messages of the run's guards
        self.divergence = DivergenceWatch()
        self.last_saved_step: int | None = None  # the step of the checkpoint this Trainer saved last
        self.add_callback(PreemptionCallback())
        # Training blocks are not padded: the shuffled order is a permutation of the stage's blocks, the same on
        # any number of ranks, so that a run resumed with another split of the same global batch reads the same
        # data (padding would make it a permutation of a world-size-dependent length: resumed on another number of
        # ranks, blocks would be trained twice and others never). Accelerate fills a last partial step by
        # repeating blocks.
        self._exact_eval: dict[int, tuple] = {}  # id(dataset) -> (its IgnoredPadding, the loss scale)
        self._eval_loss_scale: float | None = None
        self.patch_eval_dataset = patch_eval_dataset
        self.schedule_steps = schedule_steps
        self.carry_state_from = carry_state_from
        self._resuming = False
        self._offset_loss_sum: torch.Tensor | None = None
        self._offset_loss_count = 0
        self.resumed_progress = StageProgress()  # set by run_stage before train() when it resumes
        self.attempt_start = time.time()
        self.add_callback(RestoreRunningLoss(self))

    def stage_progress(self, trained: bool = False) -> StageProgress:
        """The stage's progress now (a collective under several ranks: every rank calls this). After train()
        (`trained`), transformers has drained the pending loss into its running sum."""
        from transformers.trainer_pt_utils import nested_gather

        pending = 0.0 if trained else nested_gather(self._tr_loss, self.args.parallel_mode).mean().item()
        return StageProgress(
            global_step=self.state.global_step,
            loss_sum=self._total_loss_scalar,
            loss_pending=pending,
            last_logged_step=self._globalstep_last_logged,
            train_seconds=self.resumed_progress.train_seconds + time.time() - self.attempt_start,
        )

    # ---- The run's guards: nothing non-finite is saved, every write failure is one line naming its file ----

    def last_good_state(self) -> str | None:
        """The newest complete checkpoint of this stage, for messages (None if there is none)."""
        return last_complete_checkpoint(self.args.output_dir, quiet=True)

    def check_finite(self, weights: bool = False) -> None:
        """Raise `cli.Diverged` if a loss or gradient norm observed so far (or, with `weights`, a weight) is not
        finite: a synchronisation, and under several ranks a collective (every rank calls it)."""
        self.divergence.check(self.stage_name, self.last_good_state, self.args.world_size)
        if weights:
            check_finite_weights(self.model, self.stage_name, self.state.global_step, self.last_good_state,
                                 self.args.world_size)

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
        self.divergence.observe(self.state.global_step, tr_loss, grad_norm)  # device-side: no synchronisation
        if self.control.should_log or self.control.should_evaluate or self.control.should_training_stop:
            self.check_finite()  # where transformers reads the loss anyway (a save checks in _save_checkpoint)
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        self.check_finite(weights=True)
        # Written before transformers' files, whose trainer_state.json (last) marks the checkpoint complete.
        progress = self.stage_progress()
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(folder / STAGE_PROGRESS_FILE, asdict(progress))
        # transformers' rotation keeps the newest checkpoints by time, complete or not: rotated here instead
        # (`run_dir.checkpoints_to_delete`), never losing the newest complete one.
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.last_saved_step = self.state.global_step
        if self.args.should_save:
            for old in checkpoints_to_delete(self.args.output_dir, limit, self.state.best_model_checkpoint):
                logger.info("Deleting %s (--save_total_limit %d)", old, limit)
                shutil.rmtree(old, ignore_errors=True)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        folder = output_dir or self.args.output_dir
        with writing(Path(folder) / "model.safetensors", which=lambda: weights_being_written(folder)):
            return super().save_model(output_dir, _internal_call)

    def _save_optimizer_and_scheduler(self, output_dir):
        with writing(Path(output_dir) / OPTIMIZER_NAME, which=lambda: optimizer_file_being_written(output_dir)):
            return super()._save_optimizer_and_scheduler(output_dir)

    def _save_rng_state(self, output_dir):
        name = f"rng_state_{self.args.process_index}.pth" if self.args.world_size > 1 else "rng_state.pth"
        with writing(Path(output_dir) / name):
            return super()._save_rng_state(output_dir)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self._resuming = resume_from_checkpoint is not None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """transformers' scheduler, over `schedule_steps` when set; then the carried optimizer and scheduler
        state of the previous stage (called once the optimizer is prepared, before a resume loads its own)."""
        created = self.lr_scheduler is None
        scheduler = super().create_scheduler(self.schedule_steps or num_training_steps, optimizer)
        if created and self.carry_state_from is not None and not self._resuming:
            missing = [name for name in (OPTIMIZER_NAME, SCHEDULER_NAME) if not (Path(self.carry_state_from) / name).is_file()]
            if missing:
                raise UsageError(
                    f"--patch_switch continue: {self.carry_state_from} holds no {' or '.join(missing)} to carry on from "
                    "(a patch stage finished with --patch_switch restart?): rerun with the switch it was started with"
                )
            self._load_optimizer_and_scheduler(str(self.carry_state_from))
            logger.info("Carried the optimizer state and schedule on from %s (schedule step %d of %d)",
                        self.carry_state_from, self.lr_scheduler.last_epoch, self.schedule_steps or num_training_steps)
        return scheduler

    def save_optimizer_state(self, folder: str) -> None:
        """Save this stage's final optimizer and scheduler state to `folder` (`optimizer.pt`, `scheduler.pt`),
        for the next stage to carry on from (`carry_state_from`)."""
        self._save_optimizer_and_scheduler(folder)
        self.accelerator.wait_for_everyone()

    @property
    def stage_patch_size(self) -> int:
        return get_patch_size(self.model.config)

    def _get_num_items_in_batch(self, batch_samples, device):
        patch_size = self.stage_patch_size
        if patch_size > 1:  # the first patch is never a target: count labels[..., K:], not labels[..., 1:]
            batch_samples = [
                {**batch, "shift_labels": loss_target_labels(batch["labels"], patch_size)} if "labels" in batch else batch
                for batch in batch_samples
            ]
        return super()._get_num_items_in_batch(batch_samples, device)

    def exact_eval_dataset(self, dataset, patch_size: int):
        """`dataset` padded for an exact evaluation on every rank (`IgnoredPadding` to ranks x eval batch), and the
        scale that makes transformers' mean of per-batch losses the mean over every target (`compute_loss`):
        padded length / the targets of `dataset` at `patch_size`. Made once per dataset."""
        if id(dataset) not in self._exact_eval:
            padded = IgnoredPadding(dataset, self.args.world_size * self.args.eval_batch_size)
            targets = sum(int(count_loss_targets(dataset[i]["labels"], patch_size)) for i in range(len(dataset)))
            self._exact_eval[id(dataset)] = (padded, len(padded) / max(targets, 1))
        return self._exact_eval[id(dataset)]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        exact = not model.training and self._eval_loss_scale is not None
        # An exact evaluation takes this rank's own mean (transformers 5.24 passes the targets of all ranks' batches
        # as num_items_in_batch when evaluating, and multiplies by the number of ranks).
        loss, outputs = self._compute_loss(model, inputs, None if exact else num_items_in_batch)
        if exact:
            # transformers' evaluation loss is the mean over batches of loss x the eval batch size entries (its
            # `losses.repeat(batch_size)`); each batch's summed NLL x the scale / that batch size makes it the
            # mean over every target of the dataset, whatever the batches hold (ignored blocks add nothing; a
            # batch of only ignored blocks, whose mean is NaN, adds 0).
            counted = count_loss_targets(inputs["labels"], get_patch_size(self.model.config))
            summed = torch.where(counted > 0, loss * counted, torch.zeros_like(loss))
            loss = summed * self._eval_loss_scale / self.args.eval_batch_size
        return (loss, outputs) if return_outputs else loss

    def _compute_loss(self, model, inputs, num_items_in_batch):
        if not model.training and getattr(self.model.config, "output_router_logits", False):
            # Evaluation scores the language model: a mixture of experts' forward adds router_aux_loss_coef x its
            # load-balancing loss to the loss it returns, which made eval_perplexity exp(CE + 0.01 aux) (8,643
            # where the model's own was 8,470).
            inputs = {**inputs, "output_router_logits": False}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        offset_losses = getattr(outputs, "offset_losses", None)
        if offset_losses is not None and model.training:
            offset_losses = offset_losses.detach()
            self._offset_loss_sum = offset_losses if self._offset_loss_sum is None else self._offset_loss_sum + offset_losses
            self._offset_loss_count += 1
        return loss, outputs

    def create_model_card(self, *args, **kwargs) -> None:
        """Write `model_card` as <output_dir>/README.md (what --push_to_hub uploads with the model); without one,
        transformers' own card."""
        if self.model_card is None:
            return super().create_model_card(*args, **kwargs)
        if self.args.should_save:
            write_model_card(self.model_card, self.args.output_dir)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self.throughput is not None:  # a training log: the rates since the last one
            logs.update(self.throughput.fields(self.state.global_step))
        if "train_loss" in logs:  # train()'s closing metrics: the whole stage's figure (see `StageProgress`)
            # transformers 5.24 divides the restored loss sum by the steps of this attempt only (30.87 for a stage
            # of loss 10.29 resumed at step 4 of 6): the trackers and trainer_state.json get all_results.json's.
            logs["train_loss"] = self.stage_progress(trained=True).train_loss
        if "loss" in logs and self.stage_patch_size > 1:
            logs["patch_loss"] = logs.pop("loss")
        if self._offset_loss_sum is not None and self._offset_loss_count and "patch_loss" in logs:
            # The mean over ranks, as transformers logs the loss (every rank logs here: a collective), so that the
            # offset curves cover all the data and average to patch_loss.
            local = self._offset_loss_sum / self._offset_loss_count  # (K,)
            if self.args.world_size > 1:
                from transformers.trainer_pt_utils import nested_gather

                local = nested_gather(local[None], self.args.parallel_mode).mean(0)
            means = local.tolist()
            for offset, value in enumerate(means, start=1):
                logs[f"offset_{offset}_loss"] = round(value, 4)
            self._offset_loss_sum, self._offset_loss_count = None, 0
        super().log(logs, *args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """The token-level evaluation (`eval_loss`, `eval_perplexity`, the model run at K = 1) and, in the patch
        stage, the patch-level one (`eval_patch_loss`): each the mean over every target of its blocks, exactly,
        on any number of ranks (`exact_eval_dataset`)."""
        metrics = {}
        patch_size = self.stage_patch_size
        if patch_size > 1 and self.patch_eval_dataset is not None and eval_dataset is None:
            metrics.update(self._exact_evaluate(self.patch_eval_dataset, patch_size, ignore_keys, f"{metric_key_prefix}_patch"))
        with patch_size_as(self.model, 1):
            token_metrics = self._exact_evaluate(eval_dataset if eval_dataset is not None else self.eval_dataset, 1,
                                                 ignore_keys, metric_key_prefix)
        loss = token_metrics.get(f"{metric_key_prefix}_loss")
        if loss is not None:
            token_metrics[f"{metric_key_prefix}_perplexity"] = math.exp(min(loss, 100.0))
            self.log({f"{metric_key_prefix}_perplexity": token_metrics[f"{metric_key_prefix}_perplexity"]})
        metrics.update(token_metrics)
        return metrics

    def _exact_evaluate(self, dataset, patch_size: int, ignore_keys, prefix: str) -> dict:
        padded, self._eval_loss_scale = self.exact_eval_dataset(dataset, patch_size)
        try:
            return super().evaluate(padded, ignore_keys, prefix)
        finally:
            self._eval_loss_scale = None


def fresh_compilation(args) -> None:
    """With --torch_compile, forget what torch.compile learnt in this process (`torch._dynamo.reset()`), so that
    a stage compiles as a fresh process would. Otherwise the token stage, whose sequences are K times shorter
    than the patch stage's, fails the patch stage's shape guards and dynamo's automatic dynamic shapes compile
    it with symbolic batch and sequence sizes (torch 2.11 to 2.13), and both stages share one recompile limit.
    Raises nothing; does nothing without --torch_compile."""
    if args.torch_compile:
        import torch._dynamo

        torch._dynamo.reset()


def weights_being_written(folder) -> Path:
    """The weights file of `folder` a failed `save_pretrained` was writing: the first shard of its index that is
    missing or unreadable, else model.safetensors."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError):
            shards = []
        for shard in shards:
            if safetensors_problem(folder / shard):
                return folder / shard
    return folder / "model.safetensors"


def optimizer_file_being_written(folder) -> Path:
    """The file a failed `_save_optimizer_and_scheduler` was writing in `folder`: scheduler.pt once optimizer.pt
    is a whole archive (it is written first), else optimizer.pt."""
    folder = Path(folder)
    return folder / (SCHEDULER_NAME if archive_problem(folder / OPTIMIZER_NAME) is None else OPTIMIZER_NAME)
