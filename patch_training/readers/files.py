"""Data file specs -> files: a comma list or JSON list of entries, each a file, a folder (its data files,
recursively) or a glob pattern; the checks that each exists, is readable and has a supported name; and the stamp
that identifies a file's or folder's content without reading it (`content_stamp`).

Folders and patterns expand in sorted order; a folder's files that are not data are named in one warning, hidden
ones skipped. A folder written by `datasets.save_to_disk` is one data file.
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import json
import logging
import os
from pathlib import Path

from ..cli import UsageError
from .formats import (
    SUPPORTED_EXTENSIONS,
    file_format,
    has_supported_name,
    is_saved_dataset,
)

logger = logging.getLogger("run_clm")

DOCUMENTATION_NAMES = ("readme", "license", "licence", "copying", "notice", "citation")  # a dataset folder's non-data
SKIPPED_NAMED = 5  # skipped files of a folder named in its warning (then a count)


def split_file_list(spec: str) -> list[str]:
    """'a.jsonl,b.jsonl' or a JSON list '["a.jsonl", "b.jsonl"]' -> list of entries (paths, folders, patterns)."""
    spec = spec.strip()
    if spec.startswith("["):
        try:
            paths = json.loads(spec)
        except json.JSONDecodeError as error:
            raise UsageError(f"file list {spec!r} is not a valid JSON list ({error})") from None
        return [str(p) for p in paths]
    return [part.strip() for part in spec.split(",") if part.strip()]


def expand_data_files(spec: str, argument: str, report_skipped: bool = False) -> list[str]:
    """The files of `spec`, in order: each entry a file, a saved-dataset folder, a folder (its supported files,
    recursively, sorted; hidden ones skipped, and with `report_skipped` the others named in one warning, see
    `folder_files`) or a glob pattern (its matches, sorted, folders read as folders: see `pattern_files`). Paths
    keep the form given (relative stays relative). UsageError for an entry naming nothing, or a folder or pattern
    holding no data file."""
    entries = split_file_list(spec)
    if not entries:
        raise UsageError(f"--{argument} names no file")
    files = []
    for entry in entries:
        if glob.has_magic(entry):
            matches = sorted(glob.glob(entry, recursive=True))
            if not matches:
                raise UsageError(f"--{argument}: the pattern {entry} matches no file")
            found, skipped = pattern_files(matches)
            if not found:
                raise UsageError(f"--{argument}: the pattern {entry} matches no data file "
                                 f"({', '.join(SUPPORTED_EXTENSIONS)}): it matches {_some_names(skipped)}")
            if skipped and report_skipped:
                logger.warning("--%s: skipping %s in the folders the pattern %s matches that are not data files (%s; "
                               "text and JSON optionally compressed): %s",
                               argument, _files(len(skipped)), entry, ", ".join(SUPPORTED_EXTENSIONS), _some_names(skipped))
            files.extend(found)
        elif os.path.isdir(entry) and not is_saved_dataset(entry):
            found, skipped = folder_files(entry)
            if not found:
                also = f": it holds {_some_names(skipped)}" if skipped else ""
                raise UsageError(f"--{argument}: the folder {entry} holds no data file ({', '.join(SUPPORTED_EXTENSIONS)}){also}")
            if skipped and report_skipped:
                logger.warning("--%s: skipping %s of the folder %s that are not data files (%s; text and JSON "
                               "optionally compressed): %s",
                               argument, _files(len(skipped)), entry, ", ".join(SUPPORTED_EXTENSIONS), _some_names(skipped))
            files.extend(found)
        else:
            files.append(entry)
    return files


def pattern_files(matches: list[str]) -> tuple[list[str], list[str]]:
    """(the data files of a glob pattern's sorted `matches`, the paths skipped), read as a folder is (see
    `folder_files`): a matched data file or saved-dataset folder is itself, any other matched folder gives its data
    files (`shards_*` matching folders reads them, as naming each would), each file once (`dir/**` matches a
    folder and the files under it), a saved dataset whole (not its own files that `**` matches). Skipped: matched
    files that are not data (`dir/*` over a README.md), the non-data files of matched folders, and a matched
    folder holding nothing (named with a trailing /)."""
    found, skipped, saved = [], [], []
    for match in matches:
        if any(match.startswith(os.path.join(folder, "")) for folder in saved):
            continue  # a file of a saved dataset matched by `**`: the dataset is read whole
        if is_saved_dataset(match):
            saved.append(match)
            found.append(match)
        elif os.path.isfile(match):
            (found if has_supported_name(match) else skipped).append(match)
        elif os.path.isdir(match):
            inside, others = folder_files(match)
            found.extend(inside)
            skipped.extend(os.path.join(match, name) for name in others)
            if not inside and not others:
                skipped.append(os.path.join(match, ""))
    skipped = [name for name in dict.fromkeys(skipped) if name.rstrip("/") not in found]
    return list(dict.fromkeys(found)), sorted(skipped, key=lambda path: (_is_documentation(path), path))


def pattern_may_reach(pattern: str, path: str) -> bool:
    """Whether the glob `pattern` (as `expand_data_files` reads it: `**` recursive, hidden names matched only by
    a pattern part that starts with a dot, a matched folder read whole) can match `path` itself, a folder above it,
    or something inside it, now or once `path` exists. Both are made absolute; no file system access beyond that.
    `data/*` and `data/**/*.json` reach `data/run`; `data/*.jsonl` and `data/*` (for `data/.run`) do not."""
    pattern_parts = Path(os.path.abspath(pattern)).parts
    path_parts = Path(os.path.abspath(path)).parts

    @functools.cache
    def reach(i: int, j: int) -> bool:  # pattern_parts[i:] against path_parts[j:]
        if j == len(path_parts):
            return True  # something inside `path` may match
        if i == len(pattern_parts):  # a folder above `path` matches: read whole, but for hidden names
            return not any(name.startswith(".") for name in path_parts[j:])
        part, name = pattern_parts[i], path_parts[j]
        visible = not name.startswith(".") or part.startswith(".")
        if part == "**":
            return reach(i + 1, j) or (not name.startswith(".") and reach(i, j + 1))
        return visible and fnmatch.fnmatchcase(name, part) and reach(i + 1, j + 1)

    return reach(0, 0)


def folder_files(folder: str) -> tuple[list[str], list[str]]:
    """(the data files of `folder`, recursively, sorted, as paths under it; the other files, as names relative
    to it, files that may be data first, then documentation: README.md, LICENSE, *.md, ...). Hidden files and
    folders (.gitattributes, .cache/) are in neither. A saved dataset inside (`datasets.save_to_disk`) is one data
    file: its own files are not listed."""
    found, skipped = [], []
    for root, folders, names in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in [name for name in folders if is_saved_dataset(os.path.join(root, name))]:
            found.append(os.path.join(root, name))
            folders.remove(name)
        for name in names:
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            (found if has_supported_name(name) else skipped).append(path)
    skipped = sorted(skipped, key=lambda path: (_is_documentation(path), path))
    return sorted(found), [os.path.relpath(path, folder) for path in skipped]


def _is_documentation(path: str) -> bool:
    """Whether a file of a data folder is documentation (README.md, LICENSE, notes.md), not data in an
    unsupported format (.csv, .ndjson.lz4)."""
    stem, extension = os.path.splitext(os.path.basename(path).lower())
    return extension in (".md", ".rst", ".pdf", ".html") or (stem or extension).startswith(DOCUMENTATION_NAMES)


def _files(count: int) -> str:
    return f"{count} file{'s' if count != 1 else ''}"


def _some_names(names: list[str]) -> str:
    """The first SKIPPED_NAMED of `names`, then how many more."""
    shown = ", ".join(names[:SKIPPED_NAMED])
    return shown if len(names) <= SKIPPED_NAMED else f"{shown} and {len(names) - SKIPPED_NAMED} more"


def check_data_files(spec: str, argument: str) -> tuple[list[str], str]:
    """Resolve and check a file list: each entry exists, is readable and has a supported format. Returns
    (absolute paths, format): the one format of all files, or 'mixed'. The files a folder holds that are not data
    are named in one warning (see `expand_data_files`)."""
    paths = expand_data_files(spec, argument, report_skipped=True)
    formats = set()
    for path in paths:
        if not (os.path.isfile(path) or is_saved_dataset(path)):
            what = "is a folder with no data file" if os.path.isdir(path) else "does not exist"
            raise UsageError(f"--{argument}: file {path} {what}")
        if not os.access(path, os.R_OK):
            raise UsageError(f"--{argument}: file {path} is not readable")
        formats.add(file_format(path))
    return [os.path.abspath(p) for p in paths], formats.pop() if len(formats) == 1 else "mixed"


def content_stamp(path: str) -> str:
    """What identifies the content of a local path without reading it, in words for run records and messages:
    a file's "<size> bytes, modified <ISO 8601 time, UTC, microseconds>", a folder's "folder <16 hex digits>" (a
    SHA-256 of its path and, for every file under it, sorted, "relative path:size:mtime in ns"), or "not a local
    path" (a hub dataset's name). A file rewritten in place with another size or modification time gets another
    stamp, unless the two times are within about a microsecond (the time is rounded through a float, the seconds
    since 1970: times 1 µs apart share a stamp about once in 20)."""
    import datetime
    import hashlib

    if os.path.isfile(path):
        stat = os.stat(path)
        modified = datetime.datetime.fromtimestamp(stat.st_mtime_ns / 1e9, datetime.timezone.utc)
        return f"{stat.st_size} bytes, modified {modified.isoformat(timespec='microseconds')}"
    if os.path.isdir(path):
        stats = []
        for root, _, names in sorted(os.walk(path)):
            for name in sorted(names):
                full = os.path.join(root, name)
                stat = os.stat(full)
                stats.append(f"{os.path.relpath(full, path)}:{stat.st_size}:{stat.st_mtime_ns}")
        return "folder " + hashlib.sha256(f"{path}|{','.join(stats)}".encode()).hexdigest()[:16]
    return "not a local path"
