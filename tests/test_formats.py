"""Data formats (`patch_training.readers`): every format and compression gives the same documents and the same
tokens; folders and glob patterns expand in sorted order; one large file split into parts (Parquet row groups,
Arrow record batches, JSON-lines byte ranges, saved-dataset shards) tokenises byte for byte as one process; a
damaged file of each format is one line naming the file."""

import bz2
import gzip
import json
import lzma
import re

import pytest
from conftest import TOKENIZER_DIR

from patch_training import readers
from patch_training.cli import UsageError
from patch_training.readers import DataSource, check_data_files, file_parts, iter_local_documents, iter_part_documents
from patch_training.token_cache import tokenize_to_cache

TEXTS = [f"Document {i}: naïve café — “quoted” {'word ' * (i % 7)}日本語 {i * i}" for i in range(120)]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def write_all_formats(folder) -> dict:
    """The documents TEXTS in each format the readers accept: {name: path}."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    jsonl = "".join(json.dumps({"text": t, "id": i}, ensure_ascii=False) + "\n" for i, t in enumerate(TEXTS))
    txt = "".join(t + "\n" for t in TEXTS)
    files = {}

    def put(name, data: bytes):
        (folder / name).write_bytes(data)
        files[name] = str(folder / name)

    put("a.jsonl", jsonl.encode())
    put("a.ndjson", jsonl.encode())
    put("a.ndjson.gz", gzip.compress(jsonl.encode()))
    put("a.json", json.dumps([{"text": t} for t in TEXTS]).encode())
    put("a.txt", txt.encode())
    put("crlf_bom.txt", b"\xef\xbb\xbf" + txt.replace("\n", "\r\n").encode())
    put("bom.jsonl", b"\xef\xbb\xbf" + jsonl.encode())
    put("a.jsonl.gz", gzip.compress(jsonl.encode()))
    put("a.jsonl.xz", lzma.compress(jsonl.encode()))
    put("a.jsonl.bz2", bz2.compress(jsonl.encode()))
    put("a.jsonl.zst", zstandard.ZstdCompressor().compress(jsonl.encode()))
    put("a.txt.zst", zstandard.ZstdCompressor().compress(txt.encode()))
    put("cr.txt", txt.replace("\n", "\r").encode())  # old Mac line ends
    ends = ["\n", "\r", "\r\n", "\r\r\n"]  # \r\r\n: a line end, then an empty line
    put("mixed.txt.gz", gzip.compress("".join(t + ends[i % 4] for i, t in enumerate(TEXTS)).encode()))
    table = pa.table({"id": list(range(len(TEXTS))), "text": TEXTS})
    pq.write_table(table, folder / "a.parquet", row_group_size=25)
    files["a.parquet"] = str(folder / "a.parquet")
    for name, writer in (("stream.arrow", pa.ipc.new_stream), ("file.arrow", pa.ipc.new_file)):
        with writer(str(folder / name), table.schema) as out:
            for batch in table.to_batches(max_chunksize=30):
                out.write_batch(batch)
        files[name] = str(folder / name)
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(folder / "saved"), num_shards=2)
    files["saved"] = str(folder / "saved")
    return files


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    folder = tmp_path_factory.mktemp("formats")
    return write_all_formats(folder)


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


def test_folders_patterns_and_mixed_lists(formats, tmp_path):
    """A folder and a glob pattern expand to their files in sorted order; a list may mix formats; an empty
    pattern or folder is one line."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for index in (2, 0, 1):
        (folder / f"{index:02d}.jsonl").write_text(json.dumps({"text": f"shard {index}"}) + "\n")
    (folder / ".hidden.jsonl").write_text("not read\n")
    (folder / "README.md").write_text("not data\n")
    expected = [str(folder / f"{i:02d}.jsonl") for i in range(3)]
    assert check_data_files(str(folder), "train_file") == (expected, "json")
    assert check_data_files(str(folder / "*.jsonl"), "train_file") == (expected, "json")
    paths, fmt = check_data_files(json.dumps([formats["a.parquet"], str(folder / "0[12].jsonl"), formats["saved"]]), "train_file")
    assert fmt == "mixed" and paths == [formats["a.parquet"], *expected[1:], formats["saved"]]
    texts = [d["text"] for d in iter_local_documents(paths, fmt, "text")]
    assert texts == TEXTS + ["shard 1", "shard 2"] + TEXTS
    with pytest.raises(UsageError, match=r"^--train_file: the pattern .*/nothing-\*\.zst matches no file$"):
        check_data_files(str(tmp_path / "nothing-*.zst"), "train_file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"the folder .*/empty holds no data file"):
        check_data_files(str(tmp_path / "empty"), "train_file")


@pytest.mark.parametrize("chunk_bytes", [1, 7, 200, readers.CHUNK_BYTES])
@pytest.mark.parametrize("ending", ["\n", ""])
def test_byte_ranges_cover_every_line_once(tmp_path, monkeypatch, chunk_bytes, ending):
    """However an uncompressed file is cut, and whatever the size of the chunks it is read in (shorter than a
    line or not), the parts' documents are the file's: each line read by exactly the part where it starts
    (multi-byte characters, empty lines and a last line without a newline included); so are a compressed copy's,
    read whole."""
    monkeypatch.setattr(readers, "CHUNK_BYTES", chunk_bytes)
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


@pytest.mark.parametrize("name", ["a.jsonl", "a.txt", "a.parquet", "stream.arrow", "file.arrow", "saved",
                                  "a.jsonl.xz", "a.jsonl.zst", "a.txt.zst", "a.jsonl.gz", "bom.jsonl", "cr.txt",
                                  "mixed.txt.gz"])
def test_one_file_tokenised_in_parallel_gives_the_same_bytes(formats, tokenizer, tmp_path, name, monkeypatch):
    """One file split into parts (row groups, record batches, byte ranges, dataset shards), or a compressed file
    decompressed by the main process and fed to the workers in chunks of lines, tokenised by 2 processes gives
    byte for byte the stream of 1 process."""
    monkeypatch.setattr(readers, "PART_ROWS", 40)
    monkeypatch.setattr(readers, "CHUNK_BYTES", 1000)
    source = DataSource.from_files(formats[name], "train_file")
    one = tokenize_to_cache(None, tokenizer, "text", 7, str(tmp_path / "one"), source=source)
    two = tokenize_to_cache(None, tokenizer, "text", 7, str(tmp_path / "two"), source=source, num_workers=2)
    assert two["num_jobs"] >= 2 and two["num_documents"] == len(TEXTS)
    assert (tmp_path / "one" / "tokens.bin").read_bytes() == (tmp_path / "two" / "tokens.bin").read_bytes()
    assert one["num_tokens"] == two["num_tokens"]


@pytest.mark.parametrize("files_per_worker", [1, 4])
def test_several_compressed_files_whole_or_in_chunks_give_the_same_bytes(formats, tokenizer, tmp_path, monkeypatch, files_per_worker):
    """Compressed files (with a compressed JSON list among them) tokenised by 2 processes, each file whole (as
    many files as FEED_FILES_PER_WORKER per worker) or fed in chunks, give byte for byte the stream of 1 process."""
    from patch_training import token_cache

    monkeypatch.setattr(readers, "CHUNK_BYTES", 3000)
    monkeypatch.setattr(token_cache, "FEED_FILES_PER_WORKER", files_per_worker)
    (tmp_path / "list.json.gz").write_bytes(gzip.compress(open(formats["a.json"], "rb").read()))
    files = [formats["a.jsonl.xz"], str(tmp_path / "list.json.gz"), formats["a.jsonl.zst"], formats["a.jsonl.bz2"]]
    source = DataSource.from_files(json.dumps(files), "train_file")
    one = tokenize_to_cache(None, tokenizer, "text", 7, str(tmp_path / "one"), source=source)
    two = tokenize_to_cache(None, tokenizer, "text", 7, str(tmp_path / "two"), source=source, num_workers=2)
    assert one["num_documents"] == two["num_documents"] == 4 * len(TEXTS)
    assert (two["num_jobs"] == 4) == (files_per_worker == 1)
    assert (tmp_path / "one" / "tokens.bin").read_bytes() == (tmp_path / "two" / "tokens.bin").read_bytes()


def damaged(formats, tmp_path) -> list:
    """(path, expected message) for a damaged or wrong file of each format."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cases = []
    for name in ("a.jsonl.gz", "a.jsonl.xz", "a.jsonl.bz2", "a.jsonl.zst", "a.parquet", "stream.arrow", "file.arrow"):
        data = open(formats[name], "rb").read()
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


def test_a_folder_names_the_files_it_skips(tmp_path, caplog):
    """Regression: a folder silently dropped the files it holds with other extensions (b.ndjson, d.csv). Now
    .ndjson, compressed or not, is JSON lines; every other file, data in another format or a dataset's README.md
    and LICENSE, is named in one warning (the first few, then a count) where the data is checked, not where the
    run identity lists the files; hidden files and folders are skipped unnamed; a folder holding no data file
    names what it holds."""
    import logging

    from patch_training.readers import expand_data_files

    folder = tmp_path / "mix"
    (folder / "notes").mkdir(parents=True)
    (folder / ".cache").mkdir()
    data = {"a.jsonl": "a", "b.ndjson": "b", "c.JSONL": "c", "e.ndjson.zst": "e"}
    import zstandard

    for name, text in data.items():
        line = (json.dumps({"text": text}) + "\n").encode()
        (folder / name).write_bytes(zstandard.ZstdCompressor().compress(line) if name.endswith(".zst") else line)
    for name in ("d.csv", "README.md", "LICENSE", "notes/more.md", ".gitattributes", ".cache/x.csv"):
        (folder / name).write_text("not data\n")
    with caplog.at_level(logging.INFO, logger="run_clm"):
        paths, fmt = check_data_files(str(folder), "train_file")
    assert [p.rsplit("/", 1)[1] for p in paths] == sorted(data) and fmt == "json"
    assert [d["text"] for d in iter_local_documents(paths, fmt, "text")] == ["a", "b", "c", "e"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"--train_file: skipping 4 files of the folder {folder} that are not data files (.txt, .json, "
                        ".jsonl, .ndjson, .parquet, .arrow; text and JSON optionally compressed): d.csv, LICENSE, "
                        "README.md, notes/more.md"], warnings
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="run_clm"):
        assert expand_data_files(str(folder), "train_file") == paths  # the run identity: no second warning
    assert not caplog.records
    for index in range(4):
        (folder / f"table{index}.csv").write_text("x\n")
    with caplog.at_level(logging.WARNING, logger="run_clm"):
        check_data_files(str(folder), "validation_file")
    assert caplog.records[-1].getMessage().endswith(": d.csv, table0.csv, table1.csv, table2.csv, table3.csv and 3 more")
    assert "skipping 8 files" in caplog.records[-1].getMessage()
    only = tmp_path / "only_csv"
    only.mkdir()
    (only / "x.csv").write_text("x\n")
    (only / "README.md").write_text("x\n")
    with pytest.raises(UsageError, match=r"^--train_file: the folder .*/only_csv holds no data file \(.*\): it holds x.csv, README.md$"):
        check_data_files(str(only), "train_file")
    for name in ("x.ndjson", "x.NDJSON.xz", "x.ndjson.bz2"):
        assert readers.file_format(name) == "json", name
    with pytest.raises(UsageError, match=r"unsupported extension for x.csv: .*\.ndjson"):
        readers.file_format("x.csv")


def test_a_pattern_reads_the_folders_it_matches(tmp_path, caplog):
    """Regression: a glob pattern dropped the folders it matched without a word (`data/*` over shard folders read
    only the loose files; `shards_*` matching only folders read nothing). Each match is now taken as if named:
    a folder gives its data files (recursively), a saved dataset is read whole (also inside a folder, and not its
    own .arrow/.json files under `**`), each file once; the matched folders' other files are named in one
    warning, and a pattern matching no data file is one line naming what it matches."""
    import logging

    import datasets

    data = tmp_path / "data"
    for shard in ("shard_b", "shard_a", "shard_a/deeper"):
        (data / shard).mkdir(parents=True)
    names = ["loose.jsonl", "shard_a/1.jsonl", "shard_a/deeper/2.txt", "shard_b/0.jsonl"]
    for name in names:
        (data / name).write_text(json.dumps({"text": name}) + "\n" if name.endswith(".jsonl") else name + "\n")
    (data / "shard_b" / "README.md").write_text("about shard b\n")
    (data / "LICENSE").write_text("the licence\n")
    (data / "empty_shard").mkdir()
    datasets.Dataset.from_dict({"text": ["saved 0", "saved 1"]}).save_to_disk(str(data / "shard_c"))
    read = lambda spec: [d["text"] for d in iter_local_documents(*check_data_files(spec, "train_file"), "text")]

    with caplog.at_level(logging.WARNING, logger="run_clm"):
        paths, fmt = check_data_files(str(data / "*"), "train_file")
    assert paths == [str(data / n) for n in ("loose.jsonl", "shard_a/1.jsonl", "shard_a/deeper/2.txt", "shard_b/0.jsonl",
                                              "shard_c")] and fmt == "mixed"
    assert [r.getMessage() for r in caplog.records] == [
        f"--train_file: skipping 3 files in the folders the pattern {data}/* matches that are not data files (.txt, "
        f".json, .jsonl, .ndjson, .parquet, .arrow; text and JSON optionally compressed): {data}/empty_shard/, "
        f"{data}/LICENSE, {data}/shard_b/README.md"]
    assert read(str(data / "*")) == names + ["saved 0", "saved 1"]
    assert read(str(data / "shard_*")) == names[1:] + ["saved 0", "saved 1"]  # folders only: read, not dropped
    assert check_data_files(str(data / "**"), "train_file")[0] == paths  # each file once, the saved dataset whole
    assert check_data_files(str(data), "train_file")[0] == paths  # the folder itself: the same files
    assert check_data_files(str(data / "shard_[ab]" / "*.jsonl"), "train_file")[0] == [paths[1], paths[3]]
    with pytest.raises(UsageError, match=r"^--train_file: the pattern .*/empty_\* matches no data file \(.*\): it "
                                         r"matches .*/empty_shard/$"):
        check_data_files(str(data / "empty_*"), "train_file")


def test_check_starts_reads_the_first_documents_of_each_file(tmp_path, monkeypatch):
    """`DataSource.check_starts` (what --streaming reads before it claims the output folder): the first
    START_DOCUMENTS documents of each line file (a bad record among them is one line naming it, one after them
    is left to the stream), a table's schema only, fewer documents a file when there are many (START_BUDGET in
    all), and "no text" only when every file was read to its end without one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def lines(name, texts):
        (tmp_path / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        return str(tmp_path / name)

    check = lambda *paths: DataSource.from_files(",".join(paths), "train_file").check_starts()
    start = readers.START_DOCUMENTS
    with pytest.raises(UsageError, match=r"early.jsonl, record 50: its 'text' is an int, not text$"):
        check(lines("early.jsonl", ["fine"] * 49 + [7]))
    check(lines("late.jsonl", ["fine"] * (start + 1) + [7]))  # found by the stream, after the claim
    with pytest.raises(UsageError, match=r"^the streamed training data holds no text$"):
        check(lines("blank.jsonl", [""] * (start - 1)), lines("nulls.jsonl", [None] * 3))
    check(lines("long_blank.jsonl", [""] * start))  # not known to end there: the stream will tell
    pq.write_table(pa.table({"text": [None, None]}), tmp_path / "nulls.parquet")
    check(str(tmp_path / "blank.jsonl"), str(tmp_path / "nulls.parquet"))  # a table's rows are not read
    monkeypatch.setattr(readers, "START_BUDGET", 20)
    check(*[lines(f"many{i}.jsonl", ["fine"] * 10 + [7]) for i in range(2)])  # 10 documents a file
    with pytest.raises(UsageError, match=r"many_2.jsonl, record 6: "):
        check(*[lines(f"many_{i}.jsonl", ["fine"] * (5 if i == 2 else 6) + [7]) for i in range(3)])  # 6 a file


def test_run_identity_holds_the_files_a_pattern_expands_to(tmp_path):
    """run_args.json records the expanded file list: a new shard matched by the same pattern is another run
    (a resume would otherwise silently train on other data), refused in one line."""
    import run_clm
    from conftest import REPO_ROOT

    from patch_training.identity import job_identity
    from patch_training.job import load_inputs
    from patch_training.run_dir import check_same_run, prepare_output_dir

    def identity_of(argv):
        args = run_clm.parse_arguments(argv)
        return job_identity(args, load_inputs(args))

    for index in (1, 0):
        (tmp_path / f"{index:02d}.jsonl").write_text(json.dumps({"text": f"shard {index}"}) + "\n")
    argv = ["--config_name", str(REPO_ROOT / "configs/model/llama-tiny.json"), "--train_file", str(tmp_path / "*.jsonl"),
            "--output_dir", str(tmp_path / "run"), "--use_cpu", "true", "--report_to", "none", "--block_size", "64"]
    identity = identity_of(argv)
    assert identity["train_files"] == [str(tmp_path / "00.jsonl"), str(tmp_path / "01.jsonl")]
    prepare_output_dir(str(tmp_path / "run"), identity, overwrite=False, is_main=True)
    check_same_run(str(tmp_path / "run"), identity_of(argv))
    (tmp_path / "02.jsonl").write_text(json.dumps({"text": "a new shard"}) + "\n")
    with pytest.raises(UsageError, match=r"holds a different run \(train_files: .*02.jsonl"):
        check_same_run(str(tmp_path / "run"), identity_of(argv))


# Lines of a text file with every kind of line end, and characters that `str.splitlines` breaks at but Python's
# universal newlines (and so `datasets`' text loader) do not: form feed, vertical tab, \x1c, NEL, U+2028, U+2029.
INSIDE_A_LINE = " \f\v\x1c\x85\u2028\u2029"
LINE_END_TEXTS = [f"{'é' * (i % 3)}line {i}{INSIDE_A_LINE[i % 7]}end" for i in range(40)]
LINE_ENDS = {"cr": ["\r"], "mixed": ["\n", "\r", "\r\n", "\r\r\n", "\n\r", "\r\n\r\n", "\r\r"]}


def python_lines(path) -> list[str]:
    """The non-blank lines of a text file as Python's universal newlines read them (the reference)."""
    with open(path, encoding="utf-8", newline=None) as handle:
        return [line for line in handle.read().split("\n") if line.strip()]


@pytest.mark.parametrize("chunk_bytes", [1, 3, readers.CHUNK_BYTES])
@pytest.mark.parametrize("style", ["cr", "mixed"])
def test_text_lines_end_as_python_and_datasets_read_them(tmp_path, monkeypatch, chunk_bytes, style):
    """Regression: a .txt file with bare-CR (old Mac) line ends was one document, without a word. A text line
    ends at \\n, \\r\\n or a bare \\r, as Python's universal newlines and `datasets`' text loader read it (both
    compared); other characters `str.splitlines` breaks at stay in the line. Cut into byte ranges at every byte
    (so between the \\r and \\n of a \\r\\n, and after a \\r at a range's end) and read in chunks of any size, the
    parts give each line once; so do a compressed copy, read in chunks, and a reading resumed at each recorded
    line position."""
    import datasets

    monkeypatch.setattr(readers, "CHUNK_BYTES", chunk_bytes)
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


def test_a_text_file_gets_a_new_cache_key_other_formats_keep_theirs(formats, tokenizer):
    """A text file's documents changed when a bare \\r became a line end, so its token cache and stream index keys
    changed (`readers.reading_rule`); every other format reads as before and keeps its key (no re-tokenising)."""
    from patch_training import token_cache

    keys = {name: token_cache.cache_key([path], tokenizer, "text") for name, path in formats.items()}
    token_cache.reading_rule, rule = (lambda path: ""), token_cache.reading_rule  # the key as it was
    try:
        before = {name: token_cache.cache_key([path], tokenizer, "text") for name, path in formats.items()}
    finally:
        token_cache.reading_rule = rule
    changed = {name for name in formats if keys[name] != before[name]}
    assert changed == {"a.txt", "crlf_bom.txt", "cr.txt", "a.txt.zst", "mixed.txt.gz"}, changed


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
        ("gp.parquet", pack["gzip"](parquet), "holds gzip-compressed data, not Parquet data: decompress it, or if it "
                                              "is compressed JSON lines or text, name it gp.jsonl.gz or gp.txt.gz"),
    ]
    result = []
    for name, content, message in cases:
        (folder / name).write_bytes(content)
        suggested = message.rsplit("name it ", 1)[1] if message.count("name it") == 1 and " or " not in message else None
        result.append((folder / name, message, suggested))
    return result


