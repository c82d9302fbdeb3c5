"""What a run prints besides transformers' own logs and progress bars (docs/console.md): a line for the job's plan
(`job_line`: the token budget, what set it, the λ split and each stage's optimizer steps), a start and an end line
for each stage (`stage_start_line`, `stage_end_line`); the closing table of the stages is all_results.json's
(`results.stage_table`). The lines are logged by the main process only."""

from __future__ import annotations

from types import SimpleNamespace

from .results import relative_cost_nominal, tokens_seen
from .stages import global_batch_size, stage_batch_settings, stage_steps


def count(value) -> str:
    """A number rounded to an integer, with thousands separators (189,696)."""
    return f"{round(value):,}"


def processes(n: int) -> str:
    return f"{n} process" if n == 1 else f"{n} processes"


def planned_stage_steps(args, plan) -> int:
    """The optimizer steps the stage `plan` of run_clm.py's JobArguments `args` will take, as `stages.stage_steps`
    counts them for its TrainingArguments (one pass over its blocks, or --patch_max_steps when it stops earlier),
    without making those TrainingArguments (which resets accelerate's state)."""
    training, patch = args.training, args.patch
    if plan.name == "patch":
        batch, accumulation = stage_batch_settings(patch, training)
    else:
        batch, accumulation = training.per_device_train_batch_size, training.gradient_accumulation_steps
    whole = stage_steps(plan, SimpleNamespace(max_steps=-1, per_device_train_batch_size=batch,
                                              gradient_accumulation_steps=accumulation, world_size=training.world_size))
    limit = patch.patch_max_steps if plan.name == "patch" else None
    return min(whole, limit) if limit else whole


def budget_origin(args, dataset_tokens: int | None) -> str:
    """How the job's token budget was set: `--max_steps N x sequences x block_size` (tokens, not steps) or
    `--num_train_epochs E x the data's tokens`."""
    training = args.training
    if training.max_steps > 0:
        return (f"--max_steps {training.max_steps} x {global_batch_size(training)} sequences x {args.data.block_size} "
                "tokens: the tokens of that many token-level steps, not a count of optimizer steps")
    return f"--num_train_epochs {training.num_train_epochs:g} x the {count(dataset_tokens)} tokens of the training data"


def padding_note(tokenizer) -> str:
    """The padding choice recorded in the saved models' configs (`models.record_special_tokens`)."""
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        return "the tokenizer has no pad token (pad_token_id stays as the model config has it)"
    return f"pad_token_id {pad_id} ({tokenizer.pad_token}, the tokenizer's) recorded in the saved configs"


def job_line(args, plans, results: dict, tokenizer) -> str:
    """The job's plan in one line: the token budget and what set it, the split (λ, and r when it set it), each
    stage's optimizer steps and their total, the nominal relative cost, the padding choice. `plans`: the stages'
    `StagePlan`s; `results`: the job's all_results.json header (`job.plan_job`)."""
    lam, k = results["patch_data_fraction"], results["patch_size"]
    steps = [(plan.name, planned_stage_steps(args, plan)) for plan in plans]
    skipped = f", after skipping the first {args.data.skip_data_fraction:g} of it" if args.data.skip_data_fraction else ""
    if lam == 0:
        split = "λ = 0: token level only (the baseline)"
    elif results["patch_split_by"] == "patch_step_fraction":
        split = (f"r = {results['patch_step_fraction']:.4g} of the optimizer steps at patch level (λ = {lam:.4g} of the "
                 f"tokens), K = {k}")
    else:
        split = f"λ = {lam:.4g} of the tokens at patch level, K = {k}"
    stages = ", then ".join(f"{name} stage {count(n)} optimizer steps" for name, n in steps)
    total = f" ({count(sum(n for _, n in steps))} in all)" if len(steps) > 1 else ""
    cost = relative_cost_nominal(lam, k)
    return (f"Job: a budget of {count(results['budget_tokens'])} training tokens ({budget_origin(args, results['dataset_tokens'])})"
            f"{skipped}; {split}: {stages}{total}; relative cost λ/K + 1 - λ = {cost:.3f}; "
            f"{padding_note(tokenizer)}")


