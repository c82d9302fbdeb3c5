"""The λ split (`patch_training.stages.plan_stages`) over the token stream read as repeating: the stages'
blocks are contiguous, do not overlap, and follow the paper's epoch schedule."""

import json

import numpy as np
import torch
from conftest import DATA_DIR, TOKENIZER_DIR

from patch_training.blocks import TokenBlocks
from patch_training.stages import plan_stages

TRAIN_FILE = str(DATA_DIR / "sample_train.jsonl")


def test_stage_blocks_cover_the_stream_without_overlap(workdir):
    """The token stage's first block starts right after the patch stage's tokens; blocks are contiguous
    slices of the cached token stream (checked against the tokenizer run by hand)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    with open(TRAIN_FILE, encoding="utf-8") as handle:
        first_docs = [json.loads(line)["text"] for line, _ in zip(handle, range(3))]
    expected = []
    for text in first_docs:
        expected += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    plans = plan_stages(total_tokens=1000, patch_fraction=0.5, patch_size=4, block_size=32)
    stream = np.asarray(expected[:1000])
    patch_blocks = TokenBlocks(stream, plans[0].start_token, plans[0].num_blocks, plans[0].block_len)
    token_blocks = TokenBlocks(stream, plans[1].start_token, plans[1].num_blocks, plans[1].block_len)
    patch_tokens = torch.cat([patch_blocks[i]["input_ids"] for i in range(len(patch_blocks))])
    token_tokens = torch.cat([token_blocks[i]["input_ids"] for i in range(len(token_blocks))])
    assert len(patch_blocks) == 500 // 128 and len(token_blocks) == 500 // 32
    assert patch_tokens.tolist() == expected[: len(patch_blocks) * 128]
    assert token_tokens.tolist() == expected[500 : 500 + len(token_blocks) * 32]


def test_multi_epoch_patch_stage_covers_first_lambda_epochs(workdir, tmp_path):
    """num_train_epochs=3 with λ=1/3: the patch stage reads exactly the first epoch, the token stage the
    other two (the stream is read as repeating)."""
    tokens = np.arange(1000) % 97
    plans = plan_stages(total_tokens=3 * 1000, patch_fraction=1 / 3, patch_size=4, block_size=10)
    assert plans[0].budget_tokens == 1000 and plans[1].start_token == 1000
    second = TokenBlocks(tokens, plans[1].start_token, plans[1].num_blocks, plans[1].block_len)
    assert second[0]["input_ids"].tolist() == tokens[:10].tolist()  # the second epoch starts over
    wrap = TokenBlocks(tokens, 995, 1, 10)[0]["input_ids"].tolist()
    assert wrap == tokens[995:].tolist() + tokens[:5].tolist()


def test_skip_data_fraction_takes_the_tail():
    """The ablation run (token level on the last 1/3 only) reads exactly the token stage's data of a λ=2/3 run."""
    patch_run = plan_stages(3000, 2 / 3, 4, 10)
    tail_run = plan_stages(3000, 0.0, 4, 10, skip_fraction=2 / 3)
    assert len(tail_run) == 1 and tail_run[0].name == "token"
    assert (tail_run[0].start_token, tail_run[0].num_blocks) == (patch_run[1].start_token, patch_run[1].num_blocks)
