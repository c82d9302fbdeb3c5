"""Files (and hub datasets) -> documents: the formats the training and validation data come in, read lazily,
with one-line errors that name the file and the record.

Accepted: `.txt` (a document per line), `.jsonl`/`.ndjson`/`.json` (a JSON object per line, or one JSON list),
each optionally compressed (`.gz`, `.xz`, `.bz2`, `.zst`); `.parquet` (pyarrow); `.arrow` (Arrow IPC, stream or
file format: what `datasets` writes); a folder written by `datasets.save_to_disk` (read with
`datasets.load_from_disk`); a folder of such files (other files in it skipped, named in one warning); a glob
pattern (each folder it matches read as a folder). Folders and patterns expand in sorted order.

Line ends: a `.txt` line ends at `\n`, `\r\n` or a bare `\r` (old Mac files), Python's universal newlines, which
is also how `datasets`' text loader reads it (`TEXT_LINE_ENDS`; part of a text file's token cache key, see
`reading_rule`). Other characters that `str.splitlines` breaks at (form feed, U+2028, ...) stay in the line, as they
do for both. A JSON-lines record ends at `\n` (a `\r` before it is JSON white space), as JSON Lines defines.

The name must say what a file holds: content under another name (gzip, xz, bz2 or zstd data named without that
suffix or with another one, uncompressed text named `.gz`, Parquet or Arrow data named `.jsonl`/`.txt`, ...) is one
line saying what it holds and what to name it (`misnamed_content`), found from the first bytes (read when a line
file is opened, and for Parquet/Arrow only when reading fails).

A file is read in *parts* (`DataPart`) so that one large file can be tokenised by several processes and a
stream can restart near a position: Parquet row groups, Arrow record batches, byte ranges of an uncompressed
JSON-lines or text file aligned to line starts, contiguous shards of a saved dataset. Reading the parts of a file
in order gives exactly the documents of the whole file. A compressed file is one part, read from its start; for
several processes one reader decompresses it into `LineChunk`s (whole lines, about CHUNK_BYTES) that others parse,
and a reading can record where each line starts (`LinePosition`) to go back there without parsing what is before.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import glob
import io
import itertools
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .cli import UsageError, first_line

logger = logging.getLogger("run_clm")


JSON_EXTENSIONS = (".json", ".jsonl", ".ndjson")  # .ndjson: another name of JSON lines
SUPPORTED_EXTENSIONS = (".txt", *JSON_EXTENSIONS, ".parquet", ".arrow")
COMPRESSION_SUFFIXES = (".gz", ".xz", ".bz2", ".zst")
SAVED_DATASET_FILES = ("dataset_info.json", "state.json")  # what `datasets.save_to_disk` writes next to the data
DOCUMENTATION_NAMES = ("readme", "license", "licence", "copying", "notice", "citation")  # a dataset folder's non-data
SKIPPED_NAMED = 5  # skipped files of a folder named in its warning (then a count)
PART_BYTES = 64 * 1024 * 1024  # target size of a byte-range part of an uncompressed JSON-lines / text file
PART_ROWS = 100_000  # target rows of a part of a saved dataset
START_DOCUMENTS = 100  # documents of each file read before a stream starts (`DataSource.check_starts`)
START_BUDGET = 100_000  # ... and in all, for many files (at least one a file)
CHUNK_BYTES = 1024 * 1024  # (decompressed) bytes of a LineChunk: whole lines read by one process, parsed by another
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark: not text
TEXT_LINE_ENDS = "\\n \\r\\n \\r"  # where a .txt line ends: universal newlines (see the module docstring)
SNIFF_BYTES = 4096  # bytes of a file's start examined to tell what it holds when its name may not say it


# ---------------------------------------------------------------------------------------------------------
# File lists: names, folders, patterns -> files
# ---------------------------------------------------------------------------------------------------------


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


def is_saved_dataset(path: str) -> bool:
    """Whether `path` is a folder written by `datasets.save_to_disk` (it holds dataset_info.json or state.json,
    or dataset_dict.json for several splits)."""
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, name)) for name in (*SAVED_DATASET_FILES, "dataset_dict.json")
    )


def has_supported_name(path: str) -> bool:
    name = path.lower()
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    return name.endswith(SUPPORTED_EXTENSIONS)


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

    @functools.lru_cache(maxsize=None)
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


def file_format(path: str) -> str:
    """'text', 'json', 'parquet', 'arrow' from the extension (compression suffixes allowed for text and JSON),
    or 'saved' for a `datasets.save_to_disk` folder; UsageError otherwise."""
    if is_saved_dataset(path):
        return "saved"
    name = path.lower()
    compressed = False
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name, compressed = name.removesuffix(suffix), True
    if name.endswith(".txt"):
        return "text"
    if name.endswith(JSON_EXTENSIONS):
        return "json"
    if name.endswith((".parquet", ".arrow")) and not compressed:
        return name.rsplit(".", 1)[1]
    raise UsageError(
        f"unsupported extension for {path}: use one of {', '.join(SUPPORTED_EXTENSIONS)} (.txt, .json, .jsonl and "
        f".ndjson optionally compressed: {', '.join(COMPRESSION_SUFFIXES)}) or a datasets.save_to_disk folder"
    )


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


def source_fingerprint(path: str) -> str:
    """What identifies the content of a data file or saved-dataset folder without reading it: path, size and
    mtime of the file, or of every file in the folder."""
    if os.path.isdir(path):
        stats = []
        for root, _, names in sorted(os.walk(path)):
            for name in sorted(names):
                full = os.path.join(root, name)
                stat = os.stat(full)
                stats.append(f"{os.path.relpath(full, path)}:{stat.st_size}:{stat.st_mtime_ns}")
        return f"{path}|" + ",".join(stats)
    if os.path.isfile(path):
        stat = os.stat(path)
        return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    return path


def reading_rule(path: str) -> str:
    """What, beyond its content, decides the documents read from `path`, for keys of what is made from them (the
    token cache, the stream index): '|lines:' and `TEXT_LINE_ENDS` for a text file (its documents changed when a bare
    CR became a line end), '' for every other source (their keys are what they were)."""
    name = path.lower()
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    return f"|lines:{TEXT_LINE_ENDS}" if name.endswith(".txt") and not os.path.isdir(path) else ""


# ---------------------------------------------------------------------------------------------------------
# Parts of files
# ---------------------------------------------------------------------------------------------------------


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


@contextlib.contextmanager
def open_binary(path: str) -> Iterator[tuple]:
    """(the content of `path` as a binary file, decompressing .gz/.xz/.bz2/.zst on the fly, and the raw file under
    it, whose `tell()` is the bytes of `path` read so far): a context manager closing both."""
    import bz2
    import gzip
    import lzma

    suffix = os.path.splitext(path)[1].lower()
    with open(path, "rb") as raw:
        problem = misnamed_content(path, raw)
        if problem:
            raise UsageError(problem)
        if suffix == ".zst":
            content = io.BufferedReader(_ZstdReader(raw), 1 << 20)
        elif suffix == ".gz":
            content = gzip.GzipFile(fileobj=raw)
        elif suffix in (".xz", ".bz2"):
            content = (lzma.LZMAFile if suffix == ".xz" else bz2.BZ2File)(raw)
        else:
            yield raw, raw
            return
        try:
            yield content, raw
        finally:
            content.close()


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of a .zst file (one or more frames), raising EOFError for a file cut inside a frame,
    which `zstandard`'s stream reader lets through as a silently shorter text."""

    def __init__(self, raw):
        import zstandard

        self._file, self._zstd = raw, zstandard.ZstdDecompressor()
        self._frame, self._buffer, self._offset, self._in_frame = self._zstd.decompressobj(), b"", 0, False

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        while not self._buffer:
            compressed = self._file.read(1 << 20)
            if not compressed:
                if self._in_frame:
                    raise EOFError("Compressed file ended before the end of its last zstd frame")
                return 0
            while compressed:
                self._in_frame = True
                self._buffer += self._frame.decompress(compressed)
                compressed = b""
                if self._frame.eof:
                    compressed, self._in_frame = self._frame.unused_data, False
                    self._frame = self._zstd.decompressobj()
        size = min(len(target), len(self._buffer) - self._offset)
        target[:size] = self._buffer[self._offset : self._offset + size]
        self._offset += size
        if self._offset == len(self._buffer):
            self._buffer, self._offset = b"", 0
        return size


