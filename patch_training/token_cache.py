"""Documents -> token ids -> the on-disk token cache: one flat binary token stream per data set and tokenizer,
written once (in parallel over the parts of the data: files, Parquet row groups, Arrow batches, byte ranges of a
large JSON-lines file, hub shards), under a lock so that one process on one node writes it, and memory-mapped by
every rank of every node.

A tokenisation killed without a chance to clean up (kill -9, the OOM killer, a preemption's SIGKILL) leaves its
temporary folder `<key>.tmp-<host>-<pid>-<hex>` (`temporary_name`) behind; its worker processes die with it
(`_die_with_parent`). Such a folder is written only under its key's lock, so it is abandoned when that lock is
free: `remove_stale_temporaries` removes those of the key being tokenised (under its lock) and those of other keys
whose lock it can take at once, and names in one warning the ones it cannot show abandoned.

A cache's key (`cache_key`) holds everything its tokens depend on: each source's path and `readers.content_stamp`,
the text column, the tokenizer (`tokenizer_fingerprint`), the cache's layout (`CACHE_FORMAT_VERSION`), and the two
rules of this project's own code: how files become documents (`readers.READING_RULE_VERSION`, see `readers.rule`)
and how documents become tokens (`TOKENIZATION_RULE_VERSION`). The tokenisation rule is the code of the functions
`TOKENIZATION_RULE_CODE`: the tokenizer call (`batch_encoder`: the tokenizer's own special tokens, BOS for LLaMA),
exactly one EOS per document (`eos_rule`), empty and null texts skipped (`_text_batches`), a document of more than
a million characters tokenised in pieces (`encode_bounded`, `document_pieces`), the documents' tokens concatenated
in order (`iter_token_batches`, `flat_tokens`). The rest (reading ahead in a thread, the parallel
workers and the part files they write) must give the tokens of one process reading in order, which tests check
(tests/test_token_cache.py, tests/test_readers_parts.py), so it is not part of the rule.
`TOKENIZATION_RULE_SOURCE_HASH` is a SHA-256 of those functions' syntax trees without docstrings: any change of
their code (not of comments, docstrings or formatting) makes tests/test_rule_versions.py fail until
`TOKENIZATION_RULE_VERSION` is bumped and the new hash recorded; each bump makes every cache be rebuilt once."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import time
import uuid
from collections.abc import Iterator

import numpy as np

from .cli import UsageError, naming_file
from .readers import (
    READING_RULE_VERSION,
    DataSource,
    content_stamp,
    is_sequential,
    sequential_part_chunks,
    text_problem,
)

logger = logging.getLogger("run_clm")


CACHE_FORMAT_VERSION = 1  # the layout of a cache folder: tokens.bin, meta.json
# The document -> tokens rule (see the module docstring): the version of the code of TOKENIZATION_RULE_CODE, whose
# syntax trees hash to TOKENIZATION_RULE_SOURCE_HASH (checked by tests/test_rule_versions.py).
TOKENIZATION_RULE_VERSION = 3
TOKENIZATION_RULE_CODE = ("eos_rule", "batch_encoder", "iter_token_batches", "encode_bounded", "document_pieces",
                          "_text_batches", "flat_tokens")
TOKENIZATION_RULE_SOURCE_HASH = "5c1d62feb67dbeae179d9ef77cfeea59234e73a7c7dc70d9f4ea309ca2c13b31"
LOCK_TIMEOUT_S = -1  # wait for another node's tokenisation as long as it takes


# ---------------------------------------------------------------------------------------------------------
# The document -> tokens rule
# ---------------------------------------------------------------------------------------------------------


def eos_rule(tokenizer) -> tuple[int, bool]:
    """(EOS id, whether the tokenizer already ends every encoded text with it). Document boundaries are exactly
    one EOS: we append it unless the tokenizer does (a post-processor with `$A </s>`, `add_eos_token=True`).
    UsageError for a tokenizer without an EOS token (nothing would mark where a document ends)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UsageError(
            f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token, which marks each document's end "
            "in the token stream: use a tokenizer with one (or set its eos_token)"
        )
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    appends = bool(with_special) and with_special[-1] == eos and not (without and without[-1] == eos)
    return eos, appends


PREFETCH_BATCHES = 4  # tokenizer batches of documents read ahead by a background thread (0: none)


