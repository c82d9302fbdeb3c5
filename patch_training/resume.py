"""The output folder and re-runs: what identifies a run, which folders a run may use or overwrite, and which
checkpoint an interrupted run resumes from."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import math
import os
import shutil
from pathlib import Path

from .cli import UsageError, first_line, naming_file
from .readers import expand_data_files
from .results import ALL_RESULTS_FILE
from .stages import global_batch_size, stage_batch_settings

logger = logging.getLogger("run_clm")

PATCH_STAGE_DIR = "patch_stage"
STAGE_COMPLETE_FILE = "stage_complete.json"
RUN_ARGS_FILE = "run_args.json"
STREAM_INDEX_FILE = "stream_index.jsonl"  # --streaming: tokens per part of the data (blocks.StreamingTokenBlocks)
LOCK_FILE = ".run_clm.lock"  # held by the run using the folder (`output_dir_lock`); never deleted


# Settings that may change between attempts of one run: they change how the run is launched, logged, saved or
# evaluated, or how the same numbers are computed, never the numbers. Every other field of the argument
# dataclasses is part of the run identity (default-deny), so an argument added later (by this script or by
# transformers) is compared on resume unless it is listed here with its reason.
MAY_CHANGE = {
    # Where the run lives and how it is launched on this machine.
    "output_dir": "the folder may be moved",
    "overwrite_output_dir": "decides whether to start again, not what is computed",
    "resume_from_checkpoint": "refused anyway: run_clm resumes by itself",
    "local_rank": "differs from rank to rank",
    "use_cpu": "the same computation on another device",
    "do_train": "always true (false is refused)", "do_eval": "unused by run_clm (--eval_strategy decides)",
    "do_predict": "always false (true is refused)",
    # The split of an unchanged global batch: sequences per optimizer step over all ranks
    # (`sequences_per_step`, `patch_sequences_per_step`) are compared instead.
    "per_device_train_batch_size": "compared as sequences_per_step",
    "gradient_accumulation_steps": "compared as sequences_per_step",
    "patch_per_device_train_batch_size": "compared as patch_sequences_per_step",
    "patch_gradient_accumulation_steps": "compared as patch_sequences_per_step",
    # How the same data is read and cached.
    "data_cache_dir": "where the token cache lives (its key holds what determines its tokens)",
    "tokenize_batch_size": "documents per tokenizer call: the same tokens",
    "preprocessing_num_workers": "processes that tokenise: the same tokens",
    "dataloader_num_workers": "loader processes", "dataloader_pin_memory": "loader memory",
    "dataloader_persistent_workers": "loader processes", "dataloader_prefetch_factor": "loader queue",
    "dataloader_multiprocessing_context": "loader processes",
    # Memory and speed only: the same values computed another way.
    "attn_implementation": "the attention kernel (eager, SDPA, FlashAttention-2) of the same function",
    "gradient_checkpointing": "recomputes the same activations", "gradient_checkpointing_kwargs": "idem",
    "activation_checkpointing": "recomputes the same activations", "activation_checkpointing_kwargs": "idem",
    "torch_empty_cache_steps": "frees cached memory",
    "ddp_timeout": "a timeout", "ddp_backend": "the transport", "ddp_bucket_cap_mb": "communication buckets",
    "ddp_find_unused_parameters": "a DDP check", "ddp_static_graph": "a DDP optimisation",
    "skip_memory_metrics": "reporting",
    # Logging and progress.
    "logging_strategy": "logging cadence", "logging_steps": "logging cadence", "logging_first_step": "logging",
    "log_on_each_node": "logging", "log_level": "logging", "log_level_replica": "logging", "disable_tqdm": "progress bar",
    "include_num_input_tokens_seen": "logging", "report_to": "where logs go",
    "project": "a label", "trackio_space_id": "where logs go", "trackio_bucket_id": "where logs go",
    "trackio_static_space_id": "where logs go",
    # Saving and pushing.
    "save_strategy": "saving cadence", "save_steps": "saving cadence", "save_total_limit": "checkpoints kept",
    "save_on_each_node": "saving", "save_only_model": "what a checkpoint holds", "enable_jit_checkpoint": "saving",
    "push_to_hub": "publishing", "hub_token": "a secret: never recorded", "hub_private_repo": "publishing",
    "hub_model_id": "publishing", "hub_strategy": "publishing", "hub_always_push": "publishing",
    "hub_revision": "publishing",
    # Evaluation cadence (what is evaluated, --validation_file and --max_eval_blocks, is compared).
    "eval_strategy": "evaluation cadence", "eval_steps": "evaluation cadence", "eval_delay": "evaluation cadence",
    "eval_on_start": "evaluation cadence", "per_device_eval_batch_size": "evaluation batching: the same mean loss",
    "eval_accumulation_steps": "evaluation memory", "eval_do_concat_batches": "evaluation memory",
    "eval_use_gather_object": "evaluation gathering",
}


def identity_value(value):
    """A setting as JSON: enums by their value, dataclasses and dicts as sorted dicts, sequences as lists,
    other objects by their str."""
    import dataclasses
    import enum

    if isinstance(value, enum.Enum):
        return identity_value(value.value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): identity_value(v) for k, v in sorted(value.items(), key=lambda item: str(item[0]))}
    if isinstance(value, (list, tuple)):
        return [identity_value(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def run_identity(arguments, derived: dict | None = None) -> dict:
    """What defines a run: every init field of the argument dataclasses `arguments` (parsed argument objects),
    JSON-normalised, except those on `MAY_CHANGE`, plus the `derived` entries (e.g. `batch_identity`). A re-run
    with the same identity resumes; a different one is refused (`check_same_run`)."""
    import dataclasses

    identity = {}
    for obj in arguments:
        for f in dataclasses.fields(obj):
            if f.init and f.name not in MAY_CHANGE:
                identity[f.name] = identity_value(getattr(obj, f.name))
    identity.update(derived or {})
    return identity


def batch_identity(patch_args, training_args) -> dict:
    """The global batches, which per-device batch, accumulation and world size may split differently between
    attempts: sequences per optimizer step over all ranks, of each stage (None without a patch stage).
    UsageError (from `stage_batch_settings`) when the patch stage's batch cannot be derived. Under DeepSpeed the
    world size is part of it too (`deepspeed_world_size`, None otherwise): ZeRO partitions the optimizer state
    over the ranks and cannot load a checkpoint written by another number of them (a ZeRORuntimeException
    traceback after the resume had started)."""
    return {
        "deepspeed_world_size": training_args.world_size if training_args.deepspeed else None,
        "sequences_per_step": global_batch_size(training_args),
        "patch_sequences_per_step": (
            math.prod(stage_batch_settings(patch_args, training_args)) * training_args.world_size
            if patch_args.patch_data_fraction > 0 else None
        ),
    }


def data_files_identity(data_args) -> dict:
    """The files that the folders and glob patterns of --train_file and --validation_file expand to, in order
    (`readers.expand_data_files`): a new shard matched by the same pattern is another run."""
    def files(spec, argument):
        return expand_data_files(spec, argument) if spec else None

    return {"train_files": files(data_args.train_file, "train_file"),
            "validation_files": files(data_args.validation_file, "validation_file")}


def same_setting(old, new) -> bool:
    """Whether a recorded setting equals the current one. Records written before the identity was derived from
    the parsed arguments held enums as str(enum) ("SchedulerType.LINEAR" for "linear")."""
    if old == new:
        return True
    return isinstance(old, str) and isinstance(new, str) and "." in old and old.rsplit(".", 1)[1].lower() == new.lower()


def check_same_run(output_dir: str, identity: dict) -> None:
    """Refuse to resume or report a run recorded in `output_dir` with another identity, naming each changed
    setting with its old and new value. Keys the record does not hold (a run from an earlier version of this
    script, whose record held fewer settings) are not compared."""
    details = run_changes(output_dir, identity)
    if details:
        raise UsageError(
            f"--output_dir {output_dir} holds a different run ({details}): choose another directory "
            "or pass --overwrite_output_dir"
        )


def run_changes(output_dir: str, identity: dict) -> str | None:
    """The settings in which `identity` differs from the run recorded in `output_dir`, each as `describe_change`
    says it, joined by "; "; None where none differs or nothing is recorded (see `check_same_run`)."""
    record = Path(output_dir) / RUN_ARGS_FILE
    if not record.is_file():
        return None
    previous = json.loads(record.read_text())
    changed = {k: (previous[k], v) for k, v in identity.items() if k in previous and not same_setting(previous[k], v)}
    return "; ".join(describe_change(k, old, new) for k, (old, new) in changed.items()) or None


def describe_change(name: str, old, new) -> str:
    """`name: old -> new`; for two dicts (per-file fingerprints, a model config) only the entries that differ,
    at most five, so that a changed shard among thousands is named in a line of readable length."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return f"{name}: {old!r} -> {new!r}"
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k, "(absent)") != new.get(k, "(absent)")]
    parts = [f"{k} {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}" for k in keys[:5]]
    more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
    return f"{name}: {', '.join(parts)}{more}"


