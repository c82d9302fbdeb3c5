"""Data formats (`patch_training.readers`): every format and compression gives the same documents and the same
tokens; folders and glob patterns expand in sorted order; one large file split into parts (Parquet row groups,
Arrow record batches, JSON-lines byte ranges, saved-dataset shards) tokenises byte for byte as one process; a
damaged file of each format is one line naming the file."""

import bz2
import gzip
import json
import lzma

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
    for name in ("a.jsonl", "bom.jsonl", "crlf_bom.txt", "a.jsonl.gz", "a.jsonl.xz", "a.jsonl.bz2", "a.jsonl.zst", "a.txt.zst"):
        for part in file_parts(formats[name], None, 3):
            whole = list(iter_part_documents(part, "text"))
            cursor, positions = [None], []
            for _ in iter_part_documents(part, "text", cursor=cursor):
                positions.append(cursor[0])
            for index in (0, 1, len(whole) // 2, len(whole) - 1):
                after = list(iter_part_documents(part, "text", start=positions[index]))
                assert after == whole[index + 1 :], (name, part, index)
            if not part.start:  # line numbers are counted when the part starts the file
                assert positions[4].line == 6, (name, positions[4])


@pytest.mark.parametrize("name", ["a.jsonl", "a.txt", "a.parquet", "stream.arrow", "file.arrow", "saved",
                                  "a.jsonl.xz", "a.jsonl.zst", "a.txt.zst", "a.jsonl.gz", "bom.jsonl"])
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
    garbage.write_bytes(b"this is not parquet at all" * 10)
    cases.append((garbage, "cannot be read"))
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
    cases.append((bad_line, r"bad.jsonl, record 4: its 'text' is a int, not text"))
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
    with pytest.raises(UsageError, match=r"early.jsonl, record 50: its 'text' is a int, not text"):
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

    from patch_training.resume import check_same_run, prepare_output_dir

    for index in (1, 0):
        (tmp_path / f"{index:02d}.jsonl").write_text(json.dumps({"text": f"shard {index}"}) + "\n")
    argv = ["--config_name", str(REPO_ROOT / "configs/model/llama-tiny.json"), "--train_file", str(tmp_path / "*.jsonl"),
            "--output_dir", str(tmp_path / "run"), "--use_cpu", "true", "--report_to", "none"]
    identity = run_clm.job_identity(*run_clm.parse_arguments(argv))
    assert identity["train_files"] == [str(tmp_path / "00.jsonl"), str(tmp_path / "01.jsonl")]
    prepare_output_dir(str(tmp_path / "run"), identity, overwrite=False, is_main=True)
    check_same_run(str(tmp_path / "run"), run_clm.job_identity(*run_clm.parse_arguments(argv)))
    (tmp_path / "02.jsonl").write_text(json.dumps({"text": "a new shard"}) + "\n")
    with pytest.raises(UsageError, match=r"holds a different run \(train_files: .*02.jsonl"):
        check_same_run(str(tmp_path / "run"), run_clm.job_identity(*run_clm.parse_arguments(argv)))