def iter_token_batches(documents, tokenizer, text_column: str, batch_size: int, rule=None, state=None,
                       prefetch: int | None = None, skipped: list | None = None) -> Iterator:
    """Token ids of the documents, `batch_size` documents per tokenizer call: per document the tokenizer's own
    special tokens (BOS for LLaMA), the text, and one EOS (see `eos_rule`). Empty texts and nulls are skipped
    (they hold no tokens), and counted in `skipped`, a one-item list, when given. UsageError for a text the
    tokenizer refuses (not text, a lone surrogate: the readers of local files name the record before this).

    The documents are read (decompressed, parsed) by a background thread, up to `prefetch` batches ahead (0: no
    thread; default PREFETCH_BATCHES where there are 2 cores or more), while the tokenizer, which releases the
    GIL, encodes the previous batch (see `prefetched`). Yields lists of token-id lists; with `state` (a function
    called in the reading thread after each batch's last document), (token ids, its value) pairs."""
    eos, appends = rule or eos_rule(tokenizer)
    encode_batch = batch_encoder(tokenizer)
    batches = _text_batches(documents, text_column, batch_size, state, skipped)
    if prefetch is None:  # a reading thread helps where it has a core of its own
        prefetch = PREFETCH_BATCHES if available_cores() > 1 else 0
    for texts, snapshot in prefetched(batches, prefetch):
        try:
            ids = encode_bounded(texts, encode_batch, batch_encoder(tokenizer, special_tokens=False), eos, appends)
        except TypeError:  # the fast tokenizer's "TextEncodeInput must be Union[...]"
            _check_texts(texts, text_column)
            raise
        ids = ids if appends else [row + [eos] for row in ids]
        yield ids if state is None else (ids, snapshot)


# A tokenizer call holds many times its text in memory (a fast tokenizer's offsets and encodings: 4.3 GB for one
# 50 MB document). Calls get at most `encode_chars` characters of text, and a document longer than `piece_chars`
# is cut into pieces, each tokenised on its own, so that memory stays bounded whatever the record sizes. The two
# sizes are the defaults of `encode_bounded`, part of the rule's hashed code (the piece size changes tokens).


def encode_bounded(texts: list[str], encode_batch, encode_plain, eos: int, appends: bool,
                   piece_chars: int = 1 << 20, encode_chars: int = 8 << 20) -> list[list[int]]:
    """The token ids of each of `texts`, as `encode_batch(texts)` gives them (with the tokenizer's special tokens),
    in calls of at most `encode_chars` characters; a text longer than `piece_chars` is cut (`document_pieces`): its
    first piece gets the special tokens (less a trailing EOS the tokenizer `appends`), the others none
    (`encode_plain`), and their ids are joined (with that EOS back at the end). A document of at most
    `piece_chars` characters gets exactly its whole tokenisation; at each cut of a longer one the tokens may
    differ from the whole's by the tokenizer's handling of a text's start (SentencePiece's dummy prefix adds a
    "▁"; a byte-level BPE gives the same tokens)."""
    ids: list[list[int]] = []
    group: list[str] = []
    size = 0
    for text in texts:
        if len(text) > piece_chars:
            ids += encode_batch(group) if group else []
            group, size = [], 0
            pieces = document_pieces(text, piece_chars)
            row = encode_batch(pieces[:1])[0]
            if appends and row and row[-1] == eos:
                row = row[:-1]
            for piece in pieces[1:]:
                row += encode_plain([piece])[0]
            ids.append(row + [eos] if appends else row)
            continue
        if group and size + len(text) > encode_chars:
            ids += encode_batch(group)
            group, size = [], 0
        group.append(text)
        size += len(text)
    return ids + (encode_batch(group) if group else [])