def _is_compressed(path: str) -> bool:
    return path.lower().endswith(COMPRESSION_SUFFIXES)


# What a file holds, by the suffix that names it: as said in messages, and the magic bytes it starts with.
CONTENT_NAMES = {".gz": "gzip-compressed data", ".xz": "xz-compressed data", ".bz2": "bz2-compressed data",
                 ".zst": "zstd-compressed data", ".parquet": "Parquet data", ".arrow": "Arrow IPC data",
                 "text": "uncompressed text"}
MAGIC = {".gz": b"\x1f\x8b\x08", ".xz": b"\xfd7zXZ\x00", ".bz2": b"BZh", ".zst": b"\x28\xb5\x2f\xfd", ".parquet": b"PAR1",
         ".arrow": b"ARROW1", ".arrow stream": b"\xff\xff\xff\xff"}  # an Arrow IPC stream: its first message's marker
_BZ2_BLOCK = (b"1AY&SY", b"\x17rE8P\x90")  # after "BZh" and the block size: a block, or the end of an empty stream


def misnamed_content(path: str, raw=None) -> str | None:
    """One line saying that the file `path` holds something else than its name says, and what to name it, or None:
    compressed data (gzip, xz, bz2, zstd) under a name without that compression suffix or with another one,
    uncompressed text under a compression suffix, Parquet or Arrow data under a JSON/text name, or the reverse.
    Told from the file's first bytes (`raw`: the file open in binary, read from its start and put back there);
    costs one small read when the name fits (magic bytes, checked further only when they disagree with the name)."""
    named = _named_kind(path)
    if named is None:  # a folder, or an unsupported name: not ours to tell
        return None
    if raw is None:
        with open(path, "rb") as handle:
            return misnamed_content(path, handle)
    head = raw.read(16)
    raw.seek(0)
    if not head or (named in MAGIC and head.startswith(MAGIC[named])):
        return None
    if named == "text" and not head.startswith(tuple(MAGIC.values())):
        return None  # the usual case: a line file starting like text
    kind = _content_kind(path, raw)
    if kind is None or kind == named:
        return None
    base = os.path.basename(path)
    for suffix in COMPRESSION_SUFFIXES:
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
    stem = base
    for extension in SUPPORTED_EXTENSIONS:
        if stem.lower().endswith(extension):
            stem = stem[: -len(extension)]
    what = CONTENT_NAMES[kind]
    if named in (".parquet", ".arrow"):
        if kind in (".parquet", ".arrow"):
            return f"{path} holds {what}, not {CONTENT_NAMES[named]}: name it {stem}{kind}"
        if kind == "text":
            return f"{path} holds text, not {CONTENT_NAMES[named]}: name it after its format ({stem}.jsonl, {stem}.txt)"
        return (f"{path} holds {what}, not {CONTENT_NAMES[named]}: decompress it, or if it is compressed JSON lines or "
                f"text, name it {stem}.jsonl{kind} or {stem}.txt{kind}")
    if kind in (".parquet", ".arrow"):
        return f"{path} holds {what}: name it {stem}{kind}"
    if kind == "text":
        return f"{path} holds {what}, not {CONTENT_NAMES[named]}: name it {base}"
    if named != "text":
        return f"{path} holds {what}, not {CONTENT_NAMES[named]}: name it {base}{kind}"
    return f"{path} holds {what}: name it {base}{kind}"


