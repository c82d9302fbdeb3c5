"""Data file specs -> files (`patch_training.readers.files`, `.formats`): folders and glob patterns expand in sorted
order, mixed lists, the files a folder or pattern skips named in one warning, formats from names (compression
suffixes one layer), and the content stamp that identifies a file or folder without reading it."""

import json
import os
import re

import pytest
from data_formats import TEXTS

from patch_training import readers
from patch_training.cli import UsageError
from patch_training.readers import check_data_files, iter_local_documents


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


def test_a_folder_names_the_files_it_skips(tmp_path, caplog):
    """Regression guard: a folder never drops the files it holds with other extensions (b.ndjson, d.csv) without
    a word. .ndjson, compressed or not, is JSON lines; every other file, data in another format or a dataset's
    README.md and LICENSE, is named in one warning (the first few, then a count) where the data is checked, not
    where the run identity lists the files; hidden files and folders are skipped unnamed; a folder holding no data file
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
    assert warnings == [(f"--train_file: skipping 4 files of the folder {folder} that are not data files (.txt, .json, "
                         ".jsonl, .ndjson, .parquet, .arrow; text and JSON optionally compressed): d.csv, LICENSE, "
                         "README.md, notes/more.md")], warnings
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
    """Regression guard: a glob pattern never drops the folders it matches without a word (`data/*` over shard
    folders reading only the loose files; `shards_*` matching only folders reading nothing). Each match is taken as
    if named: a folder gives its data files (recursively), a saved dataset is read whole (also inside a folder, and
    not its own .arrow/.json files under `**`), each file once; the matched folders' other files are named in one
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
    assert [r.getMessage() for r in caplog.records] == [(
        f"--train_file: skipping 3 files in the folders the pattern {data}/* matches that are not data files (.txt, "
        f".json, .jsonl, .ndjson, .parquet, .arrow; text and JSON optionally compressed): {data}/empty_shard/, "
        f"{data}/LICENSE, {data}/shard_b/README.md")]
    assert read(str(data / "*")) == names + ["saved 0", "saved 1"]
    assert read(str(data / "shard_*")) == names[1:] + ["saved 0", "saved 1"]  # folders only: read, not dropped
    assert check_data_files(str(data / "**"), "train_file")[0] == paths  # each file once, the saved dataset whole
    assert check_data_files(str(data), "train_file")[0] == paths  # the folder itself: the same files
    assert check_data_files(str(data / "shard_[ab]" / "*.jsonl"), "train_file")[0] == [paths[1], paths[3]]
    with pytest.raises(UsageError, match=r"^--train_file: the pattern .*/empty_\* matches no data file \(.*\): it "
                                         r"matches .*/empty_shard/$"):
        check_data_files(str(data / "empty_*"), "train_file")


def test_run_identity_holds_the_files_a_pattern_expands_to(tmp_path):
    """run_args.json records the expanded file list: a new shard matched by the same pattern is another run
    (a resume would otherwise silently train on other data), refused in one line."""
    from conftest import REPO_ROOT

    import run_clm
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


def test_a_compression_suffix_is_one_layer_in_any_case():
    """`strip_compression` and `compression_suffix`, which every reader of a name uses: the last suffix only, in
    any case, the rest of the name kept as written; a name compressed twice is no data file (one layer is read)."""
    from patch_training.readers.formats import (
        compression_suffix,
        has_supported_name,
        strip_compression,
    )

    cases = {"a.jsonl.gz": ("a.jsonl", ".gz"), "A.TXT.ZST": ("A.TXT", ".zst"), "b.NDJSON.Bz2": ("b.NDJSON", ".bz2"),
             "c.json.xz": ("c.json", ".xz"), "d.txt": ("d.txt", ""), "e.tar": ("e.tar", ""), "dir.gz/f.txt": ("dir.gz/f.txt", ""),
             "f.jsonl.zst.gz": ("f.jsonl.zst", ".gz"), "gz": ("gz", "")}
    assert {name: (strip_compression(name), compression_suffix(name)) for name in cases} == cases
    assert [readers.file_format(name) for name in ("a.jsonl.gz", "A.TXT.ZST", "b.NDJSON.Bz2", "c.json.xz")] == [
        "json", "text", "json", "json"]
    assert not has_supported_name("f.jsonl.zst.gz") and has_supported_name("A.TXT.ZST")
    for name in ("f.jsonl.zst.gz", "p.parquet.gz", "e.tar.gz"):
        with pytest.raises(UsageError, match=rf"^unsupported extension for {re.escape(name)}: use one of "):
            readers.file_format(name)


def test_content_stamp_names_size_and_time_of_a_file_and_hashes_a_folder(tmp_path):
    """`content_stamp`, what the token cache key and the run identity hold for a data file without reading it: a
    file's size and modification time (UTC, to the microsecond), a folder's hash of its files' relative paths, sizes
    and times (hidden files too: a saved dataset's files are what `datasets` reads), "not a local path" otherwise."""
    from patch_training.readers import content_stamp

    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one"}\n')
    os.utime(path, ns=(0, 1_700_000_000_123_456_789))
    assert content_stamp(str(path)) == "16 bytes, modified 2023-11-14T22:13:20.123457+00:00"
    path.write_text('{"text": "two"}\n')  # rewritten in place, the same size
    os.utime(path, ns=(0, 1_700_000_000_123_456_789))
    assert content_stamp(str(path)) == "16 bytes, modified 2023-11-14T22:13:20.123457+00:00"  # nothing read
    os.utime(path, ns=(0, 1_700_000_000_124_000_000))
    assert content_stamp(str(path)) == "16 bytes, modified 2023-11-14T22:13:20.124000+00:00"

    folder = tmp_path / "saved"
    (folder / "nested").mkdir(parents=True)
    for name in ("state.json", "data-00000-of-00001.arrow", "nested/x.bin", ".hidden"):
        (folder / name).write_bytes(b"1234")
        os.utime(folder / name, ns=(0, 1_700_000_000_000_000_000))
    stamps = {"first": content_stamp(str(folder))}
    assert re.fullmatch(r"folder [0-9a-f]{16}", stamps["first"]) and content_stamp(str(folder)) == stamps["first"]
    for change, act in [("size", lambda: (folder / "nested/x.bin").write_bytes(b"12345")),
                        ("time", lambda: os.utime(folder / "state.json", ns=(0, 1_700_000_000_000_000_001))),
                        ("hidden", lambda: (folder / ".hidden").write_bytes(b"123")),
                        ("added", lambda: (folder / "more.arrow").write_bytes(b"")),
                        ("renamed", lambda: (folder / "more.arrow").rename(folder / "most.arrow"))]:
        act()
        stamps[change] = content_stamp(str(folder))
    assert len(set(stamps.values())) == len(stamps), stamps
    assert content_stamp(str(tmp_path / "missing.jsonl")) == content_stamp("hub:wikitext:None:train") == "not a local path"
