"""Patch-level training for transformers causal LMs (Shao, Meng, Zhou, "Beyond Next Token Prediction: Patch-Level Training
for LLMs", ICLR 2025, arXiv:2407.12665).

A *patch* is K consecutive tokens; its embedding is the mean of the K token embeddings, so no parameter is
added. With K > 1 the decoder reads an input of L = n*K tokens as n patches at positions 0..n-1 and, from
patch i, predicts every one of the K tokens of patch i+1 with the one LM head (the paper's Eq. 3):

    loss = mean over (i, k) of  -log p(x_{(i+1)K+k} | patches 0..i),   i < n-1, k = 0..K-1

The loss math (next-patch targets, the chunked K-way cross-entropy `kway_cross_entropy`, per-offset weights)
is `patch_training/loss.py`, and the fused LM-head + K-way loss `patch_training/fused_loss.py`; both lie below
this file and are re-exported here. Optionally the K offsets are weighted (`offset_weights`, mean 1: Token
Superposition Training's unequal weighting; equal weights are Eq. 3 exactly).

`PatchModelMixin` adds this to any decoder-only transformers causal LM: `patch_model_class(Qwen2ForCausalLM)`
is `PatchQwen2ForCausalLM(PatchModelMixin, Qwen2ForCausalLM)`, `AutoPatchModelForCausalLM` picks the class from
a config or checkpoint like `AutoModelForCausalLM`, and `PatchLlamaForCausalLM` is the Llama member. It
overrides `forward` (and guards `generate` and `save_pretrained`) and adds no parameter, so checkpoints are
stock checkpoints. K is read from `config.patch_size` (absent means 1). With K = 1 it is the stock model:
inference and generation run the stock forward; training (labels given) runs the stock forward with the same
lean loss at K = 1, which equals transformers' causal-LM loss and gradients to float rounding while holding 3x
less loss memory (measured in benchmarks/throughput.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import os
from dataclasses import dataclass

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from patch_training.fused_loss import fused_kway_linear_cross_entropy
from patch_training.loss import (  # noqa: F401  (the loss math, re-exported: part of this module's API)
    IGNORE_INDEX,
    LOSS_CHUNK_ELEMENTS,
    check_length,
    check_offset_weights,
    count_loss_targets,
    kway_cross_entropy,
    loss_denominator,
    loss_target_labels,
    next_patch_targets,
    normalise_offset_weights,
)

__all__ = [
    "AutoPatchModelForCausalLM",
    "PatchModelMixin",
    "PatchLlamaForCausalLM",
    "PatchCausalLMOutputWithPast",
    "UnsupportedModelError",
    "patch_model_class",
    "check_supported",
    "get_patch_size",
    "patchify_embeddings",
    "patchify_attention_mask",
    "next_patch_targets",
    "count_loss_targets",
    "loss_target_labels",
    "kway_cross_entropy",
    "normalise_offset_weights",
    "fused_loss_arguments",
    "FUSED_LOSS_ARCHITECTURES",
    "SUPPORTED_ARCHITECTURES",
    "SupportedArchitecture",
    "is_encoder_family",
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


# ---------------------------------------------------------------------------------------------------------
# The model: one mixin over any decoder-only transformers causal LM
# ---------------------------------------------------------------------------------------------------------

# The forward's key-value cache argument: transformers 5.2x renamed `past_key_values` to `cache` (the old name
# warns, and goes in 5.40). Each stock class's own signature says which one it takes; a K > 1 model refuses both.
CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")


class UnsupportedModelError(ValueError):
    """A model patch-level training cannot wrap: not a decoder-only causal LM, or no `inputs_embeds` input."""


@dataclass
class PatchCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus `offset_losses` (K,): the mean loss of each offset k = 1..K of the
    next patch (detached, for logging; None without labels). `logits` is (B, n, V) with n = L / K."""

    offset_losses: torch.FloatTensor | None = None


_OUTPUT_CLASSES: dict[type, type] = {CausalLMOutputWithPast: PatchCausalLMOutputWithPast}


