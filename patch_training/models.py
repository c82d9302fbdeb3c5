"""The model of a stage: its config and tokenizer (checked), the attention implementation, and the patch model
built from a config or from saved weights."""

from __future__ import annotations

import copy
import json
import os

import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from modeling_llama_patch import (
    FUSED_LOSS_ARCHITECTURES, AutoPatchModelForCausalLM, UnsupportedModelError, check_supported, fused_loss_arguments,
)

from .cli import UsageError, describe_change, first_line


def resolve_attn_implementation(requested: str, config=None) -> str:
    """The attention implementation of the model of `config` (None: a Llama): auto -> flash_attention_2 when
    flash_attn imports on a CUDA machine and the architecture supports it, else sdpa where it supports SDPA
    (Gemma-2's soft-capped attention does not), else eager. UsageError for an explicit request the
    architecture does not support."""
    stock_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)] if config is not None else None
    supports = {
        "flash_attention_2": stock_class is None or bool(getattr(stock_class, "_supports_flash_attn", False)),
        "sdpa": stock_class is None or bool(getattr(stock_class, "_supports_sdpa", False)),
        "eager": True,
    }
    if requested != "auto":
        if not supports[requested]:
            raise UsageError(f"--attn_implementation {requested}: {stock_class.__name__} does not support it (use eager or auto)")
        if requested == "flash_attention_2":  # else transformers raised an ImportError at the first model, after the claim
            if not torch.cuda.is_available():
                raise UsageError("--attn_implementation flash_attention_2 needs a CUDA GPU (use sdpa or auto)")
            try:
                import flash_attn  # noqa: F401
            except ImportError:
                raise UsageError("--attn_implementation flash_attention_2 needs the flash_attn package, which is not "
                                 "installed (use sdpa, or auto: it takes flash_attn where it imports)") from None
        return requested
    if torch.cuda.is_available() and supports["flash_attention_2"]:
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa" if supports["sdpa"] else "eager"


def load_model_config(source: str):
    """The config of --model_name_or_path or --config_name (a folder, a JSON file or a hub name) of a supported
    architecture (`modeling_llama_patch.SUPPORTED_ARCHITECTURES`, the list in patch_training/architectures.txt;
    docs/architectures.md). Refused in one line: a missing file or a folder without config.json; a JSON without a
    known model_type (a DeepSpeed config, say: LlamaConfig would have filled it with its 7B defaults); a model_type
    with no causal LM, one patch-level training cannot wrap (an encoder, an encoder-decoder), or one not in the
    supported list (`modeling_llama_patch.check_supported`'s UnsupportedModelError)."""
    if not os.path.exists(source) and os.path.sep in source:
        raise UsageError(f"model config {source} does not exist")
    try:
        values, _ = PretrainedConfig.get_config_dict(source)
    except (OSError, ValueError) as error:
        raise UsageError(f"model config {source}: {first_line(error)}") from None
    if not values:  # transformers returns {} for a folder without config.json
        raise UsageError(f"model config {source}: no config.json there")
    model_type = values.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise UsageError(
            f"model config {source} is not a model config: its model_type is {model_type!r}, which transformers "
            f"does not know (the configs in configs/model/ have one, e.g. \"model_type\": \"llama\")"
        )
    config = AutoConfig.from_pretrained(source)
    try:
        check_supported(config)
    except UnsupportedModelError as error:
        raise UsageError(f"model config {source}: {error}") from None
    return config


# Config entries a checkpoint's config.json differs in from the config it was trained from without being another
# model: what saving writes (architectures, dtype, versions), the special tokens recorded from the tokenizer
# (`record_special_tokens`), the patch size of the stage, the generation cache switch.
SAVED_CONFIG_KEYS = ("architectures", "dtype", "torch_dtype", "transformers_version", "use_cache", "patch_size",
                     "bos_token_id", "eos_token_id", "pad_token_id")


def check_one_model_config(config_name: str | None, model_name_or_path: str | None) -> None:
    """UsageError when --config_name and --model_name_or_path are both given and describe different models: the
    run starts from the checkpoint with the checkpoint's own config, so the other would be silently ignored (say
    tiny-patch.json's config_name beside a 370M checkpoint, or a config with another max_position_embeddings).
    Configs that differ only in what saving adds (SAVED_CONFIG_KEYS) are the same model."""
    if not (config_name and model_name_or_path):
        return
    given, checkpoint = (
        {k: v for k, v in load_model_config(source).to_dict().items() if not k.startswith("_") and k not in SAVED_CONFIG_KEYS}
        for source in (config_name, model_name_or_path)
    )
    if given != checkpoint:
        raise UsageError(
            f"--config_name {config_name} and --model_name_or_path {model_name_or_path} describe different models "
            f"({describe_change('checkpoint -> config', checkpoint, given).split(': ', 1)[1]}); the run would start "
            "from the checkpoint with its own config: drop --config_name (--config_name \"\" after a config file that "
            "sets it), or drop --model_name_or_path to train a new model from the config"
        )


