"""`DataSource`: where the documents of a data set come from (checked local files, or a hub dataset read through
`datasets`), its parts, their documents, and the check of each file's start that `--streaming` makes before it
claims the output folder.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from ..cli import UsageError, first_line
from .checks import check_column
from .documents import iter_local_documents, iter_part_documents
from .files import check_data_files
from .formats import file_format
from .lines import LineChunk, LinePosition
from .parts import DataPart, data_parts, file_parts
from .sniffing import read_errors
from .tables import arrow_reader, load_saved

START_DOCUMENTS = 100  # documents of each file read before a stream starts (`DataSource.check_starts`)
START_BUDGET = 100_000  # ... and in all, for many files (at least one a file)


@dataclass(frozen=True)
class DataSource:
    """Where the documents of a data set come from: local files (`paths`, `fmt`, as `check_data_files` returns
    them; `fmt` may be 'mixed'), or a hub dataset read through `datasets` (`dataset_name`, its configuration
    and split). `text_column` is the field holding each document's text."""

    text_column: str = "text"
    paths: tuple[str, ...] | None = None
    fmt: str | None = None
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    dataset_split: str = "train"

    @classmethod
    def from_files(cls, spec: str, argument: str, text_column: str = "text") -> DataSource:
        """The checked local files of `spec` (paths, folders, glob patterns: 'a.jsonl,b/*.parquet' or a JSON
        list), named `--argument` in errors."""
        paths, fmt = check_data_files(spec, argument)
        return cls(text_column=text_column, paths=tuple(paths), fmt=fmt)

    @property
    def names(self) -> list[str]:
        """The sources: absolute paths, or hub:<name>:<config>:<split>."""
        if self.paths is not None:
            return list(self.paths)
        return [f"hub:{self.dataset_name}:{self.dataset_config_name}:{self.dataset_split}"]

    def parts(self, target_parts: int = 1) -> list:
        """The pieces the data is read in, in order (at least `target_parts` where files can be split): `DataPart`s
        of local files, or ('hub', shard index, number of shards) of a hub dataset."""
        if self.paths is not None:
            return data_parts(list(self.paths), target_parts)
        shards = getattr(self._hub_dataset(streaming=True), "num_shards", 1) or 1
        return [("hub", index, shards) for index in range(shards)]

    def part_documents(self, part, start: LinePosition | None = None, cursor: list | None = None) -> Iterator[dict]:
        """The documents of one of `parts()` or of a `LineChunk` (`start`, `cursor`: see `iter_part_documents`)."""
        if isinstance(part, (DataPart, LineChunk)):
            return iter_part_documents(part, self.text_column, start, cursor)
        _, index, shards = part
        dataset = self._hub_dataset(streaming=True)
        return iter(dataset.shard(num_shards=shards, index=index) if shards > 1 else dataset)

    def check_starts(self, documents: int = START_DOCUMENTS) -> None:
        """Read the start of each source, as `--streaming` does before it claims the output folder: a Parquet,
        Arrow or saved dataset's schema (the text column, its type); the first `documents` documents of a
        JSON-lines, JSON or text file (fewer when there are many files: START_BUDGET documents in all, at least
        one a file), which checks its format, compression, encoding and text column; a hub dataset's columns.
        UsageError naming the file and record for what it finds, and "holds no text" when the line files ended
        before that many documents without a text and there is no other file. A bad record further in is found when the
        stream reaches it."""
        if self.paths is None:
            self._hub_dataset(streaming=True)
            return
        per_file = max(1, min(documents, START_BUDGET // len(self.paths)))
        empty = True  # every file read to its end, without a text
        for path in self.paths:
            fmt = file_format(path)
            with read_errors(path):
                if fmt in ("parquet", "arrow", "saved"):
                    check_column(path, _table_schema(path, fmt), self.text_column)
                    empty = False
                    continue
                parts = file_parts(path, fmt)
                read = list(itertools.islice(iter_part_documents(parts[0], self.text_column), per_file))
                empty &= len(read) < per_file and len(parts) == 1 and not any(d[self.text_column] for d in read)
        if empty:
            raise UsageError("the streamed training data holds no text")

    def _hub_dataset(self, streaming: bool):
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

    def documents(self, streaming: bool = True):
        """An iterable of documents (dicts holding `text_column`): local files read lazily, or the hub dataset
        (`streaming`: without downloading it whole). UsageError for a dataset that cannot be loaded or lacks
        the text column."""
        if self.paths is not None:
            return iter_local_documents(list(self.paths), self.fmt, self.text_column)
        return self._hub_dataset(streaming)


def _table_schema(path: str, fmt: str):
    """The Arrow schema of a Parquet, Arrow or saved-dataset table (`fmt`), read without its rows."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).schema_arrow
    return arrow_reader(path).schema if fmt == "arrow" else load_saved(path).data.schema
