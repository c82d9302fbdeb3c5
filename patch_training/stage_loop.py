"""Training the stages of a job one after the other (`train_stages`): each stage starts where the run folder says
(`run_dir.RunDir.resume_point`: complete, from a checkpoint, or afresh), trains (`run_stage`), saves its model
(`save_stage_model`: DeepSpeed's fp32 master weights included) and hands its weights to the next stage; with
λ = 1 the patch model becomes the final, token-level model."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, default_data_collator, set_seed

from modeling_llama_patch import update_saved_config

from .cli import Preempted, StoppedEarly
from .console import stage_end_line, stage_start_line
from .guards import check_preempted, deferred_preemption, preempted_message, preemption_signal
from .job import JobPlan
from .model_card import model_card, write_model_card
from .models import build_model
from .results import job_results, stage_results
from .run_dir import RunDir
from .stages import StagePlan, stage_steps
from .throughput import ThroughputMeter
from .tracking import JobAxis
from .trainer import PatchTrainer, StageProgress, fresh_compilation
from .training_args import backend_in_use

logger = logging.getLogger("run_clm")


def train_stages(job: JobPlan, run: RunDir) -> dict:
    """Train the stages `job.plans` in order in the folder `run` and return the job's results (all_results.json).

    A complete patch stage is skipped; the patch stage hands its weights (with `job.continued`, also its optimizer
    state) to the token stage. Each stage's model goes to its `run.stage_dir`, with its trainer_state.json; with
    λ = 1 (no token stage) the patch model is saved as the final, token-level (K = 1) model in the job's folder
    and evaluated there. Raises what training raises: UsageError for bad input found only now (e.g.
    --patch_switch continue after a patch stage finished without its optimizer state)."""
    set_seed(job.args.training.seed)  # the first stage's random weights, as transformers' run_clm seeds them
    logger.info("Attention: %s", job.inputs.attn_implementation)
    results, init_from, trainer = dict(job.results), job.args.model.model_name_or_path, None
    # A preemption signal is acted on at safe points only: a training step's end, and between stages.
    with deferred_preemption():
        for plan in job.plans:
            check_preempted(f"the stages before the {plan.name} stage are complete")
            point = run.resume_point(plan)
            if point.complete is not None:
                results[f"{plan.name}_stage"], init_from = point.complete, run.stage_dir(plan)
                continue
            trainer, record = train_one_stage(job, run, plan, init_from, point.checkpoint, results.get("patch_stage"))
            results[f"{plan.name}_stage"] = record
            if plan.name == "patch":
                if job.continued:  # the token stage carries them on (before the marker: a complete stage has them)
                    trainer.save_optimizer_state(run.stage_dir(plan))
                run.mark_stage_complete(plan, record)  # written last: the model is complete
                trainer.accelerator.wait_for_everyone()
                init_from = run.stage_dir(plan)
        final_eval = {}
        if not job.args.patch.has_token_stage:
            trainer, final_eval = save_patch_model_as_final(job, run, trainer, init_from, results)
    stages = [results[f"{plan.name}_stage"] for plan in job.plans]
    final = stages[-1] if job.args.patch.has_token_stage else final_eval
    index = run.stream_index_file if job.args.data.streaming else None
    return job_results(results, stages, final, index, trainer is None or trainer.args.should_save)


def train_one_stage(job: JobPlan, run: RunDir, plan: StagePlan, init_from: str | None, checkpoint: str | None,
                    previous: dict | None) -> tuple[PatchTrainer, dict]:
    """Build the stage's model from `init_from` (None: the job's model config), train it from `checkpoint` (None:
    afresh), save its model and trainer state in its folder; returns (its Trainer, its all_results.json record).
    `previous`: the record of the stage before (the patch stage's, for the token stage), for the job's axes."""
    folder = run.stage_dir(plan)
    args = job.stage_arguments(plan, folder)
    model = stage_model(job, plan, init_from)
    handover = init_from if plan.name == "token" and job.args.patch.has_patch_stage else None
    logger.info(stage_start_line(job, plan, args, init_from, checkpoint))
    trainer, metrics = run_stage(plan, args, model, job.train_dataset(plan), job.eval_datasets, job.inputs.tokenizer,
                                 checkpoint, master_weights_from=handover,
                                 job_axis=JobAxis.for_stage(run.output_dir, job.args.training.run_name, plan, args, previous),
                                 schedule_steps=job.schedule_steps, carry_state_from=handover if job.continued else None)
    planned = stage_steps(plan, args)
    if job.continued and metrics["steps"] != planned:  # the one schedule would not end as planned
        logger.warning("the %s stage took %d optimizer steps, not the %d its schedule planned",
                       plan.name, metrics["steps"], planned)
    model.config.patch_size = 1 if plan.name == "token" else plan.patch_size
    record = stage_results(plan, args, metrics)
    logger.info(stage_end_line(plan, job.plans, record, folder))
    trainer.check_finite(weights=True)  # nothing non-finite becomes a stage's model
    save_stage_model(trainer, folder, stage_model_card(job, trainer.model, plan, folder, record, previous))
    trainer.save_state()  # <stage_dir>/trainer_state.json: the stage's whole log history
    return trainer, record


def stage_model_card(job: JobPlan, model, plan: StagePlan, folder: str, record: dict, previous: dict | None):
    """The model card of the stage `plan`'s model (saved in `folder`), from its all_results.json `record` and the
    previous stage's: the job's final model's (with the job's totals) for the token stage, the patch stage's
    otherwise."""
    stages = {"patch": previous, "token": record} if plan.name == "token" else {"patch": record}
    return model_card(job, model, stages, record, folder, patch_stage=plan.name == "patch")


def stage_model(job: JobPlan, plan: StagePlan, init_from: str | None, patch_size: int | None = None):
    """The patch model of the stage `plan` (`models.build_model`) at `patch_size` (default: the stage's K): the
    job's loaded config (random weights) or the user's checkpoint with it for the first stage, a saved stage's
    weights after; the patch stage alone gets the offset weights."""
    model_args = job.args.model
    config = job.inputs.config if init_from == model_args.model_name_or_path else None
    return build_model(config, init_from, plan.patch_size if patch_size is None else patch_size,
                       job.inputs.attn_implementation, model_args.loss_implementation,
                       job.args.patch.offset_weights if plan.name == "patch" else None, tokenizer=job.inputs.tokenizer)


def save_patch_model_as_final(job: JobPlan, run: RunDir, trainer, init_from: str, results: dict):
    """λ = 1: save the patch model as the job's final, token-level (K = 1) model in the output folder and evaluate
    it there. `trainer`: the patch stage's, or None when the stage was complete before this run (a Trainer that
    only evaluates and saves is made, on the job's axes where the patch stage ended). Returns (the Trainer, the
    final evaluation or {})."""
    if trainer is None:
        plan = job.plans[0]
        model = stage_model(job, plan, init_from, patch_size=1)
        trainer = PatchTrainer(model=model, args=job.stage_arguments(plan, run.output_dir, final_model=True),
                               eval_dataset=job.eval_datasets[0], processing_class=job.inputs.tokenizer,
                               data_collator=default_data_collator)
        JobAxis.for_stage(run.output_dir, job.args.training.run_name, plan, trainer.args, results["patch_stage"]).attach(trainer)
    trainer.model.config.patch_size = 1
    trainer.check_finite(weights=True)
    final_eval = {}
    if job.eval_datasets[0] is not None:  # (the model in memory: the same before and after it is saved)
        results["final_eval"] = final_eval = trainer.evaluate()
    save_stage_model(trainer, run.output_dir, model_card(job, trainer.model, {"patch": results["patch_stage"]},
                                                         final_eval, run.output_dir, patch_stage=False))
    return trainer, final_eval


def run_stage(plan, stage_args, model, train_dataset, eval_datasets, tokenizer, checkpoint=None,
              master_weights_from=None, job_axis=None, schedule_steps=None, carry_state_from=None):
    """Train one stage from `checkpoint` (None: afresh), then evaluate it; returns (its Trainer, its metrics:
    steps, the whole stage's train_loss and runtime, resumed_from, the evaluation).
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
        stage_name=plan.name,
    )
    backend = backend_in_use(trainer)
    logger.info("The %s stage trains with %s", plan.name, ", ".join(f"{k} {v}" for k, v in backend.items()))
    if job_axis is not None:
        job_axis.attach(trainer)
    ThroughputMeter.for_stage(plan, stage_args, model).attach(trainer)
    if master_weights_from is not None and trainer.is_deepspeed_enabled:
        trainer.add_callback(MasterWeightsFrom(master_weights_from))
    trainer.resumed_progress = StageProgress.of_checkpoint(checkpoint)
    trainer.attempt_start = time.time()
    trainer.train(resume_from_checkpoint=checkpoint)
    stop_unless_planned_steps(trainer, plan)
    # The whole stage's figures, the same whether or not it was interrupted: transformers' train_loss is the
    # loss summed over the steps of this train() call / their number; here over all the stage's steps.
    progress = trainer.stage_progress(trained=True)
    metrics = {
        "steps": trainer.state.global_step,
        "train_loss": progress.train_loss,
        "train_runtime_s": round(progress.train_seconds, 2),
        "resumed_from": checkpoint,
        "distributed": backend,
    }
    if token_eval is not None:
        metrics.update(trainer.evaluate())
    return trainer, metrics


