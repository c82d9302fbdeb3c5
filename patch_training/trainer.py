"""`PatchTrainer` (exact gradient accumulation for the K-way loss, per-offset losses, patch and token
evaluation, and with `--patch_switch continue` one learning-rate schedule and one AdamW state across both
stages), training one stage, saving a stage's model (DeepSpeed's fp32 master weights included), and training
the stages of a job one after the other (`train_stages`: the patch stage hands its weights to the token stage)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

from modeling_llama_patch import get_patch_size

from .loss import count_loss_targets, loss_target_labels

from . import compat
from .blocks import IgnoredPadding
from .cli import UsageError
from .models import build_model
from .results import stage_results
from .resume import PATCH_STAGE_DIR, STAGE_COMPLETE_FILE, last_complete_checkpoint, write_json_atomic
from .stages import StagePlan, stage_max_steps, stage_steps, stage_training_args
from .tracking import JobAxis

logger = logging.getLogger("run_clm")

STAGE_PROGRESS_FILE = "stage_progress.json"
compat.install()  # transformers 5.17: a multi-process CPU run's optimizer state loads (see compat.py)


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
    first_step: int = 0  # the step that loss_sum and train_seconds count from (> 0 only after an old checkpoint)

    @property
    def train_loss(self) -> float:
        return (self.loss_sum + self.loss_pending) / max(self.global_step - self.first_step, 1)

    @classmethod
    def of_checkpoint(cls, checkpoint: str | None) -> StageProgress:
        """The progress recorded in `checkpoint` (a fresh one for None). A checkpoint written before this record
        existed gives the state's step with no loss or time: the figures then cover the later steps only."""
        if checkpoint is None:
            return cls()
        record = Path(checkpoint) / STAGE_PROGRESS_FILE
        if record.is_file():
            return cls(**json.loads(record.read_text()))
        step = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]
        logger.warning("%s has no %s (an earlier version wrote it): train_loss and train_runtime_s will cover the "
                       "steps after it only", checkpoint, STAGE_PROGRESS_FILE)
        return cls(global_step=step, last_logged_step=step, first_step=step)


class RestoreRunningLoss(TrainerCallback):
    """At the start of a resumed train(), put back the loss sums that transformers keeps outside its checkpoint
    (see `StageProgress`): after this the Trainer logs and sums as if it had never stopped."""

    def __init__(self, trainer: PatchTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
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
        previous stage's last step."""

    def __init__(self, *args, patch_eval_dataset=None, schedule_steps: int | None = None, carry_state_from=None, **kwargs):
        super().__init__(*args, **kwargs)
        # Training blocks are not padded: the shuffled order is a permutation of the stage's blocks, the same on
        # any number of ranks, so that a run resumed with another split of the same global batch reads the same
        # data (padding made it a permutation of a world-size-dependent length: resumed on another number of ranks,
        # blocks were trained twice and others never). Accelerate fills a last partial step by repeating blocks.
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
            first_step=self.resumed_progress.first_step,
        )

    def _save_checkpoint(self, model, trial):
        # Written before transformers' files, whose trainer_state.json (last) marks the checkpoint complete.
        progress = self.stage_progress()
        if self.args.should_save:
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f"{STAGE_PROGRESS_FILE}.tmp-{os.getpid()}"
            tmp.write_text(json.dumps(asdict(progress)))
            os.replace(tmp, folder / STAGE_PROGRESS_FILE)
        super()._save_checkpoint(model, trial)

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

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "train_loss" in logs:  # train()'s closing metrics: the whole stage's figure (see `StageProgress`)
            # transformers >= 5.2x divides the restored loss sum by the steps of this attempt only (30.87 logged
            # for a stage of loss 10.29 after a resume at step 4 of 6): the trackers and trainer_state.json now
            # get what all_results.json records.
            logs["train_loss"] = self.stage_progress(trained=True).train_loss
        if "loss" in logs and self.stage_patch_size > 1:
            logs["patch_loss"] = logs.pop("loss")
        if self._offset_loss_sum is not None and self._offset_loss_count and "patch_loss" in logs:
            # The mean over ranks, as transformers logs the loss (every rank logs here: a collective). Before, rank
            # 0's alone: on 8 GPUs the offset curves showed 1/8 of the data and did not average to patch_loss.
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


