"""Telling what a file holds from its first bytes when its name may not say it, and the one-line errors of a file
that cannot be read.

The name must say what a file holds: content under another name (gzip, xz, bz2 or zstd data named without that
suffix or with another one, uncompressed text named `.gz`, Parquet or Arrow data named `.jsonl`/`.txt`, ...) is one
line saying what it holds and what to name it (`misnamed_content`), found from the first bytes (read when a line
file is opened, and for Parquet/Arrow only when reading fails).

Not part of the reading rule (`rule.READING_RULE_MODULES`): what is here only refuses a file, never changes the
documents of one that reads.
"""

from __future__ import annotations

import contextlib
import os

from ..cli import UsageError, first_line
from .formats import (
    JSON_EXTENSIONS,
    SUPPORTED_EXTENSIONS,
    compression_suffix,
    strip_compression,
)
from .tables import arrow_reader

SNIFF_BYTES = 4096  # bytes of a file's start examined to tell what it holds when its name may not say it

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
    base = strip_compression(os.path.basename(path))
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
    if compression_suffix(name):
        return compression_suffix(name)
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

        readers = {".parquet": lambda: pq.read_metadata(path), ".arrow": lambda: arrow_reader(path).schema}
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


def misnamed_or(path: str, message: str) -> str:
    """`message` about a file that could not be read, or, where its content is not what its name says, that."""
    try:
        return misnamed_content(path) or message
    except OSError:
        return message


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
        raise UsageError(misnamed_or(path, message)) from None
    except Exception as error:  # zstandard.ZstdError, pyarrow.ArrowInvalid for a damaged file
        raise UsageError(misnamed_or(path, f"{path} cannot be read: {first_line(error)} (a damaged file?)")) from None