def document_pieces(text: str, limit: int, search: int = 1 << 16) -> list[str]:
    """`text` cut into pieces of at most `limit` characters that join to it: each cut just before a space, newline
    or tab, looked for in the last `search` characters of the piece (the whitespace then starts the next piece, as
    a byte-level BPE attaches a space to the word after it), or at `limit` where there is none."""
    pieces, start = [], 0
    while len(text) - start > limit:
        end = start + limit
        window = text[max(start + 1, end - search):end]
        spaces = [i for i in (window.rfind(" "), window.rfind("\n"), window.rfind("\t")) if i >= 0]
        cut = end - len(window) + max(spaces) if spaces else end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _text_batches(documents, text_column: str, batch_size: int, state=None,
                  skipped: list | None = None) -> Iterator[tuple[list[str], object]]:
    """(`batch_size` non-empty texts, `state()` after the last of them was read) of `documents`; the last batch
    may be shorter. `skipped`: a one-item list counting the empty and null texts left out."""
    batch: list[str] = []
    for example in documents:
        text = example[text_column]
        if text:
            batch.append(text)
        elif skipped is not None:
            skipped[0] += 1
        if len(batch) >= batch_size:
            yield batch, state() if state else None
            batch = []
    if batch:
        yield batch, state() if state else None


def _check_texts(texts: list, text_column: str) -> None:
    """UsageError naming the first of a batch's `texts` that is not valid text (see `readers.text_problem`)."""
    for text in texts:
        problem = text_problem({text_column: text}, text_column)
        if problem:
            raise UsageError(f"a document of the data: {problem}")


def prefetched(items, depth: int) -> Iterator:
    """The items of the iterable `items`, made by a background thread up to `depth` ahead of the consumer, in
    order. An exception of `items` (a UsageError for bad data) is raised here, where the item would have come;
    closing this generator (a consumer that stops early, Ctrl-C) stops the thread at its next item."""
    import queue
    import threading

    if depth <= 0:
        yield from items
        return
    channel: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                channel.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((True, done))
        except BaseException as error:  # handed to the consumer, raised there
            put((False, error))
        finally:
            getattr(items, "close", lambda: None)()  # a generator's open files, closed in its own thread

    thread = threading.Thread(target=produce, name="prefetch-documents", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = channel.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=1.0)


def batch_encoder(tokenizer, special_tokens: bool = True):
    """texts -> token ids, with the tokenizer's special tokens unless `special_tokens` is False:
    `tokenizer(texts)["input_ids"]`, or, for a fast tokenizer with no truncation or padding set in its backend
    (then the two are the same), the backend's `encode_batch` directly, which skips building attention masks and
    a BatchEncoding per call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        return lambda texts: [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=special_tokens)]
    return lambda texts: tokenizer(texts, add_special_tokens=special_tokens)["input_ids"]


def iter_document_tokens(documents, tokenizer, text_column: str, batch_size: int) -> Iterator[list[int]]:
    """Token ids of each document (see `iter_token_batches`)."""
    for batch in iter_token_batches(documents, tokenizer, text_column, batch_size):
        yield from batch


def flat_tokens(batch: list[list[int]], dtype) -> np.ndarray:
    """The token-id lists of a batch, one after the other, as one array (n_tokens,) of `dtype`."""
    return np.fromiter(itertools.chain.from_iterable(batch), dtype=dtype, count=sum(map(len, batch)))


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


# ---------------------------------------------------------------------------------------------------------
# The cache key
# ---------------------------------------------------------------------------------------------------------

# Tokenizer settings that name where it was loaded from, not what it does.
_LOCATION_KWARGS = {"name_or_path", "tokenizer_file", "vocab_file", "merges_file", "_commit_hash", "cache_dir", "local_files_only", "is_local"}


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides what tokens a text becomes: for a fast tokenizer its full serialized
    state (`backend_tokenizer.to_str()`: normalizer, pre-tokenizer, model, post-processor, added tokens), for a
    slow one the bytes of every file `save_pretrained` writes; plus the class, the special tokens and the init
    settings (add_bos_token, add_eos_token, ...), without the paths it was loaded from."""
    import tempfile

    digest = hashlib.sha256()
    digest.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        with tempfile.TemporaryDirectory() as folder:
            for name in sorted(tokenizer.save_pretrained(folder)):
                if os.path.basename(name) != "tokenizer_config.json":  # holds the load path; settings hashed below
                    with open(name, "rb") as handle:
                        digest.update(os.path.basename(name).encode() + handle.read())
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    settings = {k: v for k, v in tokenizer.init_kwargs.items() if k not in _LOCATION_KWARGS}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(json.dumps([tokenizer.all_special_tokens, tokenizer.all_special_ids, tokenizer.bos_token_id,
                              tokenizer.eos_token_id], default=str).encode())
    return digest.hexdigest()