def patch_output_class(output_class: type) -> type:
    """The stock output dataclass (e.g. `MoeCausalLMOutputWithPast`, which adds `aux_loss` and `router_logits`)
    plus an `offset_losses` field; built once per class, named `Patch<Name>`, a module attribute (pickles)."""
    if output_class not in _OUTPUT_CLASSES:
        name = f"Patch{output_class.__name__}"
        patch_output = dataclasses.make_dataclass(
            name, [("offset_losses", torch.FloatTensor | None, dataclasses.field(default=None))], bases=(output_class,)
        )
        patch_output.__module__, patch_output.__qualname__ = __name__, name
        patch_output.__doc__ = f"`{output_class.__name__}` plus `offset_losses` (K,), as in `PatchCausalLMOutputWithPast`."
        globals()[name] = _OUTPUT_CLASSES[output_class] = patch_output
    return _OUTPUT_CLASSES[output_class]


def _stock_class_of(patch_class: type) -> type:
    """The transformers class a patch class wraps: the first base after the mixin that is not itself a patch class."""
    return next(
        base for base in patch_class.__mro__[1:]
        if issubclass(base, PreTrainedModel) and not issubclass(base, PatchModelMixin)
    )


def _check_stock_class(stock_class: type) -> inspect.Signature:
    """The stock forward's signature; raise UnsupportedModelError if it cannot take patch embeddings and labels."""
    if not (isinstance(stock_class, type) and issubclass(stock_class, PreTrainedModel)):
        raise UnsupportedModelError(f"{stock_class!r} is not a transformers PreTrainedModel class")
    signature = inspect.signature(stock_class.forward)
    for needed in ("inputs_embeds", "labels"):
        if needed not in signature.parameters:
            raise UnsupportedModelError(
                f"{stock_class.__name__}.forward takes no `{needed}`: patch-level training feeds the decoder the "
                "mean of each patch's token embeddings as inputs_embeds, and labels for the loss"
            )
    try:
        source = inspect.getsource(stock_class.forward)
    except (OSError, TypeError):  # no source to read: the forward checks that the hook was called
        source = "loss_function"
    if "loss_function" not in source:
        raise UnsupportedModelError(
            f"{stock_class.__name__}.forward computes its loss without self.loss_function (the hook the K-way "
            "loss replaces): patch-level training needs a causal LM that uses it"
        )
    return signature


# ---------------------------------------------------------------------------------------------------------
# Which architectures: the rule for decoder-only models, and the supported list (patch_training/architectures.txt)
# ---------------------------------------------------------------------------------------------------------

SUPPORTED_ARCHITECTURES_FILE = "architectures.txt"  # in the `patch_training` package (package data)
_FUSED_LOSS_FLAG = "fused_loss"


@dataclass(frozen=True)
class SupportedArchitecture:
    """One line of the supported list: a transformers `model_type` whose patch model is tested against the stock
    model (tests/test_architectures.py) on the oldest and newest transformers that requirements.txt allows.

    `since`: the first transformers release that maps the type to a causal LM, where that is newer than the oldest
    release allowed (None: every release allowed has it). `fused_loss`: {argument of
    `fused_kway_linear_cross_entropy`: config attribute} where the fused LM-head loss is exact for the type (the
    post-head processing, e.g. {"softcap": "final_logit_softcapping"}), None where it is not."""

    model_type: str
    since: tuple[int, ...] | None = None
    fused_loss: dict[str, str] | None = None


