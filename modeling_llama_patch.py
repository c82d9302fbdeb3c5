"""Patch-level training for Llama (Shao, Meng, Zhou, "Beyond Next Token Prediction: Patch-Level Training
for LLMs", ICLR 2025, arXiv:2407.12665).

A *patch* is K consecutive tokens; its embedding is the mean of the K token embeddings, so no parameter is
added. With K > 1 the decoder reads an input of L = n*K tokens as n patches at positions 0..n-1 and, from
patch i, predicts every one of the K tokens of patch i+1 with the one LM head (the paper's Eq. 3):

    loss = mean over (i, k) of  -log p(x_{(i+1)K+k} | patches 0..i),   i < n-1, k = 0..K-1

Since all K targets share one distribution, the loss of patch i is  K_i*logsumexp(z_i) - sum_k z_i[t_ik]
(K_i = its targets that count). `kway_cross_entropy` computes that in row chunks, in float32, and keeps
only the gradient of the logits (in the logits' dtype) for the backward pass: never the float32 copy plus
float32 log-softmax that the reference code and stock transformers hold.

`PatchLlamaForCausalLM` subclasses `transformers.LlamaForCausalLM`: it overrides `forward` (and guards
`generate` and `save_pretrained`) and adds no parameter, so its checkpoints are stock Llama checkpoints.
K is read from `config.patch_size` (absent means 1). With K = 1 it is the stock model: inference and
generation run the stock forward; training (labels given) runs the stock decoder with the same lean loss at
K = 1, which equals transformers' causal-LM loss and gradients to float rounding while holding 3x less
loss memory (measured in benchmarks/throughput.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

IGNORE_INDEX = -100
# Float32 elements of one loss chunk (64 MiB): bounds the temporaries of the K-way loss whatever
# the number of positions. 16M / 32000 (LLaMA-2 vocabulary) = 524 positions per chunk.
LOSS_CHUNK_ELEMENTS = 16 * 1024 * 1024

__all__ = [
    "PatchLlamaForCausalLM",
    "PatchCausalLMOutputWithPast",
    "get_patch_size",
    "patchify_embeddings",
    "patchify_attention_mask",
    "next_patch_targets",
    "count_loss_targets",
    "loss_target_labels",
    "kway_cross_entropy",
]


# ---------------------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------------------


def validate_patch_size(patch_size) -> int:
    """Return `patch_size` as an int >= 1, or raise a ValueError that names it."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, int):
        if isinstance(patch_size, float) and patch_size.is_integer():
            patch_size = int(patch_size)
        else:
            raise ValueError(f"patch_size K must be an integer >= 1, got K={patch_size!r}")
    if patch_size < 1:
        raise ValueError(f"patch_size K must be an integer >= 1, got K={patch_size}")
    return patch_size


def get_patch_size(config) -> int:
    """K from `config.patch_size`; a config without it (a stock Llama config) or with None means K = 1."""
    patch_size = getattr(config, "patch_size", None)
    return 1 if patch_size is None else validate_patch_size(patch_size)  # 0 is an error, not "absent"


def check_length(length: int, patch_size: int) -> int:
    """Number of patches n = L / K; raise if L is not a multiple of K (never truncate silently)."""
    if length % patch_size != 0:
        raise ValueError(
            f"sequence length L={length} is not a multiple of the patch size K={patch_size}: "
            f"make the block size a multiple of K (e.g. L={length - length % patch_size} or "
            f"L={length + patch_size - length % patch_size}); nothing is truncated silently"
        )
    return length // patch_size


def patchify_attention_mask(attention_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, L) token mask -> (B, n) patch mask: a patch is visible if any of its K tokens is."""
    batch, length = attention_mask.shape
    n = check_length(length, patch_size)
    return attention_mask.view(batch, n, patch_size).amax(dim=-1)


def patchify_embeddings(
    embeds: torch.Tensor, patch_size: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, L, H) token embeddings -> (B, n, H) patch embeddings, n = L / K.

    Without a mask, a patch embedding is the mean of its K token embeddings (the paper). With a (B, L)
    attention mask, it is the mean over the patch's visible tokens only, so padding never leaks into a
    real patch; a patch with no visible token gets zeros (it is masked out anyway).
    """
    batch, length, hidden = embeds.shape
    n = check_length(length, patch_size)
    patches = embeds.view(batch, n, patch_size, hidden)  # (B, n, K, H)
    if attention_mask is None:
        return patches.mean(dim=2)
    weights = attention_mask.view(batch, n, patch_size, 1).to(embeds.dtype)  # (B, n, K, 1)
    counts = weights.sum(dim=2).clamp(min=1)  # (B, n, 1)
    return (patches * weights).sum(dim=2) / counts