# What this script writes into an output folder (and a stage folder), itself or through the Trainer and
# save_pretrained: fnmatch patterns of the names of the entries. Only these are ever deleted, and only from a
# folder this script claimed (RUN_ARGS_FILE).
OWN_OUTPUTS = (
    RUN_ARGS_FILE, ALL_RESULTS_FILE, STAGE_COMPLETE_FILE, "*.json.tmp-*",
    "trainer_state.json", "training_args.bin", "config.json", "generation_config.json",
    "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "added_tokens.json",
    "chat_template.jinja", "checkpoint-*", "runs", PATCH_STAGE_DIR, STREAM_INDEX_FILE,
)


def is_own_output(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in OWN_OUTPUTS)


def refuse_input_folders(folders: list[Path], inputs: list[Path]) -> None:
    """UsageError when one of the resolved `inputs` is one of the resolved `folders` the run writes in (its output
    folder, its patch_stage/): the run's outputs would replace or delete the model, tokenizer, data or cache it
    reads."""
    for folder in folders:
        if folder in inputs:
            raise UsageError(
                f"{folder} is an input of this run (the model, tokenizer, data or cache it reads) and the folder where "
                "it writes its outputs, which would replace or delete it: choose another --output_dir"
            )


def check_output_not_an_input(output_dir: str, inputs) -> None:
    """`refuse_input_folders` for the output folder and its patch_stage/ (before anything else looks at them)."""
    folder = Path(output_dir).resolve()
    refuse_input_folders([folder, folder / PATCH_STAGE_DIR], [Path(p).resolve() for p in inputs])


