"""Opening a JSON-lines or text file as its content: .gz, .xz, .bz2 and .zst decompressed on the fly, after a check
that the file holds what its name says (`sniffing.misnamed_content`).

Part of the reading rule (`rule.READING_RULE_MODULES`): these are the bytes that are split into lines.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

from ..cli import UsageError
from .formats import compression_suffix
from .sniffing import misnamed_content


@contextlib.contextmanager
def open_binary(path: str) -> Iterator[tuple]:
    """(the content of `path` as a binary file, decompressing .gz/.xz/.bz2/.zst on the fly, and the raw file under
    it, whose `tell()` is the bytes of `path` read so far): a context manager closing both. UsageError for a file
    whose first bytes are not what its name says (`misnamed_content`)."""
    import bz2
    import gzip
    import lzma

    suffix = compression_suffix(path)
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
