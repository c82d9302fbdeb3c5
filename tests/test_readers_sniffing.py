"""What a file holds against what its name says (`patch_training.readers.sniffing`): data under another kind's
name is one line saying what it holds and what to name it, a file named right is never examined beyond its first
bytes, and a damaged file of each format is one line naming it."""

import bz2
import gzip
import json
import lzma
import re
from pathlib import Path

import pytest
from conftest import TOKENIZER_DIR
from data_formats import TEXTS, python_lines

from patch_training import readers
from patch_training.cli import UsageError
from patch_training.readers import (
    DataSource,
    check_data_files,
    file_parts,
    iter_local_documents,
    iter_part_documents,
)
from patch_training.token_cache import tokenize_to_cache


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def misnamed(folder) -> list:
    """(path, expected message, the name it suggests or None) for data of one kind under another kind's name."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    jsonl = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS).encode()
    txt = "".join(t + "\n" for t in TEXTS).encode()
    table = pa.table({"text": TEXTS})
    pq.write_table(table, folder / "real.parquet", row_group_size=50)
    parquet = (folder / "real.parquet").read_bytes()
    for name, writer in (("real.arrow", pa.ipc.new_file), ("real_stream.arrow", pa.ipc.new_stream)):
        with writer(str(folder / name), table.schema) as out:
            out.write_table(table)
    arrow, stream = (folder / "real.arrow").read_bytes(), (folder / "real_stream.arrow").read_bytes()
    pack = {"gzip": gzip.compress, "xz": lzma.compress, "bz2": bz2.compress,
            "zstd": zstandard.ZstdCompressor().compress}
    cases = [  # (name, content, what it is said to hold, rest of the message after ": ", or None)
        ("g.jsonl", pack["gzip"](jsonl), "holds gzip-compressed data: name it g.jsonl.gz"),
        ("x.jsonl", pack["xz"](jsonl), "holds xz-compressed data: name it x.jsonl.xz"),
        ("b.txt", pack["bz2"](txt), "holds bz2-compressed data: name it b.txt.bz2"),
        ("z.ndjson", pack["zstd"](jsonl), "holds zstd-compressed data: name it z.ndjson.zst"),
        ("list.json", pack["gzip"](json.dumps([{"text": t} for t in TEXTS]).encode()),
         "holds gzip-compressed data: name it list.json.gz"),
        ("gx.jsonl.xz", pack["gzip"](jsonl), "holds gzip-compressed data, not xz-compressed data: name it gx.jsonl.gz"),
        ("xg.txt.gz", pack["xz"](txt), "holds xz-compressed data, not gzip-compressed data: name it xg.txt.xz"),
        ("zb.jsonl.bz2", pack["zstd"](jsonl), "holds zstd-compressed data, not bz2-compressed data: name it zb.jsonl.zst"),
        ("bz.JSONL.zst", pack["bz2"](jsonl), "holds bz2-compressed data, not zstd-compressed data: name it bz.JSONL.bz2"),
        ("plain.jsonl.gz", jsonl, "holds uncompressed text, not gzip-compressed data: name it plain.jsonl"),
        ("plain.txt.zst", txt, "holds uncompressed text, not zstd-compressed data: name it plain.txt"),
        ("p.jsonl", parquet, "holds Parquet data: name it p.parquet"),
        ("pg.jsonl.gz", parquet, "holds Parquet data: name it pg.parquet"),
        ("a.txt", arrow, "holds Arrow IPC data: name it a.arrow"),
        ("s.jsonl", stream, "holds Arrow IPC data: name it s.arrow"),
        ("sp.parquet", stream, "holds Arrow IPC data, not Parquet data: name it sp.arrow"),
        ("pa.arrow", parquet, "holds Parquet data, not Arrow IPC data: name it pa.parquet"),
        ("gp.parquet", pack["gzip"](parquet), ("holds gzip-compressed data, not Parquet data: decompress it, or if it "
                                               "is compressed JSON lines or text, name it gp.jsonl.gz or gp.txt.gz")),
    ]
    result = []
    for name, content, message in cases:
        (folder / name).write_bytes(content)
        suggested = message.rsplit("name it ", 1)[1] if message.count("name it") == 1 and " or " not in message else None
        result.append((folder / name, message, suggested))
    return result


def readings(path, tokenizer, cache: str) -> dict:
    """{how: a function reading the file `path` that way}: whole, in byte ranges, by --streaming's first look,
    tokenised into `cache`; also by 2 processes for one file of each route (a worker, the main process's chunks,
    a table)."""
    source = DataSource.from_files(str(path), "train_file")
    ways = {
        "whole": lambda: list(iter_local_documents([str(path)], None, "text")),
        "parts": lambda: [d for part in file_parts(str(path), None, 3) for d in iter_part_documents(part, "text")],
        "check_starts": source.check_starts,
        "tokenised": lambda: tokenize_to_cache(None, tokenizer, "text", 8, cache, source=source),
    }
    if path.name in ("b.txt", "gx.jsonl.xz", "pa.arrow"):
        ways["2 processes"] = lambda: tokenize_to_cache(None, tokenizer, "text", 8, cache, source=source, num_workers=2)
    return ways


def test_data_under_another_name_is_one_line_saying_what_it_is(tmp_path, tokenizer):
    """Regression guard: a gzip file named .jsonl is not "not UTF-8 text (invalid start byte at byte 1)". Compressed data
    (gzip, xz, bz2, zstd: made by the stdlib and zstandard) named without its compression suffix or with another,
    text under a compression suffix, Parquet or Arrow (file or stream format) under a JSON/text name, and the
    reverse: one line naming the file, what it holds and what to name it, whether read whole, in byte ranges, by 2
    processes or by --streaming's first look; named so, it reads the documents written."""
    (tmp_path / "data").mkdir()
    for path, message, suggested in misnamed(tmp_path / "data"):
        expected = rf"^{path} {message.replace('(', '[(]').replace(')', '[)]')}$"
        for how, read in readings(path, tokenizer, str(tmp_path / "cache" / path.name)).items():
            with pytest.raises(UsageError) as error:
                read()
            assert re.match(expected, str(error.value)), (how, str(error.value))
        assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir()), path
        if suggested:
            renamed = path.rename(path.parent / suggested)
            assert [d["text"] for d in iter_local_documents([str(renamed)], None, "text")] == TEXTS, renamed