def cache_key(sources: list[str], tokenizer, text_column: str) -> str:
    """A hash (20 hex digits) of what the token stream depends on: the data (`sources`, each with its
    `readers.content_stamp`: a file's size and modification time, a folder's files'), the text column, the
    tokenizer (`tokenizer_fingerprint`), and this project's reading and tokenisation rules
    (`readers.READING_RULE_VERSION`, `TOKENIZATION_RULE_VERSION`; see the module docstring)."""
    digest = hashlib.sha256()
    digest.update(f"v{CACHE_FORMAT_VERSION}|reading{READING_RULE_VERSION}|tokenization{TOKENIZATION_RULE_VERSION}|"
                  f"{text_column}|".encode())
    for source in sources:
        digest.update(f"{source}|{content_stamp(source)}|".encode())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    return digest.hexdigest()[:20]


def default_cache_dir() -> str:
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return os.path.join(home, "patch_level_tokens")


# ---------------------------------------------------------------------------------------------------------
# Writing the cache
# ---------------------------------------------------------------------------------------------------------


def write_token_file(documents, tokenizer, text_column: str, batch_size: int, path: str, mode: str = "wb",
                     on_batch=None, rule=None, prefetch: int | None = None) -> tuple[int, int, int]:
    """Write (`mode` "ab": append) the token ids of `documents` to the flat binary file `path`.
    `on_batch(documents, tokens)` is called after each tokenizer call; `prefetch`: see `iter_token_batches`.
    Returns (tokens, documents, empty or null texts skipped)."""
    dtype = token_dtype(len(tokenizer))
    num_tokens = num_documents = 0
    skipped = [0]
    with naming_file(path), open(path, mode) as out:
        for batch in iter_token_batches(documents, tokenizer, text_column, batch_size, rule, prefetch=prefetch,
                                        skipped=skipped):
            flat = flat_tokens(batch, dtype)
            out.write(flat.tobytes())
            num_tokens += len(flat)
            num_documents += len(batch)
            if on_batch is not None:
                on_batch(len(batch), len(flat))
    return num_tokens, num_documents, skipped[0]


_WORKER: dict = {}


def _init_worker(tokenizer, counter, prefetch: int, parent: int | None = None, start_method: str = "fork") -> None:
    """Per worker process, once: the tokenizer, the shared (documents, tokens) counter of the progress bar, and
    the batches read ahead by a thread (none when the workers already fill the cores); the worker ends with the
    process `parent` that started it (see `_die_with_parent`)."""
    if parent is not None:
        _die_with_parent(parent, start_method)
    _WORKER.update(tokenizer=tokenizer, counter=counter, rule=eos_rule(tokenizer), prefetch=prefetch)


PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when the thread that started it ends


def _die_with_parent(parent: int, start_method: str) -> None:
    """On Linux, have the kernel kill this worker (SIGKILL) when `parent`, the tokenising process that started it
    (start method fork or spawn), ends. A parent killed with -9 (preemption, the OOM killer) otherwise leaves its
    workers running forever, blocked on a queue nobody feeds, with their tokenizer in memory, the last of them
    writing into a temporary folder whose key's lock died with the parent (see `remove_stale_temporaries`). A
    worker whose parent is already gone ends here."""
    if not sys.platform.startswith("linux") or start_method not in ("fork", "spawn"):
        return  # a fork server's workers are not the parent's children
    try:
        import ctypes

        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent ended before the line above
        os._exit(1)


def _count(counter, documents: int, tokens: int) -> None:
    with counter.get_lock():
        counter[0] += documents
        counter[1] += tokens


def _tokenize_part(job: tuple) -> tuple[int, int, int]:
    """Worker of the parallel tokenisation: one part of the data (or a `LineChunk`) into one part file."""
    source, part, text_column, batch_size, part_file = job
    tokenizer, counter = _WORKER["tokenizer"], _WORKER["counter"]
    return write_token_file(source.part_documents(part), tokenizer, text_column, batch_size, part_file,
                            on_batch=lambda d, t: _count(counter, d, t), rule=_WORKER["rule"],
                            prefetch=_WORKER["prefetch"])


FEED_FILES_PER_WORKER = 4  # below this many compressed files per worker, they are read here and fed in chunks
PARTS_PER_WORKER = 4  # files that can be split are cut in at least this many parts per worker, which balances them


