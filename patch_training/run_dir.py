"""A run's life on disk, in one owner (`RunDir`): the output folder's rules, the run's recorded identity, the
lock, which checkpoint a stage resumes from, and what marks a stage or the job complete.

The life of an output folder:

1. `RunDir.open` checks the folder before anything is read: given, not under a file, not where the data
   reads, not one of the run's inputs; and computes the run's identity (`identity.job_identity`).
2. A folder holding a finished run (`all_results.json`) of the same identity reports it and changes nothing
   (`finished`, `report_finished`); a different run is refused.
3. `locked()` holds the folder's lock (a second run into it is refused) and checks what the folder holds: a new
   or empty folder, one this script claimed for the same run (resumed), or with --overwrite_output_dir one whose
   own outputs will be deleted; files it did not write are refused, never deleted.
4. `claim()`, once every input has been read: an overwritten run's outputs are deleted and the identity is
   recorded (`run_args.json`). Bad data never costs a finished model.
5. Each stage: `resume_point(plan)` says whether the stage is complete (its `stage_complete.json`), which
   checkpoint it resumes from (the newest complete one), or that it starts afresh;
   `mark_stage_complete` records a finished stage.
6. `finish(results)` writes `all_results.json`, which marks the job complete, and prints the summary.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .cli import UsageError, first_line, folder_problem, write_json_atomic
from .identity import identity_changes, job_identity
from .readers import pattern_may_reach, split_file_list
from .results import report

logger = logging.getLogger("run_clm")

PATCH_STAGE_DIR = "patch_stage"
STAGE_COMPLETE_FILE = "stage_complete.json"
RUN_ARGS_FILE = "run_args.json"
ALL_RESULTS_FILE = "all_results.json"
STAGE_PROGRESS_FILE = "stage_progress.json"  # in each checkpoint: the stage's figures up to it (trainer.StageProgress)
MODEL_CARD_FILE = "README.md"  # beside each saved model (model_card.write_model_card); what --push_to_hub uploads
STREAM_INDEX_FILE = "stream_index.jsonl"  # --streaming: tokens per part of the data (blocks.StreamingTokenBlocks)
LOCK_FILE = ".run_clm.lock"  # held by the run using the folder (`output_dir_lock`); never deleted

# What this script writes into an output folder (and a stage folder), itself or through the Trainer and
# save_pretrained: fnmatch patterns of the names of the entries. Only these are ever deleted, and only from a
# folder this script claimed (RUN_ARGS_FILE).
OWN_OUTPUTS = (
    RUN_ARGS_FILE, ALL_RESULTS_FILE, STAGE_COMPLETE_FILE, "*.json.tmp-*",
    "trainer_state.json", "training_args.bin", "config.json", "generation_config.json",
    "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "added_tokens.json",
    "chat_template.jinja", "checkpoint-*", "runs", PATCH_STAGE_DIR, STREAM_INDEX_FILE, MODEL_CARD_FILE,
)

# What a run leaves once it has made progress, in the output folder or its patch_stage/: a checkpoint, a
# stage's model, its results. A claimed folder without any was left by a run that failed before its first
# checkpoint (say a model that does not load), and a changed command may take it over.
PROGRESS = ("checkpoint-*", ALL_RESULTS_FILE, STAGE_COMPLETE_FILE, "model.safetensors", "model-*-of-*.safetensors",
            "model.safetensors.index.json", "pytorch_model*.bin")


# ---------------------------------------------------------------------------------------------------------
# The owner
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResumePoint:
    """Where a stage stands on disk: `complete` holds its record (`stage_complete.json`) when the stage is done,
    else `checkpoint` is the folder it resumes from, or None to start afresh."""

    complete: dict | None = None
    checkpoint: str | None = None


class RunDir:
    """The output folder of one run (see the module docstring for its life). Every process of a multi-process
    run makes one; only the main process (`training_args.should_save`) writes, locks, deletes or prints."""

    def __init__(self, output_dir: str, identity: dict, inputs: list[str], training_args):
        self.output_dir = output_dir
        self.identity = identity
        self.inputs = inputs
        self.training_args = training_args
        self._outdated: list[Path] = []

    @classmethod
    def open(cls, args, inputs) -> RunDir:
        """The run folder of run_clm.py's JobArguments `args` (model, data, patch, training) with the loaded
        `inputs` (`job.JobInputs`), checked (`check_output_dir`, `check_output_outside_data`, not one of the run's
        inputs). UsageError for a folder the run cannot use."""
        output_dir = check_output_dir(args.data, args.training)
        check_output_outside_data(output_dir, args.data)
        paths = input_paths(args.model, args.data, args.training)
        check_output_not_an_input(output_dir, paths)
        return cls(output_dir, job_identity(args, inputs), paths, args.training)

    @property
    def is_main(self) -> bool:
        return self.training_args.should_save

    @property
    def results_file(self) -> Path:
        return Path(self.output_dir) / ALL_RESULTS_FILE

    @property
    def stream_index_file(self) -> str:
        return os.path.join(self.output_dir, STREAM_INDEX_FILE)

    @property
    def finished(self) -> bool:
        """Whether the folder holds a finished job (its all_results.json) that this run would only report."""
        return self.results_file.is_file() and not self.training_args.overwrite_output_dir

    def report_finished(self) -> dict:
        """The recorded results of the finished job in the folder, printed; UsageError if it is another run."""
        check_same_run(self.output_dir, self.identity)
        results = json.loads(self.results_file.read_text())
        if self.training_args.should_log:
            logger.info("%s already holds a finished run; nothing to do (use --overwrite_output_dir to redo it)",
                        self.output_dir)
            report(results, self.results_file)
        return results

    @contextlib.contextmanager
    def locked(self):
        """Hold the folder's lock while the run uses it (`output_dir_lock`) and check what it holds
        (`check_output_folder`); UsageError for a folder in use or holding what the run may not touch."""
        with output_dir_lock(self.output_dir, self.is_main):
            with self.training_args.main_process_first(desc="output directory"):
                self._outdated = check_output_folder(self.output_dir, self.identity,
                                                     self.training_args.overwrite_output_dir, inputs=self.inputs)
            yield self

    def claim(self) -> None:
        """Claim the folder for this run (`claim_output_dir`): called once every input has been read."""
        with self.training_args.main_process_first(desc="output directory"):
            claim_output_dir(self.output_dir, self.identity, self._outdated, self.is_main)

    def stage_dir(self, plan) -> str:
        """The folder of the stage `plan` (a `stages.StagePlan`): `<output_dir>/patch_stage` for the patch stage,
        the output folder itself for the token stage (whose model is the job's)."""
        return os.path.join(self.output_dir, PATCH_STAGE_DIR) if plan.name == "patch" else self.output_dir

    def resume_point(self, plan) -> ResumePoint:
        """Where the stage `plan` starts: complete (its marker, patch stage only: the token stage's completion is
        the job's, `finished`), from its newest complete checkpoint (`last_complete_checkpoint`), or afresh."""
        marker = Path(self.stage_dir(plan)) / STAGE_COMPLETE_FILE
        if plan.name == "patch" and marker.is_file():
            logger.info("The patch stage is complete (%s): going straight to the token stage", marker)
            return ResumePoint(complete=json.loads(marker.read_text()))
        checkpoint = last_complete_checkpoint(self.stage_dir(plan))
        if checkpoint:
            logger.info("Resuming the %s stage from %s", plan.name, checkpoint)
        return ResumePoint(checkpoint=checkpoint)

    def mark_stage_complete(self, plan, record: dict) -> None:
        """Record that the stage `plan` is complete, with its `record` (written last, after its model)."""
        if self.is_main:
            write_json_atomic(Path(self.stage_dir(plan)) / STAGE_COMPLETE_FILE, record)

    def finish(self, results: dict) -> dict:
        """Write the job's `results` to all_results.json (which marks the job complete) and print the summary."""
        if self.is_main:
            write_json_atomic(self.results_file, results)
            report(results, self.results_file)
        return results


# ---------------------------------------------------------------------------------------------------------
# Checks of the folder against the arguments, before anything is read
# ---------------------------------------------------------------------------------------------------------


def check_output_dir(data_args, training_args) -> str:
    """The output folder, checked: given, not a path under a file (nor is the cache folder), and no
    --resume_from_checkpoint (this script resumes by itself)."""
    output_dir = training_args.output_dir
    if output_dir is None:
        raise UsageError("give --output_dir")
    if training_args.resume_from_checkpoint is not None:
        raise UsageError(
            "--resume_from_checkpoint is not used: run_clm.py resumes by itself from the newest complete checkpoint "
            "in --output_dir (and goes straight to the token stage once the patch stage is complete); re-run the "
            "same command"
        )
    for name, folder in (("output_dir", output_dir), ("data_cache_dir", data_args.data_cache_dir)):
        problem = folder_problem(f"--{name}", folder)
        if problem:
            raise UsageError(problem)
    return output_dir


def input_paths(model_args, data_args, training_args) -> list[str]:
    """The local paths that the run reads (data files, model config or weights, tokenizer, token cache,
    DeepSpeed config): never deleted or written over, even inside --output_dir."""
    paths = [model_args.config_name, model_args.model_name_or_path, model_args.tokenizer_name, data_args.data_cache_dir]
    for spec in (data_args.train_file, data_args.validation_file):
        paths += split_file_list(spec or "")  # 'a,b' or a JSON list
    if isinstance(training_args.deepspeed, str):
        paths.append(training_args.deepspeed)
    return [p.strip() for p in paths if p and p.strip() and os.path.exists(p.strip())]


def check_output_outside_data(output_dir: str, data_args) -> None:
    """UsageError when --output_dir lies where --train_file or --validation_file reads: in a folder it names, or
    where one of its glob patterns can reach (`data/*` reads a folder `data/run`, `data/**/*.json` the files in it;
    `readers.pattern_may_reach`), whether the output folder exists yet or not. The run's own outputs (its JSON
    files, checkpoints) would be read as data by the next attempt, which would then be refused as another run or
    train on them."""
    output = Path(output_dir).resolve()
    for name, spec in (("train_file", data_args.train_file), ("validation_file", data_args.validation_file)):
        for entry in split_file_list(spec or ""):  # 'a,b' or a JSON list
            if glob.has_magic(entry):
                inside, what = pattern_reaches(entry, output_dir), f"{entry}, a pattern"
            else:
                resolved = Path(entry).resolve()
                inside, what = os.path.isdir(entry) and (output == resolved or resolved in output.parents), f"{entry}, a folder"
            if inside:
                raise UsageError(
                    f"--output_dir {output_dir} lies in {what} that --{name} reads: the run's outputs "
                    "would become its data on the next attempt; choose an --output_dir outside it"
                )


def pattern_reaches(pattern: str, output_dir: str) -> bool:
    """Whether the glob `pattern` may match `output_dir` or a path inside it, as written or with the pattern's
    existing leading folders' symbolic links resolved."""
    parts = Path(pattern).parts  # the pattern from its first folder that exists, symbolic links resolved
    base = next(i for i in range(len(parts), -1, -1) if not glob.has_magic(os.path.join("", *parts[:i])))
    resolved = os.path.join(os.path.realpath(os.path.join(".", *parts[:base])), *parts[base:])
    return pattern_may_reach(pattern, output_dir) or pattern_may_reach(resolved, str(Path(output_dir).resolve()))


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


# ---------------------------------------------------------------------------------------------------------
# What a folder holds: the recorded run, its own outputs, foreign files
# ---------------------------------------------------------------------------------------------------------


def check_same_run(output_dir: str, identity: dict) -> None:
    """Refuse to resume or report a run recorded in `output_dir` with another identity, naming each changed
    setting with its old and new value (`identity.identity_changes`)."""
    details = run_changes(output_dir, identity)
    if details:
        raise UsageError(
            f"--output_dir {output_dir} holds a different run ({details}): choose another directory "
            "or pass --overwrite_output_dir"
        )


def run_changes(output_dir: str, identity: dict) -> str | None:
    """How `identity` differs from the run recorded in `output_dir` (`identity.identity_changes`); None where
    nothing differs or nothing is recorded."""
    record = Path(output_dir) / RUN_ARGS_FILE
    if not record.is_file():
        return None
    return identity_changes(json.loads(record.read_text()), identity)


def is_own_output(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in OWN_OUTPUTS)


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


def has_progress(output_dir: Path) -> bool:
    """Whether the run recorded in `output_dir` has anything to resume from or keep (`PROGRESS`)."""
    return any(any(folder.glob(pattern)) for folder in (output_dir, output_dir / PATCH_STAGE_DIR) if folder.is_dir()
               for pattern in PROGRESS)


def claim_output_dir(output_dir: str, identity: dict, outdated: list[Path], is_main: bool) -> None:
    """Claim `output_dir` for this run: the main process deletes `outdated` (what `check_output_folder`
    returned) and records the run's identity (RUN_ARGS_FILE)."""
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


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------


# A checkpoint is resumable when everything a resume loads is there and readable: the Trainer's state, this
# project's stage progress, the weights, the optimizer and scheduler states (and the RNG states, whose absence
# marks a checkpoint saved with --save_only_model). transformers writes a checkpoint in place, its
# trainer_state.json last, so a job killed while saving, a full disk or a lost file leaves one that is not.


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` (a checkpoint-N) cannot be resumed from exactly, or None. Reads only headers: each
    safetensors file's, each torch archive's central directory (written last: a file cut short has none), the two
    JSON records whole."""
    for record in ("trainer_state.json", STAGE_PROGRESS_FILE):
        if not (folder / record).is_file():
            return f"no {record}"
        try:
            json.loads((folder / record).read_text(encoding="utf-8"))
        except ValueError:
            return f"{record} is not valid JSON"
    return weights_problem(folder) or optimizer_problem(folder)


def weights_problem(folder: Path) -> str | None:
    """Why the model weights of the checkpoint `folder` cannot be loaded, or None: the safetensors file, or every
    shard its index names, with a readable header; or PyTorch's archive; or a DeepSpeed or FSDP sharded layout."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, AttributeError):
            return f"{index.name} is not a valid index"
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    elif (folder / "pytorch_model.bin").is_file():
        return archive_problem(folder / "pytorch_model.bin")
    elif deepspeed_tag(folder) is not None or any(folder.glob("pytorch_model_fsdp*")):
        return None  # the weights live in DeepSpeed's global_step*/ or FSDP's shards, checked with the optimizer
    else:
        return "no model weights (model.safetensors)"
    for shard in shards:
        problem = safetensors_problem(folder / shard)
        if problem:
            return problem
    return None


def optimizer_problem(folder: Path) -> str | None:
    """Why the optimizer and scheduler states of the checkpoint `folder` cannot be loaded, or None: DeepSpeed's
    tagged folder (`latest` names it) with every archive readable, FSDP's optimizer file or shards, or
    optimizer.pt; and scheduler.pt (DeepSpeed keeps a scheduler of its own config in its folder instead)."""
    tag = deepspeed_tag(folder)
    if tag is not None:
        states = folder / tag
        if not states.is_dir():
            return f"no {tag}/ (named by DeepSpeed's `latest`)"
        for archive in sorted(states.glob("*.pt")):
            problem = archive_problem(archive)
            if problem:
                return problem
        return archive_problem(folder / "scheduler.pt") if (folder / "scheduler.pt").exists() else None
    sharded = sorted(p for p in folder.glob("optimizer_*") if p.is_dir())
    if sharded:
        problem = None if all((p / ".metadata").is_file() for p in sharded) else f"{sharded[0].name}/ has no .metadata"
    elif (folder / "optimizer.bin").is_file():
        problem = archive_problem(folder / "optimizer.bin")
    else:
        problem = archive_problem(folder / "optimizer.pt")
    return problem or archive_problem(folder / "scheduler.pt")


def deepspeed_tag(folder: Path) -> str | None:
    """The folder of DeepSpeed's states in a checkpoint (`global_stepN`, named by its `latest` file), or None
    where the checkpoint was not saved by DeepSpeed."""
    latest = folder / "latest"
    return latest.read_text(encoding="utf-8").strip() if latest.is_file() else None


def archive_problem(path: Path) -> str | None:
    """Why the torch.save archive `path` cannot be loaded, or None: missing, or cut short (a zip archive's central
    directory is written last)."""
    import zipfile

    if not path.is_file():
        return f"no {path.name}"
    try:
        with zipfile.ZipFile(path):
            return None
    except (zipfile.BadZipFile, OSError) as error:
        return f"{path.name} is unreadable ({first_line(error)})"


def safetensors_problem(path: Path) -> str | None:
    """Why the safetensors file `path` cannot be loaded, or None: missing, or its header unreadable."""
    from safetensors import safe_open

    if not path.is_file():
        return f"no {path.name}"
    try:
        with safe_open(str(path), "pt") as handle:
            handle.keys()
    except Exception as error:  # safetensors raises its own error type for a damaged file
        return f"{path.name} is unreadable ({first_line(error)})"
    return None


def check_resumable(folder: Path) -> None:
    """UsageError for a checkpoint that holds only the model: saved with --save_only_model true, it lacks the
    optimizer, scheduler and RNG states (transformers' `_save_checkpoint` writes the RNG state, as rng_state.pth
    or rng_state_<rank>.pth, exactly when it saves them), so training cannot continue exactly from it;
    transformers would go on with a fresh optimizer without a word."""
    saved_whole = (folder / "trainer_state.json").is_file() and weights_problem(folder) is None  # state: written last
    training_state = ("rng_state*.pth", "optimizer*", "scheduler.pt", "latest")
    if saved_whole and not any(any(folder.glob(pattern)) for pattern in training_state):
        raise UsageError(
            f"{folder} holds only the model (saved with --save_only_model true: no optimizer, scheduler or RNG "
            "state), so the run cannot resume from it exactly: pass --overwrite_output_dir to start over"
        )


def numbered_checkpoints(output_dir: str) -> list[Path]:
    """The checkpoint-N folders of `output_dir`, newest (highest N) first."""
    if not os.path.isdir(output_dir):
        return []
    numbered = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted(numbered, key=lambda p: int(p.name.split("-", 1)[1]), reverse=True)


def checkpoints_to_delete(output_dir: str, limit: int | None, protected: str | None = None) -> list[Path]:
    """The checkpoints of `output_dir` that --save_total_limit `limit` lets go: all but the newest `limit`
    complete ones (and `protected`, transformers' best checkpoint), incomplete ones included. The newest complete
    checkpoint is never among them, whatever newer incomplete ones a killed attempt left. [] without a limit."""
    if limit is None or limit <= 0:
        return []
    kept, delete = 0, []
    for checkpoint in numbered_checkpoints(output_dir):
        complete = checkpoint_problem(checkpoint) is None
        if complete and kept < limit:
            kept += 1
        elif protected is None or Path(protected).resolve() != checkpoint.resolve():
            delete.append(checkpoint)
    return delete


def last_complete_checkpoint(output_dir: str, quiet: bool = False) -> str | None:
    """The newest checkpoint-N of `output_dir` that a resume can load exactly (`checkpoint_problem`); each newer
    incomplete one is skipped with a warning naming what it lacks (unless `quiet`) and left in place. None if there
    is none. UsageError for a checkpoint saved with --save_only_model (`check_resumable`)."""
    checkpoints = numbered_checkpoints(output_dir)
    for candidate in checkpoints:
        check_resumable(candidate)
        problem = checkpoint_problem(candidate)
        if problem is None:
            return str(candidate)
        if not quiet:
            logger.warning("Not resuming from %s: %s (a save that did not finish, or a file lost since); trying the "
                           "next older checkpoint", candidate, problem)
    if checkpoints and not quiet:
        logger.warning("No complete checkpoint in %s: the stage starts from its beginning", output_dir)
    return None