def stop_unless_planned_steps(trainer: PatchTrainer, plan: StagePlan) -> None:
    """After train(): raise `cli.Preempted` (a preemption signal arrived) or `cli.StoppedEarly` (train() returned
    before the Trainer's planned steps for any other reason: a callback's control flag, data that ran out), with
    a checkpoint of the step reached saved first; return when the stage reached its plan and no signal came. The
    stage is then not marked complete: a re-run resumes it. Every rank calls this (the save is a collective)."""
    state, signal_name = trainer.state, preemption_signal()
    if state.global_step >= state.max_steps and signal_name is None:
        return
    if trainer.last_saved_step != state.global_step:
        trainer._save_checkpoint(trainer.model, trial=None)
    saved = os.path.join(trainer.args.output_dir, f"checkpoint-{state.global_step}")
    if signal_name is not None:
        raise Preempted(preempted_message(signal_name, f"the {plan.name} stage at step {state.global_step} of "
                                                       f"{state.max_steps}, {saved}"))
    raise StoppedEarly(f"the {plan.name} stage returned after {state.global_step} of its {state.max_steps} planned "
                       f"optimizer steps (a callback stopped it, or its data ran out): it is not marked complete; its "
                       f"state is saved in {saved}, and re-running the same command resumes it")


# ---------------------------------------------------------------------------------------------------------
# A stage's model on disk, under DeepSpeed too
# ---------------------------------------------------------------------------------------------------------


