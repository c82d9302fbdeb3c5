"""A data file's format from its name: the extensions read, the compression suffixes, a saved dataset folder.

Part of the reading rule (`rule.READING_RULE_MODULES`): the format decides how a file's bytes become documents.
"""

from __future__ import annotations

import os

from ..cli import UsageError

JSON_EXTENSIONS = (".json", ".jsonl", ".ndjson")  # .ndjson: another name of JSON lines
SUPPORTED_EXTENSIONS = (".txt", *JSON_EXTENSIONS, ".parquet", ".arrow")
COMPRESSION_SUFFIXES = (".gz", ".xz", ".bz2", ".zst")
SAVED_DATASET_FILES = ("dataset_info.json", "state.json")  # what `datasets.save_to_disk` writes next to the data
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark: not text


def compression_suffix(name: str) -> str:
    """The compression suffix `name` ends with, lower case ('.gz', '.xz', '.bz2', '.zst', in any case in the
    name), or '' for none. One layer: 'a.jsonl.zst.gz' is gzip data named 'a.jsonl.zst' inside."""
    lower = name.lower()
    return next((suffix for suffix in COMPRESSION_SUFFIXES if lower.endswith(suffix)), "")


def strip_compression(name: str) -> str:
    """`name` without its compression suffix (see `compression_suffix`), its case kept: 'A.JSONL.GZ' -> 'A.JSONL'."""
    suffix = compression_suffix(name)
    return name[: -len(suffix)] if suffix else name


def is_compressed(path: str) -> bool:
    return bool(compression_suffix(path))


def is_saved_dataset(path: str) -> bool:
    """Whether `path` is a folder written by `datasets.save_to_disk` (it holds dataset_info.json or state.json,
    or dataset_dict.json for several splits)."""
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, name)) for name in (*SAVED_DATASET_FILES, "dataset_dict.json")
    )


def has_supported_name(path: str) -> bool:
    """Whether the name of `path` is one of a data file (`SUPPORTED_EXTENSIONS`, optionally compressed)."""
    return strip_compression(path).lower().endswith(SUPPORTED_EXTENSIONS)


def file_format(path: str) -> str:
    """'text', 'json', 'parquet', 'arrow' from the extension (compression suffixes allowed for text and JSON),
    or 'saved' for a `datasets.save_to_disk` folder; UsageError otherwise."""
    if is_saved_dataset(path):
        return "saved"
    name = strip_compression(path).lower()
    if name.endswith(".txt"):
        return "text"
    if name.endswith(JSON_EXTENSIONS):
        return "json"
    if name.endswith((".parquet", ".arrow")) and not is_compressed(path):
        return name.rsplit(".", 1)[1]
    raise UsageError(
        f"unsupported extension for {path}: use one of {', '.join(SUPPORTED_EXTENSIONS)} (.txt, .json, .jsonl and "
        f".ndjson optionally compressed: {', '.join(COMPRESSION_SUFFIXES)}) or a datasets.save_to_disk folder"
    )