def sort_entries(folder: Path, inputs: list[Path], claimed: bool) -> tuple[list[Path], list[Path], list[Path]]:
    """Sort what `folder` holds into (this script's outputs, the run's inputs and the entries holding them,
    foreign entries). Outputs are named as in OWN_OUTPUTS and lie in a `claimed` folder. UsageError where an
    input lies where the run writes (it would be overwritten or deleted), the folder itself included (a run
    continuing from the model in its own --output_dir, or from its patch_stage/)."""
    refuse_input_folders([folder], inputs)
    own, kept, foreign = [], [], []
    for child in sorted(folder.iterdir()):
        if child.name == LOCK_FILE:  # the lock this run holds: neither a foreign file nor deleted
            continue
        inside = [p for p in inputs if p == child or child in p.parents]
        if inside and child.name == PATCH_STAGE_DIR and child.is_dir():
            sub_own, sub_kept, sub_foreign = sort_entries(child, inputs, claimed)
            own += sub_own
            kept += sub_kept
            foreign += sub_foreign
        elif inside and is_own_output(child.name):
            raise UsageError(
                f"{inside[0]} is an input of this run but lies at {child}, where the run writes its outputs: move it "
                "or choose another --output_dir"
            )
        elif inside:
            kept.append(child)
        elif claimed and is_own_output(child.name):
            own.append(child)
        else:
            foreign.append(child)
    return own, kept, foreign


def check_output_folder(output_dir: str, identity: dict, overwrite: bool, inputs=()) -> list[Path]:
    """Check that this run may use `output_dir`, changing nothing; returns what claiming it will delete
    (`claim_output_dir`): with `overwrite`, this script's own outputs of an earlier run.

    An empty or new folder, or one holding only this run's `inputs` (paths: data files, model config,
    tokenizer, token cache), may be claimed. A folder this script claimed before resumes (the same identity, else
    UsageError) or, with `overwrite`, loses this script's own outputs (OWN_OUTPUTS) and nothing else. Anything
    else in the folder (files this script did not write) is refused with or without `overwrite`, naming it, and
    left untouched; so is an input lying where the run writes (its output folder's config.json, say)."""
    path = Path(output_dir)
    if not path.is_dir():
        return []
    claimed = (path / RUN_ARGS_FILE).is_file()
    inputs = [Path(p).resolve() for p in inputs]
    own, kept, foreign = sort_entries(path.resolve(), inputs, claimed)
    if foreign and (overwrite or not claimed):
        names = ", ".join(str(p.relative_to(path.resolve())) + ("/" if p.is_dir() else "") for p in foreign[:5])
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise UsageError(
            f"--output_dir {output_dir} holds files this script did not write ({names}{more}): move them or "
            "choose another directory (--overwrite_output_dir only replaces this script's own outputs)"
        )
    if claimed and not overwrite:
        if has_progress(path):
            check_same_run(output_dir, identity)
        else:  # a run that failed before its first checkpoint: nothing to resume or to lose
            details = run_changes(output_dir, identity)
            if details:
                logger.warning("--output_dir %s holds a different run (%s); it made no progress (no checkpoint, no "
                               "model): this run takes the folder over", output_dir, details)
    return own if claimed and overwrite else []