# The files `from_pretrained` reads weights from (transformers 5: safetensors, or PyTorch's pickles), one model or shards.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def weight_files(folder: str) -> list[str]:
    """The files of a saved model in `folder` that `from_pretrained` reads its weights from, by name: the one
    safetensors (or PyTorch) file, or an index and the shards it names. [] where there are none."""
    for single, index in ((WEIGHT_FILES[0], WEIGHT_FILES[1]), (WEIGHT_FILES[2], WEIGHT_FILES[3])):
        if os.path.isfile(os.path.join(folder, single)):
            return [single]
        index_file = os.path.join(folder, index)
        if os.path.isfile(index_file):
            try:
                with open(index_file, encoding="utf-8") as handle:
                    shards = sorted(set(json.load(handle)["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError):
                shards = []
            return [index, *shards]
    return []


def check_model_settings(config, model_name_or_path: str | None, loss_implementation: str) -> None:
    """UsageError (one line) for what would otherwise fail only when the first stage builds its model, after the
    output folder is claimed: a local --model_name_or_path folder without weights (a config alone: that is
    --config_name), and --loss_implementation fused on an architecture it is not exact for."""
    if model_name_or_path and os.path.isdir(model_name_or_path):
        if not weight_files(model_name_or_path):
            raise UsageError(
                f"--model_name_or_path {model_name_or_path} holds no weights ({', '.join(WEIGHT_FILES[::2])}): to "
                "train a new model from its config, give it as --config_name"
            )
    if loss_implementation == "fused" and fused_loss_arguments(config) is None:
        raise UsageError(
            f"--loss_implementation fused is not exact for model_type {config.model_type!r} (it is for: "
            f"{', '.join(sorted(FUSED_LOSS_ARCHITECTURES))}): use auto (the stock head there) or unfused"
        )


# Files of which one is beside every tokenizer that save_pretrained writes (fast, sentencepiece or BPE).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def holds_tokenizer(folder: str) -> bool:
    """Whether the local folder `folder` holds a saved tokenizer (one of TOKENIZER_FILES)."""
    return any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES)


def load_tokenizer(name: str, flag: str = "--tokenizer_name"):
    """AutoTokenizer.from_pretrained(name), with a one-line UsageError naming `flag` where there is none to load:
    a path that does not exist, a local folder with none of TOKENIZER_FILES (transformers 5.24 made an empty
    tokenizer of one token from a model folder's config.json alone, and every document became one EOS), a
    tokenizer that does not load, or one with no tokens beyond its special ones."""
    if not os.path.exists(name) and os.path.sep in name:
        raise UsageError(f"{flag} {name} does not exist")
    if os.path.isdir(name) and not holds_tokenizer(name):
        raise UsageError(f"{flag} {name}: no tokenizer to load (the folder holds none of {', '.join(TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise UsageError(f"{flag} {name}: no tokenizer to load ({first_line(error)})") from None
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise UsageError(f"{flag} {name}: the tokenizer has no vocabulary, only {len(tokenizer)} special token(s)")
    return tokenizer


def vocabulary_conflicts(given: dict[str, int], own: dict[str, int]) -> list[tuple[int, str | None, str | None]]:
    """The ids that two vocabularies (token -> id, as `get_vocab()`) give to different tokens, as
    (id, token in `given`, token in `own`), sorted by id; a token's two ids both appear. Empty when one extends
    the other (added tokens past the end, a smaller vocabulary that is a prefix): the same id is the same token."""
    given_by_id = {i: t for t, i in given.items()}
    own_by_id = {i: t for t, i in own.items()}
    ids = {i for i in given_by_id.keys() & own_by_id.keys() if given_by_id[i] != own_by_id[i]}
    ids |= {i for t in given.keys() & own.keys() if given[t] != own[t] for i in (given[t], own[t])}
    return [(i, given_by_id.get(i), own_by_id.get(i)) for i in sorted(ids)]


def check_tokenizer_fits_model(tokenizer, tokenizer_flag: str, config, model_path: str | None = None,
                               model_flag: str = "--model_name_or_path") -> None:
    """UsageError (one line) when `tokenizer` (named `tokenizer_flag` in the message, e.g. "--tokenizer_name X")
    cannot be the model's: it has more tokens than the model's vocab_size (the embedding has no row for some ids),
    or the model's folder `model_path` (given as `model_flag`: a local checkpoint or saved model; None for a model
    made from a config, and a hub name is not looked at) holds a tokenizer of its own that gives
    some id another token (`vocabulary_conflicts`: the LLaMA-2 tokenizer beside a Qwen checkpoint, whose
    151,936-row embedding took the 32,000 ids without complaint and then trained, or was evaluated, on the wrong
    text). A tokenizer that extends the model's own, or has fewer tokens with the same ids, fits."""
    if len(tokenizer) > config.vocab_size:
        raise UsageError(
            f"{tokenizer_flag} has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}"
        )
    if model_path is None:
        return
    if not os.path.isdir(model_path) or not holds_tokenizer(model_path):
        return
    if os.path.realpath(model_path) == os.path.realpath(getattr(tokenizer, "name_or_path", "") or ""):
        return
    try:
        own = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError, TypeError):  # tokenizer files that do not load: nothing to compare with
        return
    conflicts = vocabulary_conflicts(tokenizer.get_vocab(), own.get_vocab())
    if conflicts:
        token_id, given, theirs = conflicts[0]
        raise UsageError(
            f"{tokenizer_flag} is not the tokenizer of {model_flag} {model_path}: {len(conflicts)} token ids differ (id "
            f"{token_id} is {given!r} in the one given, {theirs!r} in the model's; {len(tokenizer)} and {len(own)} "
            f"tokens); use the model's own tokenizer ({model_path})"
        )


def record_special_tokens(model, tokenizer) -> None:
    """Record the tokenizer's BOS, EOS and PAD ids in the model's config and generation config, so that the
    saved checkpoint agrees with the tokenizer saved beside it.

    Pre-training never pads (every block is full), but a checkpoint is later used with padding (batched
    generation, evaluation harnesses), and transformers' Trainer aligns these ids itself, with a warning, when
    they differ (`transformers.trainer_utils.align_special_tokens`). Done here on purpose and silently, with
    transformers 5.24's rule, whatever the installed version: only ids that the tokenizer defines are written
    (the bundled LLaMA-2 tokenizer pads with <unk>, id 0; one without a pad token leaves pad_token_id as the
    config has it), and an EOS only ever joins the ids a list holds (`aligned_token_ids`): Llama-3's or Qwen3's
    several stop tokens are kept."""
    config = model.config.get_text_config()
    generation_config = getattr(model, "generation_config", None)
    for name, several in (("eos_token_id", True), ("bos_token_id", False), ("pad_token_id", False)):
        token_id = getattr(tokenizer, name, None)
        if token_id is None:
            continue
        in_config = getattr(config, name, None)
        in_generation = getattr(generation_config, name, None) if generation_config is not None else None
        new_config, new_generation = aligned_token_ids(token_id, in_config, in_generation, several,
                                                       has_generation_config=generation_config is not None)
        setattr(config, name, new_config)
        if generation_config is not None:
            setattr(generation_config, name, new_generation)


def aligned_token_ids(token_id: int, in_config, in_generation, several: bool, has_generation_config: bool = True):
    """(config value, generation config value) of one special token after aligning them with the tokenizer's
    `token_id` (transformers 5.24's `_align_special_token`): unchanged where both already hold it; else the
    tokenizer's id, put first in a config's list (`several`: the EOS) and in the generation config's ids, the
    others kept: a list of stop tokens is never collapsed to one."""
    config_ids = in_config if isinstance(in_config, list) else [in_config]
    generation_ids = in_generation if isinstance(in_generation, list) else [in_generation]
    if token_id in config_ids and (not has_generation_config or token_id in generation_ids):
        return in_config, in_generation
    if several and isinstance(in_config, list):
        in_config = [token_id, *(t for t in config_ids if t != token_id)]
    else:
        in_config = token_id
    if several:
        in_generation = [token_id, *(t for t in generation_ids if t is not None and t != token_id)]
    else:
        in_generation = token_id
    return in_config, in_generation


def build_model(
    config, init_from: str | None, patch_size: int, attn_implementation: str,
    loss_implementation: str = "auto", offset_weights: tuple[float, ...] | None = None, tokenizer=None,
):
    """The patch model of a stage (`AutoPatchModelForCausalLM`: a subclass of the stock class of the config's
    model_type) at `patch_size`: from the weights in `init_from` (loaded in float32: mixed precision comes from
    the launch, and the optimizer steps float32 weights; with `config`, the checkpoint's config already loaded),
    or, with `init_from` None, from `config` (a loaded PretrainedConfig, left unchanged; random weights from the
    current seed). `loss_implementation`: auto, fused or unfused (`PatchModelMixin.loss_implementation`);
    `offset_weights`: the K-way loss's per-offset weights (`PatchModelMixin.offset_weights`, None: the mean).
    With a `tokenizer`, its special token ids are recorded in the config (`record_special_tokens`)."""
    config = copy.deepcopy(config)  # the stage sets patch_size, use_cache and the special tokens on its own copy
    if init_from is not None:
        loaded = {"config": config} if config is not None else {}
        model = AutoPatchModelForCausalLM.from_pretrained(init_from, attn_implementation=attn_implementation,
                                                          dtype=torch.float32, **loaded)
    else:
        model = AutoPatchModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    model.config.patch_size = patch_size
    model.saved_use_cache = getattr(model.config, "use_cache", None)  # what checkpoints say (see PatchModelMixin)
    model.config.use_cache = False
    model.loss_implementation = loss_implementation
    model.offset_weights = offset_weights
    if tokenizer is not None:
        record_special_tokens(model, tokenizer)
    return model
