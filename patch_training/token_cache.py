"""Documents -> token ids -> the on-disk token cache: one flat binary token stream per data set and tokenizer,
written once (in parallel over files) and memory-mapped by every rank."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator

import numpy as np

from .readers import DataSource, iter_local_documents

logger = logging.getLogger("run_clm")


CACHE_FORMAT_VERSION = 1


def iter_document_tokens(documents, tokenizer, text_column: str, batch_size: int) -> Iterator[list[int]]:
    """Token ids of each document: the tokenizer's own special tokens (BOS for LLaMA), the text, then EOS."""
    eos = tokenizer.eos_token_id
    batch: list[str] = []

    def encode(texts):
        for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
            yield ids + [eos] if eos is not None else ids

    for example in documents:
        text = example[text_column]
        if text:
            batch.append(text)
        if len(batch) >= batch_size:
            yield from encode(batch)
            batch = []
    if batch:
        yield from encode(batch)


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def cache_key(sources: list[str], tokenizer, text_column: str) -> str:
    """A hash of what the token stream depends on: the data (path, size, mtime), the tokenizer, the column."""
    digest = hashlib.sha256()
    digest.update(f"v{CACHE_FORMAT_VERSION}|{text_column}|".encode())
    for source in sources:
        if os.path.isfile(source):
            stat = os.stat(source)
            digest.update(f"{source}|{stat.st_size}|{stat.st_mtime_ns}|".encode())
        else:
            digest.update(f"{source}|".encode())
    vocab = tokenizer.get_vocab()
    digest.update(json.dumps(sorted(vocab.items())).encode())
    digest.update(f"{tokenizer.bos_token_id}|{tokenizer.eos_token_id}|{type(tokenizer).__name__}".encode())
    return digest.hexdigest()[:20]


def default_cache_dir() -> str:
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return os.path.join(home, "patch_level_tokens")


def write_token_file(documents, tokenizer, text_column: str, batch_size: int, path: str) -> tuple[int, int]:
    """Append the token ids of `documents` to the flat binary file `path`. Returns (tokens, documents)."""
    dtype = token_dtype(len(tokenizer))
    num_tokens = num_documents = 0
    with open(path, "wb") as out:
        for ids in iter_document_tokens(documents, tokenizer, text_column, batch_size):
            out.write(np.asarray(ids, dtype=dtype).tobytes())
            num_tokens += len(ids)
            num_documents += 1
    return num_tokens, num_documents


def _tokenize_one_file(job: tuple) -> tuple[int, int]:
    """Worker of the parallel tokenisation: one local file into one part file."""
    path, fmt, tokenizer, text_column, batch_size, part = job
    return write_token_file(iter_local_documents([path], fmt, text_column), tokenizer, text_column, batch_size, part)


def tokenize_to_cache(
    documents, tokenizer, text_column: str, batch_size: int, folder: str,
    paths: list[str] | None = None, fmt: str | None = None, num_workers: int = 1,
) -> dict:
    """Tokenise every document once into `<folder>/tokens.bin` (flat uint16/uint32 stream) + `meta.json`.

    With several local `paths` and `num_workers` > 1, the files are tokenised in parallel processes, one file
    each, and their streams concatenated in order: the same bytes as one process. Written to a temporary
    folder and renamed, so an interrupted run never leaves a half-written cache.
    """
    tmp_folder = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_folder, ignore_errors=True)
    os.makedirs(tmp_folder)
    try:
        meta = _tokenize_into(tmp_folder, documents, tokenizer, text_column, batch_size, paths, fmt, num_workers)
    except BaseException:  # bad data, Ctrl-C: no half-written temporary folder left behind
        shutil.rmtree(tmp_folder, ignore_errors=True)
        raise
    if os.path.isdir(folder):  # another process finished first
        shutil.rmtree(tmp_folder)
    else:
        os.replace(tmp_folder, folder)
    return meta


def _tokenize_into(tmp_folder, documents, tokenizer, text_column, batch_size, paths, fmt, num_workers) -> dict:
    """The body of `tokenize_to_cache`: tokens.bin and meta.json in `tmp_folder`; returns the meta."""
    tokens_file = os.path.join(tmp_folder, "tokens.bin")
    start = time.time()
    if paths is not None and num_workers > 1 and len(paths) > 1:
        from concurrent.futures import ProcessPoolExecutor

        parts = [os.path.join(tmp_folder, f"part-{i:05d}.bin") for i in range(len(paths))]
        jobs = [(path, fmt, tokenizer, text_column, batch_size, part) for path, part in zip(paths, parts)]
        with ProcessPoolExecutor(max_workers=min(num_workers, len(paths))) as pool:
            counts = list(pool.map(_tokenize_one_file, jobs))
        with open(tokens_file, "wb") as out:
            for part in parts:
                with open(part, "rb") as handle:
                    shutil.copyfileobj(handle, out, 64 * 1024 * 1024)
                os.remove(part)
    else:
        counts = [write_token_file(documents, tokenizer, text_column, batch_size, tokens_file)]
    meta = {
        "num_tokens": sum(c[0] for c in counts),
        "num_documents": sum(c[1] for c in counts),
        "dtype": np.dtype(token_dtype(len(tokenizer))).name,
        "tokenize_seconds": round(time.time() - start, 2),
    }
    with open(os.path.join(tmp_folder, "meta.json"), "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=2)
    return meta


def load_token_stream(folder: str) -> np.memmap:
    with open(os.path.join(folder, "meta.json"), encoding="utf-8") as handle:
        meta = json.load(handle)
    if meta["num_tokens"] == 0:
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(os.path.join(folder, "tokens.bin"), dtype=meta["dtype"], mode="r", shape=(meta["num_tokens"],))


def cached_token_stream(
    source: DataSource, tokenizer, training_args, cache_dir: str | None = None, batch_size: int = 1000, num_workers: int = 1,
) -> tuple[np.ndarray, str]:
    """The token stream of `source`, tokenised once (by the main process: `training_args.main_process_first`)
    into `<cache_dir>/<cache_key>` and then memory-mapped. Returns (stream of token ids, cache folder).
    `batch_size`: documents per tokenizer call; `num_workers`: processes, one file each."""
    sources = source.names
    cache_root = cache_dir or default_cache_dir()
    folder = os.path.join(cache_root, cache_key(sources, tokenizer, source.text_column))
    with training_args.main_process_first(desc="tokenisation"):
        if not os.path.isdir(folder):
            logger.info("Tokenising %s into %s", ", ".join(sources), folder)
            os.makedirs(cache_root, exist_ok=True)
            meta = tokenize_to_cache(
                source.documents(streaming=True), tokenizer, source.text_column, batch_size, folder,
                paths=None if source.paths is None else list(source.paths), fmt=source.fmt, num_workers=num_workers,
            )
            logger.info("Tokenised %d documents into %d tokens in %.1fs", meta["num_documents"], meta["num_tokens"], meta["tokenize_seconds"])
        else:
            logger.info("Reading tokenised data from the cache %s", folder)
    return load_token_stream(folder), folder
