"""The command line: one-line errors for bad input (`UsageError`, exit code 2), JSON config files checked
against the argument dataclasses, and the wrapper that turns an entry point into a command."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path


# Exit codes of the command-line programs (`run_cli`).
EXIT_FAILED = 1  # a stage stopped early for another reason than a signal, or an unexpected error
EXIT_WRITE_FAILURE = 1  # a file could not be written (disk full, permissions): the environment, not the input
EXIT_USAGE = 2  # bad input, refused before any work is lost
EXIT_DIVERGED = 3  # training met a non-finite loss, gradient norm or weights: re-running the same command won't help
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: stopped early with its state saved; re-running the same command resumes
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as the shell reports it)


class UsageError(ValueError):
    """Bad input from the user: reported as one clear line and exit code 2, before any work is lost."""


class RunStopped(Exception):
    """A run that stopped before its plan, on purpose: reported as its one-line message and `exit_code`."""

    exit_code = EXIT_PREEMPTED


class Preempted(RunStopped):
    """Stopped early (a preemption signal, or a stage that returned before its planned steps), its state saved:
    re-running the same command resumes it (exit code EXIT_PREEMPTED)."""

    exit_code = EXIT_PREEMPTED


class StoppedEarly(RunStopped):
    """A stage returned before its planned steps without a preemption signal (a callback's control flag, data
    that ran out): not marked complete, its state saved (exit code EXIT_FAILED)."""

    exit_code = EXIT_FAILED


class Diverged(RunStopped):
    """Training met a non-finite loss, gradient norm or weights: stopped before anything non-finite was saved
    (exit code EXIT_DIVERGED)."""

    exit_code = EXIT_DIVERGED


def file_in_the_way(path: str | Path) -> Path | None:
    """The file that stops `path` from being (or becoming) a folder: `path` itself or its nearest existing
    ancestor, when that is not a folder (a file, or a link to nothing: os.makedirs fails on both); None otherwise.
    The path is taken as given (relative to the current folder)."""
    path = Path(path)
    nearest = next((p for p in [path, *path.parents] if os.path.lexists(p)), None)
    return nearest if nearest is not None and not nearest.is_dir() else None


def folder_problem(flag: str, folder: str | Path | None) -> str | None:
    """Why `folder` cannot be (or become) a folder, as a one-line message naming `flag`
    ("--data_cache_dir x/y: x is a file, not a folder"), or None: see `file_in_the_way`. os.makedirs would end
    the program with a FileExistsError or NotADirectoryError traceback."""
    if not folder:
        return None
    blocking = file_in_the_way(folder)
    if blocking is None:
        return None
    what = "a link to nothing" if os.path.islink(blocking) and not os.path.exists(blocking) else "a file"
    return f"{flag} {folder}: {blocking} is {what}, not a folder"


def refuse_below(arguments, names: tuple[str, ...], minimum: int) -> None:
    """UsageError naming the first of the `arguments` fields `names` set below `minimum` (None: unset, fine).
    NaN is refused too: it compares false with every number, so `value < minimum` alone would let it through."""
    for name in names:
        value = getattr(arguments, name)
        if isinstance(value, float) and math.isnan(value):
            raise UsageError(f"--{name} must be a number, got nan")
        if value is not None and value < minimum:
            raise UsageError(f"--{name} must be >= {minimum}, got {value}")


# Float arguments for which +inf means something: each with the reason. Every other float argument of every
# argument dataclass must be finite (`refuse_non_finite`); NaN is refused everywhere.
INFINITY_MEANS = {
    # Trainer clips with torch's clip_grad_norm_ when max_grad_norm > 0; with inf the clipping factor is
    # min(1, inf / norm) = 1: the gradient norm is measured and logged, nothing is clipped (what transformers
    # itself passes to measure the norm when max_grad_norm is 0).
    "max_grad_norm": "no clipping",
}


def dataclass_field_types(classes: tuple) -> dict[str, tuple]:
    """{field name: the types its annotation allows} over the dataclasses `classes`: `int | None` and
    `Optional[int]` give (int, NoneType), a plain `int` gives (int,), an enum or list its one type."""
    import types
    import typing

    field_types = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            annotation = hints.get(f.name)
            union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
            field_types[f.name] = typing.get_args(annotation) if union else (annotation,)
    return field_types


def blank_as_unset(arguments) -> None:
    """Set every optional text field of the dataclass instance `arguments` (type `str | None`) that holds only
    blanks to None: `--tokenizer_name ""` on the command line, or "" in a config, unsets the value a config file
    gave (the way to drop tiny-patch.json's `config_name` or `tokenizer_name`), as for the fields read by truth
    value; "" would otherwise reach the tokenizer loader as a name."""
    field_types = dataclass_field_types((type(arguments),))
    for f in dataclasses.fields(arguments):
        value = getattr(arguments, f.name, None)
        if set(field_types[f.name]) == {str, type(None)} and isinstance(value, str) and not value.strip():
            setattr(arguments, f.name, None)


def refuse_non_finite(arguments) -> None:
    """UsageError for a NaN or infinite float field of the dataclass instance `arguments` (a flag such as
    `--learning_rate inf`, or `"learning_rate": Infinity` / `NaN` in a config file, which Python's JSON reader
    accepts): torch trains with them without a word and ends in NaN losses, or fails deep inside the optimizer
    or the scheduler. +inf is allowed where it has a meaning (`INFINITY_MEANS`)."""
    for f in dataclasses.fields(arguments):
        value = getattr(arguments, f.name, None)
        if not isinstance(value, float) or math.isfinite(value):
            continue
        if math.isnan(value):
            raise UsageError(f"--{f.name} must be a number, got nan")
        if value > 0 and f.name in INFINITY_MEANS:
            continue
        raise UsageError(f"--{f.name} must be a finite number, got {value}")


class _DuplicateKey(Exception):
    pass


def object_without_duplicates(pairs: list) -> dict:
    """`object_pairs_hook` for json.load(s): a JSON object as a dict, or _DuplicateKey naming a key that it
    holds twice (json keeps the last one without a word)."""
    values = {}
    for key, value in pairs:
        if key in values:
            raise _DuplicateKey(key)
        values[key] = value
    return values


def loads_json_object(text: str, what: str):
    """`json.loads(text)`, refusing a key given twice at any level: UsageError naming `what` and the key."""
    try:
        return json.loads(text, object_pairs_hook=object_without_duplicates)
    except _DuplicateKey as error:
        raise UsageError(f"{what} has the key {error.args[0]!r} twice (JSON would keep only the last one)") from None


def first_line(error: Exception) -> str:
    """The first line of an exception's message (library messages can run to many lines)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def check_config_types(values: dict, source: str, classes: tuple) -> None:
    """Refuse a config value of the wrong type for its field in the dataclasses `classes` (e.g. "block_size":
    "2048") with a message naming the key."""
    expected_types = dataclass_field_types(classes)
    for key, value in values.items():
        options = expected_types.get(key, ())
        simple = [t for t in options if t in (int, float, bool, str, type(None))]
        if len(simple) != len(options) or not simple:
            continue  # enums, lists, dicts: left to transformers' own checks
        if value is None and type(None) in simple:
            continue
        accepted = isinstance(value, bool) if bool in simple else False
        accepted |= str in simple and isinstance(value, str)
        accepted |= int in simple and isinstance(value, int) and not isinstance(value, bool)
        accepted |= float in simple and isinstance(value, (int, float)) and not isinstance(value, bool)
        if not accepted:
            names = " or ".join(t.__name__ for t in simple if t is not type(None))
            raise UsageError(f"config file {source}: key {key!r} must be {names}, got {value!r}")


def load_config_file(path: str, classes: tuple) -> dict:
    """The values of a JSON config file, checked: it exists, parses, has only keys that are fields of the
    dataclasses `classes`, of the right types. File lists given as JSON lists become comma-separated, and a
    list of offset weights its JSON text (as `--patch_offset_weights` takes it)."""
    if not Path(path).is_file():
        raise UsageError(f"config file {path} does not exist")
    with open(path, encoding="utf-8") as handle:
        try:
            values = json.load(handle, object_pairs_hook=object_without_duplicates)
        except json.JSONDecodeError as error:
            raise UsageError(f"config file {path} is not valid JSON: {error}") from None
        except _DuplicateKey as error:
            raise UsageError(
                f"config file {path} has the key {error.args[0]!r} twice (JSON would keep only the last one): remove one"
            ) from None
    if not isinstance(values, dict):
        raise UsageError(f"config file {path} must hold a JSON object of arguments")
    known = {f.name for cls in classes for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"config file {path} has unknown keys: {', '.join(unknown)}")
    for key in ("train_file", "validation_file"):
        if isinstance(values.get(key), list):
            values[key] = ",".join(values[key])
    if isinstance(values.get("patch_offset_weights"), list):  # a list of weights: the flag's JSON text
        values["patch_offset_weights"] = json.dumps(values["patch_offset_weights"])
    check_config_types(values, path, classes)
    return values


def parse_arguments(classes: tuple, argv: list[str] | None = None) -> tuple:
    """Parse the command line (`sys.argv[1:]` by default) into instances of the dataclasses `classes`: flags, a
    lone `*.json` config file, or a config file followed by flags that override its values
    (`run_clm.py configs/train/x.json --output_dir runs/y`). UsageError for any bad value."""
    from .arguments_help import ArgumentParser  # HfArgumentParser, --help grouped

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = ArgumentParser(classes, allow_abbrev=False)  # `--max_step 4` is refused, not read as --max_steps
    try:
        if argv and argv[0].endswith(".json") and not argv[0].startswith("-"):
            values = load_config_file(argv[0], classes)
            if len(argv) == 1:
                parsed = parser.parse_dict(values)
            else:
                parser.set_defaults(**values)  # the flags after the file override it
                parsed = parser.parse_args_into_dataclasses(args=argv[1:])
        else:
            parsed = parser.parse_args_into_dataclasses(args=argv)
    except UsageError:
        raise
    except ValueError as error:  # transformers' own argument checks (e.g. --bf16 without a GPU): one line
        raise UsageError(str(error).strip()) from error
    for arguments in parsed:  # every float of every class; a class's own __post_init__ may check first
        refuse_non_finite(arguments)
    return tuple(parsed)


# Failures to write that the user can act on (permissions, a read-only or full filesystem, a quota): one line
# instead of the traceback; every other OSError keeps its traceback.
WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# How libraries in other languages report an errno in their messages: Rust's "(os error 28)" (safetensors).
OS_ERROR_IN_MESSAGE = re.compile(r"\(os error (\d+)\)")
NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def write_error_message(error: BaseException) -> str | None:
    """The one-line message for a failure to write a file, or None for any other error: an OSError with one
    of WRITE_ERRNOS and the file it names ("cannot write /x/run_args.json.tmp-1: [Errno 13] Permission denied"),
    a full disk or quota without a file name, or torch.save's failure to write its zip archive (a RuntimeError
    from inline_container.cc, as on a full disk, that names neither errno nor file)."""
    if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
        reason = f"[Errno {error.errno}] {error.strerror or ''}".strip()
        if error.filename is not None:
            return f"cannot write {error.filename}: {reason}"
        if error.errno in NO_SPACE_ERRNOS:
            return f"cannot write: no space left on device ({reason})"
        return None
    if isinstance(error, RuntimeError):
        message = first_line(error)
        if "inline_container.cc" in message and ("PytorchStreamWriter" in message or "unexpected pos" in message):
            return f"torch.save could not write a checkpoint file (disk full or write error?): {message}"
    return None


def write_failure_reason(error: BaseException) -> str | None:
    """Why writing failed, when `error` (raised by any library while writing a file) is a failure to write: an
    OSError with one of WRITE_ERRNOS ("[Errno 28] No space left on device"), an error whose message carries such
    an errno ("(os error 28)", safetensors), or torch.save's zip writer failing; None for any other error."""
    if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
        return f"[Errno {error.errno}] {error.strerror or os.strerror(error.errno)}"
    found = OS_ERROR_IN_MESSAGE.search(str(error))
    if found and int(found.group(1)) in WRITE_ERRNOS:
        number = int(found.group(1))
        return f"[Errno {number}] {os.strerror(number)}"
    if isinstance(error, RuntimeError) and "inline_container.cc" in str(error):
        return f"torch.save's archive writer failed, as on a full disk ({first_line(error)})"
    return None


@contextlib.contextmanager
def writing(path, which=None) -> Iterator[None]:
    """Turn a failure to write met inside (`write_failure_reason`, whatever library raised it) into a one-line
    `WriteFailure` naming the file: an OSError's own file where it names one, else `which()` (the file being
    written when it failed, worked out afterwards) or `path`."""
    try:
        yield
    except (UsageError, RunStopped, WriteFailure):
        raise
    except Exception as error:
        reason = write_failure_reason(error)
        if reason is None:
            raise
        named = error.filename if isinstance(error, OSError) and error.filename else (which() if which else None) or path
        raise WriteFailure(f"cannot write {named}: {reason}") from error


@contextlib.contextmanager
def naming_file(path) -> Iterator[None]:
    """Give `path` to an OSError raised inside that names no file: write(2) and close(2) name none, so a full disk
    met while writing or flushing `path` said only "[Errno 28] No space left on device"."""
    try:
        yield
    except OSError as error:
        if error.filename is not None or error.errno is None:
            raise
        raise OSError(error.errno, error.strerror, str(path)) from error


def write_json_atomic(path, payload: dict) -> None:
    """Write `payload` as indented, key-sorted JSON to `path` through a temporary file in the same folder and an
    atomic rename, so that a reader (or a job killed while writing) never sees half a file. OSError (naming the
    temporary file) when it cannot be written."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with naming_file(tmp), open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(tmp, path)


def describe_change(name: str, old, new) -> str:
    """`name: old -> new` for a message; for two dicts (per-file fingerprints, a model config) only the entries
    that differ, at most five, so that a changed shard among thousands is named in a line of readable length."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return f"{name}: {old!r} -> {new!r}"
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k, "(absent)") != new.get(k, "(absent)")]
    parts = [f"{k} {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}" for k in keys[:5]]
    more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
    return f"{name}: {', '.join(parts)}{more}"


