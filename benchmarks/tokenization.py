#!/usr/bin/env python
"""Tokenisation throughput (tokens/s): our whole path against `datasets.map` and the bare tokenizer, with 1 and
2 processes, on the same documents; and the streamed loader (`StreamingTokenBlocks`) against tokenisation alone,
with the time to the first block of a streamed start (a resume) near the start and far into the stream.

- bare: `backend_tokenizer.encode_batch` on texts already in memory (the floor; reading not timed), the texts
  split in N contiguous pieces over N processes;
- ours: `tokenize_to_cache` from the file (read, decompress, parse, tokenise, write tokens.bin), as run_clm.py
  does it: the .jsonl.xz shard (one compressed file: one part), the same documents as an uncompressed .jsonl
  (one large file, split in byte ranges), and as two .jsonl.xz files (several files);
- datasets.map: `load_dataset("json")` of the shard then `map(batched=True, num_proc=N)`, what a run_clm.py user
  of transformers' example has (loading into Arrow timed too).

Every path gives the same token count (checked). TOKENIZERS_PARALLELISM=false: one thread per process.
Two rates per row: tokens per wall-clock second, and tokens per CPU second (this process and its finished
children, `resource.getrusage`), which a machine shared with other jobs disturbs far less; the load average at
the start is recorded.

    python benchmarks/tokenization.py --data ../shared/data/corpus/train-00.jsonl.xz
"""

from __future__ import annotations

import argparse
import json
import lzma
import multiprocessing
import os
import resource
import sys
import tempfile
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from patch_training.readers import DataSource, iter_local_documents  # noqa: E402
from patch_training.token_cache import tokenize_to_cache  # noqa: E402

TOKENIZER = None


def _encode_piece(texts: list[str]) -> int:
    return sum(len(e.ids) for e in TOKENIZER.backend_tokenizer.encode_batch(texts))


def _init(name: str) -> None:
    global TOKENIZER
    from transformers import AutoTokenizer

    TOKENIZER = AutoTokenizer.from_pretrained(name)


def cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have ended."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bare(texts: list[str], tokenizer_name: str, processes: int) -> tuple[float, int]:
    """encode_batch over texts in memory, in `processes` contiguous pieces (tokens without the EOS we add)."""
    pieces = [texts[len(texts) * i // processes : len(texts) * (i + 1) // processes] for i in range(processes)]
    if processes == 1:
        _init(tokenizer_name)
        start = time.perf_counter()
        tokens = _encode_piece(texts)
        return time.perf_counter() - start, tokens
    with multiprocessing.get_context("fork").Pool(processes, initializer=_init, initargs=(tokenizer_name,)) as pool:
        pool.map(_encode_piece, [["warm-up"]] * processes)  # process start and tokenizer load not timed
        start = time.perf_counter()
        tokens = sum(pool.map(_encode_piece, pieces))
        return time.perf_counter() - start, tokens


def ours(paths: list[str], tokenizer, processes: int, folder: str) -> tuple[float, int]:
    source = DataSource(text_column="text", paths=tuple(paths), fmt="json")
    start = time.perf_counter()
    meta = tokenize_to_cache(None, tokenizer, "text", 1000, folder, num_workers=processes, source=source)
    return time.perf_counter() - start, meta["num_tokens"]


def with_datasets_map(path: str, tokenizer, processes: int, cache: str) -> tuple[float, int]:
    import datasets

    datasets.disable_progress_bars()
    start = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache)
    dataset = dataset.select_columns(["text"])
    mapped = dataset.map(lambda batch: tokenizer(batch["text"]), batched=True, num_proc=processes if processes > 1 else None,
                         remove_columns=["text"], load_from_cache_file=False)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(ids) for ids in mapped["input_ids"])