def feeds_chunks(parts: list, workers: int) -> bool:
    """Whether the compressed JSON-lines and text files among `parts` (one sequential part each, see
    `readers.is_sequential`) are decompressed here and fed to the `workers` in chunks: when there are some, but
    fewer than FEED_FILES_PER_WORKER per worker to keep every worker busy on whole files."""
    return 0 < sum(map(is_sequential, parts)) < FEED_FILES_PER_WORKER * workers


def _jobs(source, parts: list, feed: bool) -> Iterator:
    """The units of parallel work, in stream order: the parts, except that with `feed` (see `feeds_chunks`) the
    sequential ones are decompressed here and handed out as `LineChunk`s of CHUNK_BYTES (decompression is a few
    per cent of tokenising: one reader feeds many workers)."""
    for part in parts:
        if feed and is_sequential(part):
            yield from sequential_part_chunks(part)
        else:
            yield part


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity, which a container or `taskset` narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def temporary_name(folder: str) -> str:
    """A temporary name beside `folder`, unique across hosts sharing the filesystem and processes of one host
    (`TEMPORARY_NAME`, for a cache folder `<cache_dir>/<key>`)."""
    return f"{folder}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


# `temporary_name` of a cache folder: what `remove_stale_temporaries` considers at all, and the only files it
# may hold to be removed (what `_tokenize_into` writes).
TEMPORARY_NAME = re.compile(r"(?P<key>[0-9a-f]{20})\.tmp-(?P<host>.+)-(?P<pid>[0-9]+)-[0-9a-f]{8}")
TEMPORARY_FILES = re.compile(r"tokens\.bin|meta\.json|part-[0-9]{6}\.bin")


def remove_stale_temporaries(cache_root: str, held_key: str | None = None) -> None:
    """Remove the temporary folders (`TEMPORARY_NAME`) that killed tokenisations left in `cache_root`, once each
    is provably abandoned: it is written only by a process holding its key's lock `<key>.lock` (see
    `cached_token_stream`), and that process's workers die with it (`_die_with_parent`), so a temporary folder
    whose key's lock is free is written by nobody.
    - Those of `held_key`, whose lock the caller holds: removed.
    - Those of another key: removed while holding its lock, when it exists and is free; skipped when it is held
      (that key is being tokenised, and its tokeniser removes them: see `cached_token_stream`).
    - Kept, and named in one warning: those without a lock file beside them (not written under the lock, or the
      lock file was deleted: nothing shows them abandoned), those holding anything but the files a tokenisation
      writes (tokens.bin, meta.json, part-NNNNNN.bin), and those that could not be removed.
    What is removed is named, with its size, in one log line. Anything else in `cache_root` (caches, locks, other
    files and folders, a link with a temporary's name) is never touched."""
    from filelock import FileLock, Timeout

    temporaries = _temporaries(cache_root)
    if not temporaries:
        return
    removed: list[tuple[str, int]] = []
    kept: list[tuple[str, int, str]] = []
    for key in sorted(temporaries):
        if key == held_key:
            _remove_temporaries(cache_root, temporaries[key], removed, kept)
            continue
        lock_file = os.path.join(cache_root, f"{key}.lock")
        if not os.path.isfile(lock_file):
            kept.extend((name, _size(os.path.join(cache_root, name)), f"no {key}.lock beside it")
                        for name in temporaries[key])
            continue
        lock = FileLock(lock_file, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            continue  # being tokenised: whoever holds the lock removes its key's stale temporaries
        except OSError as error:  # a cache folder this user may read but not write
            kept.extend((name, _size(os.path.join(cache_root, name)), f"its lock cannot be taken: {error.strerror or error}")
                        for name in temporaries[key])
            continue
        try:  # listed again: another process may have removed some before we took the lock
            _remove_temporaries(cache_root, _temporaries(cache_root).get(key, []), removed, kept)
        finally:
            lock.release()
    if removed:
        one = len(removed) == 1
        logger.info("Removed %s left by %s from %s (%s%s): %s", _plural(len(removed), "stale temporary folder"),
                    "a killed tokenisation" if one else "killed tokenisations", cache_root,
                    _human_size(sum(size for _, size in removed)), "" if one else " in all",
                    ", ".join(f"{name} ({_human_size(size)})" for name, size in removed))
    if kept:
        logger.warning("Kept %s in the token cache folder %s that may still be in use (remove %s by hand once no "
                       "tokenisation is writing %s): %s", _plural(len(kept), "temporary folder"), cache_root,
                       "it" if len(kept) == 1 else "them", "it" if len(kept) == 1 else "them",
                       ", ".join(f"{name} ({_human_size(size)}; {why})" for name, size, why in kept))


def _temporaries(cache_root: str) -> dict[str, list[str]]:
    """{key: sorted names} of the folders (not links) in `cache_root` named as `temporary_name` names them."""
    found: dict[str, list[str]] = {}
    try:
        entries = list(os.scandir(cache_root))
    except OSError:  # no cache folder yet, or one this user cannot list: nothing to remove
        return found
    for entry in entries:
        match = TEMPORARY_NAME.fullmatch(entry.name)
        if match and entry.is_dir(follow_symlinks=False):
            found.setdefault(match["key"], []).append(entry.name)
    return {key: sorted(names) for key, names in found.items()}


def _remove_temporaries(cache_root: str, names: list[str], removed: list, kept: list) -> None:
    """Remove the abandoned temporary folders `names` of `cache_root` that hold only what a tokenisation writes
    (appended to `removed` as (name, bytes)); the others are appended to `kept` as (name, bytes, why)."""
    for name in names:
        path = os.path.join(cache_root, name)
        try:
            entries = list(os.scandir(path))
        except FileNotFoundError:
            continue  # removed meanwhile
        except OSError as error:
            kept.append((name, 0, f"cannot be listed: {error.strerror or error}"))
            continue
        size = _size(path)
        foreign = [entry.name for entry in entries
                   if not (TEMPORARY_FILES.fullmatch(entry.name) and entry.is_file(follow_symlinks=False))]
        if foreign:
            kept.append((name, size, f"holds {', '.join(sorted(foreign)[:3])}{', ...' if len(foreign) > 3 else ''}, "
                                     "which a tokenisation does not write"))
            continue
        errors = []
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=lambda function, target, error: errors.append(f"{target}: {error}"))
        else:
            shutil.rmtree(path, onerror=lambda function, target, info: errors.append(f"{target}: {info[1]}"))
        if os.path.lexists(path):
            kept.append((name, size, f"could not be removed ({errors[0] if errors else 'it came back'})"))
        else:
            removed.append((name, size))


