"""Files cut into parts (`patch_training.readers.parts`): one large file split into parts (Parquet row groups,
Arrow record batches, JSON-lines byte ranges, saved-dataset shards), or compressed files fed to workers in chunks
of lines, tokenises byte for byte as one process."""

import gzip
import json
from pathlib import Path

import pytest
from conftest import TOKENIZER_DIR
from data_formats import TEXTS

from patch_training import readers
from patch_training.readers import DataSource
from patch_training.token_cache import tokenize_to_cache


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.mark.parametrize("name", ["a.jsonl", "a.txt", "a.parquet", "stream.arrow", "file.arrow", "saved",
                                  "a.jsonl.xz", "a.jsonl.zst", "a.txt.zst", "a.jsonl.gz", "bom.jsonl", "cr.txt",
                                  "mixed.txt.gz"])
def test_one_file_tokenised_in_parallel_gives_the_same_bytes(formats, tokenizer, tmp_path, name, monkeypatch):
    """One file split into parts (row groups, record batches, byte ranges, dataset shards), or a compressed file
    decompressed by the main process and fed to the workers in chunks of lines, tokenised by 2 processes gives
    byte for byte the stream of 1 process."""
    monkeypatch.setattr(readers.parts, "PART_ROWS", 40)
    monkeypatch.setattr(readers.lines, "CHUNK_BYTES", 1000)
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

    monkeypatch.setattr(readers.lines, "CHUNK_BYTES", 3000)
    monkeypatch.setattr(token_cache, "FEED_FILES_PER_WORKER", files_per_worker)
    (tmp_path / "list.json.gz").write_bytes(gzip.compress(Path(formats["a.json"]).read_bytes()))
    files = [formats["a.jsonl.xz"], str(tmp_path / "list.json.gz"), formats["a.jsonl.zst"], formats["a.jsonl.bz2"]]
    source = DataSource.from_files(json.dumps(files), "train_file")
    one = tokenize_to_cache(None, tokenizer, "text", 7, str(tmp_path / "one"), source=source)
    two = tokenize_to_cache(None, tokenizer, "text", 7, str(tmp_path / "two"), source=source, num_workers=2)
    assert one["num_documents"] == two["num_documents"] == 4 * len(TEXTS)
    assert (two["num_jobs"] == 4) == (files_per_worker == 1)
    assert (tmp_path / "one" / "tokens.bin").read_bytes() == (tmp_path / "two" / "tokens.bin").read_bytes()