def parse_supported_architectures(text: str, source: str = SUPPORTED_ARCHITECTURES_FILE) -> dict[str, SupportedArchitecture]:
    """The supported list from its text: one model_type a line, then optional words `since=5.24` and `fused_loss`,
    and after `fused_loss` any `argument=config_attribute` pairs; `#` starts a comment. Raises ValueError naming
    `source` and the line for anything else (an unknown word, a type listed twice, arguments without fused_loss)."""
    architectures: dict[str, SupportedArchitecture] = {}
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        model_type, since, fused_loss = words[0], None, None
        where = f"{source}:{number}"
        if model_type in architectures:
            raise ValueError(f"{where}: model_type {model_type!r} is listed twice")
        for word in words[1:]:
            name, equals, value = word.partition("=")
            if word == _FUSED_LOSS_FLAG and fused_loss is None:
                fused_loss = {}
            elif name == "since" and value and since is None:
                try:
                    since = tuple(int(part) for part in value.split("."))
                except ValueError:
                    raise ValueError(f"{where}: since={value} is not a release number like 5.24") from None
            elif equals and name and value and fused_loss is not None and name not in fused_loss:
                fused_loss[name] = value
            else:
                raise ValueError(
                    f"{where}: cannot read {word!r} (a line is: model_type [since=5.24] [fused_loss [argument=attribute ...]])"
                )
        architectures[model_type] = SupportedArchitecture(model_type, since, fused_loss)
    return architectures


def _read_supported_architectures() -> dict[str, SupportedArchitecture]:
    from importlib.resources import files

    resource = files("patch_training").joinpath(SUPPORTED_ARCHITECTURES_FILE)
    return parse_supported_architectures(resource.read_text(encoding="utf-8"), f"patch_training/{SUPPORTED_ARCHITECTURES_FILE}")


# model_type -> SupportedArchitecture: the one list `check_supported` (so run_clm.py) and the fused loss read.
SUPPORTED_ARCHITECTURES = _read_supported_architectures()

# The fused LM-head + K-way loss (`patch_training.fused_loss`) needs the decoder's final hidden states and the
# head's weight, so it replaces the stock forward's `logits = lm_head(hidden)` and whatever follows. It is exact
# only for architectures whose causal-LM forward is the plain template (base model -> last hidden state -> one
# linear head -> elementwise processing given as arguments here -> loss, no extra loss term); the supported list
# marks them `fused_loss`, and tests/test_architectures.py checks each against the unfused path:
# model_type -> {fused argument: config attribute}.
FUSED_LOSS_ARCHITECTURES = {
    model_type: dict(architecture.fused_loss)
    for model_type, architecture in SUPPORTED_ARCHITECTURES.items()
    if architecture.fused_loss is not None
}
LOSS_IMPLEMENTATIONS = ("auto", "fused", "unfused")


def is_encoder_family(model_type: str) -> bool:
    """Whether transformers also maps `model_type` as a masked LM (BERT, RoBERTa, XLM-R, ...): such a family is an
    encoder that attends bidirectionally, and its causal-LM head is causal only with `config.is_decoder=True`.

    The decision rests on what the family is in transformers' own task mappings, which stay put from release to
    release, not on which attributes its config class happens to declare (transformers 5.x declares `is_decoder`
    on GPT-NeoX's config too, a decoder-only model)."""
    return model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _check_config(stock_class: type, config, warn_unlisted: bool = True) -> None:
    """Raise UnsupportedModelError unless `config` describes a decoder-only causal LM whose config leaves
    `patch_size` to us; log once (a warning) where its model_type is not in the supported list and `warn_unlisted`."""
    name = f"{stock_class.__name__} (model_type {config.model_type!r})"
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name} is an encoder-decoder model: patch-level training needs a decoder-only causal LM")
    if is_encoder_family(config.model_type) and not getattr(config, "is_decoder", False):
        raise UnsupportedModelError(
            f"{name} is an encoder with bidirectional attention unless config.is_decoder=True: patch-level "
            "training needs a decoder-only causal LM"
        )
    config_class = type(config)
    if getattr(config_class, "patch_size", None) is not None or "patch_size" in inspect.signature(config_class).parameters:
        raise UnsupportedModelError(
            f"{name}: its config already has a `patch_size` (an image patch size), which K would overwrite"
        )
    if warn_unlisted and config.model_type not in SUPPORTED_ARCHITECTURES:
        _log_once(f"model_type {config.model_type!r} is not in the supported list ({_supported_list_where()}): its "
                  "patch-level training has not been checked against the stock model")


def _supported_list_where() -> str:
    return f"patch_training/{SUPPORTED_ARCHITECTURES_FILE}, docs/architectures.md"