def _size(path: str) -> int:
    """Bytes of the files under the folder `path` (links not followed)."""
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _human_size(size: int) -> str:
    """'6.00kB', '5.70MB': tqdm's decimal byte sizes, as its progress bars show them."""
    from tqdm import tqdm

    return tqdm.format_sizeof(size, "B", 1000)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"


def tokenize_to_cache(
    documents, tokenizer, text_column: str, batch_size: int, folder: str,
    paths: list[str] | None = None, fmt: str | None = None, num_workers: int = 1,
    source: DataSource | None = None, progress: bool = False,
) -> dict:
    """Tokenise every document once into `<folder>/tokens.bin` (flat uint16/uint32 stream) + `meta.json`.

    The documents are `source`'s, or those of local `paths`, or the iterable `documents`. With `num_workers` > 1
    the data's parts (files, Parquet row groups, Arrow record batches, byte ranges of an uncompressed JSON-lines
    or text file, hub shards; see `readers.file_parts`), and chunks of lines of compressed files, which this
    process decompresses (see `_jobs`), are tokenised in parallel processes and their streams concatenated in
    order: the same bytes as one process. meta.json holds the tokens, the documents tokenised, the null or empty
    texts skipped (`num_skipped_empty`), the dtype and how the work was split. `progress`: a tqdm bar (documents, tokens, tokens/s,
    ETA from the bytes read). Written to a temporary folder (unique across hosts) and renamed, so an interrupted
    run never leaves a half-written cache; an existing `folder` is kept.
    """
    eos_rule(tokenizer)  # refuse a tokenizer without EOS before any work
    if source is None and paths is not None:
        source = DataSource(text_column=text_column, paths=tuple(paths), fmt=fmt)
    tmp_folder = temporary_name(folder)
    os.makedirs(tmp_folder)
    try:
        meta = _tokenize_into(tmp_folder, documents, source, tokenizer, text_column, batch_size, num_workers, progress)
    except BaseException:  # bad data, Ctrl-C: no half-written temporary folder left behind
        shutil.rmtree(tmp_folder, ignore_errors=True)
        raise
    if os.path.isdir(folder):  # another process finished first
        shutil.rmtree(tmp_folder)
    else:
        os.replace(tmp_folder, folder)
    return meta


