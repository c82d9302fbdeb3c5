"""A job from its checked arguments: its inputs loaded and checked once (`load_inputs`), then its data tokenised
and its stages planned (`plan_job`).

`args` throughout is run_clm.py's `JobArguments` (fields `model`, `data`, `patch`, `training`: its argument
dataclasses); this package never imports run_clm.py.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass, field

from .cli import UsageError
from .liger import check_liger_environment, check_liger_kernel_config
from .readers import DataSource
from .stages import (
    StagePlan,
    check_plans,
    global_batch_size,
    plan_stages,
    repetition_warning,
    split_fractions,
    stage_batch_settings,
    stage_max_steps,
    stage_steps,
    stage_training_args,
)
from .training_args import (
    check_backend_available, check_patch_stage_settings, check_trainer_settings, torch_compile_caveat,
)

logger = logging.getLogger("run_clm")


# ---------------------------------------------------------------------------------------------------------
# The inputs, loaded and checked once
# ---------------------------------------------------------------------------------------------------------


@dataclass
class JobInputs:
    """What a job reads besides the token stream, loaded once: the data sources, the model config (checked: a
    decoder-only causal LM), the tokenizer (checked against the model), and the resolved attention."""

    train_source: DataSource
    eval_source: DataSource | None
    config: object  # a transformers PretrainedConfig
    tokenizer: object
    attn_implementation: str


def load_inputs(args) -> JobInputs:
    """Load and check everything the job reads before any of it is written: the run settings against each other
    (`check_run_settings`), the data sources, the model config and the tokenizer against the model. UsageError
    (one line) for the first problem found."""
    from .models import (
        check_model_settings, check_one_model_config, check_tokenizer_fits_model, load_model_config, load_tokenizer,
        resolve_attn_implementation,
    )

    check_run_settings(args)
    train_source, eval_source = data_sources(args.data)
    model_args = args.model
    check_one_model_config(model_args.config_name, model_args.model_name_or_path)
    config = load_model_config(model_args.model_name_or_path or model_args.config_name)
    check_model_settings(config, model_args.model_name_or_path, model_args.loss_implementation)
    if args.training.use_liger_kernel:
        check_liger_environment(args.training.use_cpu, config.model_type)
        check_liger_kernel_config(args.training.liger_kernel_config, config.model_type)
    tokenizer = load_tokenizer(model_args.tokenizer_name)
    check_tokenizer_fits_model(tokenizer, f"--tokenizer_name {model_args.tokenizer_name}", config,
                               model_args.model_name_or_path)
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions is not None and args.data.block_size > max_positions:
        raise UsageError(f"--block_size {args.data.block_size} exceeds the model's max_position_embeddings {max_positions}")
    return JobInputs(train_source, eval_source, config, tokenizer,
                     resolve_attn_implementation(model_args.attn_implementation, config))


def data_sources(data_args) -> tuple[DataSource, DataSource | None]:
    """(the training data, the validation data or None) as `DataSource`s, their files checked."""
    if data_args.train_file is not None:
        train_source = DataSource.from_files(data_args.train_file, "train_file", data_args.text_column_name)
    else:
        train_source = DataSource(data_args.text_column_name, dataset_name=data_args.dataset_name,
                                  dataset_config_name=data_args.dataset_config_name, dataset_split=data_args.dataset_split)
    eval_source = None
    if data_args.validation_file is not None:
        eval_source = DataSource.from_files(data_args.validation_file, "validation_file", data_args.text_column_name)
    return train_source, eval_source


def check_run_settings(args) -> None:
    """UsageError for run settings that contradict each other or the launch, found before any input is read;
    warnings for those that work with a caveat."""
    from .tracking import check_report_to

    data_args, patch_args, training_args = args.data, args.patch, args.training
    if data_args.validation_file is None and training_args.eval_strategy != "no":
        raise UsageError(
            f"--eval_strategy {training_args.eval_strategy.value} needs a --validation_file (or set --eval_strategy no)"
        )
    check_report_to(training_args.report_to)
    check_trainer_settings(training_args)
    check_backend_available(training_args)
    check_world_size(training_args)
    if patch_args.patch_switch == "continue" and (training_args.deepspeed or training_args.fsdp):
        raise UsageError(
            "--patch_switch continue carries the optimizer state across the switch under DDP or one device; "
            f"with --{'deepspeed' if training_args.deepspeed else 'fsdp'} it is not supported yet (use --patch_switch restart)"
        )
    check_patch_stage_settings(training_args, patch_args.has_patch_stage)
    if patch_args.has_patch_stage:
        stage_batch_settings(patch_args, training_args)  # UsageError when the patch stage's batch cannot be derived
    check_streaming(data_args, training_args)
    caveat = torch_compile_caveat(training_args)
    if caveat:
        logger.warning(caveat)
    if training_args.save_only_model and training_args.save_strategy != "no":
        logger.warning("--save_only_model: checkpoints hold only the weights, so an interrupted run cannot resume "
                       "from them (a re-run is refused; --overwrite_output_dir starts over)")
    if patch_args.patch_size > 1 and not patch_args.has_patch_stage:
        logger.warning("--patch_size %d is ignored: --patch_data_fraction is 0 (token-level baseline)", patch_args.patch_size)


def check_streaming(data_args, training_args) -> None:
    """UsageError for --streaming without the token budget it needs, or with loader workers that would each read
    the whole stream."""
    if data_args.streaming and training_args.max_steps <= 0:
        raise UsageError("--streaming needs --max_steps: it fixes the token budget that --patch_data_fraction splits")
    if data_args.streaming and training_args.dataloader_num_workers > 1:
        raise UsageError(
            f"--streaming tokenises one stream of blocks, which --dataloader_num_workers "
            f"{training_args.dataloader_num_workers} would read that many times over (every block repeated): use "
            "--dataloader_num_workers 1 (tokenise in a background process) or 0, or drop --streaming to use the cache"
        )


def check_world_size(training_args) -> None:
    """UsageError when the launcher started several processes (WORLD_SIZE > 1) but transformers runs this one
    alone: on a machine without a GPU, a launch without --use_cpu true. Each process would then train and save
    on its own into the same --output_dir."""
    launched = os.environ.get("WORLD_SIZE", "1")
    if launched.isdigit() and int(launched) > 1 and training_args.world_size == 1:
        import torch

        fix = "add --use_cpu true to run the processes as one job on CPU" if not torch.cuda.is_available() else (
            "check the launcher's settings")
        raise UsageError(f"launched as {launched} processes (WORLD_SIZE={launched}), but each would train alone "
                         f"(the Trainer's world size is 1): {fix}")


# ---------------------------------------------------------------------------------------------------------
# The plan: tokens, the λ split, each stage's arguments
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobPlan:
    """Everything the stage loop (`stage_loop.train_stages`) needs, fixed before the first stage.

    plans: the stages in order (`stages.plan_stages`). args, inputs: the job's arguments and inputs.
    train_dataset(plan): a stage's training blocks; eval_datasets: (token-level, patch-level) validation blocks,
    (None, None) without validation data. continued: --patch_switch continue with both stages (the token stage
    carries the patch stage's optimizer state and schedule on); schedule_steps: the optimizer steps of that one
    schedule (None: each stage its own). results: the job's record so far (all_results.json's header)."""

    plans: list[StagePlan]
    args: object
    inputs: JobInputs
    train_dataset: object
    eval_datasets: tuple
    continued: bool
    schedule_steps: int | None
    results: dict = field(default_factory=dict)

    def stage_arguments(self, plan: StagePlan, output_dir: str, final_model: bool = False):
        """`stage_arguments` of this job's arguments."""
        return stage_arguments(self.args, plan, output_dir, final_model)


