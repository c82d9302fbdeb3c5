"""The output folder and re-runs: what identifies a run, which folders a run may use or overwrite, and which
checkpoint an interrupted run resumes from."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

from .cli import UsageError, first_line
from .readers import expand_data_files
from .stages import global_batch_size, stage_batch_settings

logger = logging.getLogger("run_clm")

PATCH_STAGE_DIR = "patch_stage"
STAGE_COMPLETE_FILE = "stage_complete.json"
RUN_ARGS_FILE = "run_args.json"
STREAM_INDEX_FILE = "stream_index.jsonl"  # --streaming: tokens per part of the data (blocks.StreamingTokenBlocks)


def run_identity(model_args, data_args, patch_args, training_args) -> dict:
    """What defines a run: a re-run with the same identity resumes, a different one is refused."""
    return {
        "config_name": model_args.config_name,
        "model_name_or_path": model_args.model_name_or_path,
        "train_file": data_args.train_file,
        # The files that folders and glob patterns expand to, in order: a new shard matched is another run.
        "train_files": expand_data_files(data_args.train_file, "train_file") if data_args.train_file else None,
        "validation_files": expand_data_files(data_args.validation_file, "validation_file") if data_args.validation_file else None,
        "dataset_name": data_args.dataset_name,
        "validation_file": data_args.validation_file,
        "skip_data_fraction": data_args.skip_data_fraction,
        "block_size": data_args.block_size,
        "patch_size": patch_args.patch_size,
        "patch_data_fraction": patch_args.patch_data_fraction,
        "max_steps": training_args.max_steps,
        "num_train_epochs": training_args.num_train_epochs,
        "seed": training_args.seed,
        # What a resume would otherwise silently change: the budget and split (sequences per optimizer step,
        # over all ranks: per-device batch, accumulation and world size may change if their product does not),
        # the token stream, and the optimizer schedule that the checkpoint restores.
        "tokenizer_name": model_args.tokenizer_name,
        "sequences_per_step": global_batch_size(training_args),
        "patch_sequences_per_step": (
            math.prod(stage_batch_settings(patch_args, training_args)) * training_args.world_size
            if patch_args.has_patch_stage else None
        ),
        "patch_max_steps": patch_args.patch_max_steps,
        "learning_rate": training_args.learning_rate,
        "patch_learning_rate": patch_args.patch_learning_rate,
        "lr_scheduler_type": str(training_args.lr_scheduler_type),
        "warmup_steps": training_args.warmup_steps,
        "patch_warmup_steps": patch_args.patch_warmup_steps,
    }


def check_same_run(output_dir: str, identity: dict) -> None:
    """Refuse to resume or report a run recorded in `output_dir` with another identity. Keys the record does
    not hold (a run from an earlier version of this script) are not compared."""
    record = Path(output_dir) / RUN_ARGS_FILE
    if not record.is_file():
        return
    previous = json.loads(record.read_text())
    changed = {k: (previous[k], v) for k, v in identity.items() if k in previous and previous[k] != v}
    if changed:
        details = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise UsageError(
            f"--output_dir {output_dir} holds a different run ({details}): choose another directory "
            "or pass --overwrite_output_dir"
        )


def prepare_output_dir(output_dir: str, identity: dict, overwrite: bool, is_main: bool) -> None:
    """Refuse an output directory holding an unrelated run; record this run's identity."""
    path = Path(output_dir)
    record = path / RUN_ARGS_FILE
    if path.exists() and any(path.iterdir()):
        if overwrite:
            if is_main:
                logger.warning("--overwrite_output_dir: deleting the contents of %s", output_dir)
                for child in path.iterdir():
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        elif not record.is_file():
            raise UsageError(
                f"--output_dir {output_dir} is not empty and holds no run of this script ({RUN_ARGS_FILE} missing): "
                "choose another directory or pass --overwrite_output_dir"
            )
        else:
            check_same_run(output_dir, identity)
    if is_main:
        path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(record, identity)


def file_in_the_way(path: str | Path) -> Path | None:
    """The file that stops `path` from being (or becoming) a folder: `path` itself or its nearest existing
    ancestor, when that is not a folder; None otherwise."""
    path = Path(path)
    nearest = next((p for p in [path, *path.parents] if p.exists()), None)
    return nearest if nearest is not None and not nearest.is_dir() else None


def write_json_atomic(path, payload: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(tmp, path)


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` (a checkpoint-N) cannot be resumed from, or None. transformers writes a checkpoint in
    place and its trainer_state.json last, so a job killed while saving leaves one without it, or with
    half-written files; the header of each safetensors file and the state are read to tell."""
    from safetensors import safe_open

    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except ValueError:
        return "trainer_state.json is not valid JSON"
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(weights), "pt") as handle:
                handle.keys()
        except Exception as error:  # safetensors raises its own error type for a damaged file
            return f"{weights.name} is unreadable ({first_line(error)})"
    return None


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint-N of `output_dir` that a resume can load; newer damaged ones are skipped with a
    warning (and left in place). None if there is none."""
    if not os.path.isdir(output_dir):
        return None
    numbered = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    for candidate in sorted(numbered, key=lambda p: int(p.name.split("-", 1)[1]), reverse=True):
        problem = checkpoint_problem(candidate)
        if problem is None:
            return str(candidate)
        logger.warning("Not resuming from %s: %s (a save that did not finish?)", candidate, problem)
    return None