def save_stage_model(trainer: Trainer, folder: str, card=None) -> None:
    """`trainer.save_model(folder)`, except after DeepSpeed training: then DeepSpeed's fp32 master weights; and the
    model card `card` (`model_card.model_card`, None: none) as <folder>/README.md, which --push_to_hub uploads
    with the model (`PatchTrainer.create_model_card`).

    With bf16 (or fp16), DeepSpeed trains a 16-bit copy of the weights and keeps the fp32 master weights in
    its ZeRO optimizer; `trainer.save_model` would save the 16-bit copy. Here each parameter's master is
    gathered whole (`deepspeed.utils.safe_get_full_fp32_param`, ZeRO-1/2/3: a collective, so every rank runs
    this, parameter by parameter) and the main process saves them as float32: what DDP and FSDP save, and
    what the token stage starts from (`MasterWeightsFrom`). Where DeepSpeed has no fp32 master (no ZeRO
    optimizer, e.g. ZeRO-0 with fp16), the 16-bit save."""
    trainer.model_card = card
    save_weights(trainer, folder)
    if card is not None and trainer.args.should_save:
        write_model_card(card, folder)


def save_weights(trainer: Trainer, folder: str) -> None:
    """The model of `trainer` saved in `folder` (see `save_stage_model`)."""
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
        trainer.model.config.dtype = "float32"
        update_saved_config(folder, {"dtype": "float32"})  # save_pretrained recorded the module's 16-bit dtype
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
        import json

        from deepspeed.utils import safe_set_full_fp32_param
        from safetensors import safe_open

        params = dict(model.named_parameters())
        index = self.folder / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
        missing = set(params)
        for file in files:
            with safe_open(os.path.join(self.folder, file), framework="pt") as weights:
                for name in missing & set(weights.keys()):
                    safe_set_full_fp32_param(params[name], weights.get_tensor(name).float())
                    missing.discard(name)
        if missing:
            raise RuntimeError(f"{self.folder} has no weights for {sorted(missing)}")
