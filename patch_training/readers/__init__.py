"""Files (and hub datasets) -> documents: the formats the training and validation data come in, read lazily,
with one-line errors that name the file and the record.

Accepted: `.txt` (a document per line), `.jsonl`/`.ndjson`/`.json` (a JSON object per line, or one JSON list),
each optionally compressed (`.gz`, `.xz`, `.bz2`, `.zst`); `.parquet` (pyarrow); `.arrow` (Arrow IPC, stream or
file format: what `datasets` writes); a folder written by `datasets.save_to_disk` (read with
`datasets.load_from_disk`); a folder of such files (other files in it skipped, named in one warning); a glob
pattern (each folder it matches read as a folder). Folders and patterns expand in sorted order.

Where each concern lives (each module imports only those listed before it, and `..cli`):

- `formats`: a file's format from its name; compression suffixes (`strip_compression`); saved-dataset folders;
- `tables`: opening Arrow IPC files and saved datasets;
- `sniffing`: what a file holds from its first bytes (`misnamed_content`), one-line errors of an unreadable file;
- `compression`: a file's content, decompressed on the fly (`open_binary`);
- `lines`: line ends, a JSON list or JSON lines, reading in chunks of whole lines (`LineChunk`, `LinePosition`,
  CHUNK_BYTES);
- `files`: specs -> files (comma or JSON lists, folders, glob patterns), their checks, `content_stamp`;
- `parts`: files cut into parts for parallel reading and restarts (`DataPart`, PART_BYTES, PART_ROWS);
- `checks`: what a record must hold to be a document, and the words of those errors;
- `documents`: the documents of each format;
- `source`: `DataSource`, a data set's files or hub dataset;
- `rule`: `READING_RULE_VERSION`, the version of the code that decides the documents (which modules that is: see
  there), part of every token cache key.

Sizes that tune the reading are module attributes of the module that uses them (`lines.CHUNK_BYTES`,
`parts.PART_BYTES`, `source.START_DOCUMENTS`), set there.
"""

from .checks import a_type_name, indefinite_article, text_problem
from .compression import open_binary
from .documents import chunk_documents, iter_local_documents, iter_part_documents
from .files import (
    check_data_files,
    content_stamp,
    expand_data_files,
    pattern_may_reach,
    split_file_list,
)
from .formats import (
    COMPRESSION_SUFFIXES,
    SUPPORTED_EXTENSIONS,
    file_format,
    is_saved_dataset,
    strip_compression,
)
from .lines import LineChunk, LinePosition, iter_line_chunks, sequential_part_chunks
from .parts import DataPart, data_parts, file_parts, is_sequential
from .rule import READING_RULE_VERSION
from .sniffing import misnamed_content
from .source import DataSource

__all__ = [
    "COMPRESSION_SUFFIXES", "READING_RULE_VERSION", "SUPPORTED_EXTENSIONS", "DataPart", "DataSource", "LineChunk",
    "LinePosition", "a_type_name", "check_data_files", "chunk_documents", "content_stamp", "data_parts",
    "expand_data_files", "file_format", "file_parts", "indefinite_article", "is_saved_dataset", "is_sequential",
    "iter_line_chunks", "iter_local_documents", "iter_part_documents", "misnamed_content", "open_binary",
    "pattern_may_reach", "sequential_part_chunks", "split_file_list", "strip_compression", "text_problem",
]
