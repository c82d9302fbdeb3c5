"""Documents from each format (`patch_training.readers.documents`, `.checks`, `.compression`): every format and
compression gives the documents written and the same tokens, as `datasets` reads them; a bad record is one line
naming the file and the record, wherever it is read; messages name types with their article."""

import json

import pytest
from conftest import TOKENIZER_DIR
from data_formats import TEXTS

from patch_training.blocks import StreamingTokenBlocks
from patch_training.cli import UsageError
from patch_training.readers import DataSource, check_data_files, iter_local_documents
from patch_training.token_cache import tokenize_to_cache


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def test_every_format_gives_the_documents_and_the_tokens(formats, tokenizer, tmp_path):
    """Each format and compression reads back exactly the texts written (null-free, in order), and tokenises
    into the same token stream; datasets' own readers agree on the Parquet and Arrow files."""
    import datasets

    streams = {}
    for name, path in formats.items():
        paths, fmt = check_data_files(path, "train_file")
        assert [d["text"] for d in iter_local_documents(paths, fmt, "text")] == TEXTS, name
        tokenize_to_cache(None, tokenizer, "text", 16, str(tmp_path / name), source=DataSource.from_files(path, "train_file"))
        streams[name] = (tmp_path / name / "tokens.bin").read_bytes()
    assert len(set(streams.values())) == 1, {name: len(s) for name, s in streams.items()}
    for name, kind in (("a.parquet", "parquet"), ("stream.arrow", "arrow")):
        theirs = datasets.load_dataset(kind, data_files=formats[name], split="train", cache_dir=str(tmp_path / "hf"))
        assert theirs["text"] == TEXTS


def test_local_readers_match_datasets(tmp_path):
    """Our lazy local reader yields the documents `datasets` reads from .jsonl, .json (a list), .txt and
    compressed files."""
    import lzma

    import datasets

    records = [{"text": f"document {i} " * (i + 1), "source": "x"} for i in range(5)]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    as_list = tmp_path / "b.json"
    as_list.write_text(json.dumps(records))
    compressed = tmp_path / "c.jsonl.xz"
    with lzma.open(compressed, "wt") as handle:
        handle.write(jsonl.read_text())
    text = tmp_path / "d.txt"
    text.write_text("first line\n\nsecond line\n")
    for path, fmt in [(jsonl, "json"), (as_list, "json"), (compressed, "json"), (text, "text")]:
        ours = [d["text"] for d in iter_local_documents([str(path)], fmt, "text")]
        theirs = [d["text"] for d in datasets.load_dataset(fmt, data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))]
        assert ours == [t for t in theirs if t.strip()], path


def test_bad_records_are_named(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(UsageError, match=r"bad.jsonl, line 2: not valid JSON"):
        list(iter_local_documents([str(bad_json)], "json", "text"))
    no_column = tmp_path / "nocol.jsonl"
    no_column.write_text('{"content": "ok"}\n')
    with pytest.raises(UsageError, match=r"nocol.jsonl, record 1: no 'text' field \(found \['content'\]\); set --text_column_name"):
        list(iter_local_documents([str(no_column)], "json", "text"))
    for line, found in (("[1, 2]", "a list"), ("7", "an int"), ('"text"', "a str"), ("null", "a NoneType")):
        not_object = tmp_path / "not_object.jsonl"
        not_object.write_text('{"text": "ok"}\n' + line + "\n")
        with pytest.raises(UsageError, match=rf"^{not_object}, record 2: not a JSON object with a 'text' field \(found {found}\)$"):
            list(iter_local_documents([str(not_object)], "json", "text"))


SURROGATES = [("\\ud800", "\\ud800"), ("\\uDFFF", "\\udfff"), ("\\ud83d x", "\\ud83d")]  # JSON escape, as named


@pytest.mark.parametrize("escape,named", SURROGATES)
def test_a_lone_surrogate_is_named_wherever_it_is_read(tmp_path, escape, named):
    """Regression guard: valid JSON holding a lone surrogate ("\\ud800", or a pair cut in half) is a str that is
    not Unicode, on which the tokenizer fails with a TypeError traceback. It is one line naming file and record,
    read whole or in a byte range, compressed, as a JSON list, tokenised by 2 processes, or streamed; a valid
    pair and an escaped backslash before 'u' are text."""
    import gzip
    import itertools
    import re

    from transformers import AutoTokenizer

    from patch_training.readers import file_parts, iter_part_documents

    good = ['{"text": "ok \\ud83d\\ude00 pair"}', '{"text": "C:\\\\ud800 not an escape"}', '{"text": "caf\\u00e9"}']
    bad = f'{{"text": "bad {escape} surrogate", "id": 9}}'
    lines = good * 17 + [bad]
    message = re.escape(f"record 52: its 'text' holds a lone surrogate ({named} at character 5), not valid Unicode") + "$"
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    as_list = tmp_path / "x.json"
    as_list.write_text("[" + ",\n".join(lines) + "]")
    compressed = tmp_path / "x.jsonl.gz"
    compressed.write_bytes(gzip.compress(jsonl.read_bytes()))
    assert [d["text"] for d in itertools.islice(iter_local_documents([str(jsonl)], "json", "text"), 3)] == ["ok 😀 pair", "C:\\ud800 not an escape", "café"]
    for path in (jsonl, as_list, compressed):
        with pytest.raises(UsageError, match=rf"^{path}, {message}"):
            list(iter_local_documents([str(path)], "json", "text"))
    last = file_parts(str(jsonl), "json", target_parts=4)[-1]  # a byte range: its line numbers counted on error
    assert last.start > 0
    with pytest.raises(UsageError, match=rf"^{jsonl}, {message}"):
        list(iter_part_documents(last, "text"))
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    for workers in (1, 2):
        with pytest.raises(UsageError, match=rf"^{jsonl}, {message}"):
            tokenize_to_cache(None, tokenizer, "text", 5, str(tmp_path / f"cache{workers}"),
                              source=DataSource.from_files(str(jsonl), "train_file"), num_workers=workers)
        assert not (tmp_path / f"cache{workers}").exists()
    streamed = StreamingTokenBlocks(DataSource.from_files(str(jsonl), "train_file"), tokenizer, "text", 0, 10**6, 64)
    with pytest.raises(UsageError, match=rf"^{jsonl}, {message}"):
        list(streamed)


def test_type_names_take_their_article():
    """Regression guard against "its 'text' is a int": every message that names a type says 'an int', 'a str', ..."""
    from patch_training.readers import a_type_name, indefinite_article

    assert [a_type_name(v) for v in (5, "x", 1.5, True, None, [1], {}, b"", object())] == [
        "an int", "a str", "a float", "a bool", "a NoneType", "a list", "a dict", "a bytes", "an object"]
    words = {"int64": "an", "uint8": "a", "ndarray": "an", "Image": "an", "unicode": "a", "Decimal": "a", "OrderedDict": "an"}
    assert {word: indefinite_article(word) for word in words} == words
