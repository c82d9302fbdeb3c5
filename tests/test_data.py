"""The data pipeline from sources to blocks (`patch_training.readers.DataSource`, `.token_cache`, `.blocks`):
parallel tokenisation byte-identical to one process, and streamed blocks equal to the cached ones, from any start.
The readers' own tests follow their modules: tests/test_readers_*.py."""

import json
from pathlib import Path

import pytest
import torch
from conftest import DATA_DIR, TOKENIZER_DIR
from transformers import default_data_collator

from patch_training.blocks import StreamingTokenBlocks, TokenBlocks
from patch_training.readers import DataSource, iter_local_documents
from patch_training.token_cache import cached_token_stream, tokenize_to_cache
from patch_training.training_args import RunTrainingArguments

TRAIN_FILE = str(DATA_DIR / "sample_train.jsonl")


def test_streaming_matches_cached_blocks(workdir, tmp_path):
    """Streaming mode yields exactly the blocks of the cached mode for each stage, with no len() crash."""
    import datasets

    tokens, _ = cached_token_stream(
        DataSource.from_files(TRAIN_FILE, "train_file"),
        __import__("transformers").AutoTokenizer.from_pretrained(str(TOKENIZER_DIR)),
        RunTrainingArguments(output_dir=str(tmp_path), report_to="none"), cache_dir=str(workdir / "token_cache"),
    )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    def documents():
        return datasets.load_dataset("json", data_files=[TRAIN_FILE], split="train", streaming=True)

    streamed = list(StreamingTokenBlocks(documents, tokenizer, "text", skip_tokens=100, num_blocks=3, block_len=64))
    cached = TokenBlocks(tokens, 100, 3, 64)
    assert [b["input_ids"].tolist() for b in streamed] == [cached[i]["input_ids"].tolist() for i in range(3)]


