"""Token stream -> training blocks: fixed-length sequences of T (token stage) or K*T (patch stage) tokens, from
the token cache or from documents tokenised on the fly (`--streaming`)."""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Iterator

import numpy as np
import torch

from .cli import UsageError, naming_file, write_failures_as_messages

logger = logging.getLogger("run_clm")


class TokenBlocks(torch.utils.data.Dataset):
    """Blocks of `block_len` tokens cut from a token stream read as repeating (epoch after epoch).

    Block j holds stream positions start + j*block_len ... start + (j+1)*block_len - 1, each taken modulo
    the stream length, so a stage can start mid-stream and run over several epochs with nothing dropped
    but its final partial block. Items are {"input_ids", "labels"} (the model shifts the labels).
    """

    def __init__(self, tokens: np.ndarray, start: int, num_blocks: int, block_len: int):
        self.tokens, self.start, self.num_blocks, self.block_len = tokens, start, num_blocks, block_len

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_blocks:
            raise IndexError(index)
        length = len(self.tokens)
        begin = (self.start + index * self.block_len) % length
        end = begin + self.block_len
        if end <= length:
            ids = np.asarray(self.tokens[begin:end], dtype=np.int64)
        else:  # wraps around the end of the stream
            ids = np.asarray(np.take(self.tokens, np.arange(begin, end) % length), dtype=np.int64)
        input_ids = torch.from_numpy(ids)
        return {"input_ids": input_ids, "labels": input_ids.clone()}


