"""The two stages of a job: the λ split of the token budget (`plan_stages`), and each stage's batch, length and
TrainingArguments (the paper's defaults: the same tokens per optimizer step, a fresh schedule).

The choices beyond the paper (docs/recipes.md) that set the split and the batch live here too:
the split set by a fraction r of the optimizer steps (`split_fractions`: converted exactly to λ, then split by
`plan_stages` as always), and a patch stage with the token stage's positions per step (`--patch_batch_mode
positions`, `stage_batch_settings`)."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from fractions import Fraction

from transformers import TrainingArguments

from .cli import UsageError
from .liger import liger_config_for_stage
from .training_args import RunTrainingArguments

logger = logging.getLogger("run_clm")

PATCH_BATCH_MODES = ("tokens", "positions")  # what a patch-stage step holds equal to a token-stage step
PATCH_SWITCHES = ("restart", "continue")  # the optimizer and schedule at the switch


@dataclass
class StagePlan:
    """The tokens of one stage: stream offset, blocks and what is dropped (for the report)."""

    name: str
    patch_size: int
    block_len: int  # tokens per sequence: K*T (patch stage) or T (token stage)
    start_token: int
    budget_tokens: int
    num_blocks: int

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_len

    @property
    def positions(self) -> int:
        return self.tokens // self.patch_size

    @property
    def dropped_tokens(self) -> int:
        return self.budget_tokens - self.tokens


def plan_stages(
    total_tokens: int, patch_fraction: float, patch_size: int, block_size: int, skip_fraction: float = 0.0
) -> list[StagePlan]:
    """Split a budget of `total_tokens` stream tokens: the first floor(λ*total) to the patch stage (blocks of
    K*T), the rest to the token stage (blocks of T). Only each stage's final partial block is dropped.
    With `skip_fraction`, the first floor(skip*total) tokens are left out and the rest is split."""
    skipped = math.floor(skip_fraction * total_tokens)
    total_tokens -= skipped
    patch_tokens = math.floor(patch_fraction * total_tokens)
    plans = []
    if patch_fraction > 0:
        length = patch_size * block_size
        plans.append(StagePlan("patch", patch_size, length, skipped, patch_tokens, patch_tokens // length))
    if patch_fraction < 1:
        rest = total_tokens - patch_tokens
        plans.append(StagePlan("token", 1, block_size, skipped + patch_tokens, rest, rest // block_size))
    return plans


def check_plans(plans: list[StagePlan], block_size: int) -> None:
    """UsageError for a stage with less than one block of training tokens; log each stage's share of the stream."""
    for plan in plans:
        if plan.num_blocks == 0:
            blocks = f"block_size {block_size}" + (f" x patch_size {plan.patch_size}" if plan.patch_size > 1 else "")
            raise UsageError(
                f"the {plan.name} stage gets {plan.budget_tokens} training tokens, fewer than one block of "
                f"{plan.block_len} ({blocks}): give more data or epochs, or lower --block_size / --patch_data_fraction"
            )
        logger.info(
            "%s stage: %d blocks of %d tokens = %d tokens (%d positions), starting at stream token %d; %d tokens dropped",
            plan.name, plan.num_blocks, plan.block_len, plan.tokens, plan.positions, plan.start_token, plan.dropped_tokens,
        )


