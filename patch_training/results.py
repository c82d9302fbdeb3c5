"""What a job reports: each stage's accounting (tokens, positions, batch), the recipe (how the split was set, the
batch mode, the switch, the offset weights), the split both ways (λ of the tokens, r of the optimizer steps:
asked and measured) and the job's relative cost, written to `<output_dir>/all_results.json` and printed as a table
of the stages and one line."""

from __future__ import annotations

import logging
import math

from .stages import global_batch_size

logger = logging.getLogger("run_clm")


def stage_results(plan, args, metrics: dict) -> dict:
    """The record of one trained stage: its plan (a `StagePlan`), the batch of its TrainingArguments `args`, and
    what it trained (blocks seen = optimizer steps x sequences per step, at most the plan's blocks), plus the
    Trainer's `metrics`. A stage's positions are its tokens / K: the cost of a patch-stage token is 1/K."""
    global_batch = global_batch_size(args)
    tokens, positions = tokens_seen(plan, metrics["steps"], global_batch)
    return {
        "blocks": plan.num_blocks, "block_tokens": plan.block_len, "tokens": tokens,
        "positions": positions, "planned_tokens": plan.tokens,
        "dropped_tokens": plan.dropped_tokens, "start_token": plan.start_token, "patch_size": plan.patch_size,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps, "learning_rate": args.learning_rate,
        "world_size": args.world_size, "tokens_per_step": global_batch * plan.block_len,
        "positions_per_step": global_batch * plan.block_len // plan.patch_size,
        **metrics,
    }


def tokens_seen(plan, steps: int, global_batch: int) -> tuple[int, int]:
    """(tokens, positions) a stage has trained on after `steps` optimizer steps of `global_batch` sequences:
    blocks seen = min(the plan's blocks, steps x global batch), each of `plan.block_len` tokens; positions =
    tokens / K (the compute in token-level equivalents: a patch-stage token costs 1/K, the paper's §3.1)."""
    tokens = min(plan.num_blocks, steps * global_batch) * plan.block_len
    return tokens, tokens // plan.patch_size


def recipe_results(patch_args, step_fraction, schedule_steps: int | None) -> dict:
    """The job's recipe choices (run_clm.py's PatchArguments `patch_args`) for all_results.json: which fraction set
    the split (`patch_split_by`: "patch_data_fraction" λ or "patch_step_fraction" r), r (given, or derived from λ
    and the stages' tokens per step: `stages.split_fractions`), the batch mode, the switch (and with "continue"
    the optimizer steps of the one schedule), and the patch loss's normalised offset weights (None: the mean)."""
    weights = patch_args.offset_weights
    return {
        "patch_split_by": "patch_data_fraction" if patch_args.patch_step_fraction is None else "patch_step_fraction",
        "patch_step_fraction": float(step_fraction),
        "patch_batch_mode": patch_args.patch_batch_mode,
        "patch_switch": patch_args.patch_switch,
        "schedule_steps": schedule_steps,
        "patch_offset_weights": list(weights) if weights is not None else None,
    }


def relative_cost_nominal(patch_fraction: float, patch_size: int) -> float:
    """The compute of a job at patch fraction λ and patch size K relative to token-level training on the same
    tokens: λ/K + 1 - λ (the paper's §3.1), 1 for the token-level baseline λ = 0."""
    lam = float(patch_fraction)
    return lam / patch_size + 1 - lam if lam > 0 else 1.0


def add_job_totals(results: dict, stages: list[dict], patch_fraction: float, patch_size: int, final: dict) -> dict:
    """Add the job's totals to `results`: tokens and positions over `stages`, the nominal relative cost
    λ/K + 1 - λ (the paper's §3.1; 1 for the token-level baseline λ = 0) and the measured one (positions /
    tokens), and the final evaluation `final` (eval_loss, eval_perplexity; None where not evaluated); and the split
    as trained, both ways: the patch stage's share of the tokens and of the optimizer steps (`..._measured`;
    they differ from λ and r by whole blocks and steps only)."""
    tokens = sum(s["tokens"] for s in stages)
    positions = sum(s["positions"] for s in stages)
    steps = sum(s["steps"] for s in stages)
    patch = results.get("patch_stage") or {"tokens": 0, "steps": 0}
    results["patch_token_fraction_measured"] = patch["tokens"] / tokens if tokens else float("nan")
    results["patch_step_fraction_measured"] = patch["steps"] / steps if steps else float("nan")
    results["relative_cost_nominal"] = relative_cost_nominal(patch_fraction, patch_size)
    results["relative_cost_measured"] = positions / tokens if tokens else float("nan")
    results["tokens"], results["positions"] = tokens, positions
    results["eval_loss"] = final.get("eval_loss")
    results["perplexity"] = final.get("eval_perplexity")
    return results


