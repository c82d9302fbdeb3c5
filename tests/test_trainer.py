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
