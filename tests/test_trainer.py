"""`patch_training.trainer.PatchTrainer`: the gradient-accumulation divisor of the K-way loss."""

import torch
from conftest import tiny_llama_config

from patch_training.trainer import PatchTrainer
from patch_training.training_args import RunTrainingArguments


def test_trainer_counts_the_kway_targets(tmp_path):
    """The trainer's num_items_in_batch (the gradient-accumulation divisor) counts the labels after the first
    patch, as the K-way loss does, not transformers' labels[..., 1:] (naive count as the reference)."""
    from modeling_llama_patch import PatchLlamaForCausalLM

    config = tiny_llama_config()
    config.patch_size = 4
    trainer = PatchTrainer(
        model=PatchLlamaForCausalLM(config),
        args=RunTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True),
    )
    labels = torch.randint(0, 100, (2, 16))
    labels[0, 2] = labels[1, 9] = labels[1, 15] = -100
    batches = [{"input_ids": labels, "labels": labels}, {"input_ids": labels[:1], "labels": labels[:1]}]
    naive = sum(1 for b in batches for row in b["labels"] for j, v in enumerate(row.tolist()) if j >= 4 and v != -100)
    assert int(trainer._get_num_items_in_batch(batches, torch.device("cpu"))) == naive == 12 + 10 + 12


def test_ignored_padding_holds_each_block_once_then_ignored_copies():
    """`IgnoredPadding`: the real blocks in order, then copies of block 0 whose labels are all -100, up to a
    multiple; none added where the length already is one."""
    from patch_training.blocks import IgnoredPadding, TokenBlocks
    import numpy as np

    blocks = TokenBlocks(np.arange(100, dtype=np.uint16), 0, 5, 8)
    for multiple, length in ((1, 5), (5, 5), (4, 8), (6, 6), (16, 16)):
        padded = IgnoredPadding(blocks, multiple)
        assert len(padded) == length and padded.num_real == 5
        for i in range(5):
            assert torch.equal(padded[i]["input_ids"], blocks[i]["input_ids"]) and torch.equal(padded[i]["labels"], blocks[i]["labels"])
        for i in range(5, length):
            assert torch.equal(padded[i]["input_ids"], blocks[0]["input_ids"]) and bool((padded[i]["labels"] == -100).all())
    try:
        IgnoredPadding(blocks, 4)[8]
        raise AssertionError("no IndexError past the end")
    except IndexError:
        pass


def test_evaluation_is_the_mean_over_every_target_whatever_the_batches(tmp_path):
    """eval_loss and eval_patch_loss equal a naive mean over every target of the validation blocks (stock Llama's
    per-token losses; a loop over patches and offsets), for eval batches that divide the blocks and that do not.
    Under several ranks transformers scored accelerate's repeated blocks (8,724.8 against the model's 8,804.1
    with 5 blocks on 2 ranks); the same padding and scaling run here on one, where a batch of only ignored blocks
    must add nothing (tested on 2 CPU processes in test_multiprocess.py)."""
    import numpy as np
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    from modeling_llama_patch import PatchLlamaForCausalLM
    from patch_training.blocks import TokenBlocks

    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=300)
    config.patch_size = 4
    model = PatchLlamaForCausalLM(config)
    stream = np.random.default_rng(0).integers(0, 300, 5 * 16).astype(np.uint16)
    token_blocks, patch_blocks = TokenBlocks(stream, 0, 5, 16), TokenBlocks(stream, 0, 1, 64)
    stock = LlamaForCausalLM(tiny_llama_config(vocab_size=300))
    stock.load_state_dict(model.state_dict())
    stock.eval()
    with torch.no_grad():
        ids = torch.stack([token_blocks[i]["input_ids"] for i in range(5)])
        logits = stock(ids).logits[:, :-1]
        naive_token = F.cross_entropy(logits.reshape(-1, 300), ids[:, 1:].reshape(-1)).item()
        patch_ids = patch_blocks[0]["input_ids"][None]  # (1, 64): 16 patches of 4
        embeds = model.get_input_embeddings()(patch_ids).view(1, 16, 4, -1).mean(2)
        patch_logits = stock(inputs_embeds=embeds).logits[0]  # (16, V)
        terms = [-F.log_softmax(patch_logits[n], -1)[patch_ids[0, 4 * (n + 1) + k]] for n in range(15) for k in range(4)]
        naive_patch = torch.stack(terms).mean().item()
    for batch in (1, 2, 3, 5, 8):
        args = RunTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                                    per_device_eval_batch_size=batch)
        trainer = PatchTrainer(model=model, args=args, eval_dataset=token_blocks, patch_eval_dataset=patch_blocks)
        metrics = trainer.evaluate()
        assert abs(metrics["eval_loss"] - naive_token) < 1e-5, (batch, metrics["eval_loss"], naive_token)
        assert abs(metrics["eval_patch_loss"] - naive_patch) < 1e-5, (batch, metrics["eval_patch_loss"], naive_patch)