class IgnoredPadding(torch.utils.data.Dataset):
    """`blocks` (a map-style dataset of {"input_ids", "labels"}) followed by ignored blocks up to a multiple of
    `multiple` items: copies of block 0 with every label -100, which add no target to a loss or to
    `num_items_in_batch`.

    For evaluation (`PatchTrainer.exact_eval_dataset`): under several ranks accelerate fills the last batch of
    each rank by repeating real blocks from the start (`even_batches`), so a distributed evaluation would score
    some blocks twice (eval_perplexity 8,724.8 where the model's is 8,804.1, 5 blocks on 2 ranks). Padded to
    `multiple` = ranks x per-device batch, every batch is full and holds each real block once; the ignored ones
    only cost their compute. `num_real` is len(blocks). (Not for training, whose shuffled order must not depend
    on the number of ranks: see `PatchTrainer.__init__`.)"""

    def __init__(self, blocks, multiple: int):
        self.blocks, self.num_real = blocks, len(blocks)
        self.length = -(-self.num_real // max(1, multiple)) * max(1, multiple)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        if index < self.num_real:
            return self.blocks[index]
        first = self.blocks[0]
        return {"input_ids": first["input_ids"], "labels": torch.full_like(first["labels"], -100)}


MARK_TOKENS = 1 << 18  # a position mark inside a part every ~262k tokens (~1M index lines for 280B tokens) (see StreamingTokenBlocks._chunks)


def _counted(documents, read: list[int]) -> Iterator:
    """`documents`, counting in read[0] how many were taken (from its starting value)."""
    for document in documents:
        read[0] += 1
        yield document


class StreamingTokenBlocks(torch.utils.data.IterableDataset):
    """Blocks of `block_len` tokens from documents tokenised on the fly: stream tokens `skip_tokens` ...
    `skip_tokens + num_blocks * block_len - 1`, the data re-read as often as needed (epoch after epoch).

    `source`: a `DataSource` (read part by part: files, Parquet row groups, Arrow batches, byte ranges of an
    uncompressed JSON-lines file; see `readers.file_parts`), or a function giving an iterable of documents
    (dicts holding `text_column`), read whole. Documents are tokenised `batch_size` per call by the rule of the
    token cache (`token_cache.iter_token_batches`) and blocks are cut with numpy slices.

    Starting at stream token N costs time independent of N: the tokens of each part (the same every epoch)
    (and a mark every ~MARK_TOKENS inside it) are recorded in `index_file` (JSON lines, keyed by the data and
    tokenizer) as the stream first passes them, so a later stage or a resume opens the part holding token N
    and tokenises only from the mark before N (at most ~MARK_TOKENS tokens). Where the
    index does not yet reach N (a first run, or a `source` that is a function) the stream is read from the
    start. `write_index`: whether this process writes the index (the process that saves checkpoints).

    One stream: read by at most one data-loader worker (several would each yield every block; `main`
    refuses that, and `__iter__` raises if it happens anyway)."""

    def __init__(
        self, source, tokenizer, text_column: str, skip_tokens: int, num_blocks: int, block_len: int,
        batch_size: int = 1000, index_file: str | None = None, write_index: bool = True,
    ):
        self.source, self.tokenizer, self.text_column = source, tokenizer, text_column
        self.batch_size, self.index_file, self.write_index = batch_size, index_file, write_index
        self.skip_tokens, self.num_blocks, self.block_len = skip_tokens, num_blocks, block_len

    def __len__(self) -> int:
        return self.num_blocks

    def _parts(self) -> tuple[list, str]:
        """(the parts read in order, a key naming the data, the parts and the tokenizer)."""
        from .readers import DataSource
        from .token_cache import cache_key

        if isinstance(self.source, DataSource):
            parts = self.source.parts()
            key = f"{cache_key(self.source.names, self.tokenizer, self.text_column)}|{len(parts)}"
            return parts, key
        return [None], ""

    def _documents(self, part, start=None, cursor=None):
        return self.source() if part is None else self.source.part_documents(part, start, cursor)

    def _load_index(self, key: str) -> tuple[list[int], dict[int, list[list[int]]]]:
        """(tokens of each part read whole so far, {part: sorted [documents, tokens(, offset, line)] marks}) from
        the index file, an append-only JSON-lines file whose first line names the data and tokenizer; empty if it is
        another's. Also kept, in `self._counts`: {(part, tokens): null or empty texts skipped} of the marks, where
        the index has them (see `streamed_counts`)."""
        known: dict[int, int] = {}
        marks: dict[int, set] = {}
        self._counts: dict = {}
        if self.index_file and key and os.path.isfile(self.index_file):
            lines = read_index(self.index_file)  # [] for a line cut by a crash: start a new index
            if lines and lines[0].get("key") == key:
                for entry in lines[1:]:
                    if "part_tokens" in entry:
                        known[entry["part"]] = entry["part_tokens"]
                    else:
                        if "skipped" in entry:
                            self._counts[entry["part"], entry["tokens"]] = entry["skipped"]
                        position = (entry["offset"], entry["line"]) if "offset" in entry else ()
                        marks.setdefault(entry["part"], set()).add((entry["documents"], entry["tokens"], *position))
                self._index_key = key
        prefix = []
        while len(prefix) in known:  # the parts read whole, from the first on
            prefix.append(known[len(prefix)])
        return prefix, {part: sorted(map(list, found), key=lambda m: m[1]) for part, found in marks.items()}

    def _record(self, key: str, entry: dict) -> None:
        """Append `entry` to the index file (started with the key line when it holds another data's index)."""
        if not (self.index_file and key and self.write_index):
            return
        with naming_file(self.index_file):
            if getattr(self, "_index_key", None) != key:
                with open(self.index_file, "w", encoding="utf-8") as handle:
                    handle.write(json.dumps({"key": key}) + "\n")
                self._index_key = key
            with open(self.index_file, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")

    def _chunks(self) -> Iterator[np.ndarray]:
        """The token stream from `skip_tokens` on, as numpy arrays (one per tokenizer call).

        The index records, per part, its tokens once read whole and a mark [documents, tokens] every ~MARK_TOKENS
        inside it, with, for a JSON-lines or text part, where the next line starts (`offset` bytes into the
        decompressed content, `line`): a start inside a part reads from the last mark at or before the start
        (seeking there; a compressed file is decompressed up to it, not parsed or tokenised). Table parts skip
        their documents before the mark untokenised."""
        from .readers import LinePosition
        from .token_cache import eos_rule, flat_tokens, iter_token_batches, token_dtype

        parts, key = self._parts()
        known, marks = self._load_index(key)
        rule, dtype = eos_rule(self.tokenizer), token_dtype(len(self.tokenizer))
        skip, part_index = self.skip_tokens, 0
        epoch_tokens = sum(known) if len(known) == len(parts) else None
        if epoch_tokens == 0:
            raise UsageError("the streamed training data holds no text")
        if epoch_tokens:
            skip %= epoch_tokens
        while part_index < len(known) and skip >= known[part_index]:  # jump over whole parts already counted
            skip -= known[part_index]
            part_index += 1
        while True:
            if part_index == len(parts):
                if sum(known) == 0:
                    raise UsageError("the streamed training data holds no text")
                part_index = 0
            recording = part_index == len(known)  # this part's tokens are not known yet
            part_marks = marks.get(part_index, [])
            mark = [0, 0]
            for candidate in part_marks:  # the last mark at or before the start
                if candidate[1] <= skip:
                    mark = candidate
            produced, skip = mark[1], skip - mark[1]
            next_mark = (part_marks[-1][1] if part_marks else 0) + MARK_TOKENS
            cursor = [None]
            # null or empty texts before the start (None: an index written before they were counted), and after it
            skipped_start, counter = self._counts.get((part_index, mark[1]), 0 if mark[1] == 0 else None), [0]
            if len(mark) > 2:  # a line position: read from there
                read = [mark[0]]
                documents = _counted(self._documents(parts[part_index], LinePosition(*mark[2:]), cursor), read)
            else:
                read = [0]
                documents = itertools.islice(_counted(self._documents(parts[part_index], None, cursor), read), mark[0], None)

            def position(documents_read=read, cursor=cursor, start=skipped_start, counter=counter):
                return documents_read[0], cursor[0], None if start is None else start + counter[0]

            def add_mark(documents_read, tokens, line_position, skipped_before, part=part_index):
                entry = {"part": part, "documents": documents_read, "tokens": tokens}
                if line_position is not None:
                    entry.update(offset=line_position.offset, line=line_position.line)
                if skipped_before is not None:
                    entry["skipped"] = skipped_before
                self._record(key, entry)
                marks.setdefault(part, []).append([documents_read, tokens, *(line_position or ())])

            last = None  # the position after the last batch tokenised
            try:
                for batch, (documents_read, line_position, skipped_before) in iter_token_batches(
                        documents, self.tokenizer, self.text_column, self.batch_size, rule, state=position, skipped=counter):
                    chunk = flat_tokens(batch, dtype)
                    produced += len(chunk)
                    last = (documents_read, produced, line_position, skipped_before)
                    if recording and produced >= next_mark:
                        add_mark(*last)
                        next_mark = produced + MARK_TOKENS
                    if skip >= len(chunk):
                        skip -= len(chunk)
                        continue
                    yield chunk[skip:]
                    skip = 0
            except GeneratorExit:  # the stream stops inside this part (its last block): mark how far it read
                if recording and last is not None and last[1] > max([0] + [m[1] for m in marks.get(part_index, [])]):
                    add_mark(*last)
                raise
            if recording:
                known.append(produced)
                entry = {"part": part_index, "part_tokens": produced}
                if skipped_start is not None:
                    entry.update(part_documents=read[0], part_skipped=skipped_start + counter[0])
                self._record(key, entry)
            part_index += 1

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = torch.utils.data.get_worker_info()
        if worker is not None and worker.num_workers > 1:
            raise UsageError(f"streamed blocks read by {worker.num_workers} data-loader workers would repeat: use at most 1")
        with write_failures_as_messages():  # from a worker process, torch's re-raise would lose errno and file
            yield from self._blocks()

    def _blocks(self) -> Iterator[dict[str, torch.Tensor]]:
        pending: list[np.ndarray] = []
        held = 0
        blocks = 0
        for chunk in self._chunks():
            pending.append(chunk)
            held += len(chunk)
            if held < self.block_len:
                continue
            flat = np.concatenate(pending) if len(pending) > 1 else pending[0]
            whole = min(len(flat) // self.block_len, self.num_blocks - blocks)
            for b in range(whole):
                ids = torch.from_numpy(flat[b * self.block_len : (b + 1) * self.block_len].astype(np.int64))
                yield {"input_ids": ids, "labels": ids.clone()}
            blocks += whole
            if blocks == self.num_blocks:
                return
            rest = flat[whole * self.block_len :]
            pending, held = [rest], len(rest)


def read_index(index_file: str) -> list[dict]:
    """The entries of a stream's index file (`StreamingTokenBlocks`), the key line first; [] where it cannot be
    read whole (missing, unreadable, or a line cut by a crash)."""
    try:
        with open(index_file, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    except (OSError, ValueError):
        return []


def streamed_counts(index_file: str) -> dict | None:
    """What the index of a stream (`StreamingTokenBlocks`) says of the training data it has read, over all its
    passes: {"documents": documents read (texts and skipped ones), "skipped_empty": null or empty texts skipped
    (no tokens; the token cache's `num_skipped_empty`), "tokens": their tokens, "parts_read_whole", "parts"};
    a part read in part counts up to where the stream stopped (its last mark). None without an index, or for one
    written before texts were counted."""
    lines = read_index(index_file)
    if not lines or "key" not in lines[0]:
        return None
    whole, last_mark = {}, {}
    for entry in lines[1:]:
        if "part_tokens" in entry:
            whole[entry["part"]] = entry
        elif entry["tokens"] >= last_mark.get(entry["part"], {}).get("tokens", -1):
            last_mark[entry["part"]] = entry
    counts = {"documents": 0, "skipped_empty": 0, "tokens": 0}
    for part in set(whole) | set(last_mark):
        entry = whole.get(part)
        fields = ("part_documents", "part_skipped", "part_tokens") if entry else ("documents", "skipped", "tokens")
        entry = entry or last_mark[part]
        if any(name not in entry for name in fields):
            return None
        for name, field_name in zip(counts, fields):
            counts[name] += entry[field_name]
    return {**counts, "parts_read_whole": len(whole), "parts": int(lines[0]["key"].rsplit("|", 1)[-1])}


def training_blocks(plan, stream: np.ndarray | None, source=None, tokenizer=None, batch_size: int = 1000,
                    index_file: str | None = None, write_index: bool = True):
    """The training blocks of the stage `plan` (a `stages.StagePlan`: its start token, blocks and block length):
    cut from the token cache's `stream` (`TokenBlocks`), or, when `stream` is None (--streaming), tokenised on the
    fly from the `DataSource` `source` with `tokenizer`, `batch_size` documents per call, the stream's positions
    kept in `index_file` (written when `write_index`: see `StreamingTokenBlocks`). Raises nothing itself: the data's
    errors come when the blocks are read."""
    if stream is None:
        return StreamingTokenBlocks(source, tokenizer, source.text_column, plan.start_token, plan.num_blocks,
                                    plan.block_len, batch_size=batch_size, index_file=index_file,
                                    write_index=write_index)
    return TokenBlocks(stream, plan.start_token, plan.num_blocks, plan.block_len)


def validation_blocks(stream: np.ndarray, block_size: int, patch_size: int, max_blocks: int | None = None):
    """(token-level blocks of T, patch-level blocks of K*T or None) of a validation token stream: at most
    `max_blocks` blocks of T from its start, and K times fewer blocks of K*T over the same tokens (None when
    the stream is shorter than one). UsageError when it holds less than one block of T."""
    num_blocks = len(stream) // block_size
    if num_blocks == 0:
        raise UsageError(f"--validation_file has {len(stream)} tokens, fewer than one block of {block_size}")
    if max_blocks:
        num_blocks = min(num_blocks, max_blocks)
    token_blocks = TokenBlocks(stream, 0, num_blocks, block_size)
    if len(stream) < patch_size * block_size:
        return token_blocks, None
    return token_blocks, TokenBlocks(stream, 0, max(1, num_blocks // patch_size), patch_size * block_size)