def _named_kind(path: str) -> str | None:
    """What the name of `path` says it holds: a compression suffix (.gz, ...), '.parquet', '.arrow', 'text' (an
    uncompressed JSON or text file), or None (a folder, another name)."""
    name = path.lower()
    if os.path.isdir(path):
        return None
    if name.endswith(COMPRESSION_SUFFIXES):
        return os.path.splitext(name)[1]
    if name.endswith((".parquet", ".arrow")):
        return os.path.splitext(name)[1]
    return "text" if name.endswith((".txt", *JSON_EXTENSIONS)) else None


def _content_kind(path: str, raw) -> str | None:
    """What a file holds, from its first SNIFF_BYTES (`raw` put back at its start): a compression suffix (its magic
    bytes; bz2's, which are ASCII, confirmed by decompressing them), '.parquet' or '.arrow' (magic bytes, confirmed by
    pyarrow reading the file's metadata), 'text' (valid UTF-8), or None (none of these: damaged, or unknown)."""
    head = raw.read(SNIFF_BYTES)
    raw.seek(0)
    for suffix in (".gz", ".xz", ".zst"):
        if head.startswith(MAGIC[suffix]):
            return suffix
    if head.startswith(MAGIC[".bz2"]) and head[3:4] in b"123456789" and head[4:10] in _BZ2_BLOCK:
        import bz2

        try:
            bz2.BZ2Decompressor().decompress(head, max_length=1 << 16)
            return ".bz2"
        except (OSError, ValueError):
            pass
    if head.startswith((MAGIC[".parquet"], MAGIC[".arrow"], MAGIC[".arrow stream"])):
        import pyarrow as pa
        import pyarrow.parquet as pq

        readers = {".parquet": lambda: pq.read_metadata(path), ".arrow": lambda: _arrow_reader(path).schema}
        for kind in (".parquet", ".arrow"):
            try:
                readers[kind]()
                return kind
            except (pa.ArrowException, OSError, ValueError):
                continue
    if b"\0" in head:
        return None
    try:
        head.decode("utf-8")
        return "text"
    except UnicodeDecodeError as error:
        if error.reason == "unexpected end of data" and error.start >= len(head) - 3:
            return "text"  # a character cut by the end of what was read (or of a truncated file)
    return None


