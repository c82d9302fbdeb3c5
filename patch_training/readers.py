"""Files (and hub datasets) -> documents: the formats the training and validation data come in, read lazily,
with one-line errors that name the file and the record."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

from .cli import UsageError, first_line


SUPPORTED_EXTENSIONS = (".txt", ".json", ".jsonl")


COMPRESSION_SUFFIXES = (".gz", ".xz", ".bz2")


def split_file_list(spec: str) -> list[str]:
    """'a.jsonl,b.jsonl' or a JSON list '["a.jsonl", "b.jsonl"]' -> list of paths."""
    spec = spec.strip()
    if spec.startswith("["):
        try:
            paths = json.loads(spec)
        except json.JSONDecodeError as error:
            raise UsageError(f"file list {spec!r} is not a valid JSON list ({error})") from None
        return [str(p) for p in paths]
    return [part.strip() for part in spec.split(",") if part.strip()]


def file_format(path: str) -> str:
    """'text' or 'json' from the extension (compression suffixes allowed); UsageError otherwise."""
    name = path.lower()
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    if name.endswith(".txt"):
        return "text"
    if name.endswith((".json", ".jsonl")):
        return "json"
    raise UsageError(
        f"unsupported extension for {path}: use one of {', '.join(SUPPORTED_EXTENSIONS)} "
        f"(optionally compressed: {', '.join(COMPRESSION_SUFFIXES)})"
    )


def check_data_files(spec: str, argument: str) -> tuple[list[str], str]:
    """Resolve and check a file list: exists, readable, one supported format. Returns (paths, format)."""
    paths = split_file_list(spec)
    if not paths:
        raise UsageError(f"--{argument} names no file")
    formats = set()
    for path in paths:
        if not os.path.isfile(path):
            raise UsageError(f"--{argument}: file {path} does not exist")
        if not os.access(path, os.R_OK):
            raise UsageError(f"--{argument}: file {path} is not readable")
        formats.add(file_format(path))
    if len(formats) > 1:
        raise UsageError(f"--{argument}: mix of text and JSON files ({', '.join(paths)}); use one format")
    return [os.path.abspath(p) for p in paths], formats.pop()


def open_text(path: str):
    """Open a text file for reading, decompressing .gz/.xz/.bz2 on the fly."""
    import bz2
    import gzip
    import lzma

    openers = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
    opener = openers.get(os.path.splitext(path)[1].lower(), open)
    return opener(path, "rt", encoding="utf-8")


def iter_local_documents(paths: list[str], fmt: str, text_column: str) -> Iterator[dict]:
    """Documents of local files, read lazily in order: a .txt line, or a JSON object of a .jsonl line (a .json
    file may also hold one JSON list of objects). The text column must exist and hold text (or null: skipped);
    errors name file and line, including a file that is not UTF-8 or a damaged compressed file."""
    import lzma

    for path in paths:
        try:
            yield from _documents_of_file(path, fmt, text_column)
        except UnicodeDecodeError as error:
            raise UsageError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start} of its text)") from None
        except (EOFError, lzma.LZMAError, OSError) as error:  # a truncated .gz/.xz/.bz2, or plain text named .gz
            raise UsageError(f"{path} cannot be read: {first_line(error)} (a damaged or mislabelled compressed file?)") from None


def _documents_of_file(path: str, fmt: str, text_column: str) -> Iterator[dict]:
    with open_text(path) as handle:
        if fmt == "text":
            for line in handle:
                line = line.rstrip("\n")
                if line.strip():
                    yield {text_column: line}
            return
        first = handle.read(1)
        while first and first.isspace():
            first = handle.read(1)
        if first == "[":  # one JSON list
            try:
                records = json.loads(first + handle.read())
            except json.JSONDecodeError as error:
                raise UsageError(f"{path}: not a valid JSON list ({error})") from None
            numbered = enumerate(records, start=1)
        else:
            numbered = _json_lines(first, handle)
        for number, record in numbered:
            if not isinstance(record, dict) or text_column not in record:
                keys = list(record) if isinstance(record, dict) else type(record).__name__
                raise UsageError(f"{path}, record {number}: no {text_column!r} field (found {keys}); set --text_column_name")
            if record[text_column] is not None and not isinstance(record[text_column], str):
                raise UsageError(
                    f"{path}, record {number}: its {text_column!r} is a {type(record[text_column]).__name__}, not text"
                )
            yield record


def _json_lines(first: str, handle) -> Iterator[tuple[int, dict]]:
    """(line number, object) of a JSON-lines file whose first character was already read."""
    for number, line in enumerate(_prepend(first, handle), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(f"{handle.name}, line {number}: not valid JSON ({error})") from None


def _prepend(first: str, handle) -> Iterator[str]:
    if first:
        yield first + handle.readline()
    yield from handle


@dataclass(frozen=True)
class DataSource:
    """Where the documents of a data set come from: local files of one format (`paths`, `fmt`, as
    `check_data_files` returns them), or a hub dataset read through `datasets` (`dataset_name`, its
    configuration and split). `text_column` is the field holding each document's text."""

    text_column: str = "text"
    paths: tuple[str, ...] | None = None
    fmt: str | None = None
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    dataset_split: str = "train"

    @classmethod
    def from_files(cls, spec: str, argument: str, text_column: str = "text") -> DataSource:
        """The checked local files of `spec` ('a.jsonl,b.jsonl' or a JSON list), named `--argument` in errors."""
        paths, fmt = check_data_files(spec, argument)
        return cls(text_column=text_column, paths=tuple(paths), fmt=fmt)

    @property
    def names(self) -> list[str]:
        """The sources, as the token cache's key names them: absolute paths, or hub:<name>:<config>:<split>."""
        if self.paths is not None:
            return list(self.paths)
        return [f"hub:{self.dataset_name}:{self.dataset_config_name}:{self.dataset_split}"]

    def documents(self, streaming: bool = True):
        """An iterable of documents (dicts holding `text_column`): local files read lazily, or the hub dataset
        (`streaming`: without downloading it whole). UsageError for a dataset that cannot be loaded or lacks
        the text column."""
        if self.paths is not None:
            return iter_local_documents(list(self.paths), self.fmt, self.text_column)
        import datasets

        try:
            dataset = datasets.load_dataset(
                self.dataset_name, self.dataset_config_name, split=self.dataset_split, streaming=streaming
            )
        except (ConnectionError, OSError, ValueError) as error:  # not found, offline, a wrong split or config name
            raise UsageError(f"--dataset_name {self.dataset_name}: {first_line(error)}") from None
        columns = dataset.column_names if dataset.column_names is not None else list(next(iter(dataset)).keys())
        if self.text_column not in columns:
            raise UsageError(f"--text_column_name {self.text_column!r} is not a column of the data (columns: {columns})")
        return dataset