def test_streaming_data_loader_workers(tmp_path):
    """Regression guard: several loader workers would each read the whole stream, so every streamed block would
    come back once per worker. One background worker yields the main process's batches; two are refused."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    dataset = StreamingTokenBlocks(DataSource.from_files(TRAIN_FILE, "train_file").documents, tokenizer, "text", 0, 8, 64)

    def batches(workers):
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=workers,
                                             collate_fn=default_data_collator)
        return [batch["input_ids"].tolist() for batch in loader]

    in_process = batches(0)
    assert len(in_process) == 4
    assert batches(1) == in_process
    with pytest.raises(Exception, match="would repeat: use at most 1"):
        batches(2)


def test_parallel_tokenisation_gives_the_same_stream(tmp_path):
    """Several files tokenised by 2 processes give byte for byte the stream of one process."""
    from transformers import AutoTokenizer

    lines = open(TRAIN_FILE, encoding="utf-8").read().splitlines()[:12]
    paths = []
    for i in range(3):
        path = tmp_path / f"part{i}.jsonl"
        path.write_text("\n".join(lines[4 * i : 4 * i + 4]) + "\n")
        paths.append(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    sequential = tokenize_to_cache(
        iter_local_documents(paths, "json", "text"), tokenizer, "text", 5, str(tmp_path / "one"))
    parallel = tokenize_to_cache(
        None, tokenizer, "text", 5, str(tmp_path / "two"), paths=paths, fmt="json", num_workers=2)
    assert (sequential["num_tokens"], sequential["num_documents"]) == (parallel["num_tokens"], parallel["num_documents"])
    assert sequential["num_documents"] == 12
    assert (tmp_path / "one" / "tokens.bin").read_bytes() == (tmp_path / "two" / "tokens.bin").read_bytes()
    assert not list((tmp_path / "two").glob("part-*"))


def count_documents_read(monkeypatch) -> list:
    """A list that gets one item per document the data source reads (parses) from now on."""
    read = []
    original = DataSource.part_documents

    def counting(self, part, *position):
        for document in original(self, part, *position):
            read.append(1)
            yield document

    monkeypatch.setattr(DataSource, "part_documents", counting)
    return read


def test_streamed_start_costs_the_same_wherever_it_is(tmp_path, monkeypatch):
    """Starting a streamed stage (or resuming one) at stream token N reads at most one part of the data, whatever
    N (the part index written by an earlier pass), and yields the blocks of the cache from N; without the index it
    read everything before N. Also across the end of an epoch, and inside a part via the position marks."""
    from transformers import AutoTokenizer

    from patch_training import blocks, readers

    monkeypatch.setattr(readers.parts, "PART_BYTES", 20_000)
    monkeypatch.setattr(blocks, "MARK_TOKENS", 500)
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    source = DataSource.from_files(TRAIN_FILE, "train_file")
    parts = source.parts()
    assert len(parts) > 5
    tokens, _ = cached_token_stream(source, tokenizer, RunTrainingArguments(output_dir=str(tmp_path), report_to="none"),
                                    cache_dir=str(tmp_path / "cache"))
    original = DataSource.part_documents
    read = count_documents_read(monkeypatch)
    from patch_training import token_cache

    tokenised = []
    batches = token_cache.iter_token_batches

    def counting_batches(*args, **kwargs):
        for batch in batches(*args, **kwargs):
            tokenised.append(len(batch[0] if kwargs.get("state") else batch))
            yield batch

    monkeypatch.setattr(token_cache, "iter_token_batches", counting_batches)
    index = tmp_path / "stream_index.jsonl"
    block = 64

    def first_block(start, index_file, count=read):
        read.clear()
        tokenised.clear()
        stream = StreamingTokenBlocks(source, tokenizer, "text", start, 1, block, batch_size=4, index_file=index_file)
        ids = next(iter(stream))["input_ids"].tolist()
        assert ids == TokenBlocks(tokens, start, 1, block)[0]["input_ids"].tolist(), start
        return len(read) if count is read else sum(tokenised)

    far = len(tokens) - 3 * block
    without_index = first_block(far, None)
    assert without_index > 40, "no index: every document before N is read"
    list(StreamingTokenBlocks(source, tokenizer, "text", 0, len(tokens) // block + 2, block, batch_size=4, index_file=str(index)))
    entries = [json.loads(line) for line in index.read_text().splitlines()]
    assert sorted(e["part"] for e in entries if "part_tokens" in e) == list(range(len(parts)))
    assert any("documents" in e for e in entries), "marks inside parts"
    documents_per_part = max(sum(1 for _ in original(source, p)) for p in parts)
    costs = [first_block(start, str(index)) for start in (10, 5_000, far, len(tokens) + 777, 3 * len(tokens) - 100)]
    assert max(costs) <= documents_per_part + 2 < without_index, costs

    # A first pass stopped inside a part (an interrupted job) leaves marks that a resume uses: the documents
    # before the last mark are read but not tokenised.
    monkeypatch.setattr(readers.parts, "PART_BYTES", 10**9)
    one_part = tmp_path / "one_part.jsonl"
    list(StreamingTokenBlocks(source, tokenizer, "text", 0, far // block, block, batch_size=4, index_file=str(one_part)))
    assert not [line for line in one_part.read_text().splitlines() if "part_tokens" in line]
    assert first_block(far - block, str(one_part), tokenised) < first_block(far - block, None, tokenised) / 4


def test_streaming_counts_null_and_empty_texts_as_the_cache_does(tmp_path, monkeypatch):
    """Regression guard: under --streaming, null and empty texts are not skipped without a word (the cache counts
    them in its "Tokenised N documents (M null or empty texts skipped)" line). The stream's index counts them with the
    documents and tokens (`streamed_counts`, which run_clm logs and records at the end of a job): the cache's
    numbers once the data has been read whole, whether in one pass or interrupted inside a part and resumed from
    its mark (a JSON-lines file cut in byte ranges, a Parquet file whose row groups are skipped by count); and, for
    a pass stopped inside the data, exactly the documents before where it stopped reading."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from patch_training import blocks, readers
    from patch_training.blocks import streamed_counts

    monkeypatch.setattr(blocks, "MARK_TOKENS", 300)
    monkeypatch.setattr(readers.parts, "PART_BYTES", 3_000)
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    paragraphs = [p for line in open(TRAIN_FILE, encoding="utf-8") for p in json.loads(line)["text"].split("\n") if p.strip()]
    texts = [None if i % 7 == 3 else "" if i % 11 == 5 else p for i, p in enumerate(paragraphs[:400])]
    nulls = sum(not t for t in texts)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:250]))
    pq.write_table(pa.table({"text": texts[250:]}), tmp_path / "b.parquet", row_group_size=20)
    source = DataSource.from_files(f"{tmp_path}/a.jsonl,{tmp_path}/b.parquet", "train_file")
    parts = len(source.parts())
    assert parts > 4
    tokens, folder = cached_token_stream(source, tokenizer, RunTrainingArguments(output_dir=str(tmp_path), report_to="none"),
                                         cache_dir=str(tmp_path / "cache"))
    meta = json.loads((Path(folder) / "meta.json").read_text())
    assert meta["num_skipped_empty"] == nulls > 40 and meta["num_documents"] == len(texts) - nulls
    whole = {"documents": len(texts), "skipped_empty": nulls, "tokens": len(tokens), "parts_read_whole": parts, "parts": parts}
    block = 64

    def stream(start, blocks_wanted, index):
        streamed = [b["input_ids"] for b in StreamingTokenBlocks(source, tokenizer, "text", start, blocks_wanted, block,
                                                                 batch_size=4, index_file=str(index))]
        cached = TokenBlocks(tokens, start, blocks_wanted, block)
        assert torch.cat(streamed).tolist() == torch.cat([cached[i]["input_ids"] for i in range(blocks_wanted)]).tolist()
        return streamed_counts(str(index))

    assert streamed_counts(str(tmp_path / "none.jsonl")) is None
    assert stream(0, len(tokens) // block + 3, tmp_path / "whole.jsonl") == whole  # into a second epoch
    assert stream(0, len(tokens) // block + 3, tmp_path / "whole.jsonl") == whole  # the data counted once
    for stop in (len(tokens) // 3, 2 * len(tokens) // 3):  # interrupted in the first file, or in the second
        index = tmp_path / f"cut_{stop}.jsonl"
        partial = stream(0, stop // block, index)
        # The documents of the batches tokenised (4 documents per call, texts only) up to where the stream stopped.
        ends = [i + 1 for i, t in enumerate(texts) if t]
        tokenised = partial["tokens"]
        assert stop // block * block <= tokenised < stop // block * block + 4 * 200, (stop, partial)
        assert partial["parts_read_whole"] < parts and partial["documents"] <= len(texts)
        assert partial["skipped_empty"] == sum(not t for t in texts[:partial["documents"]])
        assert texts[partial["documents"] - 1], "a stop is after a document with text"
        assert partial["documents"] in ends
        start = stop // block * block
        assert stream(start, (len(tokens) - start) // block + 3, index) == whole, stop


@pytest.mark.parametrize("suffix", [".xz", ".zst"])
def test_a_streamed_start_inside_a_compressed_file_parses_only_from_its_mark(tmp_path, monkeypatch, suffix):
    """A compressed file is one part, read from its start. A streamed start (a resume) far inside it goes to the
    line recorded with the last mark before it: the documents before that line are decompressed, not parsed or
    tokenised, and the blocks are the cache's, at several starts."""
    import lzma

    import zstandard
    from transformers import AutoTokenizer

    from patch_training import blocks

    monkeypatch.setattr(blocks, "MARK_TOKENS", 500)
    paragraphs = [p for line in open(TRAIN_FILE, encoding="utf-8") for p in json.loads(line)["text"].split("\n") if p.strip()]
    data = "".join(json.dumps({"text": p}) + "\n" for p in paragraphs).encode()
    path = tmp_path / f"train.jsonl{suffix}"
    path.write_bytes(lzma.compress(data) if suffix == ".xz" else zstandard.ZstdCompressor().compress(data))
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    source = DataSource.from_files(str(path), "train_file")
    assert len(source.parts()) == 1
    tokens, _ = cached_token_stream(source, tokenizer, RunTrainingArguments(output_dir=str(tmp_path), report_to="none"),
                                    cache_dir=str(tmp_path / "cache"))
    index, block = tmp_path / "stream_index.jsonl", 64
    list(StreamingTokenBlocks(source, tokenizer, "text", 0, len(tokens) // block, block, batch_size=4, index_file=str(index)))
    marks = [json.loads(line) for line in index.read_text().splitlines() if '"documents"' in line]
    assert len(marks) > 5 and all(m["offset"] > 0 and m["line"] > m["documents"] / 2 for m in marks), marks[:3]
    parsed = count_documents_read(monkeypatch)
    documents = len(data.splitlines())
    for start in (len(tokens) // 3, len(tokens) - 3 * block, len(tokens) + len(tokens) // 2):
        parsed.clear()
        stream = StreamingTokenBlocks(source, tokenizer, "text", start, 1, block, batch_size=4, index_file=str(index))
        assert next(iter(stream))["input_ids"].tolist() == TokenBlocks(tokens, start, 1, block)[0]["input_ids"].tolist()
        before = max(m["documents"] for m in marks if m["tokens"] <= start % len(tokens))
        assert before > documents / 4 and len(parsed) < documents / 20, (start, before, len(parsed), documents)
