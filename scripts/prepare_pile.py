#!/usr/bin/env python
"""Prepare the paper's training data: the Pile's JSONL shards as the hub ships them, tokenised once into
run_clm.py's cache.

The Pile itself is no longer distributed; `monology/pile-uncopyrighted` is the Pile without its
copyrighted subsets (about 25% fewer tokens). Two steps, each skipped when its output exists:

1. get the 30 training shards `train/NN.jsonl.zst` from the Hugging Face hub (`--shards`) into
   `<output_dir>/train/`, kept as they are: run_clm.py reads .jsonl.zst (and .gz/.xz/.bz2, Parquet, Arrow);
   or use local files instead (`--input_files`: works offline);
2. tokenise the shards (and `--validation_file`) with run_clm.py's own `cached_token_stream`, into the
   cache folder that run_clm.py then reads instead of tokenising again: the same files in the same order,
   the same tokenizer and `--data_cache_dir` as the training configs (configs/train/llama-*.json).

    python scripts/prepare_pile.py                                   # hub: all 30 shards into data/pile/train/
    python scripts/prepare_pile.py --input_files ../shared/data/corpus/*.jsonl.xz --data_cache_dir data/corpus/tokens

--input_files are relative to the current folder, the other paths to the repository root (as in the
configs). The hub download needs `huggingface_hub`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from patch_training.cli import UsageError, first_line, folder_problem, run_cli, write_error_message  # noqa: E402

HUB_DATASET = "monology/pile-uncopyrighted"
HUB_SHARDS = 30
TOKENS_PER_STEP = 2_097_152  # the training configs' global batch: 8 GPUs x 8 sequences x 16 accumulated x 2048


def parse_shards(spec: str) -> list[int]:
    """'0-29' or '0,3,5-7' -> shard numbers; ValueError for anything else (letters, an empty or reversed range,
    a shard the hub does not have)."""
    numbers = []
    try:
        for part in spec.split(","):
            first, _, last = part.partition("-")
            span = range(int(first), int(last or first) + 1)
            if not span:
                raise ValueError
            numbers.extend(span)
    except ValueError:
        numbers = []
    if not numbers or min(numbers) < 0 or max(numbers) >= HUB_SHARDS:
        raise ValueError(f"--shards must name shards 0..{HUB_SHARDS - 1} as in 0-29 or 0,3,5-7, got {spec!r}")
    return numbers


def shard_path(output_dir: str, index: int) -> str:
    """Hub shard `index` as downloaded: what the training configs list as train_file."""
    return os.path.join(output_dir, "train", f"{index:02d}.jsonl.zst")


def download(index: int, output_dir: str) -> dict:
    """Hub shard `index` into `shard_path(output_dir, index)` (kept if there: its mtime is part of the cache key).
    UsageError (one line) where the hub cannot give it: no network, offline mode, no access; a failure to write
    (a full disk) is raised as it is, for `run_cli` to name the file."""
    target = shard_path(output_dir, index)
    source = f"{HUB_DATASET}:train/{index:02d}.jsonl.zst"
    if os.path.isfile(target):
        return {"source": source, "target": target, "skipped": True}
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        hf_hub_download(HUB_DATASET, f"train/{index:02d}.jsonl.zst", repo_type="dataset", local_dir=output_dir)
    except (OSError, EntryNotFoundError) as error:
        if write_error_message(error) is not None:
            raise
        raise UsageError(
            f"cannot download {source} ({first_line(error)}); without the hub, give local files with --input_files"
        ) from None
    return {"source": source, "target": target, "skipped": False}


def tokenize(shards: list[str], validation_file: str | None, args) -> dict:
    """Tokenise into run_clm.py's cache with run_clm.py's own code and arguments: a later run_clm.py run
    with the same train_file, tokenizer and data_cache_dir finds the cache and reads it."""
    from transformers import TrainingArguments

    from patch_training.models import load_tokenizer
    from patch_training.readers import DataSource
    from patch_training.token_cache import cached_token_stream

    tokenizer = load_tokenizer(args.tokenizer_name)
    training_args = TrainingArguments(output_dir=args.output_dir, use_cpu=True, report_to="none")
    cache = dict(cache_dir=args.data_cache_dir, batch_size=args.tokenize_batch_size)
    train = DataSource.from_files(json.dumps(shards), "train_file", args.text_column)
    stream, folder = cached_token_stream(train, tokenizer, training_args, num_workers=max(1, args.num_workers), **cache)
    summary = {"train_tokens": len(stream), "train_cache": folder}
    if validation_file is not None:
        validation = DataSource.from_files(validation_file, "validation_file", "text")
        stream, folder = cached_token_stream(validation, tokenizer, training_args, **cache)
        summary.update(validation_tokens=len(stream), validation_cache=folder)
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--shards", default=f"0-{HUB_SHARDS - 1}", help="hub shards to get, e.g. 0-29 or 0,1 (default: all)")
    source.add_argument("--input_files", nargs="+", help="local data files (any format run_clm.py reads) to tokenise instead of the hub's shards")
    parser.add_argument("--output_dir", default="data/pile", help="where the hub's shards go, in train/ (default: data/pile)")
    parser.add_argument("--data_cache_dir", default="data/pile/tokens", help="run_clm.py's --data_cache_dir (default: data/pile/tokens)")
    parser.add_argument("--tokenizer_name", default="data/llama2_tokenizer", help="run_clm.py's --tokenizer_name")
    parser.add_argument("--validation_file", default="data/wikitext-103-test.jsonl", help="also cached; 'none' to skip")
    parser.add_argument("--text_column", default="text", help="the column (JSON key) of the text in --input_files: pass the same --text_column_name to run_clm.py")
    parser.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="shards downloaded, and processes tokenising, at once")
    parser.add_argument("--tokenize_batch_size", type=int, default=1000, help="documents per tokenizer call")
    parser.add_argument("--no_tokenize", action="store_true", help="only download the shards")
    args = parser.parse_args(argv)
    for name in ("num_workers", "tokenize_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.input_files:  # relative to where the command runs; everything else to the repository root
        args.input_files = [os.path.abspath(path) for path in args.input_files]
        missing = [path for path in args.input_files if not os.path.exists(path)]
        if missing:
            parser.error(f"--input_files: no such file: {', '.join(missing)}")
    else:
        try:
            parse_shards(args.shards)
        except ValueError as error:
            parser.error(str(error))
    os.chdir(REPO_ROOT)  # the configs' paths, and so the cache's key, are relative to the repository root
    folders = [] if args.input_files else [("--output_dir", args.output_dir)]
    folders += [] if args.no_tokenize else [("--data_cache_dir", args.data_cache_dir)]
    for flag, folder in folders:
        problem = folder_problem(flag, folder)
        if problem:
            parser.error(problem)
    if not args.no_tokenize:
        if not os.path.isdir(args.tokenizer_name):
            parser.error(f"--tokenizer_name {args.tokenizer_name}: no such folder (relative paths start at the repository root)")
        if args.validation_file.lower() != "none" and not os.path.isfile(args.validation_file):
            parser.error(f"--validation_file {args.validation_file}: no such file ('none' to skip it)")
    # One process tokenises: let it use every core; several: one core each (and no fork of a busy tokenizer).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true" if args.num_workers == 1 else "false")

    start = time.time()
    if args.input_files:
        shards = args.input_files
    else:
        with ThreadPoolExecutor(max_workers=max(1, args.num_workers)) as pool:
            results = list(pool.map(lambda index: download(index, args.output_dir), parse_shards(args.shards)))
        for result in results:
            print(f"[prepare_pile] {result['source']} -> {result['target']}: {'kept' if result['skipped'] else 'downloaded'}", flush=True)
        shards = [result["target"] for result in results]
    summary = {"shards": shards, "prepare_seconds": round(time.time() - start, 1)}

    if not args.no_tokenize:
        validation = None if args.validation_file.lower() == "none" else args.validation_file
        summary.update(tokenize(shards, validation, args))
        steps = summary["train_tokens"] // TOKENS_PER_STEP
        print(
            f"[prepare_pile] {summary['train_tokens']:,} training tokens in {summary['train_cache']}: one epoch at "
            f"{TOKENS_PER_STEP:,} tokens per step is max_steps {steps:,} (the configs use 135,000)",
            flush=True,
        )
    print(f"[prepare_pile] train_file: {json.dumps(shards)}", flush=True)
    return summary


if __name__ == "__main__":
    run_cli(main, "prepare_pile.py")