def stage_arguments(args, plan: StagePlan, output_dir: str, final_model: bool = False):
    """The TrainingArguments of the stage `plan` in `output_dir` (`stages.stage_training_args`); with
    `final_model`, with no step limit: those of a Trainer that only evaluates and saves the final model. Make
    them right before the stage's Trainer: making TrainingArguments resets accelerate's state, which a second
    DeepSpeed Accelerator needs. UsageError when the patch stage's batch cannot be derived."""
    max_steps = -1 if final_model else stage_max_steps(plan, args.patch, args.training)
    return stage_training_args(args.training, args.patch, plan, output_dir, max_steps)


def plan_job(args, inputs: JobInputs, stream_index_file: str) -> JobPlan:
    """Tokenise the training data once into the on-disk cache (or check the start of a stream), split the token
    budget between the stages (λ given, or derived exactly from r), and cut the validation blocks.
    `stream_index_file`: where a --streaming job records its stream positions. UsageError for no text, or a
    stage with less than one block."""
    from .blocks import training_blocks, validation_blocks
    from .console import job_line
    from .results import recipe_results
    from .token_cache import cached_token_stream

    data_args, patch_args, training_args = args.data, args.patch, args.training
    block_size = data_args.block_size
    cache = dict(cache_dir=data_args.data_cache_dir, batch_size=data_args.tokenize_batch_size)
    stream, dataset_tokens, total_tokens = training_tokens(args, inputs.train_source, inputs.tokenizer, cache)
    patch_fraction, step_fraction = split_fractions(patch_args, training_args, block_size)
    plans = plan_stages(total_tokens, patch_fraction, patch_args.patch_size, block_size, data_args.skip_data_fraction)
    check_plans(plans, block_size)

    # --patch_switch continue: one schedule over both stages' optimizer steps, the optimizer state carried on.
    continued = patch_args.patch_switch == "continue" and len(plans) == 2
    steps = {p.name: stage_steps(p, stage_arguments(args, p, training_args.output_dir)) for p in plans}
    schedule_steps = sum(steps.values()) if continued else None
    check_warmup(args, plans, steps, schedule_steps)
    train_dataset = functools.partial(training_blocks, stream=stream, source=inputs.train_source,
                                      tokenizer=inputs.tokenizer, batch_size=data_args.tokenize_batch_size,
                                      write_index=training_args.should_save, index_file=stream_index_file)
    eval_datasets = (None, None)
    if inputs.eval_source is not None:
        eval_stream, _ = cached_token_stream(inputs.eval_source, inputs.tokenizer, training_args, **cache)
        eval_datasets = validation_blocks(eval_stream, block_size, patch_args.patch_size, data_args.max_eval_blocks)
    results = {"output_dir": training_args.output_dir, "patch_size": patch_args.patch_size,
               "patch_data_fraction": float(patch_fraction), "block_size": block_size,
               "dataset_tokens": dataset_tokens, "budget_tokens": total_tokens,
               "attn_implementation": inputs.attn_implementation,
               **recipe_results(patch_args, step_fraction, schedule_steps)}
    logger.info(job_line(args, plans, results, inputs.tokenizer))
    return JobPlan(plans, args, inputs, train_dataset, eval_datasets, continued, schedule_steps, results)


