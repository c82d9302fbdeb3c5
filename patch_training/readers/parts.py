"""Files cut into parts (`DataPart`) so that one large file can be tokenised by several processes and a stream can
restart near a position: Parquet row groups, Arrow record batches, byte ranges of an uncompressed JSON-lines or text
file aligned to line starts, contiguous shards of a saved dataset. A compressed file or a JSON list is one part.

Reading the parts of a file in order gives exactly the documents of the whole file (tests/test_readers_parts.py
and tests/test_readers_lines.py check it for every format), so where a file is cut is not part of the reading rule
(`rule.READING_RULE_MODULES`).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

from ..cli import UsageError, first_line
from .formats import file_format, is_compressed
from .lines import is_json_list
from .sniffing import misnamed_or
from .tables import arrow_reader, load_saved

PART_BYTES = 64 * 1024 * 1024  # target size of a byte-range part of an uncompressed JSON-lines / text file
PART_ROWS = 100_000  # target rows of a part of a saved dataset


@dataclass(frozen=True)
class DataPart:
    """A piece of one data file read on its own: rows/batches/row groups [start, stop) of a Parquet, Arrow or
    saved dataset, bytes [start, stop) of an uncompressed JSON-lines or text file (the lines that start in that
    range), or the whole file (start = stop = None). `size`: bytes (or rows), for progress."""

    path: str
    fmt: str
    start: int | None = None
    stop: int | None = None
    size: int = 0


def file_parts(path: str, fmt: str | None = None, target_parts: int = 1) -> list[DataPart]:
    """The parts of one file, in order: at least `target_parts` where the format can be split (Parquet row
    groups, Arrow record batches, byte ranges of an uncompressed JSON-lines/text file of at most PART_BYTES,
    contiguous shards of a saved dataset); a compressed file or a JSON list is one part. UsageError naming the
    file for one that cannot be read as its format."""
    fmt = fmt or file_format(path)
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            metadata = pq.ParquetFile(path).metadata
            groups = metadata.num_row_groups
            return [DataPart(path, fmt, g, g + 1, metadata.row_group(g).total_byte_size) for g in range(groups)] or [DataPart(path, fmt, 0, 0)]
        if fmt == "arrow":
            reader = arrow_reader(path)
            count = reader.num_record_batches if hasattr(reader, "num_record_batches") else sum(1 for _ in reader)
            size = os.path.getsize(path) // max(count, 1)
            return [DataPart(path, fmt, b, b + 1, size) for b in range(count)] or [DataPart(path, fmt, 0, 0)]
        if fmt == "saved":
            rows = len(load_saved(path))
            pieces = max(target_parts, -(-rows // PART_ROWS), 1)
            bounds = [rows * i // pieces for i in range(pieces + 1)]
            return [DataPart(path, fmt, a, b, b - a) for a, b in itertools.pairwise(bounds) if b > a] or [DataPart(path, fmt, 0, 0)]
    except UsageError:
        raise
    except Exception as error:  # pyarrow's ArrowInvalid / OSError for a damaged or mislabelled file
        raise UsageError(misnamed_or(path, f"{path} cannot be read as {fmt}: {first_line(error)}")) from None
    size = os.path.getsize(path)
    if is_compressed(path) or size == 0 or is_json_list(path, fmt):
        return [DataPart(path, fmt, size=size)]
    pieces = max(target_parts, -(-size // PART_BYTES))
    bounds = [size * i // pieces for i in range(pieces + 1)]
    return [DataPart(path, fmt, a, b, b - a) for a, b in itertools.pairwise(bounds) if b > a]


def data_parts(paths: list[str], target_parts: int = 1) -> list[DataPart]:
    """The parts of all `paths`, in order (each file split into about `target_parts` / len(paths) or more)."""
    per_file = max(1, -(-target_parts // max(len(paths), 1)))
    return [part for path in paths for part in file_parts(path, None, per_file)]


def is_sequential(part) -> bool:
    """Whether a part can only be read from its start, by one reader: a compressed JSON-lines or text file."""
    return isinstance(part, DataPart) and part.fmt in ("json", "text") and part.start is None and is_compressed(part.path)
