#!/usr/bin/env python
"""run_clm.py's command line from a training config plus overrides, for the launchers in this folder.

    python scripts/config_args.py [CONFIG.json] [--flag value ...]    # one argument per line
    python scripts/config_args.py --get output_dir [CONFIG.json] [--flag value ...]
    python scripts/config_args.py --find deepspeed [CONFIG.json] [--flag value ...]

The launchers pass the config to run_clm.py as flags, followed by `--deepspeed`, `--use_cpu` or a user's
overrides (DRY_RUN=1 shows every value): each key becomes `--key value`
(booleans `true`/`false`, the file lists of `train_file`/`validation_file` joined by commas, the list of
`patch_offset_weights` as its JSON text, other lists as several values, objects as JSON), then the flags given after it follow. argparse keeps the last value
of a repeated flag, so a flag overrides the config's key. run_clm.py still checks every name and value.

The config is refused here, in one line and exit code 2, where run_clm.py would refuse it as a file: a key
given twice (at any level; JSON would keep the last one without a word), or a key that is no argument name
as run_clm.py reads a config (`output-dir` or `--seed`: as a flag, argparse would take it).

`--get NAME` prints the value run_clm.py will see for --NAME (exit code 2 if neither the config nor the flags
give it); `--find NAME` prints it or nothing. Both read the flags as run_clm.py's parser does: the last of
`--NAME value`, `--NAME=value`, and the dashed spelling `--NA-ME` (transformers' HfArgumentParser accepts both;
run_clm.py refuses abbreviations such as `--output_d`).
Only the standard library and `patch_training.cli` (itself standard library only) are imported: the launchers
call this before any process starts.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from patch_training.cli import UsageError, loads_json_object  # noqa: E402

PROGRAM = "config_args.py"
FILE_LIST_KEYS = ("train_file", "validation_file")
JSON_LIST_KEYS = ("patch_offset_weights",)  # one flag value that is a JSON list
ARGUMENT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # a dataclass field: what run_clm.py accepts as a config key


def read_config(path: str) -> dict:
    """The JSON object of a config file; UsageError (one line) where run_clm.py would refuse the file too."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise UsageError(f"config file {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"config file {path} is not UTF-8 text") from None
    try:
        values = loads_json_object(text, f"config file {path}")
    except json.JSONDecodeError as error:
        raise UsageError(f"config file {path} is not valid JSON: {error}") from None
    except UsageError as error:  # a key given twice: run_clm.py's own words
        raise UsageError(f"{error}: remove one") from None
    if not isinstance(values, dict):
        raise UsageError(f"config file {path} must hold a JSON object of run_clm.py arguments")
    for key in values:
        if not ARGUMENT_NAME.fullmatch(key):
            name = key.lstrip("-").replace("-", "_")
            hint = f": write it {name!r}" if ARGUMENT_NAME.fullmatch(name) else ""
            raise UsageError(f"config file {path}: the key {key!r} is not an argument name{hint}")
    return values


def config_to_flags(path: str) -> list[str]:
    flags = []
    for key, value in read_config(path).items():
        if value is None:  # the argument's default
            continue
        flags.append(f"--{key}")
        if isinstance(value, bool):
            flags.append("true" if value else "false")
        elif isinstance(value, list) and key in JSON_LIST_KEYS:
            flags.append(json.dumps(value))
        elif isinstance(value, list) and key in FILE_LIST_KEYS:
            flags.append(",".join(str(item) for item in value))
        elif isinstance(value, list):
            flags.extend(str(item) for item in value)
        elif isinstance(value, dict):
            flags.append(json.dumps(value))
        else:
            flags.append(str(value))
    return flags


def run_clm_args(argv: list[str]) -> list[str]:
    """A leading *.json is expanded into flags; everything else is passed through in order."""
    if argv and argv[0].endswith(".json") and not argv[0].startswith("-"):
        return config_to_flags(argv[0]) + argv[1:]
    return list(argv)


def spellings(name: str) -> tuple[str, str]:
    """The two flags of an argument as HfArgumentParser adds them: `--output_dir` and `--output-dir`."""
    name = name.lstrip("-").replace("-", "_")
    return f"--{name}", f"--{name.replace('_', '-')}"


def names_flag(option: str, name: str) -> bool:
    """Whether `option` (an argument before any `=`) is read as --name: one of its two spellings (run_clm.py's
    parser takes no abbreviation)."""
    return option in spellings(name)


def flag_value(args: list[str], name: str) -> str | None:
    """The last value given to --name, as run_clm.py's parser reads it (see `names_flag`): `--name value` or
    `--name=value`, in either spelling."""
    value = None
    for index, arg in enumerate(args):
        option, equals, given = arg.partition("=")
        if not names_flag(option, name):
            continue
        if equals:
            value = given
        elif index + 1 < len(args):
            value = args[index + 1]
    return value


def run(argv: list[str]) -> int:
    if argv[:1] in (["--get"], ["--find"]):
        if len(argv) < 2:
            raise UsageError(f"{argv[0]} needs an argument name")
        value = flag_value(run_clm_args(argv[2:]), argv[1])
        if value is None and argv[0] == "--get":
            raise UsageError(f"no {spellings(argv[1])[0]} in the config or the flags")
        if value is not None:
            print(value)
        return 0
    for arg in run_clm_args(argv):
        if "\n" in arg:
            raise UsageError(f"an argument holds a newline: {arg!r}")
        print(arg)
    return 0


def main(argv: list[str]) -> int:
    """`run`, with bad input as one line on stderr and exit code 2 (as run_clm.py's `run_cli`, without its
    torch import)."""
    try:
        return run(argv)
    except UsageError as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