def test_data_under_another_name_is_one_line_saying_what_it_is(tmp_path, tokenizer):
    """Regression: a gzip file named .jsonl was "not UTF-8 text (invalid start byte at byte 1)". Compressed data
    (gzip, xz, bz2, zstd: made by the stdlib and zstandard) named without its compression suffix or with another,
    text under a compression suffix, Parquet or Arrow (file or stream format) under a JSON/text name, and the
    reverse: one line naming the file, what it holds and what to name it, whether read whole, in byte ranges, by 2
    processes or by --streaming's first look; named so, it reads the documents written."""
    (tmp_path / "data").mkdir()
    for path, message, suggested in misnamed(tmp_path / "data"):
        expected = rf"^{path} {message.replace('(', '[(]').replace(')', '[)]')}$"
        source = DataSource.from_files(str(path), "train_file")
        readings = {
            "whole": lambda: list(iter_local_documents([str(path)], None, "text")),
            "parts": lambda: [d for part in file_parts(str(path), None, 3) for d in iter_part_documents(part, "text")],
            "check_starts": source.check_starts,
            "tokenised": lambda: tokenize_to_cache(None, tokenizer, "text", 8, str(tmp_path / "cache" / path.name), source=source),
        }
        if path.name in ("b.txt", "gx.jsonl.xz", "pa.arrow"):  # one of each route: a worker, the main's chunks, a table
            readings["2 processes"] = lambda: tokenize_to_cache(None, tokenizer, "text", 8, str(tmp_path / "cache" / path.name),
                                                                source=source, num_workers=2)
        for how, read in readings.items():
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
    compressed file holds no documents, as before."""
    def examined(path, raw):
        raise AssertionError(f"{path} examined beyond its first bytes")

    monkeypatch.setattr(readers, "_content_kind", examined)
    for name, path in formats.items():
        assert [d["text"] for d in iter_local_documents(*check_data_files(path, "train_file"), "text")] == TEXTS, name
    monkeypatch.undo()
    for start in ("BZh91AY&SY is a line\n", "PAR1 starts this\n", "ARROW1 too\n"):
        path = tmp_path / "look_alike.txt"
        path.write_text(start + "an ordinary line\nthe end PAR1")
        assert [d["text"] for d in iter_local_documents([str(path)], "text", "text")] == python_lines(path)
    (tmp_path / "empty.jsonl.gz").write_bytes(b"")
    assert list(iter_local_documents([str(tmp_path / "empty.jsonl.gz")], "json", "text")) == []


def test_type_names_take_their_article():
    """Regression: "its 'text' is a int". Every message that names a type says 'an int', 'a str', ..."""
    from patch_training.readers import a_type_name, indefinite_article

    assert [a_type_name(v) for v in (5, "x", 1.5, True, None, [1], {}, b"", object())] == [
        "an int", "a str", "a float", "a bool", "a NoneType", "a list", "a dict", "a bytes", "an object"]
    words = {"int64": "an", "uint8": "a", "ndarray": "an", "Image": "an", "unicode": "a", "Decimal": "a", "OrderedDict": "an"}
    assert {word: indefinite_article(word) for word in words} == words