def save_stage_model(trainer: Trainer, folder: str) -> None:
    """`trainer.save_model(folder)`, except after DeepSpeed training: then DeepSpeed's fp32 master weights.

    With bf16 (or fp16), DeepSpeed trains a 16-bit copy of the weights and keeps the fp32 master weights in
    its ZeRO optimizer; `trainer.save_model` would save the 16-bit copy. Here each parameter's master is
    gathered whole (`deepspeed.utils.safe_get_full_fp32_param`, ZeRO-1/2/3: a collective, so every rank runs
    this, parameter by parameter) and the main process saves them as float32: what DDP and FSDP save, and
    what the token stage starts from (`MasterWeightsFrom`). Where DeepSpeed has no fp32 master (no ZeRO
    optimizer, e.g. ZeRO-0 with fp16), the 16-bit save."""
    engine = trainer.deepspeed  # the training engine after trainer.train() under DeepSpeed, else None
    if engine is None or engine.optimizer is None:
        trainer.save_model(folder)
        return
    from deepspeed.utils import safe_get_full_fp32_param

    state_dict = {}
    for name, param in trainer.model.named_parameters():
        master = safe_get_full_fp32_param(param)
        if master is None:  # the same parameters on every rank: all of them fall back together
            logger.warning("DeepSpeed keeps no fp32 master of %s: saving the %s module weights", name, param.dtype)
            trainer.save_model(folder)
            return
        if trainer.args.should_save:
            state_dict[name] = master.detach().to("cpu", torch.float32)
    if trainer.args.should_save:
        trainer.model.save_pretrained(folder, state_dict=state_dict)
        trainer.model.config.dtype = "float32"  # save_pretrained recorded the module's 16-bit dtype
        config_file = Path(folder) / "config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "dtype": "float32"}, indent=2, sort_keys=True) + "\n")
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(folder)
    trainer.accelerator.wait_for_everyone()