def check_warmup(args, plans: list[StagePlan], steps: dict[str, int], schedule_steps: int | None) -> None:
    """A learning-rate schedule that does not outlast its warmup: with n optimizer steps and w warmup steps, the
    Trainer's steps use learning rates 0, 1/w, ..., (n-1)/w of the peak. UsageError where n = 1 (its one step
    learns nothing: λ = 0.97 left a token stage of one step at learning rate 0, whose final model was the patch
    model, reported as a two-stage job); one warning where n <= w (it peaks at (n-1)/w of --learning_rate).
    `steps`: each stage's optimizer steps by name; `schedule_steps`: those of one schedule over both stages."""
    schedules = [("the job", schedule_steps, stage_arguments(args, plans[0], args.training.output_dir))] if schedule_steps \
        else [(f"the {p.name} stage", steps[p.name], stage_arguments(args, p, args.training.output_dir)) for p in plans]
    for what, count, stage_args in schedules:
        warmup = stage_args.get_warmup_steps(count)
        if count > warmup or warmup == 0:
            continue
        flag = "--patch_warmup_steps" if what == "the patch stage" and args.patch.patch_warmup_steps is not None \
            else "--warmup_steps"
        numbers = (f"{what} has {count} optimizer step{'s' if count != 1 else ''}, no more than its {warmup} warmup "
                   f"steps ({flag} {stage_args.warmup_steps:g})")
        if count == 1:
            raise UsageError(f"{numbers}: its only step would use learning rate 0 and change nothing; lower {flag}, "
                             "or give it more steps (--max_steps, --patch_data_fraction)")
        logger.warning("%s: its learning rate peaks at %.0f%% of %s", numbers, 100 * (count - 1) / warmup,
                       stage_args.learning_rate)


def training_tokens(args, train_source, tokenizer, cache: dict):
    """(the token cache's stream or None when streaming, the data's tokens or None, the job's token budget):
    --max_steps x sequences per step x --block_size, or --num_train_epochs over the data. UsageError for data
    without text; a warning when a --max_steps budget reads the data many times over."""
    from .token_cache import cached_token_stream

    data_args, training_args = args.data, args.training
    steps_budget = training_args.max_steps * global_batch_size(training_args) * data_args.block_size
    if data_args.streaming:  # read during training, after the claim: check what can be checked now
        train_source.check_starts()
        return None, None, steps_budget
    stream, _ = cached_token_stream(train_source, tokenizer, training_args,
                                    num_workers=data_args.preprocessing_num_workers, **cache)
    dataset_tokens = len(stream)
    if dataset_tokens == 0:
        raise UsageError("--train_file holds no text")
    by_epochs = training_args.max_steps <= 0
    total_tokens = math.floor(training_args.num_train_epochs * dataset_tokens) if by_epochs else steps_budget
    warning = repetition_warning(total_tokens, dataset_tokens, epochs_requested=by_epochs)
    if warning:
        logger.warning(warning)
    return stream, dataset_tokens, total_tokens