def stage_batch_settings(patch_args, training_args: TrainingArguments) -> tuple[int, int]:
    """(micro-batch, gradient accumulation) of the patch stage: the user's, or by `patch_args.patch_batch_mode`
    "tokens" the paper's default of the same tokens per optimizer step as the token stage (K times fewer
    sequences of K*T tokens), or "positions" the same positions per step (as many sequences of K*T tokens as
    the token stage has of T: K times its tokens, the same compute).
    `patch_args`: run_clm.py's PatchArguments (patch_size, patch_per_device_train_batch_size, ...).
    UsageError when the token stage's batch cannot be divided by K (tokens), or when explicit patch batch
    settings contradict "positions"."""
    k = patch_args.patch_size
    batch = patch_args.patch_per_device_train_batch_size
    accumulation = patch_args.patch_gradient_accumulation_steps
    token_batch, token_accumulation = training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps
    if getattr(patch_args, "patch_batch_mode", "tokens") == "positions":
        if batch is not None or accumulation is not None:
            raise UsageError(
                "--patch_batch_mode positions sets the patch stage's batch to the token stage's: drop "
                "--patch_per_device_train_batch_size / --patch_gradient_accumulation_steps, or use --patch_batch_mode tokens"
            )
        return token_batch, token_accumulation
    if batch is not None or accumulation is not None:
        return batch or token_batch, accumulation or token_accumulation
    if token_batch % k == 0:
        return token_batch // k, token_accumulation
    if (token_batch * token_accumulation) % k == 0 and token_accumulation % k == 0:
        return token_batch, token_accumulation // k
    raise UsageError(
        f"the patch stage keeps the tokens per optimizer step of the token stage, which needs "
        f"--per_device_train_batch_size ({token_batch}) or --gradient_accumulation_steps ({token_accumulation}) "
        f"divisible by --patch_size K={k}; or set --patch_per_device_train_batch_size and "
        "--patch_gradient_accumulation_steps"
    )


def patch_sequences_per_step(patch_args, training_args: TrainingArguments) -> int:
    """Sequences of K*T tokens per optimizer step of the patch stage, over all ranks (`stage_batch_settings` x
    world size). UsageError as `stage_batch_settings`."""
    return math.prod(stage_batch_settings(patch_args, training_args)) * training_args.world_size


def stage_training_args(training_args: RunTrainingArguments, patch_args, plan: StagePlan, output_dir: str, max_steps: int):
    """The TrainingArguments of one stage: its own output folder, batch, learning rate, warmup and length."""
    changes = {"output_dir": output_dir, "max_steps": max_steps, "num_train_epochs": 1.0}
    if plan.name == "patch":
        batch, accumulation = stage_batch_settings(patch_args, training_args)
        changes.update(per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)
        if patch_args.patch_learning_rate is not None:
            changes["learning_rate"] = patch_args.patch_learning_rate
        if patch_args.patch_warmup_steps is not None:
            changes["warmup_steps"] = patch_args.patch_warmup_steps
    if training_args.use_liger_kernel:
        changes["liger_kernel_config"] = liger_config_for_stage(training_args.liger_kernel_config, plan.patch_size)
    fields = {f.name: getattr(training_args, f.name) for f in dataclasses.fields(training_args) if f.init}
    fields.update(changes)
    return RunTrainingArguments(**fields)


def stage_max_steps(plan: StagePlan, patch_args, training_args: TrainingArguments) -> int:
    """A stage's max_steps: -1 (one pass over its blocks), or --patch_max_steps for the patch stage when it
    stops before the end of its blocks. Past them the Trainer would start over the same blocks, so a larger
    --patch_max_steps stops at the end of the data instead (with a warning)."""
    if plan.name != "patch" or not patch_args.patch_max_steps:
        return -1
    sequences = patch_args.patch_max_steps * patch_sequences_per_step(patch_args, training_args)
    if sequences >= plan.num_blocks:
        logger.warning(
            "--patch_max_steps %d would take %d sequences, but the patch stage has %d: it stops after one pass over "
            "them instead of repeating them", patch_args.patch_max_steps, sequences, plan.num_blocks,
        )
        return -1
    return patch_args.patch_max_steps


MANY_EPOCHS = 4  # a budget that reads the training data more often than this is worth a warning