def _tokenize_into(tmp_folder, documents, source, tokenizer, text_column, batch_size, num_workers, progress) -> dict:
    """The body of `tokenize_to_cache`: tokens.bin and meta.json in `tmp_folder`; returns the meta."""
    tokens_file = os.path.join(tmp_folder, "tokens.bin")
    start = time.time()
    parts = None  # one hub stream read by one process, or the given `documents`
    if source is not None and (source.paths is not None or num_workers > 1):
        parts = source.parts(PARTS_PER_WORKER * num_workers if num_workers > 1 else 1)
    elif source is not None:
        documents = source.documents(streaming=True)
    bar = _progress_bar(parts, progress)
    if parts is not None and num_workers > 1 and (len(parts) > 1 or is_sequential(parts[0])):
        counts = _tokenize_parallel(parts, source, tokenizer, text_column, batch_size, tmp_folder, tokens_file,
                                    num_workers, bar)
    else:
        rule = eos_rule(tokenizer)
        open(tokens_file, "wb").close()
        counts = []
        for part in parts if parts is not None else [None]:
            docs = documents if part is None else source.part_documents(part)
            counts.append(write_token_file(docs, tokenizer, text_column, batch_size, tokens_file, "ab",
                                           on_batch=bar.add if bar else None, rule=rule))
            if bar:
                bar.part_done(part)
    if bar:
        bar.close()
    meta = {
        "num_tokens": sum(c[0] for c in counts),
        "num_documents": sum(c[1] for c in counts),
        "num_skipped_empty": sum(c[2] for c in counts),  # null or empty texts: no tokens
        "dtype": np.dtype(token_dtype(len(tokenizer))).name,
        "tokenize_seconds": round(time.time() - start, 2),
        "num_workers": num_workers,
        "num_parts": len(parts) if parts is not None else 1,
        "num_jobs": len(counts),  # the parts, compressed files fed in chunks counted chunk by chunk
    }
    with naming_file(os.path.join(tmp_folder, "meta.json")), open(os.path.join(tmp_folder, "meta.json"), "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=2)
    return meta


def _tokenize_parallel(parts, source, tokenizer, text_column, batch_size, tmp_folder, tokens_file, num_workers, bar):
    """The `_jobs` of the data tokenised by a pool of processes, each into its own part file, appended to
    `tokens_file` in order as soon as the jobs before it are done. At most 2 jobs per worker are queued at once
    (their chunks' text is held in memory). Returns the (tokens, documents, texts skipped) of each job."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    feed = feeds_chunks(parts, num_workers)
    workers = num_workers if feed else min(num_workers, len(parts))
    counter = multiprocessing.Array("q", 2)
    jobs, queued, finished, counts = _jobs(source, parts, feed), {}, {}, []
    written = submitted = 0
    prefetch = PREFETCH_BATCHES if workers < available_cores() else 0  # a reading thread needs a core of its own
    initargs = (tokenizer, counter, prefetch, os.getpid(), multiprocessing.get_start_method())
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=initargs) as pool, \
            naming_file(tokens_file), open(tokens_file, "wb") as out:
        try:
            while True:
                while len(queued) < 2 * workers and (job := next(jobs, None)) is not None:
                    part_file = os.path.join(tmp_folder, f"part-{submitted:06d}.bin")
                    future = pool.submit(_tokenize_part, (source, job, text_column, batch_size, part_file))
                    queued[future] = (submitted, job, part_file)
                    submitted += 1
                if not queued:
                    break
                done, _ = wait(queued, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    number, job, part_file = queued.pop(future)
                    finished[number] = (future.result(), part_file)  # a worker's UsageError, raised here
                    if bar:
                        bar.part_done(job)
                while written in finished:  # the next part file in stream order is complete
                    count, part_file = finished.pop(written)
                    with open(part_file, "rb") as handle:
                        shutil.copyfileobj(handle, out, 64 * 1024 * 1024)
                    os.remove(part_file)
                    counts.append(count)
                    written += 1
                if bar:
                    bar.set_counts(counter[0], counter[1])
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return counts


class _Progress:
    """One tqdm bar for a whole tokenisation job (not one per worker): bytes of the data read (so an ETA where
    the size is known) with documents, tokens and tokens/s after it."""

    def __init__(self, total: int | None):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenising", mininterval=1.0)
        self.documents = self.tokens = 0
        self.start = time.time()

    def add(self, documents: int, tokens: int) -> None:
        self.set_counts(self.documents + documents, self.tokens + tokens)

    def set_counts(self, documents: int, tokens: int) -> None:
        self.documents, self.tokens = documents, tokens
        rate = tokens / max(time.time() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{documents:,} documents, {tokens:,} tokens, {rate:,.0f} tokens/s", refresh=False)
        self.bar.refresh()

    def part_done(self, part) -> None:
        self.bar.update(getattr(part, "size", 0) or 0)

    def close(self) -> None:
        self.bar.close()


def _progress_bar(parts, progress: bool) -> _Progress | None:
    if not progress:
        return None
    sizes = [getattr(part, "size", 0) for part in parts or []]
    return _Progress(sum(sizes) if sizes and all(sizes) else None)


# ---------------------------------------------------------------------------------------------------------
# Reading the cache
# ---------------------------------------------------------------------------------------------------------


def skipped_note(meta: dict) -> str:
    """' (3 null or empty texts skipped)' after the documents tokenised, when there were some; '' otherwise
    (none, or no `num_skipped_empty` in `meta`)."""
    skipped = meta.get("num_skipped_empty", 0)
    if not skipped:
        return ""
    return f" ({skipped:,} null or empty text{'s' if skipped != 1 else ''} skipped)"


def load_token_stream(folder: str) -> np.memmap:
    with open(os.path.join(folder, "meta.json"), encoding="utf-8") as handle:
        meta = json.load(handle)
    if meta["num_tokens"] == 0:
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(os.path.join(folder, "tokens.bin"), dtype=meta["dtype"], mode="r", shape=(meta["num_tokens"],))


def cached_token_stream(
    source: DataSource, tokenizer, training_args, cache_dir: str | None = None, batch_size: int = 1000, num_workers: int = 1,
) -> tuple[np.ndarray, str]:
    """The token stream of `source`, tokenised once into `<cache_dir>/<cache_key>` and then memory-mapped.
    Returns (stream of token ids, cache folder).

    Once per cache whatever the number of processes and nodes: on each node the local main process goes first
    (`training_args.main_process_first`), and across nodes sharing the cache folder a file lock
    (`<cache_dir>/<key>.lock`, the `filelock` package) lets one of them tokenise while the others wait and then
    read. `batch_size`: documents per tokenizer call; `num_workers`: processes, one part of the data each.

    The temporary folders that killed tokenisations left in `cache_dir` are removed once provably abandoned (see
    `remove_stale_temporaries`): those of this key under its lock before tokenising, those of other keys (and of
    this key when its cache exists) by the local main process when their lock is free."""
    from filelock import FileLock

    cache_root = cache_dir or default_cache_dir()
    key = cache_key(source.names, tokenizer, source.text_column)
    folder = os.path.join(cache_root, key)
    with training_args.main_process_first(desc="tokenisation"):
        if not os.path.isdir(folder):
            os.makedirs(cache_root, exist_ok=True)
            with FileLock(os.path.join(cache_root, f"{key}.lock"), timeout=LOCK_TIMEOUT_S):
                remove_stale_temporaries(cache_root, held_key=key)  # this key's temporaries: nobody writes them now
                if not os.path.isdir(folder):  # not written by another node while this one waited
                    logger.info("Tokenising %s into %s", ", ".join(source.names), folder)
                    meta = tokenize_to_cache(
                        None, tokenizer, source.text_column, batch_size, folder, num_workers=num_workers, source=source,
                        progress=bool(getattr(training_args, "should_log", False)) and logger.isEnabledFor(logging.INFO),
                    )
                    logger.info("Tokenised %d documents%s into %d tokens in %.1fs", meta["num_documents"],
                                skipped_note(meta), meta["num_tokens"], meta["tokenize_seconds"])
                else:
                    logger.info("Reading tokenised data from the cache %s (written by another node)", folder)
        else:
            if getattr(training_args, "local_process_index", 0) == 0:
                remove_stale_temporaries(cache_root)
            logger.info("Reading tokenised data from the cache %s", folder)
    return load_token_stream(folder), folder
