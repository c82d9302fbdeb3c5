#!/usr/bin/env python
"""Tokenisation throughput (tokens/s): our whole path against `datasets.map` and the bare tokenizer, with 1 and
2 processes, on the same documents; and the streamed loader (`StreamingTokenBlocks`) against tokenisation alone,
with the time to the first block of a streamed start (a resume) near the start and far into the stream.

- bare: `backend_tokenizer.encode_batch` on texts already in memory (the floor; reading not timed), the texts
  split in N contiguous pieces over N processes;
- ours: `tokenize_to_cache` from the file (read, decompress, parse, tokenise, write tokens.bin), as run_clm.py
  does it: the documents as one .jsonl.xz file (with 2 processes decompressed by the main process and fed to
  the workers in chunks of lines), as an uncompressed .jsonl (one large file, split in byte ranges), and as two
  .jsonl.xz files (several files);
- datasets.map: `load_dataset("json")` of the shard then `map(batched=True, num_proc=N)`, what a run_clm.py user
  of transformers' example has (loading into Arrow timed too).

Every path gives the same token count (checked). TOKENIZERS_PARALLELISM=false: one tokenizer thread per
process. Two rates per row: tokens per wall-clock second, and tokens per CPU second (this process and its
finished children, `resource.getrusage`); the load average at the start is recorded. Each case runs once per
round, the rounds one after the other (`--rounds`), and the summary gives medians over the rounds: of the
rates, and of ratios between runs made back to back (each case at 1 process / a bare-tokenizer run made right
before it; a case at 2 processes / the same at 1), which a machine whose speed drifts from minute to minute
disturbs far less than the rates.

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

from patch_training.cli import run_cli  # noqa: E402
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


def ours(paths: list[str], tokenizer, processes: int, folder: str, batch_size: int) -> tuple[float, int]:
    source = DataSource(text_column="text", paths=tuple(paths), fmt="json")
    start = time.perf_counter()
    meta = tokenize_to_cache(None, tokenizer, "text", batch_size, folder, num_workers=processes, source=source)
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


def first_block_seconds(source, tokenizer, index: str, block: int, batch_size: int, steps, prefix: str) -> dict:
    """{f"{prefix}_step_<n>_index" / "_no_index": seconds to the first block of a streamed start at each of `steps`
    (one block per step), with the stream index `index` of an earlier pass (a resume) and without it."""
    from patch_training.blocks import StreamingTokenBlocks

    result = {}
    for step in steps:
        for label, index_file in (("index", index), ("no_index", None)):
            start = time.perf_counter()
            next(iter(StreamingTokenBlocks(source, tokenizer, "text", step * block, 1, block, batch_size=batch_size,
                                           index_file=index_file)))
            result[f"{prefix}_step_{step}_{label}"] = time.perf_counter() - start
    return result


def streamed(path: str, tokenizer, tokens: int, block: int, batch_size: int, compressed: str | None = None) -> dict:
    """Streamed loader tokens/s over `tokens` tokens (which also writes the stream index), and time to the first
    block at steps 10, 1000 and 1350 of a job reading one block per step, with that index (a resume) and without it
    (what a resume costs without it: every token before the start tokenised again); the same at steps 10 and 1350 for
    the `compressed` copy (one part: the index's line position is reached by decompressing, without parsing)."""
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
        result.update(first_block_seconds(source, tokenizer, index, block, batch_size, (10, 1000, 1350), "first_block_s"))
        if compressed:  # the same documents as one .jsonl.xz file: one part, read from its start
            source = DataSource.from_files(compressed, "data")
            index = os.path.join(folder, "stream_index_xz.jsonl")
            list(StreamingTokenBlocks(source, tokenizer, "text", 0, tokens // block, block, batch_size=batch_size,
                                      index_file=index))
            result.update(first_block_seconds(source, tokenizer, index, block, batch_size, (10, 1350), "first_block_xz_s"))
    return result


CASES = (
    "bare tokenizer (encode_batch, texts in memory)",
    "ours: one .jsonl.xz file",
    "ours: one .jsonl file (byte ranges)",
    "ours: two .jsonl.xz files",
    "datasets.map (load_dataset json + map)",
)


def summary(rows: list[dict], processes: list[int]) -> list[dict]:
    """Per case: the median over rounds of tokens/s (1 and N processes), of the ratio case / bare tokenizer at 1
    process (each against the bare run made right before it), and of N / 1 processes (run back to back)."""
    import statistics

    def runs(method, procs, round_, paired_with=None):
        return [r["tokens_per_s"] for r in rows if r["method"] == method and r["processes"] == procs
                and r["round"] == round_ and r.get("paired_with") == paired_with]

    rounds = sorted({r["round"] for r in rows})
    table = []
    for method in CASES:
        entry = {"method": method}
        for procs in processes:
            entry[f"tokens_per_s_{procs}"] = statistics.median(
                r["tokens_per_s"] for r in rows if r["method"] == method and r["processes"] == procs)
        if 1 in processes:
            paired = None if method == CASES[0] else method
            entry["vs_bare_1"] = statistics.median(
                runs(method, 1, i)[0] / runs(CASES[0], 1, i, paired)[0] for i in rounds)
            for procs in processes[1:]:
                entry[f"scaling_{procs}"] = statistics.median(runs(method, procs, i)[0] / runs(method, 1, i)[0] for i in rounds)
        table.append(entry)
    return table


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/corpus/train-00.jsonl.xz", help="a .jsonl.xz shard")
    parser.add_argument("--tokenizer_name", default="data/llama2_tokenizer")
    parser.add_argument("--max_documents", type=int, default=None, help="only the first N documents (quick runs)")
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--rounds", type=int, default=5, help="each case once per round; the summary takes medians")
    parser.add_argument("--batch_size", type=int, default=100,
                        help="documents per tokenizer call in our path (run_clm.py's --tokenize_batch_size, 1000 by "
                             "default). The reading thread works a batch ahead, so the first batch is not overlapped: "
                             "with a few thousand documents 1000 would leave a large share of them unoverlapped, "
                             "which a shard of millions does not")
    parser.add_argument("--stream_block", type=int, default=2048, help="block length of the streamed-loader figures")
    parser.add_argument("--stream_batch_size", type=int, default=64, help="documents per tokenizer call when streaming")
    parser.add_argument("--only_streaming", action="store_true", help="only the streamed-loader figures")
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)
    try:
        processes_given = [int(p) for p in args.processes.split(",")]
    except ValueError:
        parser.error(f"--processes takes comma-separated whole numbers, got {args.processes!r}")
    for name, value in (("max_documents", args.max_documents), ("rounds", args.rounds), ("batch_size", args.batch_size),
                        ("stream_block", args.stream_block), ("stream_batch_size", args.stream_batch_size),
                        *(("processes", p) for p in processes_given)):
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    if not os.path.isfile(args.data):
        parser.error(f"--data {args.data}: no such file")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name)
    texts = [d["text"] for d in iter_local_documents([args.data], "json", "text") if d["text"]]
    if args.max_documents:
        texts = texts[: args.max_documents]
    tokenizer.backend_tokenizer.encode_batch(texts[:100])  # warm: not timed
    processes = processes_given
    rows, results = [], {"data": args.data, "documents": len(texts), "cpus": os.cpu_count(),
                         "load_average": os.getloadavg()[0], "rounds": args.rounds, "batch_size": args.batch_size}
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
        expected, run_number = None, 0
        for round_ in [] if args.only_streaming else range(args.rounds):
            for index, name in enumerate(CASES):
                # Each 1-process case right after a 1-process bare run (its ratio to the floor drifts least), and a
                # case's 1 and 2 processes back to back (likewise their ratio).
                plan = [(CASES[0], 1, name)] if index > 0 and 1 in processes else []
                plan += [(name, procs, None) for procs in processes]
                for method, procs, paired_with in plan:
                    run_number += 1
                    folder = os.path.join(work, f"run-{run_number}")
                    run = (
                        lambda: bare(texts, args.tokenizer_name, procs),
                        lambda: ours([compressed], tokenizer, procs, folder, args.batch_size),
                        lambda: ours([plain], tokenizer, procs, folder, args.batch_size),
                        lambda: ours(halves, tokenizer, procs, folder, args.batch_size),
                        lambda: with_datasets_map(plain, tokenizer, procs, folder),
                    )[CASES.index(method)]
                    cpu_start = cpu_seconds()
                    seconds, tokens = run()
                    cpu = cpu_seconds() - cpu_start
                    if method.startswith(("bare", "datasets")):
                        tokens += len(texts)  # + the EOS per document that ours counts
                    expected = expected or tokens
                    assert tokens == expected, (method, tokens, expected)
                    rows.append({"method": method, "processes": procs, "round": round_, "seconds": round(seconds, 2),
                                 "tokens_per_s": round(tokens / seconds), "cpu_seconds": round(cpu, 2),
                                 "tokens_per_cpu_s": round(tokens / cpu), **({"paired_with": paired_with} if paired_with else {})})
                    print(f"round {round_} {method:50s} {procs} proc {seconds:7.2f} s {tokens / seconds / 1e6:6.3f}M tokens/s "
                          f"{tokens / cpu / 1e6:6.3f}M tokens/CPU-s", flush=True)
        results["rows"] = rows
        if rows:
            results["summary"] = summary(rows, processes)
            print(f"\nmedians over {args.rounds} rounds:")
            for entry in results["summary"]:
                print(f"{entry['method']:50s} " + " ".join(
                    f"{key} {value / 1e6:.3f}M" if key.startswith("tokens") else f"{key} {value:.2f}"
                    for key, value in entry.items() if key != "method"))
        results.update(streamed(plain, tokenizer, 2_800_000, args.stream_block, args.stream_batch_size, compressed))
    for key, value in results.items():
        if key.startswith(("first_block", "streamed", "tokenise_only", "assembly")):
            print(f"{key:40s} {value:,.3f}")
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    run_cli(main, "tokenization.py")
