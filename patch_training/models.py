"""The model of a stage: its config and tokenizer (checked), the attention implementation, and the patch model
built from a config or from saved weights."""

from __future__ import annotations

import os

import torch
from transformers import AutoTokenizer, LlamaConfig

from modeling_llama_patch import PatchLlamaForCausalLM

from .cli import UsageError, first_line


def resolve_attn_implementation(requested: str) -> str:
    """auto -> flash_attention_2 when flash_attn imports on a CUDA machine, else sdpa."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_model_config(source: str) -> LlamaConfig:
    """The LlamaConfig of --model_name_or_path or --config_name (a folder, a JSON file or a hub name). A
    missing file, or a JSON that is not a Llama config, is refused: LlamaConfig would fill every missing key
    with its defaults, a 7B model, from any JSON (a DeepSpeed config, say)."""
    if not os.path.exists(source) and os.path.sep in source:
        raise UsageError(f"model config {source} does not exist")
    try:
        values, _ = LlamaConfig.get_config_dict(source)
    except (OSError, ValueError) as error:
        raise UsageError(f"model config {source}: {first_line(error)}") from None
    if not values:  # transformers returns {} for a folder without config.json
        raise UsageError(f"model config {source}: no config.json there")
    if values.get("model_type") != LlamaConfig.model_type:
        raise UsageError(
            f"model config {source} is not a Llama config: its model_type is {values.get('model_type')!r}, not "
            f"'llama' (the configs in configs/model/ are; a hand-written one needs \"model_type\": \"llama\")"
        )
    return LlamaConfig.from_pretrained(source)


def load_tokenizer(name: str):
    """AutoTokenizer.from_pretrained(name), with a one-line UsageError where there is none to load."""
    if not os.path.exists(name) and os.path.sep in name:
        raise UsageError(f"--tokenizer_name {name} does not exist")
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise UsageError(f"--tokenizer_name {name}: no tokenizer to load ({first_line(error)})") from None


def record_special_tokens(model, tokenizer) -> None:
    """Record the tokenizer's BOS, EOS and PAD ids in the model's config and generation config, so that the
    saved checkpoint agrees with the tokenizer saved beside it.

    Pre-training never pads (every block is full), but a checkpoint is later used with padding (batched
    generation, evaluation harnesses), and transformers' Trainer aligns these ids itself, with a warning, when
    they differ (`transformers.trainer_utils.align_special_tokens`). Done here on purpose and silently, with the
    same rule: only ids that the tokenizer defines are written (the bundled LLaMA-2 tokenizer pads with <unk>,
    id 0; one without a pad token leaves pad_token_id as the config has it)."""
    generation_config = getattr(model, "generation_config", None)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is None:
            continue
        setattr(model.config, name, token_id)
        if generation_config is not None:
            setattr(generation_config, name, token_id)


def build_model(config_name: str | None, init_from: str | None, patch_size: int, attn_implementation: str, tokenizer=None):
    """A PatchLlamaForCausalLM at `patch_size`: from weights (`init_from`) or from the config `config_name`
    (random weights from the current seed). With a `tokenizer`, its special token ids are recorded in the
    config (`record_special_tokens`)."""
    if init_from is not None:
        model = PatchLlamaForCausalLM.from_pretrained(init_from, attn_implementation=attn_implementation)
    else:
        config = LlamaConfig.from_pretrained(config_name)
        config._attn_implementation = attn_implementation
        model = PatchLlamaForCausalLM(config)
    model.config.patch_size = patch_size
    model.config.use_cache = False
    if tokenizer is not None:
        record_special_tokens(model, tokenizer)
    return model
