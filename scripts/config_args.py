#!/usr/bin/env python
"""run_clm.py's command line from a training config plus overrides, for the launchers in this folder.

    python scripts/config_args.py [CONFIG.json] [--flag value ...]    # one argument per line
    python scripts/config_args.py --get output_dir [CONFIG.json] [--flag value ...]

run_clm.py reads a config file only when it is its one argument; the launchers also pass `--deepspeed`,
`--use_cpu` or a user's overrides, so they turn the config into flags: each key becomes `--key value`
(booleans `true`/`false`, the file lists of `train_file`/`validation_file` joined by commas, the list of
`patch_offset_weights` as its JSON text, other lists as several values, objects as JSON), then the flags given after it follow. argparse keeps the last value
of a repeated flag, so a flag overrides the config's key. run_clm.py still checks every name and value.
No third-party import: the launchers call this before any process starts.
"""

from __future__ import annotations

import json
import sys

FILE_LIST_KEYS = ("train_file", "validation_file")
JSON_LIST_KEYS = ("patch_offset_weights",)  # one flag value that is a JSON list


def config_to_flags(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            values = json.load(handle)
    except OSError as error:
        raise SystemExit(f"config_args.py: error: config file {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise SystemExit(f"config_args.py: error: config file {path} is not valid JSON: {error}") from None
    if not isinstance(values, dict):
        raise SystemExit(f"config_args.py: {path} must hold a JSON object of run_clm.py arguments")
    flags = []
    for key, value in values.items():
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


def flag_value(args: list[str], name: str) -> str | None:
    """The last value given to --name (either `--name value` or `--name=value`)."""
    value = None
    for index, arg in enumerate(args):
        if arg == f"--{name}" and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
    return value


def main(argv: list[str]) -> int:
    if argv[:1] == ["--get"]:
        if len(argv) < 2:
            raise SystemExit("config_args.py: --get needs an argument name")
        value = flag_value(run_clm_args(argv[2:]), argv[1])
        if value is None:
            raise SystemExit(f"config_args.py: no --{argv[1]} in the config or the flags")
        print(value)
        return 0
    for arg in run_clm_args(argv):
        if "\n" in arg:
            raise SystemExit(f"config_args.py: an argument holds a newline: {arg!r}")
        print(arg)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
