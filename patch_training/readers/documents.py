"""Documents from each format: a `.txt` line, a JSON object of a JSON-lines line or of a JSON list, a row of a
Parquet, Arrow or saved-dataset table, read lazily, with one-line errors that name the file and the record.

A document is a dict whose text column holds its text, or None for a null (skipped at tokenisation): a JSON record
whole, a text line or a table row as that column alone (only that column of a table is read). Blank lines of a
line file are not documents; a JSON record must be an object whose text field holds text or null
(`checks.text_problem`).

Part of the reading rule (`rule.READING_RULE_MODULES`): this decides which records and columns become documents.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from ..cli import UsageError
from .checks import a_type_name, check_column, check_text, text_problem
from .compression import open_binary
from .formats import file_format
from .lines import LineChunk, LinePosition, is_json_list, iter_line_chunks, line_ends
from .parts import DataPart
from .sniffing import read_errors
from .tables import arrow_batches, arrow_reader, load_saved


def iter_local_documents(paths: list[str], fmt: str | None, text_column: str) -> Iterator[dict]:
    """Documents of local files, read lazily in order: a .txt line, a JSON object of a .jsonl line (a .json
    file may also hold one JSON list of objects), a row of a Parquet/Arrow file or saved dataset. `fmt`: the
    format of every file, or None/'mixed' to tell it from each name. The text column must exist and hold text
    (or null: skipped); errors name file and line/row."""
    for path in paths:
        own = file_format(path) if fmt in (None, "mixed") else fmt
        yield from iter_part_documents(DataPart(path, own), text_column)


def iter_part_documents(part, text_column: str, start: LinePosition | None = None, cursor: list | None = None) -> Iterator[dict]:
    """The documents of one part (see `iter_local_documents`), or of a `LineChunk`, with one-line errors naming
    file and record. For JSON-lines and text parts: `start`, a line start recorded by `cursor` in an earlier
    reading (see `iter_line_chunks`); `cursor`, a one-item list set to the `LinePosition` after each document."""
    with read_errors(part.path):
        if isinstance(part, LineChunk):
            yield from chunk_documents(part, text_column, cursor)
        elif part.fmt in ("parquet", "arrow", "saved"):
            yield from _table_documents(part, text_column)
        elif part.start is None and start is None and is_json_list(part.path, part.fmt):
            yield from _json_list_documents(part.path, text_column)
        else:
            for chunk in iter_line_chunks(part, start):
                yield from chunk_documents(chunk, text_column, cursor)


def chunk_documents(chunk: LineChunk, text_column: str, cursor: list | None = None) -> Iterator[dict]:
    """The documents of a chunk's lines: a .txt line (without its line end: \\n, \\r\\n or \\r, see `line_ends`), or
    a .jsonl line's JSON object; blank lines skipped. UsageError naming the file and line for a line that is not
    UTF-8, not JSON, or has no text field. `cursor`: a one-item list, set to the `LinePosition` after each document
    yielded."""
    path, (offset, line) = chunk.path, chunk.start
    position = 0
    if line_ends(chunk.fmt) == "universal":  # bytes.splitlines breaks at \n, \r\n and \r only
        pieces = chunk.data.splitlines(keepends=True)
        lines = [(piece.rstrip(b"\r\n"), len(piece)) for piece in pieces]
    else:
        pieces = chunk.data.split(b"\n")
        if pieces and not pieces[-1]:
            pieces.pop()  # the empty piece after the last newline
        lines = [(piece, len(piece) + 1) for piece in pieces]
    for number, (raw, length) in enumerate(lines, start=line):
        line_start = offset + position
        position = min(position + length, len(chunk.data))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise UsageError(f"{path} is not UTF-8 text ({error.reason} at byte {line_start + error.start})") from None
        if not text.strip():
            continue
        if chunk.fmt == "text":
            document = {text_column: text}
        else:
            try:
                document = json.loads(text)
            except json.JSONDecodeError as error:
                where = number if line else _line_number(path, line_start)
                raise UsageError(f"{path}, line {where}: not valid JSON ({error})") from None
            # only a \u escape can put a lone surrogate in the text of a line that is UTF-8
            if not (isinstance(document, dict) and isinstance(document.get(text_column, 0), (str, type(None)))) or \
                    ("\\u" in text and text_problem(document, text_column)):
                check_text(path, f"record {number if line else _line_number(path, line_start)}", document, text_column)  # raises
        if cursor is not None:
            cursor[:] = [LinePosition(offset + position, number + 1 if line else 0)]
        yield document


def _line_number(path: str, byte_offset: int) -> int:
    """The 1-based line number of the line starting at `byte_offset` of an uncompressed file (counted only when
    an error is reported)."""
    with open(path, "rb") as handle:
        return handle.read(byte_offset).count(b"\n") + 1


def _json_list_documents(path: str, text_column: str) -> Iterator[dict]:
    """The objects of a .json file holding one JSON list (compressed or not), read whole."""
    with open_binary(path) as (handle, _):
        text = handle.read().decode("utf-8-sig")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}: not a valid JSON list ({error})") from None
    for number, record in enumerate(records, start=1):
        yield check_text(path, f"record {number}", record, text_column)


def _table_documents(part: DataPart, text_column: str) -> Iterator[dict]:
    """Rows of a Parquet row group, Arrow record batch or saved-dataset range; only the text column is read."""
    import pyarrow as pa

    path = part.path
    if part.fmt == "saved":
        dataset = load_saved(path)
        start, stop = (0, len(dataset)) if part.start is None else (part.start, part.stop)
        check_column(path, dataset.features.arrow_schema if hasattr(dataset.features, "arrow_schema") else dataset.data.schema, text_column)
        table = dataset.data.table if part.start is None else dataset.data.table.slice(start, stop - start)
        batches = ((start, batch) for batch in [table.select([text_column])])
    elif part.fmt == "parquet":
        import pyarrow.parquet as pq

        handle = pq.ParquetFile(path)
        check_column(path, handle.schema_arrow, text_column)
        groups = range(handle.metadata.num_row_groups) if part.start is None else range(part.start, part.stop)
        first_rows = [0]
        for g in range(handle.metadata.num_row_groups):
            first_rows.append(first_rows[-1] + handle.metadata.row_group(g).num_rows)
        batches = ((first_rows[g], handle.read_row_group(g, columns=[text_column])) for g in groups)
    else:
        reader = arrow_reader(path)
        check_column(path, reader.schema, text_column)

        def selected_batches():
            row = 0
            for index, batch in enumerate(arrow_batches(reader)):
                if part.start is None or part.start <= index < part.stop:
                    yield row, batch.select([text_column])
                elif part.stop is not None and index >= part.stop:
                    return
                row += batch.num_rows

        batches = selected_batches()
    for first_row, batch in batches:
        column = batch.column(0)
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        for offset, text in enumerate(column.to_pylist()):
            if text is not None and not isinstance(text, str):
                raise UsageError(f"{path}, row {first_row + offset + 1}: its {text_column!r} is {a_type_name(text)}, not text")
            yield {text_column: text}