def fused_loss_arguments(config) -> dict | None:
    """The post-head processing of `config`'s architecture as `fused_kway_linear_cross_entropy` arguments
    (e.g. {"softcap": 30.0} for Gemma-2), or None where the fused loss would not be exact."""
    spec = FUSED_LOSS_ARCHITECTURES.get(getattr(config, "model_type", None))
    if spec is None:
        return None
    return {argument: getattr(config, attribute) for argument, attribute in spec.items() if getattr(config, attribute, None)}


class PatchModelMixin:
    """Patch-level training (module docstring) for the transformers causal LM it is mixed into, placed first:
    `class PatchXForCausalLM(PatchModelMixin, XForCausalLM)`, as `patch_model_class(XForCausalLM)` builds it.

    It overrides `forward` (and guards `generate` and `save_pretrained`) and adds no parameter, so checkpoints
    are stock checkpoints of the wrapped class. K is `config.patch_size` (absent or None means 1).

    K = 1 is the stock model: without labels (inference, `generate()`), or with a cache or `logits_to_keep`,
    the call goes to the stock forward untouched. With labels, the stock forward runs with our lean loss in
    place of transformers' causal-LM loss (equal to float rounding, `kway_cross_entropy` at K = 1).

    K > 1, input (B, L) ids or (B, L, H) embeddings, L = n*K:
      1. embed with `get_input_embeddings()` and average each patch (over its visible tokens, with a mask);
      2. run the stock class's own forward on `inputs_embeds` (B, n, H), so the logits (B, n, V) are exactly
         the stock ones: embedding scaling, final norm, tied head, logit soft-capping or scaling included;
      3. the K-way loss (Eq. 3) on those logits, handed to the stock forward as its `loss_function`, so that
      4. whatever the stock model adds to its causal-LM loss it adds to ours the same way (MoE:
         `router_aux_loss_coef * aux_loss` when `output_router_logits`).

    Attention masks: a patch is visible if any of its tokens is, and its embedding is the mean of its
    visible tokens (`patchify_embeddings`). Labels are independent of the mask, as in transformers: set
    padded labels to -100. Position ids, if given, are patch positions of shape (B, n).

    Raises UnsupportedModelError (a ValueError) on construction for an encoder-decoder or encoder model, or a
    stock forward without `inputs_embeds`; ValueError in forward for a cache at K > 1, L not a multiple of K,
    labels not (B, L), or position ids not (B, n).
    """

    _stock_class: type  # the wrapped transformers class, set per subclass
    # Training loss: "auto" = the fused LM-head + K-way loss where it is exact (`fused_loss_arguments`), else
    # the stock head then `kway_cross_entropy`; "fused" = refuse an architecture it is not exact for;
    # "unfused" = always the stock head. Evaluation (`model.eval()`) and calls without labels return logits.
    loss_implementation: str = "auto"
    # The fused loss's chunk kernel (`patch_training.fused_loss.FUSED_KERNELS`): "auto" = compiled by torch.compile
    # on a CUDA GPU with Triton, eager elsewhere; "compiled" or "eager" to choose.
    fused_loss_kernel: str = "auto"
    # Per-offset weights of the K-way training loss (K numbers of mean 1, `normalise_offset_weights`), or None:
    # the paper's plain mean. An attribute, not a config entry: checkpoints stay stock.
    offset_weights: tuple[float, ...] | None = None
    # The `use_cache` that `save_pretrained` writes into config.json, or None: the config's own. Training turns
    # config.use_cache off (transformers' Trainer does, to its --use_cache default); a checkpoint keeps the
    # setting of the model it came from (a stock config's True).
    saved_use_cache: bool | None = None
    _forward_signature: inspect.Signature  # its forward's signature, which ours presents

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        stock_class = _stock_class_of(cls)
        cls._stock_class, cls._forward_signature = stock_class, _check_stock_class(stock_class)

        # `generate()` and the Trainer read the forward's signature (which cache name, whether it takes
        # logits_to_keep, ...): ours presents the stock one, whatever the transformers version.
        def forward(self, *args, **kwargs):
            return self._patch_forward(*args, **kwargs)

        forward.__signature__ = cls._forward_signature
        forward.__doc__ = PatchModelMixin.__doc__
        forward.__qualname__ = f"{cls.__qualname__}.forward"
        cls.forward = forward
        _PATCH_CLASSES.setdefault(stock_class, cls)

    def __init__(self, config, *args, **kwargs):
        _check_config(type(self)._stock_class, config)
        super().__init__(config, *args, **kwargs)

    @property
    def patch_size(self) -> int:
        return get_patch_size(self.config)

    def _patch_forward(self, *args, **kwargs):
        bound = self._forward_signature.bind(self, *args, **kwargs)  # a TypeError for bad arguments, as stock
        inputs = {}
        for name, value in list(bound.arguments.items())[1:]:  # without self
            kind = self._forward_signature.parameters[name].kind
            inputs.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
        patch_size = self.patch_size
        labels = inputs.get("labels")
        cache_names = [name for name in CACHE_ARGUMENT_NAMES if inputs.get(name) is not None]
        logits_to_keep = inputs.get("logits_to_keep", 0)
        keep_all_logits = isinstance(logits_to_keep, int) and logits_to_keep == 0
        if patch_size == 1 and (labels is None or cache_names or inputs.get("use_cache") or not keep_all_logits):
            return super().forward(*args, **kwargs)  # token-level inference and generation: the stock forward
        if cache_names or inputs.get("use_cache"):
            raise ValueError(
                f"a patch-level model (K={patch_size}) has no key-value cache (got "
                f"{', '.join(cache_names) or 'use_cache=True'}): it reads whole sequences of patches. Use K = 1 "
                "(config.patch_size = 1) for incremental decoding."
            )
        for name in (*CACHE_ARGUMENT_NAMES, "use_cache", "logits_to_keep"):
            inputs.pop(name, None)
        input_ids, inputs_embeds = inputs.pop("input_ids", None), inputs.pop("inputs_embeds", None)
        attention_mask, position_ids = inputs.pop("attention_mask", None), inputs.pop("position_ids", None)
        labels = inputs.pop("labels", None)
        num_items_in_batch = inputs.pop("num_items_in_batch", None)
        # transformers' Trainer asks for no logits when evaluating with --use_liger_kernel (Liger's forward
        # then never computes them); ours needs them for the loss, but need not return them.
        skip_logits = bool(inputs.pop("skip_logits", False)) and labels is not None
        return_dict = inputs.pop("return_dict", None)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")

        parameters = self._forward_signature.parameters
        stock_inputs = dict(inputs, attention_mask=attention_mask, return_dict=True)
        if "use_cache" in parameters and patch_size > 1:  # K = 1 keeps the caller's use_cache, as stock
            stock_inputs["use_cache"] = False
        if position_ids is not None:
            stock_inputs["position_ids"] = position_ids
        if patch_size == 1:  # token-level training: the stock forward on the same inputs, our lean loss
            batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
            stock_inputs.update(input_ids=input_ids, inputs_embeds=inputs_embeds)
        else:
            # 1. (B, L) -> (B, L, H) -> (B, n, H): patch embeddings; (B, n) patch mask
            if inputs_embeds is None:
                inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, L, H)
            batch, length, _ = inputs_embeds.shape
            num_patches = check_length(length, patch_size)
            stock_inputs["inputs_embeds"] = patchify_embeddings(inputs_embeds, patch_size, attention_mask)
            if attention_mask is not None:
                stock_inputs["attention_mask"] = patchify_attention_mask(attention_mask, patch_size)
            if position_ids is not None and position_ids.shape[-1] != num_patches:
                raise ValueError(
                    f"position_ids must be patch positions of length n=L/K={num_patches} (L={length}, "
                    f"K={patch_size}), got shape {tuple(position_ids.shape)}"
                )
        slice_logits = labels is None and not keep_all_logits
        if slice_logits and "logits_to_keep" in parameters:
            stock_inputs["logits_to_keep"], slice_logits = logits_to_keep, False

        # 2.-4. the stock forward computes the logits, calls our K-way loss on them, adds its extra losses
        offset_losses = []
        if labels is not None:
            if labels.shape != (batch, length):
                raise ValueError(f"labels must have shape (B, L)=({batch}, {length}), got {tuple(labels.shape)}")
            stock_inputs["labels"] = labels

        weights = self.offset_weights if patch_size > 1 else None  # K = 1 has one offset: nothing to weight
        fused_arguments = self._fused_loss_arguments(labels, stock_inputs)
        if fused_arguments is not None:
            result = self._fused_forward(stock_inputs, labels, patch_size, num_items_in_batch, fused_arguments)
            if return_dict is None:
                return_dict = getattr(self.config, "return_dict", True)
            return result if return_dict else result.to_tuple()

        def patch_loss(logits, labels, *args, **kwargs):  # the stock `loss_function(logits, labels, vocab_size, ...)`
            targets = next_patch_targets(labels, patch_size)  # (B, n, K)
            loss, per_offset = kway_cross_entropy(logits, targets, num_items_in_batch, offset_weights=weights)
            offset_losses.append(per_offset)
            return loss

        with _loss_function_replaced(self, patch_loss):
            outputs = super().forward(**stock_inputs)
        if labels is not None and not offset_losses:
            raise UnsupportedModelError(
                f"{self._stock_class.__name__}.forward computed its loss without self.loss_function, so the "
                "K-way loss cannot replace it"
            )

        values = {field.name: getattr(outputs, field.name) for field in dataclasses.fields(outputs)}
        if skip_logits:
            values["logits"] = None
        elif slice_logits:
            logits = values["logits"]
            values["logits"] = (
                logits[:, -logits_to_keep:] if isinstance(logits_to_keep, int) else logits[:, logits_to_keep]
            )
        result = patch_output_class(type(outputs))(**values, offset_losses=offset_losses[0] if offset_losses else None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        return result if return_dict else result.to_tuple()

    def _fused_loss_arguments(self, labels, stock_inputs) -> dict | None:
        """The fused loss's arguments when this training call takes the fused path, else None (module
        `FUSED_LOSS_ARCHITECTURES`). Fused: labels given, training mode, logits not asked for by slicing, no
        extra stock output requested, and the head's weight is whole on this rank (not a ZeRO-3 partition,
        gathered only inside the head's own forward)."""
        if self.loss_implementation not in LOSS_IMPLEMENTATIONS:
            raise ValueError(f"loss_implementation must be one of {LOSS_IMPLEMENTATIONS}, got {self.loss_implementation!r}")
        if labels is None or not self.training or self.loss_implementation == "unfused" or "logits_to_keep" in stock_inputs:
            return None
        arguments = fused_loss_arguments(self.config)
        if arguments is None:
            if self.loss_implementation == "fused":
                raise UnsupportedModelError(
                    f"the fused LM-head loss is not exact for model_type {self.config.model_type!r} (it is for: "
                    f"{', '.join(sorted(FUSED_LOSS_ARCHITECTURES))}): use loss_implementation 'auto' or 'unfused'"
                )
            _log_once(f"fused LM-head loss: not exact for model_type {self.config.model_type!r}; using the stock head "
                      "and the chunked K-way loss")
            return None
        head = self._output_head()
        if not isinstance(head, torch.nn.Linear):
            _log_once(f"fused LM-head loss: the output head is a {type(head).__name__}, not a Linear; using the stock "
                      "head and the chunked K-way loss")
            return None
        if hasattr(head.weight, "ds_id"):  # ds_id: a DeepSpeed ZeRO-3 partition
            _log_once("fused LM-head loss: the head's weight is partitioned (DeepSpeed ZeRO-3); using the stock head "
                      "and the chunked K-way loss")
            return None
        return arguments

    def _output_head(self) -> torch.nn.Module:
        """The output embeddings (the LM head) as the module that owns the weight: a `torch.compile` wrapper
        around it (accelerate's regional compilation, `compile_regions`, compiles each leaf module outside the
        repeated blocks one by one) is looked through, since the fused loss uses the weight, not the head's forward."""
        from torch._dynamo.eval_frame import OptimizedModule

        head = self.get_output_embeddings()
        return head._orig_mod if isinstance(head, OptimizedModule) else head

    def _fused_forward(self, stock_inputs: dict, labels, patch_size: int, num_items_in_batch, fused_arguments: dict):
        """The decoder (`self.base_model`) on the stock inputs, then the fused LM-head + K-way loss on its final
        hidden states (B, n, H) with the chunk kernel `fused_loss_kernel`: no (B, n, V) logits are held (`logits`
        is None in the output)."""
        base_inputs = {name: value for name, value in stock_inputs.items() if name != "labels"}
        outputs = self.base_model(**base_inputs)
        head = self._output_head()
        targets = next_patch_targets(labels, patch_size)  # (B, n, K)
        loss, per_offset = fused_kway_linear_cross_entropy(
            outputs.last_hidden_state, head.weight, targets, head.bias, num_items_in_batch=num_items_in_batch,
            offset_weights=self.offset_weights if patch_size > 1 else None, kernel=self.fused_loss_kernel,
            **fused_arguments,
        )
        return PatchCausalLMOutputWithPast(
            loss=loss, logits=None, hidden_states=outputs.hidden_states, attentions=outputs.attentions,
            offset_losses=per_offset,
        )

    def generate(self, *args, **kwargs):
        """Token-level generation; refused for K > 1, where the model predicts bags of K tokens."""
        if self.patch_size > 1:
            raise ValueError(
                f"generate() needs a token-level model, but this one has patch_size K={self.patch_size}: "
                "a patch model predicts an unordered bag of the next K tokens. Set model.config.patch_size = 1 "
                f"(same weights) or load the checkpoint with AutoModelForCausalLM."
            )
        return super().generate(*args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save a stock checkpoint: `architectures` is the stock class name (e.g. ["Qwen2ForCausalLM"]), so
        that `AutoModelForCausalLM` and `pipeline` load it without this file, and `use_cache` is
        `saved_use_cache` where set. `patch_size` stays in the config as a record of how the weights were
        trained (stock models ignore it)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        stock_name = self._stock_class.__name__
        self.config.architectures = [stock_name]
        if kwargs.get("is_main_process", True):
            values = {"architectures": [stock_name]}
            if self.saved_use_cache is not None:
                values["use_cache"] = self.saved_use_cache
            update_saved_config(save_directory, values)


def update_saved_config(save_directory, values: dict) -> None:
    """Set the entries `values` in the config.json that `save_pretrained` wrote in `save_directory` (rewritten
    indented, keys sorted, as transformers writes it); nothing when there is none."""
    config_file = os.path.join(save_directory, "config.json")
    if not os.path.isfile(config_file):
        return
    with open(config_file, encoding="utf-8") as handle:
        saved = json.load(handle)
    saved.update(values)
    with open(config_file, "w", encoding="utf-8") as handle:
        json.dump(saved, handle, indent=2, sort_keys=True)
        handle.write("\n")


_LOGGED: set[str] = set()


def _log_once(message: str) -> None:
    """Log `message` (a warning of the `modeling_llama_patch` logger) the first time only."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        logging.getLogger(__name__).warning(message)


@contextlib.contextmanager
def _loss_function_replaced(model, loss_function):
    """Within the block, `model.loss_function` (the hook every transformers causal LM computes its loss with)
    is `loss_function`; any loss function set on the model before is restored after."""
    missing = object()
    previous = model.__dict__.get("_loss_function", missing)
    model._loss_function = loss_function  # what PreTrainedModel.loss_function returns when set
    try:
        yield
    finally:
        if previous is missing:
            del model._loss_function
        else:
            model._loss_function = previous


_PATCH_CLASSES: dict[type, type] = {}


def patch_model_class(stock_class: type) -> type:
    """The patch class of a transformers causal-LM class: `Patch<Name>(PatchModelMixin, stock_class)`.

    Built once per class and kept as an attribute of this module, so models pickle; `LlamaForCausalLM` gives
    `PatchLlamaForCausalLM`. `isinstance(model, stock_class)` holds for its instances. Raises
    UnsupportedModelError if the class's forward takes no `inputs_embeds` or `labels` (and, when an instance is
    built, if its config is an encoder-decoder or encoder model).
    """
    if isinstance(stock_class, type) and issubclass(stock_class, PatchModelMixin):
        return stock_class
    if stock_class not in _PATCH_CLASSES:
        _check_stock_class(stock_class)
        name = f"Patch{stock_class.__name__}"
        if name in globals():
            raise UnsupportedModelError(f"two classes named {stock_class.__name__}: {name} already wraps another")
        patch_class = type(name, (PatchModelMixin, stock_class), {"__module__": __name__, "__qualname__": name})
        patch_class.__doc__ = f"`{stock_class.__name__}` with patch-level training (see `PatchModelMixin`)."
        globals()[name] = patch_class
    return _PATCH_CLASSES[stock_class]


def check_supported(config) -> type:
    """The patch class for `config` (its stock causal-LM class wrapped), or UnsupportedModelError (one line) when
    patch-level training cannot wrap it (no causal LM for its model_type, an encoder or encoder-decoder, a forward
    without `inputs_embeds`, a config that already has an image `patch_size`) or its model_type is not in the
    supported list (`SUPPORTED_ARCHITECTURES`: the types tested against stock transformers). run_clm.py trains
    supported types only; `AutoPatchModelForCausalLM` wraps others too, with a warning."""
    stock_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if stock_class is None:
        raise UnsupportedModelError(f"model_type {config.model_type!r} has no causal LM in transformers")
    patch_class = patch_model_class(stock_class)
    _check_config(stock_class, config, warn_unlisted=False)
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"model_type {config.model_type!r} is not in the supported list ({_supported_list_where()}): only the "
            "types whose patch model is tested against the stock model are trained; docs/architectures.md says how "
            "to test and add one"
        )
    return patch_class


def __getattr__(name: str):
    """`Patch<Name>` for any transformers class `<Name>`, built on first use (so a pickled model loads in a
    fresh process)."""
    stock_class = getattr(transformers, name.removeprefix("Patch"), None) if name.startswith("Patch") else None
    if stock_class is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return patch_model_class(stock_class)


class PatchLlamaForCausalLM(PatchModelMixin, LlamaForCausalLM):
    """`LlamaForCausalLM` that trains on patches of K = `config.patch_size` tokens (see `PatchModelMixin`)."""


class _PatchModelMapping:
    """transformers' causal-LM mapping (config class -> model class), answering with patch classes."""

    def __init__(self, stock_mapping):
        self._stock_mapping = stock_mapping

    def __contains__(self, config_class) -> bool:
        return config_class in self._stock_mapping

    def __iter__(self):
        return iter(self._stock_mapping)

    def __getitem__(self, config_class):
        stock = self._stock_mapping[config_class]
        if isinstance(stock, (list, tuple)):
            return type(stock)(patch_model_class(model_class) for model_class in stock)
        return patch_model_class(stock)


class AutoPatchModelForCausalLM(AutoModelForCausalLM):
    """`AutoModelForCausalLM` whose models do patch-level training at `config.patch_size`.

    `from_config(config, **kwargs)` and `from_pretrained(path_or_name, *model_args, **kwargs)` take the same
    arguments as `AutoModelForCausalLM`'s and return an instance of `patch_model_class(<stock class>)`, e.g. a
    `PatchQwen2ForCausalLM`, which is a `Qwen2ForCausalLM`. Raises UnsupportedModelError for a model that is
    not a decoder-only causal LM or whose forward takes no `inputs_embeds`, and for `trust_remote_code=True`
    (only transformers' own classes are wrapped).
    """

    _model_mapping = _PatchModelMapping(MODEL_FOR_CAUSAL_LM_MAPPING)

    @classmethod
    def from_config(cls, config, **kwargs):
        cls._refuse_remote_code(kwargs)
        return super().from_config(config, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        cls._refuse_remote_code(kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    @staticmethod
    def _refuse_remote_code(kwargs) -> None:
        if kwargs.get("trust_remote_code"):
            raise UnsupportedModelError(
                "AutoPatchModelForCausalLM wraps transformers' own model classes only: trust_remote_code=True "
                "is not supported"
            )