def test_files_named_right_are_never_taken_for_misnamed(formats, tmp_path, monkeypatch):
    """The check costs nothing where the name is right: no file of any format is examined beyond its first
    16 bytes; text that starts like bz2, Parquet or Arrow magic bytes (and ends like Parquet) is text; an empty
    compressed file holds no documents."""
    def examined(path, raw):
        raise AssertionError(f"{path} examined beyond its first bytes")

    monkeypatch.setattr(readers.sniffing, "_content_kind", examined)
    for name, path in formats.items():
        assert [d["text"] for d in iter_local_documents(*check_data_files(path, "train_file"), "text")] == TEXTS, name
    monkeypatch.undo()
    for start in ("BZh91AY&SY is a line\n", "PAR1 starts this\n", "ARROW1 too\n"):
        path = tmp_path / "look_alike.txt"
        path.write_text(start + "an ordinary line\nthe end PAR1")
        assert [d["text"] for d in iter_local_documents([str(path)], "text", "text")] == python_lines(path)
    (tmp_path / "empty.jsonl.gz").write_bytes(b"")
    assert list(iter_local_documents([str(tmp_path / "empty.jsonl.gz")], "json", "text")) == []


def damaged(formats, tmp_path) -> list:
    """(path, expected message) for a damaged or wrong file of each format."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cases = []
    for name in ("a.jsonl.gz", "a.jsonl.xz", "a.jsonl.bz2", "a.jsonl.zst", "a.parquet", "stream.arrow", "file.arrow"):
        data = Path(formats[name]).read_bytes()
        path = tmp_path / f"cut-{name}"
        path.write_bytes(data[: len(data) // 2])
        cases.append((path, "cannot be read"))
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(bytes(range(256)) * 10)
    cases.append((garbage, "cannot be read"))
    text = tmp_path / "text.parquet"
    text.write_bytes(b"this is not parquet at all" * 10)
    cases.append((text, r"text.parquet holds text, not Parquet data: name it after its format \(text.jsonl, text.txt\)$"))
    no_text = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"content": ["a"], "id": [1]}), no_text)
    cases.append((no_text, r"no 'text' column \(found \['content', 'id'\]\); set --text_column_name"))
    numbers = tmp_path / "numbers.arrow"
    with pa.ipc.new_stream(str(numbers), pa.schema([("text", pa.int64())])) as out:
        out.write_batch(pa.record_batch([pa.array([1, 2])], names=["text"]))
    cases.append((numbers, "its 'text' column holds int64, not text"))
    saved = tmp_path / "broken_saved"
    saved.mkdir()
    (saved / "state.json").write_text("{not json")
    cases.append((saved, "cannot be read as a datasets.save_to_disk folder"))
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"text": "ok"}\n' * 3 + '{"text": 5}\n')
    cases.append((bad_line, r"bad.jsonl, record 4: its 'text' is an int, not text$"))
    return cases


def test_damaged_files_are_one_line_naming_the_file(formats, tokenizer, tmp_path):
    """A damaged file of each format (cut in half, not that format, a missing or non-text column, a broken
    saved dataset) is refused with one line naming it, whether read whole or in parallel parts; no cache left."""
    for path, message in damaged(formats, tmp_path):
        for workers in (1, 2):
            with pytest.raises(UsageError, match=message) as error:
                source = DataSource.from_files(str(path), "train_file")
                tokenize_to_cache(None, tokenizer, "text", 8, str(tmp_path / "cache" / path.name), source=source, num_workers=workers)
            assert str(path) in str(error.value) and "\n" not in str(error.value), (path, str(error.value))
            assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir()), path