def _misnamed_or(path: str, message: str) -> str:
    """`message` about a file that could not be read, or, where its content is not what its name says, that."""
    try:
        return misnamed_content(path) or message
    except OSError:
        return message


def _arrow_reader(path: str):
    """An Arrow IPC reader over a memory map: the file format if the file has its footer, else the stream
    format (what `datasets` writes). Both give `num_record_batches` lazily via `batches()` below."""
    import pyarrow as pa

    source = pa.memory_map(path)
    try:
        return pa.ipc.open_file(source)
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source)


def _arrow_batches(reader) -> Iterator:
    if hasattr(reader, "num_record_batches"):
        for index in range(reader.num_record_batches):
            yield reader.get_batch(index)
    else:
        yield from reader


def _load_saved(path: str):
    import datasets

    try:
        dataset = datasets.load_from_disk(path)
    except Exception as error:  # datasets raises FileNotFoundError, ValueError, its own errors
        raise UsageError(f"{path} cannot be read as a datasets.save_to_disk folder: {first_line(error)}") from None
    if isinstance(dataset, datasets.DatasetDict):
        raise UsageError(f"{path} holds the splits {list(dataset)}: name one of their folders, e.g. {os.path.join(path, next(iter(dataset)))}")
    return dataset


def file_parts(path: str, fmt: str | None = None, target_parts: int = 1) -> list[DataPart]:
    """The parts of one file, in order: at least `target_parts` where the format can be split (Parquet row
    groups, Arrow record batches, byte ranges of an uncompressed JSON-lines/text file of at most PART_BYTES,
    contiguous shards of a saved dataset); a compressed file or a JSON list is one part."""
    fmt = fmt or file_format(path)
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            metadata = pq.ParquetFile(path).metadata
            groups = metadata.num_row_groups
            return [DataPart(path, fmt, g, g + 1, metadata.row_group(g).total_byte_size) for g in range(groups)] or [DataPart(path, fmt, 0, 0)]
        if fmt == "arrow":
            reader = _arrow_reader(path)
            count = reader.num_record_batches if hasattr(reader, "num_record_batches") else sum(1 for _ in reader)
            size = os.path.getsize(path) // max(count, 1)
            return [DataPart(path, fmt, b, b + 1, size) for b in range(count)] or [DataPart(path, fmt, 0, 0)]
        if fmt == "saved":
            rows = len(_load_saved(path))
            pieces = max(target_parts, -(-rows // PART_ROWS), 1)
            bounds = [rows * i // pieces for i in range(pieces + 1)]
            return [DataPart(path, fmt, a, b, b - a) for a, b in zip(bounds, bounds[1:]) if b > a] or [DataPart(path, fmt, 0, 0)]
    except UsageError:
        raise
    except Exception as error:  # pyarrow's ArrowInvalid / OSError for a damaged or mislabelled file
        raise UsageError(_misnamed_or(path, f"{path} cannot be read as {fmt}: {first_line(error)}")) from None
    size = os.path.getsize(path)
    if _is_compressed(path) or size == 0 or is_json_list(path, fmt):
        return [DataPart(path, fmt, size=size)]
    pieces = max(target_parts, -(-size // PART_BYTES))
    bounds = [size * i // pieces for i in range(pieces + 1)]
    return [DataPart(path, fmt, a, b, b - a) for a, b in zip(bounds, bounds[1:]) if b > a]


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


def data_parts(paths: list[str], target_parts: int = 1) -> list[DataPart]:
    """The parts of all `paths`, in order (each file split into about `target_parts` / len(paths) or more)."""
    per_file = max(1, -(-target_parts // max(len(paths), 1)))
    return [part for path in paths for part in file_parts(path, None, per_file)]


# ---------------------------------------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------------------------------------


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


@contextlib.contextmanager
def read_errors(path: str):
    """Errors of reading `path` as one-line UsageErrors naming it: not UTF-8, a damaged or mislabelled file."""
    import lzma

    try:
        yield
    except UnicodeDecodeError as error:
        raise UsageError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start} of its text)") from None
    except UsageError:
        raise
    except (EOFError, lzma.LZMAError, OSError) as error:  # a truncated .gz/.xz/.bz2/.zst
        message = f"{path} cannot be read: {first_line(error)} (a damaged or mislabelled compressed file?)"
        raise UsageError(_misnamed_or(path, message)) from None
    except Exception as error:  # zstandard.ZstdError, pyarrow.ArrowInvalid for a damaged file
        raise UsageError(_misnamed_or(path, f"{path} cannot be read: {first_line(error)} (a damaged file?)")) from None


def _check_text(path: str, where: str, record, text_column: str) -> dict:
    """`record`, a JSON value read at `where` of `path`; UsageError naming both unless it is an object whose
    `text_column` is text or null (see `text_problem`)."""
    problem = text_problem(record, text_column)
    if problem:
        raise UsageError(f"{path}, {where}: {problem}")
    return record


def text_problem(record, text_column: str) -> str | None:
    """What is wrong with a record's text, or None: no `text_column` field, a value other than text or null, or
    text that is not valid Unicode (a lone surrogate, which a JSON escape such as "\\ud800" can make: the
    tokenizer would fail on it)."""
    if not isinstance(record, dict):
        return f"not a JSON object with a {text_column!r} field (found {a_type_name(record)})"
    if text_column not in record:
        return f"no {text_column!r} field (found {list(record)}); set --text_column_name"
    text = record[text_column]
    if text is not None and not isinstance(text, str):
        return f"its {text_column!r} is {a_type_name(text)}, not text"
    if text and not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            return (f"its {text_column!r} holds a lone surrogate ({ascii(text[error.start])[1:-1]} at character "
                    f"{error.start + 1}), not valid Unicode")
    return None


def a_type_name(value) -> str:
    """The type of `value` with its article, for messages: 'an int', 'a str', 'an ndarray', 'a uint8', 'a NoneType'."""
    name = type(value).__name__
    return f"{indefinite_article(name)} {name}"


def indefinite_article(word: str) -> str:
    """'an' before a word said with a vowel sound ('an int', 'an object', 'an ndarray'), else 'a' ('a list', 'a
    uint8', 'a unicode string'): by its first letter, 'u' sounded 'you' in uint/uni/usa/use/uu, and nd- read
    letter by letter."""
    lower = word.lower()
    if lower.startswith(("uint", "uni", "usa", "use", "usu", "uu", "one")):
        return "a"
    return "an" if lower[:1] in tuple("aeiou") or lower.startswith("nd") else "a"


def _table_documents(part: DataPart, text_column: str) -> Iterator[dict]:
    """Rows of a Parquet row group, Arrow record batch or saved-dataset range; only the text column is read."""
    import pyarrow as pa

    path = part.path
    if part.fmt == "saved":
        dataset = _load_saved(path)
        start, stop = (0, len(dataset)) if part.start is None else (part.start, part.stop)
        _check_column(path, dataset.features.arrow_schema if hasattr(dataset.features, "arrow_schema") else dataset.data.schema, text_column)
        table = dataset.data.table if part.start is None else dataset.data.table.slice(start, stop - start)
        batches = ((start, batch) for batch in [table.select([text_column])])
    elif part.fmt == "parquet":
        import pyarrow.parquet as pq

        handle = pq.ParquetFile(path)
        _check_column(path, handle.schema_arrow, text_column)
        groups = range(handle.metadata.num_row_groups) if part.start is None else range(part.start, part.stop)
        first_rows = [0]
        for g in range(handle.metadata.num_row_groups):
            first_rows.append(first_rows[-1] + handle.metadata.row_group(g).num_rows)
        batches = ((first_rows[g], handle.read_row_group(g, columns=[text_column])) for g in groups)
    else:
        reader = _arrow_reader(path)
        _check_column(path, reader.schema, text_column)

        def arrow_batches():
            row = 0
            for index, batch in enumerate(_arrow_batches(reader)):
                if part.start is None or part.start <= index < part.stop:
                    yield row, batch.select([text_column])
                elif part.stop is not None and index >= part.stop:
                    return
                row += batch.num_rows

        batches = arrow_batches()
    for first_row, batch in batches:
        column = batch.column(0)
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        for offset, text in enumerate(column.to_pylist()):
            if text is not None and not isinstance(text, str):
                raise UsageError(f"{path}, row {first_row + offset + 1}: its {text_column!r} is {a_type_name(text)}, not text")
            yield {text_column: text}


def _check_column(path: str, schema, text_column: str) -> None:
    """UsageError unless `schema` has a string column `text_column` (named with the columns found)."""
    import pyarrow as pa

    if text_column not in schema.names:
        raise UsageError(f"{path}: no {text_column!r} column (found {schema.names}); set --text_column_name")
    kind = schema.field(text_column).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind) or pa.types.is_null(kind)):
        raise UsageError(f"{path}: its {text_column!r} column holds {kind}, not text")


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


def iter_line_chunks(part: DataPart, start: LinePosition | None = None, chunk_bytes: int | None = None) -> Iterator[LineChunk]:
    """The lines of a JSON-lines or text part, in `LineChunk`s of about `chunk_bytes` (CHUNK_BYTES) decompressed
    bytes: a whole file, compressed or not (a byte-order mark dropped), or, for an uncompressed file, the lines
    starting in bytes [part.start, part.stop). From the part's first line, or from `start`, a line start that
    `chunk_documents`' cursor recorded: an uncompressed file seeks there, a compressed one is decompressed up to it
    (not parsed). Lines end as the format says (`line_ends`): a chunk and a part end only where a line certainly
    starts (never between the \r and \n of a \r\n). Raises the reader's own errors (see `read_errors`)."""
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


def is_sequential(part) -> bool:
    """Whether a part can only be read from its start, by one reader: a compressed JSON-lines or text file."""
    return isinstance(part, DataPart) and part.fmt in ("json", "text") and part.start is None and _is_compressed(part.path)


def sequential_part_chunks(part: DataPart) -> Iterator:
    """A sequential part (see `is_sequential`) read (decompressed) here, as `LineChunk`s for other processes to
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
                _check_text(path, f"record {number if line else _line_number(path, line_start)}", document, text_column)  # raises
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
        yield _check_text(path, f"record {number}", record, text_column)


# ---------------------------------------------------------------------------------------------------------
# A data set
# ---------------------------------------------------------------------------------------------------------


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

    @property
    def fingerprints(self) -> list[str]:
        """What identifies the data's content for the token cache: each file's (or folder's files') path, size
        and mtime; the hub name for a hub dataset."""
        return [source_fingerprint(name) for name in self.names]

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
                    import pyarrow.parquet as pq

                    schema = {"parquet": lambda: pq.ParquetFile(path).schema_arrow,
                              "arrow": lambda: _arrow_reader(path).schema,
                              "saved": lambda: _load_saved(path).data.schema}[fmt]()
                    _check_column(path, schema, self.text_column)
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
