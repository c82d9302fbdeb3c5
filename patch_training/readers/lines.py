"""The lines of JSON-lines and text files: where a line ends, and reading a file (or a byte range of one) in chunks
of whole lines.

Line ends: a `.txt` line ends at `\n`, `\r\n` or a bare `\r` (old Mac files), Python's universal newlines, which
is also how `datasets`' text loader reads it. Other characters that `str.splitlines` breaks at (form feed, U+2028,
...) stay in the line, as they do for both. A JSON-lines record ends at `\n` (a `\r` before it is JSON white space),
as JSON Lines defines. A byte-order mark at the start of the content is dropped; a JSON file whose first character
is `[` holds one JSON list, read whole (`is_json_list`).

A compressed file is read from its start; for several processes one reader decompresses it into `LineChunk`s
(whole lines, about CHUNK_BYTES) that others parse, and a reading can record where each line starts
(`LinePosition`) to go back there without parsing what is before. An uncompressed file can also be read from a
byte offset: the lines that start in a byte range (`parts.DataPart`).

Part of the reading rule (`rule.READING_RULE_MODULES`): this decides which bytes make each record.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from .compression import open_binary
from .formats import BOM
from .sniffing import read_errors

CHUNK_BYTES = 1024 * 1024  # (decompressed) bytes of a LineChunk: whole lines read by one process, parsed by another


class LinePosition(NamedTuple):
    """Where a line of a JSON-lines or text file starts: `offset` bytes into its (decompressed) content, and its
    1-based `line` number (0: not counted, in a byte range of an uncompressed file; an error message counts it)."""

    offset: int
    line: int


@dataclass(frozen=True)
class LineChunk:
    """Whole lines of a JSON-lines or text file, read (and decompressed) by one process and parsed by another:
    `data` begins at `start`. `size`: bytes of the file (compressed) read for it, for progress."""

    path: str
    fmt: str
    start: LinePosition
    data: bytes
    size: int = 0


def iter_line_chunks(part, start: LinePosition | None = None, chunk_bytes: int | None = None) -> Iterator[LineChunk]:
    """The lines of a JSON-lines or text part (a `parts.DataPart`), in `LineChunk`s of about `chunk_bytes` (CHUNK_BYTES) decompressed
    bytes: a whole file, compressed or not (a byte-order mark dropped), or, for an uncompressed file, the lines
    starting in bytes [part.start, part.stop). From the part's first line, or from `start`, a line start that
    `documents.chunk_documents`' cursor recorded: an uncompressed file seeks there, a compressed one is decompressed up to it
    (not parsed). Lines end as the format says (`line_ends`): a chunk and a part end only where a line certainly
    starts (never between the \\r and \\n of a \\r\\n). Raises the reader's own errors (see `read_errors`)."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    universal = line_ends(part.fmt) == "universal"
    stop = part.stop
    with open_binary(part.path) as (handle, raw):
        carry = b""
        if start is not None:
            position, line = start
            _skip(handle, position, compressed=handle is not raw)
        elif part.start:  # from the first line that starts at or after part.start
            position, line = _next_line_start(handle, part.start, universal), 0
            handle.seek(position)
        else:
            carry = handle.read(len(BOM))
            position, line = (len(BOM), 1) if carry == BOM else (0, 1)
            carry = b"" if carry == BOM else carry
        read = raw.tell() if start is not None or part.start else 0  # a whole file: every byte of it counted
        while stop is None or position < stop:
            block = handle.read(chunk_bytes)
            data = carry + block if carry else block
            last = not block  # the end of the file
            if stop is not None and position + len(data) >= stop:  # the line holding byte stop - 1 is the last
                end = _first_line_start(data, stop - position, universal, last)
                if end < 0:
                    carry = data
                    continue
                cut, last = end, True
            elif last:
                cut = len(data)
            else:
                cut = _last_line_start(data, universal)
                if cut == 0:  # a line longer than chunk_bytes: read on
                    carry = data
                    continue
            if cut:
                yield LineChunk(part.path, part.fmt, LinePosition(position, line), data[:cut], raw.tell() - read)
                read = raw.tell()
            if last:
                return
            line = line + _count_line_ends(data, cut, universal) if line else 0
            position, carry = position + cut, data[cut:]