def streamed(path: str, tokenizer, tokens: int, block: int, batch_size: int) -> dict:
    """Streamed loader tokens/s over `tokens` tokens (which also writes the stream index), and time to the first
    block at steps 10, 1000 and 1350 of a job reading one block per step, with that index (a resume) and without it
    (what a resume cost before: every token before the start tokenised again)."""
    from patch_training.blocks import StreamingTokenBlocks

    source = DataSource.from_files(path, "data")
    result = {}
    with tempfile.TemporaryDirectory() as folder:
        index = os.path.join(folder, "stream_index.jsonl")
        start = time.perf_counter()
        count = sum(len(b["input_ids"]) for b in StreamingTokenBlocks(source, tokenizer, "text", 0, tokens // block, block,
                                                                            batch_size=batch_size, index_file=index))
        result["streamed_tokens_per_s"] = count / (time.perf_counter() - start)
        from patch_training.token_cache import iter_token_batches

        start, seen = time.perf_counter(), 0
        for batch in iter_token_batches(source.documents(), tokenizer, "text", batch_size):  # tokenising alone
            seen += sum(map(len, batch))
            if seen >= count:
                break
        result["tokenise_only_tokens_per_s"] = seen / (time.perf_counter() - start)
        import numpy as np

        chunks = [np.random.default_rng(i).integers(0, 32000, 150_000, dtype=np.uint16) for i in range(20)]
        blocks = StreamingTokenBlocks(None, None, "text", 0, sum(map(len, chunks)) // block, block)
        blocks._chunks = lambda: iter(chunks)  # block assembly alone, on tokens already made
        start = time.perf_counter()
        assembled = sum(len(b["input_ids"]) for b in blocks)
        result["assembly_only_tokens_per_s"] = assembled / (time.perf_counter() - start)
        for name, position in (("step_10", 10 * block), ("step_1000", 1000 * block), ("step_1350", 1350 * block)):
            for label, index_file in (("index", index), ("no_index", None)):
                start = time.perf_counter()
                next(iter(StreamingTokenBlocks(source, tokenizer, "text", position, 1, block, batch_size=batch_size,
                                               index_file=index_file)))
                result[f"first_block_s_{name}_{label}"] = time.perf_counter() - start
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/corpus/train-00.jsonl.xz", help="a .jsonl.xz shard")
    parser.add_argument("--tokenizer_name", default="data/llama2_tokenizer")
    parser.add_argument("--max_documents", type=int, default=None, help="only the first N documents (quick runs)")
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--stream_block", type=int, default=2048, help="block length of the streamed-loader figures")
    parser.add_argument("--stream_batch_size", type=int, default=64, help="documents per tokenizer call when streaming")
    parser.add_argument("--only_streaming", action="store_true", help="only the streamed-loader figures")
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name)
    texts = [d["text"] for d in iter_local_documents([args.data], "json", "text") if d["text"]]
    if args.max_documents:
        texts = texts[: args.max_documents]
    rows, results = [], {"data": args.data, "documents": len(texts), "cpus": os.cpu_count(),
                         "load_average": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as work:
        lines = [json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts]
        plain = os.path.join(work, "all.jsonl")
        with open(plain, "w", encoding="utf-8") as handle:
            handle.writelines(lines)
        compressed = os.path.join(work, "all.jsonl.xz")
        with lzma.open(compressed, "wt", encoding="utf-8", preset=1) as handle:
            handle.writelines(lines)
        halves = []
        for i in range(2):
            halves.append(os.path.join(work, f"half-{i}.jsonl.xz"))
            with lzma.open(halves[-1], "wt", encoding="utf-8", preset=1) as handle:
                handle.writelines(lines[len(lines) * i // 2 : len(lines) * (i + 1) // 2])
        expected = None
        for processes in [] if args.only_streaming else [int(p) for p in args.processes.split(",")]:
            cases = {
                "bare tokenizer (encode_batch, texts in memory)": lambda: bare(texts, args.tokenizer_name, processes),
                "ours: one .jsonl.xz file": lambda: ours([compressed], tokenizer, processes, os.path.join(work, f"c{processes}")),
                "ours: one .jsonl file (byte ranges)": lambda: ours([plain], tokenizer, processes, os.path.join(work, f"p{processes}")),
                "ours: two .jsonl.xz files": lambda: ours(halves, tokenizer, processes, os.path.join(work, f"h{processes}")),
                "datasets.map (load_dataset json + map)": lambda: with_datasets_map(plain, tokenizer, processes, os.path.join(work, f"hf{processes}")),
            }
            for name, run in cases.items():
                cpu_start = cpu_seconds()
                seconds, tokens = run()
                cpu = cpu_seconds() - cpu_start
                if name.startswith("bare"):
                    tokens += len(texts)  # + the EOS per document that the others count
                if name.startswith("datasets"):
                    tokens += len(texts)
                expected = expected or tokens
                assert tokens == expected, (name, tokens, expected)
                rows.append({"method": name, "processes": processes, "seconds": round(seconds, 2),
                             "tokens_per_s": round(tokens / seconds), "cpu_seconds": round(cpu, 2),
                             "tokens_per_cpu_s": round(tokens / cpu)})
                print(f"{name:50s} {processes} proc {seconds:7.2f} s {tokens / seconds / 1e6:6.3f}M tokens/s "
                      f"{tokens / cpu / 1e6:6.3f}M tokens/CPU-s", flush=True)
        results["rows"] = rows
        results.update(streamed(plain, tokenizer, 2_800_000, args.stream_block, args.stream_batch_size))
    for key, value in results.items():
        if key.startswith(("first_block", "streamed", "tokenise_only", "assembly")):
            print(f"{key:40s} {value:,.3f}")
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
