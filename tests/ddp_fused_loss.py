"""Run by tests/test_fused_loss.py under `torchrun --nproc_per_node 2` on CPU (gloo).

A tiny model (tied embedding, one mixing layer, the fused head + K-way loss) under DistributedDataParallel:
each rank takes half of the batch and divides by the whole batch's target count (num_items_in_batch), and
the loss is multiplied by the world size because DDP averages gradients over ranks (as transformers' Trainer
does with average_tokens_across_devices). After backward every rank's gradients must equal those of one process
on the whole batch.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from patch_training.cli import end_process_group
from patch_training.fused_loss import fused_kway_linear_cross_entropy

VOCAB, HIDDEN, K, IGNORE_INDEX = 64, 16, 4, -100


class TinyPatchModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.embedding = torch.nn.Parameter(torch.randn(VOCAB, HIDDEN, generator=generator) / 4)  # tied head
        self.mixer = torch.nn.Linear(HIDDEN, HIDDEN)
        self.head_bias = torch.nn.Parameter(torch.randn(VOCAB, generator=generator) / 4)

    def forward(self, input_ids, targets, num_items_in_batch):
        hidden = torch.tanh(self.mixer(F.embedding(input_ids, self.embedding)))  # (B, n, H)
        return fused_kway_linear_cross_entropy(hidden, self.embedding, targets, self.head_bias, softcap=5.0,
                                               num_items_in_batch=num_items_in_batch, chunk_rows=5)[0]


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (4, 6), generator=generator)
    targets = torch.randint(0, VOCAB, (4, 6, K), generator=generator)
    targets[torch.rand(targets.shape, generator=generator) < 0.3] = IGNORE_INDEX
    targets[:, -1] = IGNORE_INDEX
    items = targets.ne(IGNORE_INDEX).sum()

    torch.manual_seed(0)
    reference = TinyPatchModel()
    reference(input_ids, targets, items).backward()

    torch.manual_seed(0)
    model = DistributedDataParallel(TinyPatchModel())
    rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
    (world * model(input_ids[rows], targets[rows], items)).backward()

    for (name, param), ref in zip(model.module.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.grad, ref.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        assert param.grad.abs().max() > 0, name
    print(f"rank {rank}: ddp fused loss: gradients equal the full batch's", flush=True)


if __name__ == "__main__":
    main()
    # The project's teardown, after main's DDP module is freed: the ranks leave together, and no DDP reducer
    # outlives the process group (a rank whose peer had already torn gloo down hung in destroy_process_group, 1
    # run in 3 to 8; with the DDP module freed after destroy_process_group, 1 in 11, until torchrun's timeout).
    end_process_group()