def line_ends(fmt: str) -> str:
    """Where a line of a file of `fmt` ends: 'universal' for text (\\n, \\r\\n or a bare \\r, as Python's universal
    newlines and `datasets`' text loader), 'newline' for JSON lines (\\n; a \\r before it is JSON white space)."""
    return "universal" if fmt == "text" else "newline"


def _first_line_start(data: bytes, begin: int, universal: bool, final: bool) -> int:
    """The first position at or after `begin` (>= 1) of `data` where a line starts: after a \\n, or (`universal`) after
    a \\r that no \\n follows; len(data) if none and `final` (the end of the file); -1 if the bytes after `data`
    decide it (more must be read)."""
    newline = data.find(b"\n", begin - 1)
    if not universal:
        return newline + 1 if newline >= 0 else (len(data) if final else -1)
    cr = data.find(b"\r", begin - 1, newline if newline >= 0 else len(data))
    if cr < 0:
        return newline + 1 if newline >= 0 else (len(data) if final else -1)
    if cr + 1 < len(data):
        return cr + 2 if data[cr + 1] == 0x0A else cr + 1
    return cr + 1 if final else -1  # a \r at the end: a \n may follow


def _last_line_start(data: bytes, universal: bool) -> int:
    """The last position of `data`, more of which follows, where a line certainly starts (0 if none): after the last
    \\n, or (`universal`) after the last bare \\r, but not after a \\r ending `data` (a \\n may follow)."""
    newline = data.rfind(b"\n")
    if not universal:
        return newline + 1
    cr = data.rfind(b"\r", newline + 1)
    if cr == len(data) - 1:
        cr = data.rfind(b"\r", newline + 1, cr)
    return max(newline, cr) + 1


def _count_line_ends(data: bytes, cut: int, universal: bool) -> int:
    """The lines ending in data[:cut] (`cut` a line start, so no \\r\\n is cut in two)."""
    newlines = data.count(b"\n", 0, cut)
    if not universal:
        return newlines
    return newlines + data.count(b"\r", 0, cut) - data.count(b"\r\n", 0, cut)


def _next_line_start(handle, offset: int, universal: bool) -> int:
    """The first line start at or after byte `offset` (> 0) of an uncompressed file (its size if none): the end of
    the first line end that ends at or after it. Read from offset - 1 with `handle`, which is left anywhere."""
    handle.seek(offset - 1)
    if not universal:
        return offset - 1 + len(handle.readline())
    position, pending_cr = offset - 1, False
    while True:
        block = handle.read(1 << 16)
        if pending_cr:  # the previous block ended with \r
            return position + (1 if block[:1] == b"\n" else 0)
        if not block:
            return position
        found = _first_line_start(block, 1, True, False)
        if found >= 0:
            return position + found
        pending_cr = block.endswith(b"\r")  # the only line end of the block (any other was found)
        position += len(block)


def sequential_part_chunks(part) -> Iterator:
    """A sequential part (a compressed JSON-lines or text file, see `parts.is_sequential`) read (decompressed) here, as `LineChunk`s for other processes to
    parse and tokenise; a JSON list is left whole (the part itself). One-line errors, see `read_errors`."""
    with read_errors(part.path):
        if is_json_list(part.path, part.fmt):
            yield part
            return
        yield from iter_line_chunks(part)


def _skip(handle, offset: int, compressed: bool) -> None:
    """Move `handle` to byte `offset` of the content: a seek, or for a compressed file decompressing up to it."""
    if not compressed:
        handle.seek(offset)
        return
    remaining = offset
    while remaining:
        skipped = len(handle.read(min(remaining, 1 << 24)))
        if not skipped:
            raise EOFError(f"the file ends before byte {offset} of its content, where the recorded position is")
        remaining -= skipped


def is_json_list(path: str, fmt: str) -> bool:
    """Whether a JSON file (compressed or not) holds one JSON list rather than JSON lines: it is read whole."""
    return fmt == "json" and _first_character(path) == "["


def _first_character(path: str) -> str:
    """The first character other than white space (and a byte-order mark) of a file (decompressed), as bytes
    read: '[' for a JSON list."""
    with open_binary(path) as (handle, _):
        chunk = handle.read(4096).removeprefix(BOM)
        while chunk and not chunk.strip():
            chunk = handle.read(4096)
    return chunk.strip()[:1].decode("latin-1")
