"""Patch-level training on the decoder-only causal LMs of transformers (`AutoPatchModelForCausalLM`).

The supported list (`patch_training/architectures.txt`, read as `modeling_llama_patch.SUPPORTED_ARCHITECTURES`) is
what this file holds the code to: each listed model_type, built tiny (hidden 32, 2 layers or one of each kind of
layer, vocabulary 128), must pass the check below, and fails the suite with its name where it is refused, cannot
be built tiny, or differs from stock. Only a stock model that itself fails (at its own default config, or on the
tiny inputs) may skip, naming the upstream error; a type the installed release does not have yet skips only when
the list says it came later (`since=`). Every other model_type `AutoModelForCausalLM` maps gets the same check
as a candidate (it skips with the reason where it is refused or does not pass), so a release that adds a model
shows whether it could be added to the list. The references are independent of the code under test:
  * K = 1: the stock class with the same weights, fed the same ids (logits, loss, every gradient);
  * K = 4: the stock class fed `inputs_embeds` = per-patch means of its own token embeddings computed by a
    loop over patches, and the paper's Eq. 3 as a naive loop over (sequence, patch, offset) with a float64
    log-softmax, plus whatever the stock model adds to its own causal-LM loss (MoE: the router loss),
    measured as stock loss minus the naive cross-entropy of its logits;
  * causality: patch logits do not change when later tokens do.
FAMILIES also go through `AutoPatchModelForCausalLM`, `generate()` at K = 1, and save -> stock class ->
`pipeline` in a fresh process.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM, DynamicCache, LlamaForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import modeling_llama_patch
from modeling_llama_patch import (
    FUSED_LOSS_ARCHITECTURES,
    IGNORE_INDEX,
    SUPPORTED_ARCHITECTURES,
    AutoPatchModelForCausalLM,
    PatchLlamaForCausalLM,
    PatchModelMixin,
    UnsupportedModelError,
    fused_loss_arguments,
    patch_model_class,
)

VOCAB = 128
# Random ids stay below the placeholder ids (image, audio, ... tokens) tiny configs get at the top of the vocabulary.
RANDOM_ID_RANGE = (3, VOCAB - 16)
K = 4
# The families the issue names: each must pass, never be skipped. One is MoE (mixtral).
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "olmo2", "mixtral", "qwen3_moe"]
# Candidates (types not in the supported list) whose tiny model still takes > 5 s on 2 CPU cores (pure-torch
# state-space/recurrent kernels, large fixed sub-modules): skipped unless PATCH_TEST_SLOW_ARCHITECTURES=1.
# A listed type always runs.
SLOW = {"falcon_h1", "blt", "gemma4_text", "inkling2_loop_text", "mpt", "nemotron_h", "inkling_text", "xlm",
        "inkling2_text", "prophetnet", "kimi_linear"}
FP32_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)
INSTALLED = tuple(int(part) for part in transformers.__version__.split(".")[:2])

# Tiny values for whichever of these keys a config has, under its own name or an alias of its `attribute_map`
# (checked against its defaults, so no key is invented).
SMALL = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=128, initializer_range=0.1,
    # MoE: few small experts (in 2 groups where routing is grouped), the router loss on and large enough to show
    num_local_experts=4, num_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, output_router_logits=True, router_aux_loss_coef=0.1, n_group=2,
    topk_group=1,
    # GPT-2 style names
    n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=128, n_ctx=128,
    # others
    d_model=32, num_layers=2, num_heads=4, ffn_dim=64, d_ff=64, kv_lora_rank=16, q_lora_rank=16,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, first_k_dense_replace=1, mamba_n_heads=4, rotary_dim=4,
    vocab_size_per_layer_input=VOCAB, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
)
# Where a family's default config cannot be shrunk by SMALL alone (its validation ties sizes together, or its
# layer pattern is written in its own terms), by model_type (a sub-config's too).
TINY_OVERRIDES = {
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},  # one (global, local) pair: 2 layers
    "mamba2": {"head_dim": 16, "n_groups": 1},  # hidden_size * expand == num_heads * head_dim
    # NVFP4 K/V rounding needs head_dim a multiple of 16; the K/V sources and indexers are derived from layer_types
    "kolibri1_1": {"head_dim": 16, "index_num_heads": 1, "kv_source_layers": None, "index_layers": None,
                   "mlp_only_layers": None},
    "zaya": {"num_experts_per_tok": 1},  # one expert per token only
    "dots3_note_text": {"head_dim": 16},  # sliding-window head_dim == qk_nope_head_dim + qk_rope_head_dim
    "dots3_note_vision_encoder": {"adapter_in_dim": 32, "adapter_out_dim": 32},  # adapters match the hidden sizes
    "dots3_note_audio_encoder": {"adapter_input_size": 32, "adapter_out_dim": 32},
    "bamba": {"attn_layer_indices": [1]},  # the default has no attention layer at all
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},  # likewise
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1},  # an attention layer within 2 layers
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},  # likewise
    "zamba": {"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "hybrid", "hybrid"]},  # tied hybrids
    "flint": {"mlp_only_layers": [0]},  # the default's dense layers 0 and 1 leave 2 layers without a MoE
    "dots1": {"n_shared_experts": 1},  # the default's None fails its MoE block; checkpoints set it
    "dory": {"num_hidden_layers": 2, "layer_types": None},  # its config derives the layer pattern from the count
    # the config rounds the q/k and v widths up to multiples of 64, the model does not (transformers 5.25)
    "xlstm": {"hidden_size": 128, "embedding_dim": 128, "num_blocks": 2},
}
LAYER_COUNT_KEYS = ("num_hidden_layers", "num_layers", "n_layer")
MIN_LAYERS = 2


def _first_of_each_kind(indices, kind) -> list[int]:
    """The first index of each distinct `kind(index)`, in order."""
    kept, seen = [], set()
    for index in indices:
        if kind(index) not in seen:
            seen.add(kind(index))
            kept.append(index)
    return kept


def representative_layers(defaults: dict, shrink_entry) -> dict:
    """Config values that keep one layer of each kind of `defaults` (a config's to_dict()), at least MIN_LAYERS.

    A layer's kind is its entry in every per-layer list (`layer_types`, `mlp_layer_types`, sparsity patterns: lists
    as long as the layer count, integer lists of layer indices aside) and in per-layer overrides
    (`per_layer_config`, shrunk by `shrink_entry`). Layers that read another layer's K/V (the last
    `num_kv_shared_layers`) are chosen among themselves, so sharing stays. Returns the layer count, the
    per-layer lists and overrides of the kept layers, and `num_kv_shared_layers` where it applies."""
    key = next((name for name in LAYER_COUNT_KEYS if type(defaults.get(name)) is int), None)
    if key is None:
        return {}
    count = defaults[key]
    if count <= MIN_LAYERS:  # already tiny in depth: SMALL's layer count, per-layer values derived from it
        return {}
    lists = {name: value for name, value in defaults.items()
             if isinstance(value, list) and len(value) == count}
    overrides = {name: {int(index): entry for index, entry in value.items()} for name, value in defaults.items()
                 if "layer" in name and isinstance(value, dict) and value and all(str(i).isdigit() for i in value)}
    kinds = [value for value in lists.values() if not all(type(item) is int for item in value)]

    def kind(index: int) -> str:
        return json.dumps([[value[index] for value in kinds], [entry.get(index) for entry in overrides.values()]],
                          sort_keys=True, default=str)

    shared = defaults.get("num_kv_shared_layers")
    split = count - shared if type(shared) is int and 0 < shared < count else count
    kept = _first_of_each_kind(range(split), kind)
    kept_shared = _first_of_each_kind(range(split, count), kind)
    kept += [index for index in range(split) if index not in kept][: max(0, MIN_LAYERS - len(kept) - len(kept_shared))]
    kept = sorted(kept) + kept_shared
    values = {key: len(kept)}
    if split < count:
        values["num_kv_shared_layers"] = len(kept_shared)
    elif type(shared) is int and shared >= count > 0:  # every layer reads another model's K/V (an assistant model)
        values["num_kv_shared_layers"] = len(kept)
    values.update({name: [value[index] for index in kept] for name, value in lists.items()})
    values.update({
        name: {new: shrink_entry(value[old]) if isinstance(value[old], dict) else value[old]
               for new, old in enumerate(kept) if old in value}
        for name, value in overrides.items()
    })
    return values


def tiny_config(model_type: str, **overrides):
    """The model_type's default config made tiny: every SMALL key it has (sub-configs and per-layer overrides
    too), one layer of each kind (`representative_layers`), as many K/V heads as query heads where the default
    has (multi-head latent attention needs it), token ids < VOCAB (placeholders at its top), TINY_OVERRIDES."""

    def shrink(defaults: dict) -> dict:
        own_type = defaults.get("model_type")
        aliases = CONFIG_MAPPING[own_type].attribute_map if own_type in CONFIG_MAPPING else {}
        values = {}
        for key, value in SMALL.items():
            name = aliases.get(key, key)
            if name in defaults:
                values[name] = value
                if name != key:  # a field declared under its alias too: both names get the value
                    values[key] = value
        values.update(representative_layers(defaults, lambda entry: {**entry, **shrink(entry)}))
        if "kv_lora_rank" in defaults and "num_attention_heads" in values and \
                defaults.get("num_key_value_heads") == defaults.get("num_attention_heads"):
            values["num_key_value_heads"] = values["num_attention_heads"]
        placeholders = iter(range(VOCAB - 1, RANDOM_ID_RANGE[1] - 1, -1))
        for key, value in defaults.items():
            if key.endswith(("_token_id", "_token_index")) and type(value) is int and value >= VOCAB:
                named = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "decoder_start_token_id": 0}
                values[key] = named.get(key, next(placeholders))
        for key, value in defaults.items():
            if isinstance(value, dict) and "model_type" in value:  # a sub-config (text_config, vision_config)
                values[key] = {**value, **shrink(value)}
        values.update(TINY_OVERRIDES.get(own_type, {}))
        return values

    config_class = CONFIG_MAPPING[model_type]
    values = shrink({**config_class().to_dict(), "model_type": model_type})
    values.update(overrides)
    return config_class(**values)


def upstream_failure(model_type: str) -> str | None:
    """The error stock transformers itself raises building `model_type`'s causal LM from its own default config
    (on the meta device: no memory), or None where that builds."""
    try:
        config = CONFIG_MAPPING[model_type]()
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(config)
    except Exception as error:  # noqa: BLE001 - any error of stock transformers is the reason
        return f"{type(error).__name__}: {first_line(error)}"
    return None


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:2])[:200]


def build_pair(model_type: str, patch_size: int, seed: int = 0, listed: bool = True):
    """(stock, patch) models of `model_type` with identical weights in eval mode. A stock model that transformers
    cannot build from its own default config skips, naming that error; any other failure to build is ours and
    fails a listed type (`listed`), and skips a candidate with the reason."""
    def ours(reason: str):
        message = f"{model_type}: {reason}"
        if listed:
            pytest.fail(f"{message} (a supported type: patch_training/architectures.txt)", pytrace=False)
        pytest.skip(f"candidate: {message}")

    try:
        config = tiny_config(model_type)
        torch.manual_seed(seed)
        stock = AutoModelForCausalLM.from_config(config)
    except Exception as error:  # noqa: BLE001 - the reason is reported
        upstream = upstream_failure(model_type)
        if upstream is not None:
            pytest.skip(f"stock transformers fails on its own default config: {upstream}")
        ours(f"no tiny model (the default config builds): {type(error).__name__}: {first_line(error)}")
    patch_config = copy.deepcopy(stock.config)
    patch_config.patch_size = patch_size
    try:
        patch = patch_model_class(type(stock))(patch_config)
    except UnsupportedModelError as error:
        ours(f"refused: {error}")
    patch.load_state_dict(stock.state_dict(), strict=True)
    return stock.eval(), patch.eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(*RANDOM_ID_RANGE, (batch, length), generator=torch.Generator().manual_seed(seed))


def naive_patch_means(embeds: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, L, H) -> (B, n, H): the mean of each patch's K embeddings, by a loop over patches and tokens."""
    patches = []
    for i in range(embeds.shape[1] // patch_size):
        total = embeds[:, i * patch_size]
        for j in range(i * patch_size + 1, (i + 1) * patch_size):
            total = total + embeds[:, j]
        patches.append(total / patch_size)
    return torch.stack(patches, dim=1)


def naive_eq3(logits: torch.Tensor, labels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Eq. 3 by loops (float64): the mean over (sequence b, patch i < n-1, offset k) of -log p(label)."""
    log_probs = F.log_softmax(logits.double(), dim=-1)
    terms = [
        -log_probs[b, i, int(labels[b, (i + 1) * patch_size + k])]
        for b in range(labels.shape[0])
        for i in range(logits.shape[1] - 1)
        for k in range(patch_size)
        if int(labels[b, (i + 1) * patch_size + k]) != IGNORE_INDEX
    ]
    return torch.stack(terms).mean()


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys() and expected
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=lambda m, n=name: f"{n}: {m}", **GRAD_TOL)


# ---------------------------------------------------------------------------------------------------------
# The same check for every architecture transformers maps to a causal LM
# ---------------------------------------------------------------------------------------------------------


def stock_references(stock, ids, labels):
    """Everything the stock model computes for the check, or pytest.skip if the stock model itself fails on
    CPU at this tiny size (then there is nothing to compare against; a failure of ours still fails)."""
    try:
        token_level = stock(ids, labels=labels)
        token_level.loss.backward()
        token_grads = grads(stock)
        stock.zero_grad(set_to_none=True)
        embeds = naive_patch_means(stock.get_input_embeddings()(ids), K)  # (B, n, H)
        no_cache = dict(use_cache=False) if "use_cache" in inspect.signature(stock.forward).parameters else {}
        # any labels: to see what stock adds to its loss; no cache, as a patch model has none
        patch_level = stock(inputs_embeds=embeds, labels=ids[:, ::K], **no_cache)
        # 0, or what the stock model adds to its causal-LM loss (e.g. the MoE router loss)
        added = patch_level.loss - naive_eq3(patch_level.logits, ids[:, ::K], 1)
        reference_loss = naive_eq3(patch_level.logits, labels, K) + added
        reference_loss.backward()
        patch_grads = grads(stock)
        with torch.no_grad():
            first_tokens = stock(ids[:, ::K]).logits
    except Exception as error:  # noqa: BLE001 - the reference cannot run: a skip, with the reason
        pytest.skip(f"stock model fails on the tiny inputs: {type(error).__name__}: {first_line(error)}")
    return token_level, token_grads, patch_level, added, reference_loss, patch_grads, first_tokens


CANDIDATES = sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) - set(SUPPORTED_ARCHITECTURES))


def release(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


@pytest.mark.parametrize("model_type", sorted(SUPPORTED_ARCHITECTURES))
def test_supported_architecture(model_type):
    """A listed model_type passes `check_architecture` on the installed transformers; one the installed release
    does not map yet skips only where the list says it came later (`since=`), and fails where it should be there."""
    since = SUPPORTED_ARCHITECTURES[model_type].since
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        if since is not None and INSTALLED < since[:2]:
            pytest.skip(f"transformers {transformers.__version__} predates {model_type} (since={release(since)})")
        pytest.fail(f"{model_type} is in the supported list but transformers {transformers.__version__} maps no causal "
                    f"LM for it{f' (since={release(since)})' if since else ''}", pytrace=False)
    if since is not None and INSTALLED < since[:2]:
        pytest.fail(f"{model_type}: transformers {transformers.__version__} has it, but the list says since="
                    f"{release(since)}: correct the list", pytrace=False)
    check_architecture(model_type, listed=True)


@pytest.mark.parametrize("model_type", CANDIDATES)
def test_candidate_architecture(model_type):
    """A model_type transformers maps that is not in the supported list gets the same check; it skips with the
    reason where it is refused, cannot be built, or differs from stock (so it stays off the list). A candidate that
    passes can join the list (docs/architectures.md)."""
    if model_type in SLOW and not os.environ.get("PATCH_TEST_SLOW_ARCHITECTURES"):
        pytest.skip("slow on CPU (> 5 s); set PATCH_TEST_SLOW_ARCHITECTURES=1 to run")
    check_architecture(model_type, listed=False)


def check_architecture(model_type: str, listed: bool) -> None:
    """K = 1 equals the stock model (logits, loss, gradients); K = 4 logits equal the stock model on averaged
    `inputs_embeds`, its loss equals naive Eq. 3 plus what the stock model adds to its loss, gradients equal
    the reference's; patch logits are causal; the patch model is an instance of the stock class. A listed type
    fails on any difference; a candidate skips, naming it."""
    stock, patch = build_pair(model_type, 1, listed=listed)
    if listed:
        compare_with_stock(stock, patch)
        return
    try:
        compare_with_stock(stock, patch)
    except Exception as error:  # noqa: BLE001 - a candidate that does not pass stays off the list, with the reason
        pytest.skip(f"candidate: {model_type} does not pass: {type(error).__name__}: {first_line(error)}")


def compare_with_stock(stock, patch) -> None:
    """The checks of `check_architecture` on a (stock, patch) pair with the same weights, the patch model at K = 1."""
    assert isinstance(patch, type(stock)) and isinstance(patch, PatchModelMixin)
    ids = random_ids(2, 4 * K)
    labels = ids.clone()
    labels[0, 5] = IGNORE_INDEX
    token_level, token_grads, patch_level, added, reference_loss, patch_grads, first_tokens = stock_references(
        stock, ids, labels
    )

    # K = 1
    out = patch(ids, labels=labels)
    out.loss.backward()
    torch.testing.assert_close(out.logits, token_level.logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss, token_level.loss, **FP32_TOL)
    assert_grads_close(grads(patch), token_grads)

    # K = 4
    patch.zero_grad(set_to_none=True)
    patch.config.patch_size = K
    out = patch(ids, labels=labels)
    out.loss.backward()
    assert out.logits.shape[:2] == (2, 4)
    torch.testing.assert_close(out.logits, patch_level.logits, **FP32_TOL)
    torch.testing.assert_close(out.loss.double(), reference_loss.detach(), **FP32_TOL)
    assert out.offset_losses.shape == (K,)
    assert_grads_close(grads(patch), patch_grads)
    if getattr(patch_level, "aux_loss", None) is not None:  # MoE: the router loss is there, and added
        torch.testing.assert_close(out.aux_loss, patch_level.aux_loss, **FP32_TOL)
        assert abs(added.item()) > 1e-4

    with torch.no_grad():
        later = ids.clone()
        later[:, -K:] = random_ids(2, K, seed=99)  # change the last patch only: earlier patches must not see it
        torch.testing.assert_close(patch(later).logits[:, :-1], out.logits[:, :-1].detach(), **FP32_TOL)
    # not the stock model on the first token of each patch: the averaging matters
    assert not torch.allclose(out.logits.detach(), first_tokens, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# The named families: the Auto entry point, generate(), caches, refusals, stock checkpoints
# ---------------------------------------------------------------------------------------------------------


def generated(model, ids, **kwargs) -> list | str:
    """generate()'s ids as a list, or the error it raised as one line (type: message)."""
    try:
        return model.generate(ids, **kwargs).tolist()
    except RuntimeError as error:
        return f"{type(error).__name__}: {error}"


@pytest.mark.parametrize("model_type", FAMILIES)
def test_auto_from_config_is_the_stock_class(model_type):
    """AutoPatchModelForCausalLM.from_config returns a subclass of the stock class (isinstance holds) with the
    stock config class, forward signature and state_dict keys; K = 1 greedy generate() equals stock's, with no
    FutureWarning; a cache under either argument name, or use_cache, is refused at K = 4."""
    config = tiny_config(model_type)
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(config).eval()
    patch = AutoPatchModelForCausalLM.from_config(copy.deepcopy(config)).eval()
    patch.load_state_dict(stock.state_dict())
    assert isinstance(patch, type(stock)) and type(patch) is patch_model_class(type(stock))
    assert type(patch).__name__ == f"Patch{type(stock).__name__}" and type(patch).config_class is type(stock).config_class
    assert inspect.signature(patch.forward) == inspect.signature(stock.forward)
    assert list(patch.state_dict()) == list(stock.state_dict())

    ids = random_ids(2, 6)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        outputs = [generated(model, ids, **kwargs) for model in (patch, stock)]
        assert outputs[0] == outputs[1]  # the same tokens, or the same error as stock
        if isinstance(outputs[1], str):
            # Stock MoE generate() with output_router_logits fails in transformers 5.17 (the router loss's mask
            # has the prompt's length, the logits one step's): then compare tokens without the router loss.
            patch.config.output_router_logits = stock.config.output_router_logits = False
            outputs = [generated(model, ids, **kwargs) for model in (patch, stock)]
            assert isinstance(outputs[1], list) and outputs[0] == outputs[1]

    patch.config.patch_size = K
    for cache in ({"cache": DynamicCache()}, {"past_key_values": DynamicCache()}, {"use_cache": True}):
        with pytest.raises(ValueError, match=r"K=4.*no key-value cache"):
            patch(random_ids(1, 8), **cache)


def test_llama_member_and_pickle():
    """PatchLlamaForCausalLM is the Llama member of the family; dynamic classes are module attributes, so a
    patch model pickles (and a fresh lookup of `Patch<Name>` builds the class)."""
    import modeling_llama_patch

    assert patch_model_class(LlamaForCausalLM) is PatchLlamaForCausalLM
    qwen = AutoPatchModelForCausalLM.from_config(tiny_config("qwen2", patch_size=K))
    assert modeling_llama_patch.PatchQwen2ForCausalLM is type(qwen)
    clone = pickle.loads(pickle.dumps(qwen))
    assert type(clone) is type(qwen) and clone.patch_size == K


def test_refusals_are_one_clear_line():
    """Encoder-decoder, encoder-as-decoder, no inputs_embeds, a config that owns patch_size, remote code: each a
    one-line UnsupportedModelError (a ValueError)."""
    from transformers import BertConfig, BertLMHeadModel, CpmAntForCausalLM

    cases = [
        (lambda: AutoPatchModelForCausalLM.from_config(tiny_config("bert")), "encoder with bidirectional"),
        (lambda: patch_model_class(CpmAntForCausalLM), "takes no `inputs_embeds`"),
        (lambda: AutoPatchModelForCausalLM.from_config(tiny_config("llama"), trust_remote_code=True), "remote"),
        (lambda: patch_model_class(dict), "not a transformers PreTrainedModel"),
    ]
    for build, message in cases:
        with pytest.raises(UnsupportedModelError, match=message) as error:
            build()
        assert isinstance(error.value, ValueError) and "\n" not in str(error.value)
    # an encoder as a decoder (is_decoder=True) is causal, and accepted
    assert isinstance(patch_model_class(BertLMHeadModel)(BertConfig(**{**SMALL_BERT, "is_decoder": True})), BertLMHeadModel)


SMALL_BERT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


# Configs that carry an `is_decoder` attribute for reasons other than being an encoder: GPT-NeoX and
# GPT-NeoX-Japanese declare it (always False) in transformers 5.x, and any decoder-only config may carry it when a
# checkpoint's config.json or a user sets it. Each is a decoder-only model, whatever the attribute says.
IS_DECODER_CARRIERS = [
    ("gpt_neox", {}), ("gpt_neox_japanese", {}), ("llama", {"is_decoder": False}), ("qwen2", {"is_decoder": False}),
    ("mistral", {"is_decoder": True}), ("gpt2", {"is_decoder": False}),
]


@pytest.mark.parametrize("model_type, extra", IS_DECODER_CARRIERS)
def test_a_decoder_whose_config_carries_is_decoder_is_accepted(model_type, extra):
    """Decoder-only-ness is decided by what the family is (transformers maps it as a masked LM, or not), not by
    which attributes its config carries: each of these is accepted by `check_supported`, by
    `AutoPatchModelForCausalLM.from_config`, and by the patch class, and its patch logits are causal.
    (Regression: a config class with an `is_decoder` attribute was taken for an encoder, and GPT-NeoX refused.)"""
    config = tiny_config(model_type)
    for name, value in extra.items():
        setattr(config, name, value)
    assert model_type in modeling_llama_patch.SUPPORTED_ARCHITECTURES
    assert hasattr(config, "is_decoder") and not modeling_llama_patch.is_encoder_family(model_type)
    patch_class = modeling_llama_patch.check_supported(config)
    model = AutoPatchModelForCausalLM.from_config(copy.deepcopy(config)).eval()
    assert type(model) is patch_class
    model.config.patch_size = K
    ids = random_ids(2, 4 * K)
    later = ids.clone()
    later[:, -K:] = random_ids(2, K, seed=99)
    with torch.no_grad():
        torch.testing.assert_close(model(later).logits[:, :-1], model(ids).logits[:, :-1], **FP32_TOL)


@pytest.mark.parametrize("model_type", ["bert", "roberta", "xlm-roberta", "electra", "camembert"])
def test_an_encoder_family_is_refused_unless_configured_as_a_decoder(model_type):
    """A family transformers also maps as a masked LM is an encoder: refused in one line naming is_decoder, whether
    or not its config class declares the attribute (XLM's does not); with is_decoder=True (where the class has
    it), its causal-LM head is causal and the patch class accepts it."""
    config = tiny_config(model_type)
    assert modeling_llama_patch.is_encoder_family(model_type)
    for build in (lambda: modeling_llama_patch.check_supported(config),
                  lambda: AutoPatchModelForCausalLM.from_config(copy.deepcopy(config))):
        with pytest.raises(UnsupportedModelError, match=r"encoder with bidirectional attention unless "
                                                       r"config\.is_decoder=True") as error:
            build()
        assert "\n" not in str(error.value) and model_type in str(error.value)
    config.is_decoder = True
    stock_class = type(AutoModelForCausalLM.from_config(config))
    assert isinstance(patch_model_class(stock_class)(config), stock_class)


def test_an_encoder_family_is_one_whether_or_not_its_config_declares_is_decoder():
    """XLM's config declares no `is_decoder`; transformers maps it as a masked LM, so the rule calls it an encoder
    all the same (its forward is refused first, for a loss outside `loss_function`)."""
    from transformers import XLMWithLMHeadModel

    config = tiny_config("xlm")
    assert not hasattr(config, "is_decoder") and modeling_llama_patch.is_encoder_family("xlm")
    with pytest.raises(UnsupportedModelError, match=r"'xlm'\) is an encoder with bidirectional attention"):
        modeling_llama_patch._check_config(XLMWithLMHeadModel, config)


def test_no_supported_type_turns_on_an_is_decoder_attribute():
    """For every listed type the installed transformers maps, `check_supported` accepts its config with and without
    an `is_decoder` attribute (False), and its decision rests on the model_type: the masked-LM families alone are
    encoders. (Regression: a config class that declares `is_decoder`, as GPT-NeoX's does, was refused.)"""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    checked = 0
    for model_type in sorted(set(SUPPORTED_ARCHITECTURES) & set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)):
        assert not modeling_llama_patch.is_encoder_family(model_type), model_type
        config = CONFIG_MAPPING[model_type]()
        modeling_llama_patch.check_supported(config)
        config.is_decoder = False
        modeling_llama_patch.check_supported(config)
        checked += 1
    assert checked >= len(FAMILIES)
    assert all(modeling_llama_patch.is_encoder_family(t) == (t in MODEL_FOR_MASKED_LM_MAPPING_NAMES)
               for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def test_unlisted_types_are_refused_for_training_and_warned_in_the_library(caplog, monkeypatch):
    """`check_supported` (run_clm.py's path) refuses a model_type the supported list lacks in one line naming the
    list; `AutoPatchModelForCausalLM` still wraps it, with one warning that it is untested."""
    model_type = "bert-generation"  # a causal-LM mapping of transformers' that is not on the list
    assert model_type not in SUPPORTED_ARCHITECTURES and not modeling_llama_patch.is_encoder_family(model_type)
    config = tiny_config(model_type, is_decoder=True)
    with pytest.raises(UnsupportedModelError, match=r"'bert-generation' is not in the supported list "
                                                   r"\(patch_training/architectures\.txt") as error:
        modeling_llama_patch.check_supported(config)
    assert "\n" not in str(error.value)
    monkeypatch.setattr(modeling_llama_patch, "_LOGGED", set())
    caplog.clear()
    with caplog.at_level("WARNING"):
        AutoPatchModelForCausalLM.from_config(copy.deepcopy(config))
        AutoPatchModelForCausalLM.from_config(copy.deepcopy(config))
    said = [r.getMessage() for r in caplog.records if "not in the supported list" in r.getMessage()]
    assert len(said) == 1 and "'bert-generation'" in said[0]


# ---------------------------------------------------------------------------------------------------------
# The supported list: its file, the fused-loss table drawn from it, its page, the tested range
# ---------------------------------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_supported_list_file_reads_and_refuses_bad_lines():
    """The file's format (model_type [since=X.Y] [fused_loss [argument=attribute ...]], # comments) and a one-line
    error naming file and line for each kind of bad line."""
    from modeling_llama_patch import (
        SupportedArchitecture,
        parse_supported_architectures,
    )

    text = "# comment\n\nllama fused_loss\ngemma2 fused_loss softcap=final_logit_softcapping  # note\nolmo3 since=5.19\n"
    assert parse_supported_architectures(text) == {
        "llama": SupportedArchitecture("llama", None, {}),
        "gemma2": SupportedArchitecture("gemma2", None, {"softcap": "final_logit_softcapping"}),
        "olmo3": SupportedArchitecture("olmo3", (5, 19), None),
    }
    bad = {
        "llama\nllama": r"list:2: model_type 'llama' is listed twice",
        "gemma2 softcap=final_logit_softcapping": r"list:1: cannot read 'softcap=final_logit_softcapping'",
        "olmo3 since=five": r"list:1: since=five is not a release number",
        "llama fused": r"list:1: cannot read 'fused'",
        "llama fused_loss fused_loss": r"list:1: cannot read 'fused_loss'",
    }
    for text, message in bad.items():
        with pytest.raises(ValueError, match=message) as error:
            parse_supported_architectures(text, "list")
        assert "\n" not in str(error.value)


def test_fused_loss_table_is_drawn_from_the_supported_list():
    """One source of truth: FUSED_LOSS_ARCHITECTURES is the list's `fused_loss` entries, each a supported type;
    patch_training.models reads the same objects."""
    from patch_training import models

    assert FUSED_LOSS_ARCHITECTURES == {
        t: a.fused_loss for t, a in SUPPORTED_ARCHITECTURES.items() if a.fused_loss is not None
    }
    assert set(FUSED_LOSS_ARCHITECTURES) <= set(SUPPORTED_ARCHITECTURES) and FUSED_LOSS_ARCHITECTURES
    assert models.FUSED_LOSS_ARCHITECTURES is FUSED_LOSS_ARCHITECTURES and models.check_supported is \
        modeling_llama_patch.check_supported
    assert set(FAMILIES) <= set(SUPPORTED_ARCHITECTURES)


def test_supported_list_is_package_data():
    """The list is read through importlib.resources from inside the `patch_training` package, so an installed
    package (package data `architectures.txt`) finds it as a checkout does."""
    from importlib.resources import files

    resource = files("patch_training").joinpath(modeling_llama_patch.SUPPORTED_ARCHITECTURES_FILE)
    assert resource.is_file() and str(resource).startswith(str(REPO_ROOT / "patch_training"))
    assert modeling_llama_patch.parse_supported_architectures(resource.read_text()) == SUPPORTED_ARCHITECTURES


def test_docs_page_matches_the_list():
    """docs/architectures.md shows the supported list and the fused-loss table as the data has them, and the
    tested range as requirements.txt and .ci/run have it."""
    import re

    page = (REPO_ROOT / "docs" / "architectures.md").read_text(encoding="utf-8")
    listed = re.search(r"<!-- supported-list -->(.*?)<!-- /supported-list -->", page, re.DOTALL).group(1)
    assert re.findall(r"`([^`]+)`", listed) == sorted(SUPPORTED_ARCHITECTURES)
    fused = re.search(r"<!-- fused-loss -->(.*?)<!-- /fused-loss -->", page, re.DOTALL).group(1)
    rows = {}
    for row in re.findall(r"^\| `([^`]+)` \| (.*?) \|$", fused, re.MULTILINE):
        rows[row[0]] = dict(re.findall(r"`(\w+)` ← `(\w+)`", row[1]))
    assert rows == FUSED_LOSS_ARCHITECTURES
    oldest = re.search(r"^transformers>=([0-9.]+),<", (REPO_ROOT / "requirements.txt").read_text(), re.MULTILINE).group(1)
    assert f"transformers {oldest}" in page and "transformers>=" in (REPO_ROOT / ".ci" / "run").read_text()


def test_since_versions_are_newer_than_the_oldest_release():
    """A `since=` is only written where the type is newer than the oldest release requirements.txt allows."""
    import re

    oldest = re.search(r"^transformers>=([0-9.]+),<", (REPO_ROOT / "requirements.txt").read_text(), re.MULTILINE).group(1)
    oldest = tuple(int(part) for part in oldest.split("."))
    for model_type, architecture in SUPPORTED_ARCHITECTURES.items():
        assert architecture.since is None or architecture.since[:2] > oldest[:2], model_type

_LOADER = r"""
import importlib.util, json, sys
import torch, transformers

result = {"project_importable": importlib.util.find_spec("modeling_llama_patch") is not None}
for path in sys.argv[2:]:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    pipe = transformers.pipeline("text-generation", model=path, tokenizer=sys.argv[1])
    out = pipe("The quick brown fox", max_new_tokens=4, do_sample=False, return_tensors=True)
    result[path] = {"class": type(model).__name__, "problems": sum(len(v) for v in info.values()),
                    "generated": out[0]["generated_token_ids"]}
result["project_imported"] = "modeling_llama_patch" in sys.modules
print("RESULT " + json.dumps(result))
"""


def test_checkpoints_stay_stock(tmp_path, tokenizer, tokenizer_dir):
    """For each family, save_pretrained of a K = 4 model writes architectures = [the stock class name]; one fresh
    Python process that cannot import this project loads every checkpoint with AutoModelForCausalLM (the stock
    class, no missing or unexpected keys) and pipeline('text-generation') generates the stock greedy tokens."""
    expected, folders = {}, []
    prompt_ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    for model_type in FAMILIES:
        torch.manual_seed(0)
        patch = AutoPatchModelForCausalLM.from_config(tiny_config(model_type, vocab_size=32000, patch_size=K))
        folder = tmp_path / model_type
        patch.save_pretrained(folder)
        stock_name = type(patch).__mro__[2].__name__
        saved = json.loads((folder / "config.json").read_text())
        assert saved["architectures"] == [stock_name] and saved["patch_size"] == K
        patch.config.patch_size = 1
        generated = patch.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=4,
                                   do_sample=False, pad_token_id=0)
        expected[str(folder)] = (stock_name, generated[0].tolist())
        folders.append(str(folder))
        reloaded = AutoPatchModelForCausalLM.from_pretrained(folder)
        assert reloaded.patch_size == K and isinstance(reloaded, type(patch))

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    completed = subprocess.run([sys.executable, "-c", _LOADER, tokenizer_dir, *folders], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(completed.stdout.split("RESULT ", 1)[1])
    assert result["project_importable"] is False and result["project_imported"] is False
    for folder, (stock_name, tokens) in expected.items():
        assert result[folder] == {"class": stock_name, "problems": 0, "generated": tokens}, folder


# ---------------------------------------------------------------------------------------------------------
# The fused LM-head + K-way loss: exact where it is used by default
# ---------------------------------------------------------------------------------------------------------


def train_step(model, ids, labels, implementation: str):
    """(loss, offset losses, logits, gradients) of one training forward+backward with `implementation`."""
    model.loss_implementation = implementation
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks, if any
    out = model(ids, labels=labels, num_items_in_batch=torch.tensor(25))
    out.loss.backward()
    return out.loss.detach(), out.offset_losses, out.logits, grads(model)


@pytest.mark.parametrize("model_type", sorted(FUSED_LOSS_ARCHITECTURES))
@pytest.mark.parametrize("patch_size", [1, K])
def test_fused_loss_equals_the_stock_head(model_type, patch_size):
    """Training with the fused LM-head loss (the default where it is exact) gives the loss, per-offset losses and
    gradients of the stock head followed by the chunked K-way loss, without returning logits."""
    assert model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    _, patch = build_pair(model_type, patch_size)
    if getattr(patch.config, "final_logit_softcapping", None):  # gemma2 (30.0); soft-capping inside the chunks
        assert fused_loss_arguments(patch.config) == {"softcap": patch.config.final_logit_softcapping}
    patch.train()
    ids = random_ids(2, 4 * K)
    labels = ids.clone()
    labels[0, 5] = labels[1, 9] = IGNORE_INDEX
    loss, offsets, logits, gradients = train_step(patch, ids, labels, "fused")
    ref_loss, ref_offsets, ref_logits, ref_gradients = train_step(patch, ids, labels, "unfused")
    assert logits is None and ref_logits is not None
    torch.testing.assert_close(loss, ref_loss, **FP32_TOL)
    torch.testing.assert_close(offsets, ref_offsets, **FP32_TOL)
    assert_grads_close(gradients, ref_gradients)
    patch.eval()  # evaluation returns logits, as before
    assert patch(ids, labels=labels).logits is not None


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
@pytest.mark.parametrize("patch_size", [1, K])
def test_fused_loss_under_regional_compilation(model_type, patch_size, caplog, monkeypatch):
    """accelerate's regional compilation (`--torch_compile_regions`) wraps each leaf module outside the repeated
    blocks in its own torch.compile, the LM head included. The fused loss looks through that wrapper: it is still
    used (no logits, no fallback line), with the loss and gradients of the uncompiled model's stock head and
    chunked K-way loss. (Regression: on an H200 the wrapped head sent every regional run to the unfused path.)"""
    from accelerate.utils import compile_regions

    _, patch = build_pair(model_type, patch_size)
    patch.train()
    ids = random_ids(2, 4 * K)
    labels = ids.clone()
    labels[0, 5] = IGNORE_INDEX
    ref_loss, ref_offsets, _, ref_gradients = train_step(patch, ids, labels, "unfused")
    patch.loss_implementation = "auto"  # the default; compile_regions copies the attributes
    torch._dynamo.reset()
    compiled = compile_regions(patch, backend="eager")
    assert isinstance(compiled.get_output_embeddings(), torch._dynamo.eval_frame.OptimizedModule)
    monkeypatch.setattr(modeling_llama_patch, "_LOGGED", set())
    with caplog.at_level("WARNING"):
        patch.zero_grad(set_to_none=True)
        out = compiled(ids, labels=labels, num_items_in_batch=torch.tensor(25))
        out.loss.backward()
    torch._dynamo.reset()
    assert compiled.loss_implementation == "auto" and out.logits is None
    assert not [r for r in caplog.records if "fused LM-head loss" in r.getMessage()]
    torch.testing.assert_close(out.loss.detach(), ref_loss, **FP32_TOL)
    torch.testing.assert_close(out.offset_losses, ref_offsets, **FP32_TOL)
    assert_grads_close(grads(patch), ref_gradients)


def test_a_head_that_is_not_a_linear_falls_back_naming_its_type(caplog, monkeypatch):
    """A head that is not a Linear (after looking through torch.compile) uses the stock head under "auto", with
    one log line naming its type."""
    _, patch = build_pair("llama", K)
    patch.train()

    class ScaledHead(torch.nn.Module):  # a head with its own forward: the fused loss would skip it
        def __init__(self, linear):
            super().__init__()
            self.linear = linear

        def forward(self, hidden):
            return self.linear(hidden) * 0.5

    patch.lm_head = ScaledHead(patch.lm_head)
    ids = random_ids(2, 4 * K)
    monkeypatch.setattr(modeling_llama_patch, "_LOGGED", set())
    with caplog.at_level("WARNING"):
        out = patch(ids, labels=ids)
    assert out.logits is not None
    said = [r.getMessage() for r in caplog.records if "fused LM-head loss" in r.getMessage()]
    assert said == ["fused LM-head loss: the output head is a ScaledHead, not a Linear; using the stock head and the "
                    "chunked K-way loss"]


def test_fused_loss_falls_back_where_it_is_not_exact(caplog, monkeypatch):
    """An architecture whose forward adds to its loss (MoE router loss) uses the stock head under "auto", with
    one log line; "fused" refuses it in one line."""
    _, patch = build_pair("mixtral", K)
    patch.train()
    ids = random_ids(2, 4 * K)
    monkeypatch.setattr(modeling_llama_patch, "_LOGGED", set())
    with caplog.at_level("WARNING"):
        out = patch(ids, labels=ids)
        patch(ids, labels=ids)
    assert out.logits is not None and out.aux_loss is not None
    said = [r.getMessage() for r in caplog.records if "fused LM-head loss" in r.getMessage()]
    assert said == ["fused LM-head loss: not exact for model_type 'mixtral'; using the stock head and the chunked "
                    "K-way loss"]
    patch.loss_implementation = "fused"
    with pytest.raises(UnsupportedModelError, match="not exact for model_type 'mixtral'") as error:
        patch(ids, labels=ids)
    assert "\n" not in str(error.value)