# What a run leaves once it has made progress, in the output folder or its patch_stage/: a checkpoint, a
# stage's model, its results. A claimed folder without any was left by a run that failed before its first
# checkpoint (say a model that does not load), and a changed command may take it over.
PROGRESS = ("checkpoint-*", ALL_RESULTS_FILE, STAGE_COMPLETE_FILE, "model.safetensors", "model-*-of-*.safetensors",
            "model.safetensors.index.json", "pytorch_model*.bin")


def has_progress(output_dir: Path) -> bool:
    """Whether the run recorded in `output_dir` has anything to resume from or keep (`PROGRESS`)."""
    return any(any(folder.glob(pattern)) for folder in (output_dir, output_dir / PATCH_STAGE_DIR) if folder.is_dir()
               for pattern in PROGRESS)


def claim_output_dir(output_dir: str, identity: dict, outdated: list[Path], is_main: bool) -> None:
    """Claim `output_dir` for this run: the main process deletes `outdated` (what `check_output_folder`
    returned) and records the run's identity (RUN_ARGS_FILE). Called once every input has been read, so that
    bad data never costs the outputs of an earlier run."""
    if not is_main:
        return
    if outdated:
        logger.warning("--overwrite_output_dir: deleting this script's outputs in %s (%s)", output_dir,
                       ", ".join(p.name for p in outdated))
        for child in outdated:
            if child.exists():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(output_dir) / RUN_ARGS_FILE, identity)


def prepare_output_dir(output_dir: str, identity: dict, overwrite: bool, is_main: bool, inputs=()) -> None:
    """`check_output_folder` then `claim_output_dir`, at once."""
    claim_output_dir(output_dir, identity, check_output_folder(output_dir, identity, overwrite, inputs), is_main)


@contextlib.contextmanager
def output_dir_lock(output_dir: str, is_main: bool):
    """Hold an exclusive lock on `output_dir` (its LOCK_FILE, via `filelock`) in the main process while the run
    uses it, so that a second run started into the same folder is refused (UsageError) instead of resuming
    from, and rotating away, the checkpoints the first is writing. Creates the folder. Other processes of the
    run hold nothing (they follow the main one). An advisory lock: on a network file system it holds where the
    file system supports `flock`."""
    if not is_main:
        yield
        return
    from filelock import FileLock, Timeout

    Path(output_dir).mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(Path(output_dir) / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UsageError(
            f"--output_dir {output_dir} is in use by another run (it holds {LOCK_FILE}): wait for it to end, or "
            "choose another directory"
        ) from None
    try:
        yield
    finally:
        lock.release()


def write_json_atomic(path, payload: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with naming_file(tmp), open(tmp, "w", encoding="utf-8") as handle:
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


def check_resumable(folder: Path) -> None:
    """UsageError for a complete checkpoint that holds only the model: saved with --save_only_model true, it
    lacks the optimizer, scheduler and RNG states (transformers' `_save_checkpoint` writes the RNG state, as
    rng_state.pth or rng_state_<rank>.pth, exactly when it saves them), so training cannot continue exactly
    from it; transformers would go on with a fresh optimizer without a word."""
    if not any(folder.glob("rng_state*.pth")):
        raise UsageError(
            f"{folder} holds only the model (saved with --save_only_model true: no optimizer, scheduler or RNG "
            "state), so the run cannot resume from it exactly: pass --overwrite_output_dir to start over"
        )


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint-N of `output_dir` that a resume can load; newer damaged ones are skipped with a
    warning (and left in place). None if there is none."""
    if not os.path.isdir(output_dir):
        return None
    numbered = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    for candidate in sorted(numbered, key=lambda p: int(p.name.split("-", 1)[1]), reverse=True):
        problem = checkpoint_problem(candidate)
        if problem is None:
            check_resumable(candidate)
            return str(candidate)
        logger.warning("Not resuming from %s: %s (a save that did not finish?)", candidate, problem)
    return None