def repetition_warning(budget_tokens: int, dataset_tokens: int, epochs_requested: bool) -> str | None:
    """One warning line when a token budget fixed by --max_steps (`epochs_requested` False) reads the
    `dataset_tokens` of training data more than MANY_EPOCHS times (e.g. a paper config on a small file); None
    otherwise. A budget asked for in epochs (--num_train_epochs) repeats the data on purpose: no warning."""
    epochs = budget_tokens / dataset_tokens if dataset_tokens else 0.0
    if epochs_requested or epochs <= MANY_EPOCHS:
        return None
    return (f"the budget of {budget_tokens:,} tokens (--max_steps x sequences per step x --block_size) reads the "
            f"{dataset_tokens:,}-token training data {epochs:,.1f} times (epochs): give more data or lower --max_steps "
            "if that is not what you want")


def tokens_per_step(patch_args, training_args: TrainingArguments, block_size: int) -> tuple[int, int]:
    """(P, Q): training tokens per optimizer step, over all ranks, of the patch stage (sequences of K*T) and of
    the token stage (sequences of T = `block_size`)."""
    patch_sequences = patch_sequences_per_step(patch_args, training_args)
    return patch_sequences * patch_args.patch_size * block_size, global_batch_size(training_args) * block_size


def token_fraction_from_step_fraction(r, patch_tokens_per_step: int, token_tokens_per_step: int) -> Fraction:
    """λ = r*P / (r*P + (1 - r)*Q): the token fraction whose patch stage takes the fraction r of the optimizer
    steps, when a patch step reads P tokens and a token step Q (patch steps λN/P, token steps (1-λ)N/Q, for any
    budget N). Exact: r is read as the decimal it was written as (0.3 is 3/10), the result is a Fraction."""
    r = Fraction(repr(float(r)))
    p, q = patch_tokens_per_step, token_tokens_per_step
    return r * p / (r * p + (1 - r) * q)


def step_fraction_from_token_fraction(lam, patch_tokens_per_step: int, token_tokens_per_step: int) -> Fraction:
    """r = (λ/P) / (λ/P + (1 - λ)/Q), the inverse of `token_fraction_from_step_fraction`."""
    lam = lam if isinstance(lam, Fraction) else Fraction(repr(float(lam)))
    p, q = patch_tokens_per_step, token_tokens_per_step
    return (lam / p) / (lam / p + (1 - lam) / q)


def split_fractions(patch_args, training_args: TrainingArguments, block_size: int) -> tuple[float | Fraction, Fraction]:
    """(λ, r) of the job: the token fraction that `plan_stages` splits by, and the step fraction it stands for.
    With --patch_data_fraction λ is the user's float (unchanged: the paper's runs split as always) and r is
    derived; with --patch_step_fraction r, λ is the exact Fraction for r (`token_fraction_from_step_fraction`)."""
    if not patch_args.has_patch_stage or not patch_args.has_token_stage:  # 0 or 1: the same in both
        whole = Fraction(1 if patch_args.has_patch_stage else 0)
        return (whole if patch_args.patch_step_fraction is not None else patch_args.patch_data_fraction), whole
    p, q = tokens_per_step(patch_args, training_args, block_size)
    if patch_args.patch_step_fraction is not None:
        return token_fraction_from_step_fraction(patch_args.patch_step_fraction, p, q), Fraction(repr(float(patch_args.patch_step_fraction)))
    return patch_args.patch_data_fraction, step_fraction_from_token_fraction(patch_args.patch_data_fraction, p, q)


def stage_steps(plan: StagePlan, stage_args: TrainingArguments) -> int:
    """The optimizer steps the Trainer takes for a stage of `plan` with TrainingArguments `stage_args`:
    max_steps when set, else one pass over the plan's blocks, counted as transformers' Trainer does
    (`set_initial_training_values`: batches per rank = ceil(blocks / (micro-batch x world size)), a partial
    accumulation at the end counts as a step)."""
    if stage_args.max_steps > 0:
        return stage_args.max_steps
    batches = math.ceil(plan.num_blocks / (stage_args.per_device_train_batch_size * stage_args.world_size))
    return max(math.ceil(batches / stage_args.gradient_accumulation_steps), 1)


def global_batch_size(args: TrainingArguments) -> int:
    """Sequences per optimizer step over all ranks."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
