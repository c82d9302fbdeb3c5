"""Token stream -> training blocks: fixed-length sequences of T (token stage) or K*T (patch stage) tokens, from
the token cache or from documents tokenised on the fly (`--streaming`)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .cli import UsageError
from .token_cache import iter_document_tokens


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


class StreamingTokenBlocks(torch.utils.data.IterableDataset):
    """Blocks of `block_len` tokens from documents tokenised on the fly: `make_documents()` gives an iterable of
    documents (dicts holding `text_column`; e.g. `DataSource.documents`), tokenised `batch_size` per call. Skips the first `skip_tokens` of
    the stream, then yields `num_blocks` blocks, re-reading the data if it runs out (next epoch).

    One stream: read by at most one data-loader worker (several would each yield every block; `main`
    refuses that, and `__iter__` raises if it happens anyway)."""

    def __init__(
        self, make_documents, tokenizer, text_column: str, skip_tokens: int, num_blocks: int, block_len: int,
        batch_size: int = 1000,
    ):
        self.make_documents, self.tokenizer, self.text_column = make_documents, tokenizer, text_column
        self.batch_size = batch_size
        self.skip_tokens, self.num_blocks, self.block_len = skip_tokens, num_blocks, block_len

    def __len__(self) -> int:
        return self.num_blocks

    def _stream(self) -> Iterator[int]:
        while True:
            produced = False
            for ids in iter_document_tokens(self.make_documents(), self.tokenizer, self.text_column, self.batch_size):
                produced = True
                yield from ids
            if not produced:
                raise UsageError("the streamed training data holds no text")

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = torch.utils.data.get_worker_info()
        if worker is not None and worker.num_workers > 1:
            raise UsageError(f"streamed blocks read by {worker.num_workers} data-loader workers would repeat: use at most 1")
        stream = self._stream()
        for _ in range(self.skip_tokens):
            next(stream)
        for _ in range(self.num_blocks):
            ids = torch.tensor([next(stream) for _ in range(self.block_len)], dtype=torch.long)
            yield {"input_ids": ids, "labels": ids.clone()}


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