def number(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def stage_table(results: dict) -> str:
    """The job's stages as a table, from its all_results.json `results`: per stage K, optimizer steps, tokens,
    positions, wall time (`train_runtime_s`: evaluations and checkpoints included) and tokens per second of it,
    training loss, evaluation loss and perplexity; a line for the whole job (the final model's evaluation) and the
    relative cost."""
    header = ("stage", "K", "steps", "tokens", "positions", "wall (s)", "tokens/s", "train loss", "eval loss", "perplexity")
    rows = []
    for name in ("patch", "token"):
        record = results.get(f"{name}_stage")
        if not record:
            continue
        seconds = record.get("train_runtime_s") or 0
        rows.append((name, str(record["patch_size"]), number(record["steps"]), number(record["tokens"]),
                     number(record["positions"]), number(float(seconds), 1),
                     number(round(record["tokens"] / seconds)) if seconds else "-", number(record.get("train_loss")),
                     number(record.get("eval_loss")), number(record.get("eval_perplexity"), 1)))
    stages = [results[f"{name}_stage"] for name in ("patch", "token") if results.get(f"{name}_stage")]
    seconds = sum(s.get("train_runtime_s") or 0 for s in stages)
    rows.append(("job", "", number(sum(s["steps"] for s in stages)), number(results["tokens"]),
                 number(results["positions"]), number(float(seconds), 1),
                 number(round(results["tokens"] / seconds)) if seconds else "-", "", number(results.get("eval_loss")),
                 number(results.get("perplexity"), 1)))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in (header, *rows)]
    lines.append(f"relative cost {results['relative_cost_nominal']:.3f} nominal (λ/K + 1 - λ), "
                 f"{results['relative_cost_measured']:.3f} measured (positions / tokens)")
    return "\n".join(lines)


def report(results: dict, results_file) -> None:
    """Print the table of the job's stages (`stage_table`), then its one-line summary: perplexity, relative cost
    (nominal and measured), and `results_file`, where the results are."""
    print(stage_table(results), flush=True)
    line = f"perplexity {results['perplexity']:.3f}" if results.get("perplexity") is not None else "no validation set"
    print(
        f"[run_clm] done: {line}; relative cost nominal {results['relative_cost_nominal']:.3f} "
        f"(λ/K + 1 - λ), measured {results['relative_cost_measured']:.3f} (positions / tokens); "
        f"results in {results_file}",
        flush=True,
    )


def job_results(results: dict, stages: list[dict], final: dict, stream_index_file: str | None, log: bool) -> dict:
    """The job's all_results.json record: `results` (its header and stage records) with the job's totals
    (`add_job_totals` over the stage records `stages`, `final` the final evaluation) and, for a --streaming job
    (`stream_index_file` given), what the stream read of the data (`blocks.streamed_counts`, null texts included),
    logged when `log` (the main process)."""
    add_job_totals(results, stages, results["patch_data_fraction"], results["patch_size"], final)
    results["distributed"] = stages[-1].get("distributed")  # the backend the last stage trained with
    if stream_index_file is not None:
        from .blocks import streamed_counts
        from .token_cache import skipped_note

        results["streamed_data"] = streamed = streamed_counts(stream_index_file)
        if streamed and log:
            logger.info("Streamed %s documents of the training data%s, %s tokens read (%d of its %d parts read whole), "
                        "of which the stages trained on %s: the stream reads ahead of training",
                        f"{streamed['documents'] - streamed['skipped_empty']:,}",
                        skipped_note({"num_skipped_empty": streamed["skipped_empty"]}), f"{streamed['tokens']:,}",
                        streamed["parts_read_whole"], streamed["parts"], f"{results['tokens']:,}")
    return results