def next_patch_targets(labels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, L) labels -> (B, n, K) targets: row i holds the K labels of patch i+1; the last row is ignored."""
    batch, length = labels.shape
    n = check_length(length, patch_size)
    patches = labels.view(batch, n, patch_size)  # (B, n, K)
    return F.pad(patches[:, 1:], (0, 0, 0, 1), value=IGNORE_INDEX)  # (B, n, K)


def loss_target_labels(labels: torch.Tensor, patch_size: int = 1) -> torch.Tensor:
    """The labels that are loss targets: all but the first patch's (B, L - K), -100 still to be ignored."""
    return labels[..., patch_size:]


def count_loss_targets(labels: torch.Tensor, patch_size: int = 1) -> torch.Tensor:
    """Number of (position, target) pairs the loss averages over: labels after the first patch != -100.

    This is the `num_items_in_batch` of one micro-batch; for K = 1 it is transformers' own count
    (`labels[..., 1:] != -100`), for K > 1 the first patch is never a target.
    """
    return loss_target_labels(labels, patch_size).ne(IGNORE_INDEX).sum()


class _KWayCrossEntropy(torch.autograd.Function):
    """Sum over rows r and offsets k of  -log softmax(z_r)[t_rk]  (t_rk = -100 ignored), chunked over rows.

    forward returns (total, per_offset): total is the differentiable sum; per_offset (K,) its split over
    the offsets, for logging. The gradient  d total / d z_r = K_r*softmax(z_r) - sum_k onehot(t_rk)  is
    computed chunk by chunk during forward (float32) and stored in the logits' dtype: the only
    (rows x vocab) tensor kept for backward.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int):
        # logits: (N, V) any float dtype; targets: (N, K) int64
        rows = logits.shape[0]
        valid = targets.ne(IGNORE_INDEX)  # (N, K)
        safe_targets = targets.clamp(min=0)  # (N, K)
        per_offset = torch.zeros(targets.shape[1], dtype=torch.float32, device=logits.device)  # (K,)
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        for start in range(0, rows, chunk_rows):
            chunk = slice(start, start + chunk_rows)
            z = logits[chunk].to(torch.float32, copy=True)  # (c, V)
            lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (c, 1)
            chunk_valid = valid[chunk]  # (c, K)
            picked = z.gather(1, safe_targets[chunk])  # (c, K)
            per_offset += ((lse - picked) * chunk_valid).sum(dim=0)
            if grad is not None:
                probs = z.sub_(lse).exp_()  # (c, V), in place: softmax
                probs.mul_(chunk_valid.sum(dim=1, keepdim=True))  # K_r * softmax
                probs.scatter_add_(1, safe_targets[chunk], -chunk_valid.to(torch.float32))
                grad[chunk] = probs
        # With no target that counts, the loss is 0/0 = nan (like stock) and grad_total is inf: the
        # gradient must stay zero (as stock's), not 0 * inf = nan, which would poison the optimizer.
        ctx.save_for_backward(grad, valid.any())
        ctx.mark_non_differentiable(per_offset)
        return per_offset.sum(), per_offset

    @staticmethod
    def backward(ctx, grad_total, grad_per_offset):
        grad, any_valid = ctx.saved_tensors
        scale = torch.where(any_valid, grad_total, torch.zeros_like(grad_total))
        return grad * scale.to(grad.dtype), None, None


def kway_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_elements: int = LOSS_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's Eq. 3 for logits (..., V) and targets (..., K) of -100-masked token ids.

    Returns (loss, per_offset_loss):
      loss: scalar float32, the sum of -log p over the targets that count divided by `num_items_in_batch`
        when given (exact gradient accumulation, like transformers' causal-LM loss), else by their number.
      per_offset_loss: (K,) float32, detached: the mean loss of each offset k = 1..K (nan if none counts).
    """
    vocab, num_offsets = logits.shape[-1], targets.shape[-1]
    logits_2d = logits.reshape(-1, vocab)  # (N, V): a view for the contiguous logits of the LM head
    targets_2d = targets.reshape(-1, num_offsets).to(logits.device)  # (N, K)
    chunk_rows = max(1, chunk_elements // vocab)
    total, per_offset_sum = _KWayCrossEntropy.apply(logits_2d, targets_2d, chunk_rows)
    per_offset_count = targets_2d.ne(IGNORE_INDEX).sum(dim=0)  # (K,)
    if num_items_in_batch is None:
        denominator = per_offset_count.sum()
    elif torch.is_tensor(num_items_in_batch):
        denominator = num_items_in_batch.to(total.device)
    else:
        denominator = num_items_in_batch
    per_offset_loss = per_offset_sum / per_offset_count
    return total / denominator, per_offset_loss


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------


@dataclass
class PatchCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus `offset_losses` (K,): the mean loss of each offset k = 1..K of the
    next patch (detached, for logging; None without labels). `logits` is (B, n, V) with n = L / K."""

    offset_losses: torch.FloatTensor | None = None


class PatchLlamaForCausalLM(LlamaForCausalLM):
    """`LlamaForCausalLM` that trains on patches of K = `config.patch_size` tokens (see the module docstring).

    Attention masks: a patch is visible if any of its tokens is, and its embedding is the mean of its
    visible tokens (`patchify_embeddings`). Labels are independent of the mask, as in transformers: set
    padded labels to -100. Position ids, if given, are patch positions of shape (B, n).
    """

    @property
    def patch_size(self) -> int:
        return get_patch_size(self.config)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> PatchCausalLMOutputWithPast | CausalLMOutputWithPast:
        patch_size = self.patch_size
        stock_path = labels is None or past_key_values is not None or use_cache or (
            not isinstance(logits_to_keep, int) or logits_to_keep != 0
        )
        if patch_size == 1 and stock_path:  # token-level inference and generation: the stock forward
            return super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
        if past_key_values is not None or use_cache:
            raise ValueError(
                f"a patch-level model (K={patch_size}) has no key-value cache: it reads whole sequences "
                "of patches. Use K = 1 (config.patch_size = 1) for incremental decoding."
            )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        # transformers' Trainer asks for no logits when evaluating with --use_liger_kernel (Liger's forward
        # then never computes them); ours needs them for the loss, but need not return them.
        skip_logits = bool(kwargs.pop("skip_logits", False)) and labels is not None

        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)  # (B, L, H)
        batch, length, _ = inputs_embeds.shape
        num_patches = check_length(length, patch_size)
        if patch_size == 1:  # token-level training: the stock decoder, our lean loss (the same Eq. 3 at K = 1)
            patch_embeds, patch_mask = inputs_embeds, attention_mask
        else:
            patch_embeds = patchify_embeddings(inputs_embeds, patch_size, attention_mask)  # (B, n, H)
            patch_mask = None if attention_mask is None else patchify_attention_mask(attention_mask, patch_size)
        if position_ids is not None and position_ids.shape[-1] != num_patches:
            raise ValueError(
                f"position_ids must be patch positions of length n=L/K={num_patches} (L={length}, "
                f"K={patch_size}), got shape {tuple(position_ids.shape)}"
            )
        outputs = self.model(
            inputs_embeds=patch_embeds,
            attention_mask=patch_mask,
            position_ids=position_ids,
            use_cache=False,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (B, n, H)
        logits = self.lm_head(hidden_states)  # (B, n, V)

        loss = offset_losses = None
        if labels is not None:
            if labels.shape != (batch, length):
                raise ValueError(f"labels must have shape (B, L)=({batch}, {length}), got {tuple(labels.shape)}")
            targets = next_patch_targets(labels, patch_size)  # (B, n, K)
            loss, offset_losses = kway_cross_entropy(logits, targets, num_items_in_batch)
        elif not isinstance(logits_to_keep, int) or logits_to_keep:
            logits = logits[:, -logits_to_keep:] if isinstance(logits_to_keep, int) else logits[:, logits_to_keep]

        return PatchCausalLMOutputWithPast(
            loss=loss,
            logits=None if skip_logits else logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            offset_losses=offset_losses,
        )

    def generate(self, *args, **kwargs):
        """Token-level generation; refused for K > 1, where the model predicts bags of K tokens."""
        if self.patch_size > 1:
            raise ValueError(
                f"generate() needs a token-level model, but this one has patch_size K={self.patch_size}: "
                "a patch model predicts an unordered bag of the next K tokens. Set model.config.patch_size = 1 "
                "(same weights) or load the checkpoint with AutoModelForCausalLM."
            )
        return super().generate(*args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save a stock Llama checkpoint: `architectures` is ["LlamaForCausalLM"], so that
        `AutoModelForCausalLM` and `pipeline` load it without this file. `patch_size` stays in the config
        as a record of how the weights were trained (stock Llama ignores it)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        self.config.architectures = [LlamaForCausalLM.__name__]
        config_file = os.path.join(save_directory, "config.json")
        if kwargs.get("is_main_process", True) and os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as handle:
                saved = json.load(handle)
            saved["architectures"] = [LlamaForCausalLM.__name__]
            with open(config_file, "w", encoding="utf-8") as handle:
                json.dump(saved, handle, indent=2, sort_keys=True)
                handle.write("\n")