class WriteFailure(Exception):
    """A failure to write a file, carried as its one-line message (`write_error_message`) out of a data-loader
    worker: torch re-raises a worker's exception from its text alone, so an OSError arrived without its errno or
    file, and with the worker's traceback. `run_cli` prints it as it does in the main process."""


@contextlib.contextmanager
def write_failures_as_messages() -> Iterator[None]:
    """Raise a failure to write (see `write_error_message`) met inside as a `WriteFailure`: for code that runs in a
    data-loader worker."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        message = write_error_message(error)
        if message is None:
            raise
        raise WriteFailure(message) from error


def run_cli(entry_point, program: str, on_interrupt: str = "interrupted") -> None:
    """Run `entry_point()`; a UsageError becomes one line on stderr naming `program`, and exit code EXIT_USAGE;
    a run stopped on purpose (`RunStopped`: preempted, diverged) its one line and its exit code; Ctrl-C
    (KeyboardInterrupt) the line `on_interrupt` and EXIT_INTERRUPTED, no traceback. A failure to write
    (`write_error_message`: permission denied, read-only or full filesystem) is one line and EXIT_WRITE_FAILURE:
    not bad input, the environment. Under a multi-process launch only rank 0 prints the line (every rank meets
    the same error); a multi-process run that finished ends its process group (`end_process_group`)."""
    try:
        entry_point()
        end_process_group()
    except UsageError as error:
        stop(program, f"error: {usage_message(error)}", EXIT_USAGE)
    except WriteFailure as error:
        stop(program, f"error: {usage_message(error)}", EXIT_WRITE_FAILURE)
    except RunStopped as error:
        stop(program, str(error), error.exit_code)
    except KeyboardInterrupt:
        stop(program, on_interrupt, EXIT_INTERRUPTED)
    except (OSError, RuntimeError) as error:
        message = write_error_message(error)
        if message is None:
            raise
        stop(program, f"error: {message}", EXIT_WRITE_FAILURE)


def stop(program: str, line: str, exit_code: int) -> None:
    """Print `program: line` on stderr (on rank 0 of a multi-process launch only) and exit with `exit_code`."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{program}: {line}", file=sys.stderr, flush=True)
    sys.exit(exit_code)


def end_process_group() -> None:
    """Every rank of a finished multi-process run frees what is left of the run (a DistributedDataParallel
    module in a reference cycle, whose reducer holds the process group), waits for the others, then destroys the
    process group, as torch asks. Left to interpreter exit, gloo's threads can abort a rank ("terminate called
    without an active exception", exit -6; torch 2.11) and the launcher reports a finished run as failed; a DDP
    module freed after the group is destroyed can hang its rank until the launcher's timeout (torch 2.13). No-op
    without a process group."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()  # DDP modules no longer reachable go now, while the group they hold is alive
        dist.barrier()
        dist.destroy_process_group()


def usage_message(error: UsageError | WriteFailure) -> str:
    """The message of a UsageError or WriteFailure; one raised in a data-loader worker (`--streaming` with a
    worker) arrives re-raised by torch with the worker's whole traceback in its message: keep only the original
    message."""
    message = str(error)
    if message.startswith("Caught ") and "\nOriginal " in message:  # torch's "Caught X in DataLoader worker process 0."
        last = [line for line in message.strip().splitlines() if line.strip()][-1]
        message = last.split(f"{type(error).__name__}: ", 1)[-1]
    return message