class MasterWeightsFrom(TrainerCallback):
    """Under DeepSpeed, start the fp32 master weights from a saved float32 model, not from its 16-bit rounding.

    With bf16 (or fp16), DeepSpeed casts the model to 16 bits when it builds its engine and builds the fp32
    masters from that cast copy, so the fp32 weights that the patch stage handed over would be rounded. At
    the start of a stage that is not resumed, this sets every parameter's master from `folder`
    (`deepspeed.utils.safe_set_full_fp32_param`, ZeRO-1/2/3: each rank sets its own partition). The 16-bit
    module weights are already those weights rounded. A resumed stage keeps its checkpoint's masters."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step > 0:
            return
        from deepspeed.utils import safe_set_full_fp32_param
        from safetensors import safe_open

        params = dict(model.named_parameters())
        index = self.folder / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
        missing = set(params)
        for file in files:
            with safe_open(self.folder / file, framework="pt") as weights:
                for name in missing & set(weights.keys()):
                    safe_set_full_fp32_param(params[name], weights.get_tensor(name).float())
                    missing.discard(name)
        if missing:
            raise RuntimeError(f"{self.folder} has no weights for {sorted(missing)}")


def fresh_compilation(args: TrainingArguments) -> None:
    """With --torch_compile, forget what torch.compile learnt in this process (`torch._dynamo.reset()`), so that
    a stage compiles as a fresh process would. Otherwise the token stage, whose sequences are K times shorter
    than the patch stage's, fails the patch stage's shape guards and dynamo's automatic dynamic shapes compile
    it with symbolic batch and sequence sizes (torch 2.11 to 2.13), and both stages share one recompile limit.
    Raises nothing; does nothing without --torch_compile."""
    if args.torch_compile:
        import torch._dynamo

        torch._dynamo.reset()


def run_stage(plan, stage_args, model, train_dataset, eval_datasets, tokenizer, master_weights_from=None, job_axis=None,
              schedule_steps=None, carry_state_from=None):
    """Train one stage (resuming from its last checkpoint if any), save its model, evaluate it.
    `master_weights_from`: the saved model that `model` was loaded from, whose float32 weights DeepSpeed's
    fp32 master weights start from (see `MasterWeightsFrom`). `job_axis`: a `tracking.JobAxis` that puts the
    `--report_to` trackers on the job's step and axes. `schedule_steps`, `carry_state_from`: one schedule and
    optimizer state across stages (see `PatchTrainer`)."""
    token_eval, patch_eval = eval_datasets
    fresh_compilation(stage_args)
    trainer = PatchTrainer(
        model=model,
        args=stage_args,
        train_dataset=train_dataset,
        eval_dataset=token_eval,
        patch_eval_dataset=patch_eval if plan.patch_size > 1 else None,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        schedule_steps=schedule_steps,
        carry_state_from=carry_state_from,
    )
    if job_axis is not None:
        job_axis.attach(trainer)
    if master_weights_from is not None and trainer.is_deepspeed_enabled:
        trainer.add_callback(MasterWeightsFrom(master_weights_from))
    checkpoint = last_complete_checkpoint(stage_args.output_dir)
    if checkpoint:
        logger.info("Resuming the %s stage from %s", plan.name, checkpoint)
    trainer.resumed_progress = StageProgress.of_checkpoint(checkpoint)
    trainer.attempt_start = time.time()
    trainer.train(resume_from_checkpoint=checkpoint)
    # The whole stage's figures, the same whether or not it was interrupted: transformers' train_loss is the
    # loss summed over the steps of this train() call / their number; here over all the stage's steps.
    progress = trainer.stage_progress(trained=True)
    metrics = {
        "steps": trainer.state.global_step,
        "train_loss": progress.train_loss,
        "train_runtime_s": round(progress.train_seconds, 2),
        "resumed_from": checkpoint,
    }
    if token_eval is not None:
        metrics.update(trainer.evaluate())
    return trainer, metrics


# ---------------------------------------------------------------------------------------------------------
# The stages of a job
# ---------------------------------------------------------------------------------------------------------


def stage_dir(output_dir: str, plan: StagePlan) -> str:
    """The folder of the stage `plan` in the job's `output_dir`: `<output_dir>/patch_stage` for the patch stage,
    `output_dir` itself for the token stage (whose model is the job's). Raises nothing."""
    return os.path.join(output_dir, PATCH_STAGE_DIR) if plan.name == "patch" else output_dir


@dataclass(frozen=True)
class StageArguments:
    """Each stage's TrainingArguments (`stages.stage_training_args`), made from the job's.

    training_args: the job's `RunTrainingArguments` (the token stage's settings).
    patch_args: run_clm.py's PatchArguments, read for the patch stage's batch, learning rate, warmup and
      --patch_max_steps (`stages.stage_training_args`, `stages.stage_max_steps`).
    output_dir: the job's folder (`stage_dir`).

    Make them right before the stage's Trainer: making TrainingArguments resets accelerate's state, which a
    second DeepSpeed Accelerator needs (and which a stage's Trainer set up)."""

    training_args: TrainingArguments
    patch_args: object
    output_dir: str

    def __call__(self, plan: StagePlan) -> TrainingArguments:
        """The TrainingArguments that the stage `plan` trains with, in its `stage_dir`. UsageError when the
        patch stage's batch cannot be derived (`stages.stage_batch_settings`)."""
        return stage_training_args(self.training_args, self.patch_args, plan, stage_dir(self.output_dir, plan),
                                   stage_max_steps(plan, self.patch_args, self.training_args))

    def for_final_model(self, plan: StagePlan) -> TrainingArguments:
        """The TrainingArguments of the stage `plan` in the job's folder with no step limit: those of a Trainer
        that only evaluates and saves the final model. UsageError as for `__call__`."""
        return stage_training_args(self.training_args, self.patch_args, plan, self.output_dir, -1)


@dataclass(frozen=True)
class StageJob:
    """What `train_stages` needs of the job besides its plans, data and TrainingArguments: plain values, fixed
    before the first stage.

    output_dir: the job's folder (the token stage's and the final model's; `stage_dir`).
    run_name: --run_name (None: the folder's name), for the trackers' one run per job (`tracking.JobAxis`).
    config_name: the model config the first stage starts from (random weights) when `init_from` is None.
    init_from: the checkpoint the first stage starts from (--model_name_or_path), or None.
    attn_implementation: the resolved attention (`models.resolve_attn_implementation`).
    loss_implementation: auto, fused or unfused (`models.build_model`).
    offset_weights: the patch loss's K weights of mean 1, or None (the paper's mean); the patch stage's only.
    has_patch_stage, has_token_stage: whether the job has each stage (λ > 0, λ < 1), whether or not it is done.
    continued: --patch_switch continue with both stages: the token stage carries the patch stage's optimizer
      state and its schedule on.
    schedule_steps: the optimizer steps of that one schedule over both stages (None: each stage its own)."""

    output_dir: str
    run_name: str | None
    config_name: str | None
    init_from: str | None
    attn_implementation: str
    loss_implementation: str
    offset_weights: tuple[float, ...] | None
    has_patch_stage: bool
    has_token_stage: bool
    continued: bool
    schedule_steps: int | None


def train_stages(job: StageJob, plans: list[StagePlan], stage_args: StageArguments, train_dataset: Callable,
                 eval_datasets: tuple, tokenizer, results: dict) -> tuple[PatchTrainer, dict]:
    """Train the stages `plans` in order: a complete patch stage (its `stage_complete.json`) is skipped, and the
    patch stage hands its weights (with `job.continued`, also its optimizer state) to the token stage. Each
    stage's model goes to its `stage_dir`, with its trainer_state.json; with λ = 1 (no token stage) the patch
    model is saved as the final, token-level (K = 1) model in the job's folder and evaluated there.

    `train_dataset(plan)`: a stage's training blocks; `eval_datasets`: (token-level, patch-level) validation
    blocks, (None, None) without validation data; `results`: the job's all_results.json record, to which each
    stage's record (`<name>_stage`) and with λ = 1 the final evaluation (`final_eval`) are added.
    Returns (the Trainer that saved the job's final model, the final evaluation with λ = 1 (else {})).
    Raises what training raises: UsageError for bad input found only now (e.g. --patch_switch continue after
    a patch stage finished without its optimizer state)."""
    init_from = job.init_from
    trainer = None
    for plan in plans:
        folder = stage_dir(job.output_dir, plan)
        marker = Path(folder) / STAGE_COMPLETE_FILE
        if plan.name == "patch" and marker.is_file():
            logger.info("The patch stage is complete (%s): going straight to the token stage", marker)
            results["patch_stage"] = json.loads(marker.read_text())
            init_from = folder
            continue
        args = stage_args(plan)
        model = build_model(job.config_name, init_from, plan.patch_size, job.attn_implementation,
                            job.loss_implementation, job.offset_weights if plan.name == "patch" else None,
                            tokenizer=tokenizer)
        handover = init_from if plan.name == "token" and job.has_patch_stage else None
        job_axis = JobAxis.for_stage(job.output_dir, job.run_name, plan, args, results.get("patch_stage"))
        carry = handover if job.continued else None
        trainer, metrics = run_stage(plan, args, model, train_dataset(plan), eval_datasets, tokenizer, handover,
                                     job_axis, job.schedule_steps, carry)
        results[f"{plan.name}_stage"] = stage_results(plan, args, metrics)
        planned = stage_steps(plan, args)
        if job.continued and metrics["steps"] != planned:  # the one schedule would not end as planned
            logger.warning("the %s stage took %d optimizer steps, not the %d its schedule planned",
                           plan.name, metrics["steps"], planned)
        model.config.patch_size = 1 if plan.name == "token" else plan.patch_size
        save_stage_model(trainer, folder)
        trainer.save_state()  # <stage_dir>/trainer_state.json: the stage's whole log history
        if plan.name == "patch":
            if job.continued:  # the token stage carries them on (before the marker: a complete stage has them)
                trainer.save_optimizer_state(folder)
            if trainer.args.should_save:  # written last: the model is complete
                write_json_atomic(marker, results["patch_stage"])
            trainer.accelerator.wait_for_everyone()
            init_from = folder

    # λ = 1: the patch model is the final model; save it as a token-level (K = 1) checkpoint.
    final_eval = {}
    if not job.has_token_stage:
        if trainer is None:  # the patch stage was complete before this run
            model = build_model(job.config_name, init_from, 1, job.attn_implementation, job.loss_implementation,
                                tokenizer=tokenizer)
            trainer = PatchTrainer(model=model, args=stage_args.for_final_model(plans[0]),
                                   eval_dataset=eval_datasets[0], processing_class=tokenizer,
                                   data_collator=default_data_collator)
            # Its evaluation lies where the patch stage ended, on the job's axes.
            axis = JobAxis.for_stage(job.output_dir, job.run_name, plans[0], trainer.args, results["patch_stage"])
            axis.attach(trainer)
        trainer.model.config.patch_size = 1
        save_stage_model(trainer, job.output_dir)
        if eval_datasets[0] is not None:
            results["final_eval"] = final_eval = trainer.evaluate()
    return trainer, final_eval