def lr_schedule(stage_args, steps: int, schedule_steps: int | None = None) -> str:
    """`lr 0.003 cosine, 10 warmup steps` of a stage's TrainingArguments over its `steps` (or one schedule of
    `schedule_steps` over both stages, --patch_switch continue)."""
    span = schedule_steps or steps
    kind = getattr(stage_args.lr_scheduler_type, "value", stage_args.lr_scheduler_type)
    over = f" over both stages' {count(span)} steps" if schedule_steps else ""
    return f"lr {stage_args.learning_rate:g} {kind}, {count(stage_args.get_warmup_steps(span))} warmup steps{over}"


def stage_label(plan, plans) -> str:
    """`patch stage (1 of 2, K = 4)`."""
    index = [p.name for p in plans].index(plan.name) + 1
    return f"{plan.name} stage ({index} of {len(plans)}, K = {plan.patch_size})"


def stage_start_line(job, plan, stage_args, init_from: str | None, checkpoint: str | None) -> str:
    """The stage's start line: its optimizer steps, tokens and positions, the global batch (and how it is made up),
    the learning-rate schedule, and what it starts or resumes from. `job`: the `job.JobPlan`; `init_from`: the
    weights it starts from (None: random); `checkpoint`: the checkpoint it resumes from (None: afresh)."""
    steps = stage_steps(plan, stage_args)
    global_batch = global_batch_size(stage_args)
    tokens, positions = tokens_seen(plan, steps, global_batch)
    per_step = global_batch * plan.block_len
    batch = (f"{global_batch} sequences x {plan.block_len} tokens = {count(per_step)} tokens "
             f"({count(per_step // plan.patch_size)} positions) per step ({stage_args.per_device_train_batch_size} per "
             f"device x {stage_args.gradient_accumulation_steps} accumulation x {processes(stage_args.world_size)})")
    if checkpoint is not None:
        origin = f"resuming from {checkpoint}"
    elif init_from is None:
        origin = f"from random weights (seed {stage_args.seed})"
    elif plan.name == "token" and job.args.patch.has_patch_stage:
        kept = "weights, AdamW state and schedule" if job.continued else "weights only (a fresh optimizer and schedule)"
        origin = f"from the patch stage's {kept}: {init_from}"
    else:
        origin = f"from the weights of {init_from}"
    return (f"{stage_label(plan, job.plans)} starts: {count(steps)} optimizer steps, {count(tokens)} tokens "
            f"({count(positions)} positions); {batch}; {lr_schedule(stage_args, steps, job.schedule_steps)}; {origin}")


def eval_summary(record: dict, patch_size: int) -> str:
    """`eval loss 8.333 (perplexity 4,160.3), patch loss 8.343` from a stage's all_results.json record."""
    if record.get("eval_loss") is None:
        return "not evaluated (no --validation_file)"
    text = f"eval loss {record['eval_loss']:.4f} (perplexity {record['eval_perplexity']:,.1f})"
    if patch_size > 1 and record.get("eval_patch_loss") is not None:
        text += f", patch loss {record['eval_patch_loss']:.4f}"
    return text


def stage_end_line(plan, plans, record: dict, folder: str) -> str:
    """The stage's end line from its all_results.json `record`: steps, tokens and positions, wall time (all its
    attempts, evaluations and checkpoints included: `train_runtime_s`), tokens and positions per second of that
    time, its training loss and evaluation, and where its model is."""
    seconds = record["train_runtime_s"]
    rate = (f"{count(record['tokens'] / seconds)} tokens/s, {count(record['positions'] / seconds)} positions/s, "
            "evaluations and checkpoints included" if seconds else "no time measured")
    loss = "patch loss" if plan.patch_size > 1 else "loss"
    return (f"{stage_label(plan, plans)} done: {count(record['steps'])} optimizer steps, {count(record['tokens'])} "
            f"tokens ({count(record['positions'])} positions) in {seconds:,.1f} s ({rate}); train {loss} "
            f"{record['train_loss']:.4f}; {eval_summary(record, plan.patch_size)}; model in {folder}")
