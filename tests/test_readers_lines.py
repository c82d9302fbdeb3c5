"""Lines of JSON-lines and text files (`patch_training.readers.lines`): byte ranges and chunks of any size give
each line once, a recorded line position reads on from there (a seek, or decompressing up to it), and text lines
end as Python's universal newlines and `datasets`' text loader end them."""

import gzip
import lzma

import pytest
from data_formats import python_lines

from patch_training import readers
from patch_training.readers import file_parts, iter_local_documents, iter_part_documents


@pytest.mark.parametrize("chunk_bytes", [1, 7, 200, readers.lines.CHUNK_BYTES])
@pytest.mark.parametrize("ending", ["\n", ""])
def test_byte_ranges_cover_every_line_once(tmp_path, monkeypatch, chunk_bytes, ending):
    """However an uncompressed file is cut, and whatever the size of the chunks it is read in (shorter than a
    line or not), the parts' documents are the file's: each line read by exactly the part where it starts
    (multi-byte characters, empty lines and a last line without a newline included); so are a compressed copy's,
    read whole."""
    monkeypatch.setattr(readers.lines, "CHUNK_BYTES", chunk_bytes)
    lines = [("é" * (i % 5)) + f"line {i} " + "x" * (i * 37 % 101) for i in range(300)]
    path = tmp_path / "lines.txt"
    path.write_text("\n\n".join(lines) + ending, encoding="utf-8")
    for pieces in (1, 2, 3, 7, 50, 997):
        parts = file_parts(str(path), "text", pieces)
        assert len(parts) == min(pieces, path.stat().st_size)
        assert [d["text"] for part in parts for d in iter_part_documents(part, "text")] == lines, pieces
    compressed = tmp_path / "lines.txt.xz"
    compressed.write_bytes(lzma.compress(b"\xef\xbb\xbf" + path.read_bytes()))
    assert [d["text"] for d in iter_local_documents([str(compressed)], "text", "text")] == lines


def test_a_recorded_line_position_reads_on_from_there(formats, tmp_path):
    """The cursor of a reading records where the next line starts; a reading from that position (a seek, or
    for a compressed file decompressing up to it) gives exactly the documents after it, for each JSON-lines
    and text format, plain and compressed, whole files and byte ranges."""
    for name in ("a.jsonl", "bom.jsonl", "crlf_bom.txt", "cr.txt", "mixed.txt.gz", "a.jsonl.gz", "a.jsonl.xz", "a.jsonl.bz2",
                 "a.jsonl.zst", "a.txt.zst"):
        for part in file_parts(formats[name], None, 3):
            whole = list(iter_part_documents(part, "text"))
            cursor, positions = [None], []
            for _ in iter_part_documents(part, "text", cursor=cursor):
                positions.append(cursor[0])
            for index in (0, 1, len(whole) // 2, len(whole) - 1):
                after = list(iter_part_documents(part, "text", start=positions[index]))
                assert after == whole[index + 1 :], (name, part, index)
            if not part.start:  # line numbers are counted when the part starts the file
                blank = name == "mixed.txt.gz"  # its 4th line ends with \r\r\n: a blank line after it
                assert positions[4].line == 6 + blank, (name, positions[4])


# Lines of a text file with every kind of line end, and characters that `str.splitlines` breaks at but Python's
# universal newlines (and so `datasets`' text loader) do not: form feed, vertical tab, \x1c, NEL, U+2028, U+2029.
INSIDE_A_LINE = " \f\v\x1c\x85\u2028\u2029"


LINE_END_TEXTS = [f"{'é' * (i % 3)}line {i}{INSIDE_A_LINE[i % 7]}end" for i in range(40)]


LINE_ENDS = {"cr": ["\r"], "mixed": ["\n", "\r", "\r\n", "\r\r\n", "\n\r", "\r\n\r\n", "\r\r"]}


@pytest.mark.parametrize("chunk_bytes", [1, 3, readers.lines.CHUNK_BYTES])
@pytest.mark.parametrize("style", ["cr", "mixed"])
def test_text_lines_end_as_python_and_datasets_read_them(tmp_path, monkeypatch, chunk_bytes, style):
    """Regression guard: a .txt file with bare-CR (old Mac) line ends is not one document. A text line
    ends at \\n, \\r\\n or a bare \\r, as Python's universal newlines and `datasets`' text loader read it (both
    compared); other characters `str.splitlines` breaks at stay in the line. Cut into byte ranges at every byte
    (so between the \\r and \\n of a \\r\\n, and after a \\r at a range's end) and read in chunks of any size, the
    parts give each line once; so do a compressed copy, read in chunks, and a reading resumed at each recorded
    line position."""
    import datasets

    monkeypatch.setattr(readers.lines, "CHUNK_BYTES", chunk_bytes)
    ends = LINE_ENDS[style]
    path = tmp_path / "lines.txt"
    path.write_bytes("".join(t + ends[i % len(ends)] for i, t in enumerate(LINE_END_TEXTS)).encode()[:-1])  # last end cut
    expected = python_lines(path)
    assert len(expected) == len(LINE_END_TEXTS) and sum(len(line.splitlines()) > 1 for line in expected) > 20  # not str.splitlines
    theirs = datasets.load_dataset("text", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))["text"]
    assert [t for t in theirs if t.strip()] == expected
    size = path.stat().st_size
    for pieces in (1, 2, 7, size):
        parts = file_parts(str(path), "text", pieces)
        assert [d["text"] for part in parts for d in iter_part_documents(part, "text")] == expected, pieces
    compressed = tmp_path / "lines.txt.gz"
    compressed.write_bytes(gzip.compress(path.read_bytes()))
    for name in (path, compressed):
        [part] = file_parts(str(name), "text")
        chunks = list(readers.iter_line_chunks(part, chunk_bytes=chunk_bytes))
        assert [d["text"] for c in chunks for d in readers.chunk_documents(c, "text")] == expected
        cursor, positions = [None], []
        for _ in iter_part_documents(part, "text", cursor=cursor):
            positions.append(cursor[0])
        for index in range(0, len(expected), 9):
            assert [d["text"] for d in iter_part_documents(part, "text", start=positions[index])] == expected[index + 1 :]
