#!/usr/bin/env python
"""Patch-level then token-level training of a Llama causal LM, in one launch.

A fork of the shape of transformers' `examples/pytorch/language-modeling/run_clm.py` (argument dataclasses
parsed by `HfArgumentParser`; a lone `*.json` argument is a config file) that adds patch-level training
(Shao, Meng, Zhou, ICLR 2025, arXiv:2407.12665):

1. the first fraction λ (`--patch_data_fraction`) of the training tokens is read in patches of K
   (`--patch_size`) tokens: sequences of K*T tokens, T patches each, K-way next-patch loss;
2. only the weights are kept (`<output_dir>/patch_stage/`); with a fresh optimizer, scheduler and trainer
   state, ordinary token-level training (K = 1, sequences of T tokens) runs on the remaining 1 - λ.

Relative cost λ/K + 1 - λ of a token-level run on the same tokens. λ = 0 is the token-level baseline.

Works under `python`, `torchrun`, `accelerate launch` and `deepspeed`. Re-running the same command resumes
an interrupted job; re-running a finished one reports its results and changes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (
    AutoTokenizer,
    HfArgumentParser,
    LlamaConfig,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.utils import is_liger_kernel_available

from modeling_llama_patch import PatchLlamaForCausalLM, get_patch_size, loss_target_labels, validate_patch_size

logger = logging.getLogger("run_clm")

SUPPORTED_EXTENSIONS = (".txt", ".json", ".jsonl")
COMPRESSION_SUFFIXES = (".gz", ".xz", ".bz2")
CACHE_FORMAT_VERSION = 1
PATCH_STAGE_DIR = "patch_stage"
STAGE_COMPLETE_FILE = "stage_complete.json"
RUN_ARGS_FILE = "run_args.json"
ALL_RESULTS_FILE = "all_results.json"


class UsageError(ValueError):
    """Bad input from the user: reported as one clear line and exit code 2, before any work is lost."""


def refuse_below(arguments, names: tuple[str, ...], minimum: int) -> None:
    """UsageError naming the first of the `arguments` fields `names` set below `minimum` (None: unset, fine)."""
    for name in names:
        value = getattr(arguments, name)
        if value is not None and value < minimum:
            raise UsageError(f"--{name} must be >= {minimum}, got {value}")


def first_line(error: Exception) -> str:
    """The first line of an exception's message (library messages can run to many lines)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# ---------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    """Which model to train: a Llama config to start from scratch, or weights to continue from."""

    config_name: str | None = field(
        default=None,
        metadata={"help": "A LlamaConfig JSON file or folder (e.g. configs/model/llama-370m.json): train from scratch."},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A checkpoint folder to start from instead of random weights (e.g. a patch-stage model)."},
    )
    tokenizer_name: str = field(
        default="data/llama2_tokenizer",
        metadata={"help": "Tokenizer folder or hub name (default: the bundled LLaMA-2 tokenizer, vocab 32000)."},
    )
    attn_implementation: str = field(
        default="auto",
        metadata={
            "help": "eager, sdpa, flash_attention_2, or auto: FlashAttention-2 when flash_attn imports on a CUDA "
            "machine, else SDPA."
        },
    )

    def __post_init__(self):
        if self.config_name is None and self.model_name_or_path is None:
            raise UsageError("give --config_name (a LlamaConfig JSON, to train from scratch) or --model_name_or_path")
        if self.attn_implementation not in ("auto", "eager", "sdpa", "flash_attention_2"):
            raise UsageError(
                f"--attn_implementation must be auto, eager, sdpa or flash_attention_2, got {self.attn_implementation!r}"
            )


@dataclass
class DataArguments:
    """What to train and evaluate on, and how it is cut into blocks."""

    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Training text: .txt (a document per line), .jsonl/.json (a JSON object per line, or one JSON list) "
            "files, optionally .gz/.xz/.bz2 compressed, comma-separated "
            "(or a JSON list in a config file)."
        },
    )
    validation_file: str | None = field(
        default=None,
        metadata={"help": "Validation text for token-level perplexity (e.g. data/wikitext-103-test.jsonl)."},
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A hub dataset name, instead of --train_file."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The hub dataset's configuration."})
    dataset_split: str = field(default="train", metadata={"help": "The split of --dataset_name to train on."})
    text_column_name: str = field(default="text", metadata={"help": "The column (JSON key) holding the text."})
    block_size: int = field(
        default=2048,
        metadata={"help": "T, the token-level context. The patch stage reads K*T tokens per sequence (T patches)."},
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Read and tokenise the training data on the fly (corpora that do not fit on disk). Needs "
            "--max_steps, which then fixes the token budget that λ splits."
        },
    )
    data_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where tokenised data is cached (one folder per data set and tokenizer). Default: "
            "$HF_HOME/patch_level_tokens or ~/.cache/huggingface/patch_level_tokens."
        },
    )
    tokenize_batch_size: int = field(default=1000, metadata={"help": "Documents per tokenizer call."})
    preprocessing_num_workers: int = field(
        default=1,
        metadata={"help": "Processes that tokenise several training files in parallel, one file each (same cache)."},
    )
    max_eval_blocks: int | None = field(
        default=None, metadata={"help": "Evaluate on at most this many validation blocks (quick runs)."}
    )
    skip_data_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Skip the first fraction of the training budget (an ablation: token-level training on only "
            "the data that the token stage of a patch run sees)."
        },
    )

    def __post_init__(self):
        if self.train_file is None and self.dataset_name is None:
            raise UsageError("give --train_file (local text files) or --dataset_name (a hub dataset)")
        if self.block_size < 2:
            raise UsageError(f"--block_size must be >= 2 (a block of one position has no next token to predict), got {self.block_size}")
        if not 0.0 <= self.skip_data_fraction < 1.0:
            raise UsageError(f"--skip_data_fraction must lie in [0, 1), got {self.skip_data_fraction}")
        refuse_below(self, ("max_eval_blocks", "preprocessing_num_workers", "tokenize_batch_size"), 1)


@dataclass
class PatchArguments:
    """Patch-level training (the paper's K and λ) and the patch stage's own optimisation settings.

    Unset per-stage values follow the paper: the same tokens per optimizer step as the token stage (the
    batch, counted in sequences of K*T tokens, is K times smaller), the same optimizer settings, and a
    learning-rate schedule restarted with its own warmup."""

    patch_size: int = field(default=1, metadata={"help": "K, the number of tokens per patch in the patch stage."})
    patch_data_fraction: float = field(
        default=0.0,
        metadata={
            "help": "λ, the fraction of the training data used at patch level: 0 = token-level baseline, "
            "0 < λ < 1 = both stages, 1 = patch stage only."
        },
    )
    patch_per_device_train_batch_size: int | None = field(
        default=None, metadata={"help": "Patch-stage micro-batch in sequences of K*T tokens (default: see above)."}
    )
    patch_gradient_accumulation_steps: int | None = field(
        default=None, metadata={"help": "Patch-stage gradient accumulation (default: the token stage's)."}
    )
    patch_learning_rate: float | None = field(default=None, metadata={"help": "Patch-stage peak learning rate."})
    patch_warmup_steps: float | None = field(
        default=None, metadata={"help": "Patch-stage warmup steps (a float < 1 is a ratio). Default: --warmup_steps."}
    )
    patch_max_steps: int | None = field(
        default=None,
        metadata={"help": "Stop the patch stage after this many optimizer steps (default: one pass over its data)."},
    )

    def __post_init__(self):
        try:
            self.patch_size = validate_patch_size(self.patch_size)
        except ValueError as error:
            raise UsageError(f"--patch_size: {error}") from None
        if not 0.0 <= self.patch_data_fraction <= 1.0:
            raise UsageError(f"--patch_data_fraction (λ) must lie in [0, 1], got {self.patch_data_fraction}")
        if self.patch_data_fraction > 0 and self.patch_size == 1:
            raise UsageError(
                f"--patch_data_fraction={self.patch_data_fraction} needs --patch_size K > 1: "
                "patch-level training with K = 1 is token-level training"
            )
        refuse_below(self, ("patch_per_device_train_batch_size", "patch_gradient_accumulation_steps", "patch_max_steps"), 1)
        refuse_below(self, ("patch_learning_rate", "patch_warmup_steps"), 0)

    @property
    def has_patch_stage(self) -> bool:
        return self.patch_data_fraction > 0

    @property
    def has_token_stage(self) -> bool:
        return self.patch_data_fraction < 1


@dataclass
class RunTrainingArguments(TrainingArguments):
    """transformers' TrainingArguments plus the job-level flag transformers 5 dropped, with two defaults
    changed so that the training step never waits on the host (see README, "Throughput"):

    - `logging_nan_inf_filter` is False: transformers' filter reads every micro-batch's loss on the host
      (`torch.isnan(loss)` in an `if`), a device synchronisation per micro-batch that stalls the GPU while
      the CPU runs the optimizer step and fetches the next batch. Without it a NaN or inf loss shows in
      the logged loss instead of being hidden, which is what a pre-training run wants to see anyway.
    - on a CUDA machine with pinned memory, `accelerator_config` defaults to {"non_blocking": true}: the
      host-to-device copy of a batch overlaps the step instead of waiting for it. Without an accelerator,
      memory is not pinned.

    `liger_kernel_config` also takes a JSON string (transformers' parser takes no value for it on the command
    line), and is checked against Liger's switches for Llama when `use_liger_kernel` is set.
    """

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Delete what --output_dir holds and start again (otherwise a re-run resumes)."},
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={
            "help": "Replace NaN/inf losses by the running mean when logging (transformers' default True). False "
            "here: the filter syncs the device every micro-batch, and a pre-training run should see a NaN."
        },
    )

    liger_kernel_config: dict | str | None = field(
        default=None,
        metadata={
            "help": "With --use_liger_kernel: Liger-Kernel's switches for Llama as a JSON object, e.g. "
            '\'{"fused_linear_cross_entropy": false}\' (keys: rope, rms_norm, swiglu, cross_entropy, '
            "fused_linear_cross_entropy; liger's defaults when unset). The patch stage always turns the two loss "
            "switches off and keeps its K-way loss."
        },
    )

    def __post_init__(self):
        if isinstance(self.liger_kernel_config, str):
            try:
                self.liger_kernel_config = json.loads(self.liger_kernel_config)
            except json.JSONDecodeError as error:
                raise UsageError(f"--liger_kernel_config is not valid JSON: {error}") from None
        if not torch.accelerator.is_available():
            self.dataloader_pin_memory = False  # nothing to pin for (torch would warn on every data loader)
        if self.accelerator_config is None and self.dataloader_pin_memory and not self.use_cpu and torch.cuda.is_available():
            self.accelerator_config = {"non_blocking": True}
        if self.use_liger_kernel:
            check_liger_kernel_config(self.liger_kernel_config)
        super().__post_init__()
        check_training_numbers(self)


def check_training_numbers(args: TrainingArguments) -> None:
    """Refuse the numbers that transformers lets through but that would fail deep inside torch once training
    starts (a batch of 0, Adam's betas outside [0, 1)) or silently do something else than asked (a negative
    weight decay grows the weights, a negative clipping norm turns clipping off, --save_steps 0 saves no
    checkpoint until the end)."""
    refuse_below(args, ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"), 1)
    refuse_below(args, ("learning_rate", "weight_decay", "adam_epsilon"), 0)
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise UsageError(f"--{name} must lie in [0, 1), got {getattr(args, name)}")
    if args.max_grad_norm is not None and args.max_grad_norm < 0:
        raise UsageError(f"--max_grad_norm must be >= 0 (0 turns gradient clipping off), got {args.max_grad_norm}")
    if args.save_strategy == "steps" and args.save_steps <= 0:
        raise UsageError(
            f"--save_steps must be > 0 (steps, or a fraction of the run below 1), got {args.save_steps}: with "
            "--save_strategy steps, 0 would save no checkpoint before the end of each stage"
        )


# The switches of Liger-Kernel's `apply_liger_kernel_to_llama` (liger silently drops any other key).
LIGER_LLAMA_SWITCHES = ("rope", "rms_norm", "swiglu", "cross_entropy", "fused_linear_cross_entropy")
# The switches that replace the model's loss (`fused_linear_cross_entropy` replaces its whole forward):
# token-level losses, so they are turned off in the patch stage, which keeps its K-way loss.
LIGER_LOSS_SWITCHES = ("cross_entropy", "fused_linear_cross_entropy")


def check_liger_kernel_config(liger_kernel_config: dict | None) -> None:
    """Refuse a `--liger_kernel_config` that Liger-Kernel would silently ignore (unknown keys) or reject."""
    config = liger_kernel_config or {}
    if not isinstance(config, dict):
        raise UsageError(f"--liger_kernel_config must be a JSON object of switches, got {config!r}")
    unknown = sorted(set(config) - set(LIGER_LLAMA_SWITCHES))
    if unknown:
        raise UsageError(
            f"--liger_kernel_config has unknown keys for Llama: {', '.join(unknown)} (known: {', '.join(LIGER_LLAMA_SWITCHES)})"
        )
    not_bool = sorted(key for key, value in config.items() if not isinstance(value, bool))
    if not_bool:
        raise UsageError(f"--liger_kernel_config: {', '.join(not_bool)} must be true or false")
    if config.get("cross_entropy") and config.get("fused_linear_cross_entropy", True):
        raise UsageError(
            "--liger_kernel_config: cross_entropy and fused_linear_cross_entropy cannot both be true "
            "(fused_linear_cross_entropy defaults to true: set it to false to use cross_entropy)"
        )


def check_liger_environment(use_cpu: bool) -> None:
    """Refuse `--use_liger_kernel` where it cannot run: Liger-Kernel is Triton code for GPUs."""
    if use_cpu or not torch.cuda.is_available():
        raise UsageError(
            "--use_liger_kernel needs a CUDA (or ROCm) GPU: Liger-Kernel's kernels are Triton GPU code, and "
            + ("--use_cpu is set" if use_cpu else "torch sees no GPU on this machine")
        )
    if not is_liger_kernel_available():
        raise UsageError("--use_liger_kernel: liger-kernel is not installed (pip install -r requirements-gpu.txt)")


def liger_config_for_stage(liger_kernel_config: dict | None, patch_size: int) -> dict | None:
    """The Liger-Kernel switches of a stage. Liger's loss kernels compute the token-level loss (the fused
    one by replacing the model's forward, which would also skip the patching), so at K > 1 they are off:
    the patch stage gets Liger's RoPE, RMSNorm and SwiGLU kernels and keeps the K-way loss."""
    if patch_size == 1:
        return liger_kernel_config
    return {**(liger_kernel_config or {}), **{switch: False for switch in LIGER_LOSS_SWITCHES}}


def torch_compile_caveat(training_args: TrainingArguments) -> str | None:
    """A warning for `--torch_compile` under DeepSpeed ZeRO-3, whose per-module parameter hooks dynamo traces
    and recompiles for every module until its recompile limit, then runs eagerly (None otherwise)."""
    config = getattr(training_args, "hf_deepspeed_config", None)
    stage = config.config.get("zero_optimization", {}).get("stage") if config is not None else None
    if not training_args.torch_compile or stage != 3:
        return None
    return ("--torch_compile under DeepSpeed ZeRO-3: torch.compile traces ZeRO-3's per-module parameter hooks, "
            "recompiles them module by module and, past its recompile limit (8), runs them eagerly: the job is "
            "correct but only partly compiled (deepspeed 0.19.8, torch 2.13). ZeRO-2 or DDP compile fully.")


ARGUMENT_CLASSES = (ModelArguments, DataArguments, PatchArguments, RunTrainingArguments)


def check_config_types(values: dict, source: str) -> None:
    """Refuse a config value of the wrong type (e.g. "block_size": "2048") with a message naming the key."""
    import types
    import typing

    expected_types = {}
    for cls in ARGUMENT_CLASSES:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            annotation = hints.get(f.name)
            options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union else (annotation,)
            expected_types[f.name] = options
    for key, value in values.items():
        options = expected_types.get(key, ())
        simple = [t for t in options if t in (int, float, bool, str, type(None))]
        if len(simple) != len(options) or not simple:
            continue  # enums, lists, dicts: left to transformers' own checks
        if value is None and type(None) in simple:
            continue
        accepted = isinstance(value, bool) if bool in simple else False
        accepted |= str in simple and isinstance(value, str)
        accepted |= int in simple and isinstance(value, int) and not isinstance(value, bool)
        accepted |= float in simple and isinstance(value, (int, float)) and not isinstance(value, bool)
        if not accepted:
            names = " or ".join(t.__name__ for t in simple if t is not type(None))
            raise UsageError(f"config file {source}: key {key!r} must be {names}, got {value!r}")


def load_config_file(path: str) -> dict:
    """The values of a JSON config file, checked: it exists, parses, has only known keys of the right types."""
    if not Path(path).is_file():
        raise UsageError(f"config file {path} does not exist")
    with open(path, encoding="utf-8") as handle:
        try:
            values = json.load(handle)
        except json.JSONDecodeError as error:
            raise UsageError(f"config file {path} is not valid JSON: {error}") from None
    if not isinstance(values, dict):
        raise UsageError(f"config file {path} must hold a JSON object of arguments")
    known = {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"config file {path} has unknown keys: {', '.join(unknown)}")
    for key in ("train_file", "validation_file"):
        if isinstance(values.get(key), list):
            values[key] = ",".join(values[key])
    check_config_types(values, path)
    return values


def parse_arguments(argv: list[str] | None = None):
    """Parse the command line: flags, a lone `*.json` config file, or a config file followed by flags that
    override its values (`run_clm.py configs/train/x.json --output_dir runs/y`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    try:
        if argv and argv[0].endswith(".json") and not argv[0].startswith("-"):
            values = load_config_file(argv[0])
            if len(argv) == 1:
                return parser.parse_dict(values)
            parser.set_defaults(**values)  # the flags after the file override it
        else:
            argv = [""] + argv
        return parser.parse_args_into_dataclasses(args=argv[1:])
    except UsageError:
        raise
    except ValueError as error:  # transformers' own argument checks (e.g. --bf16 without a GPU): one line
        raise UsageError(str(error).strip()) from error


# ---------------------------------------------------------------------------------------------------------
# Data: files -> token stream cached on disk -> blocks
# ---------------------------------------------------------------------------------------------------------


def split_file_list(spec: str) -> list[str]:
    """'a.jsonl,b.jsonl' or a JSON list '["a.jsonl", "b.jsonl"]' -> list of paths."""
    spec = spec.strip()
    if spec.startswith("["):
        try:
            paths = json.loads(spec)
        except json.JSONDecodeError as error:
            raise UsageError(f"file list {spec!r} is not a valid JSON list ({error})") from None
        return [str(p) for p in paths]
    return [part.strip() for part in spec.split(",") if part.strip()]


def file_format(path: str) -> str:
    """'text' or 'json' from the extension (compression suffixes allowed); UsageError otherwise."""
    name = path.lower()
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    if name.endswith(".txt"):
        return "text"
    if name.endswith((".json", ".jsonl")):
        return "json"
    raise UsageError(
        f"unsupported extension for {path}: use one of {', '.join(SUPPORTED_EXTENSIONS)} "
        f"(optionally compressed: {', '.join(COMPRESSION_SUFFIXES)})"
    )


def check_data_files(spec: str, argument: str) -> tuple[list[str], str]:
    """Resolve and check a file list: exists, readable, one supported format. Returns (paths, format)."""
    paths = split_file_list(spec)
    if not paths:
        raise UsageError(f"--{argument} names no file")
    formats = set()
    for path in paths:
        if not os.path.isfile(path):
            raise UsageError(f"--{argument}: file {path} does not exist")
        if not os.access(path, os.R_OK):
            raise UsageError(f"--{argument}: file {path} is not readable")
        formats.add(file_format(path))
    if len(formats) > 1:
        raise UsageError(f"--{argument}: mix of text and JSON files ({', '.join(paths)}); use one format")
    return [os.path.abspath(p) for p in paths], formats.pop()


def open_text(path: str):
    """Open a text file for reading, decompressing .gz/.xz/.bz2 on the fly."""
    import bz2
    import gzip
    import lzma

    openers = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
    opener = openers.get(os.path.splitext(path)[1].lower(), open)
    return opener(path, "rt", encoding="utf-8")


def iter_local_documents(paths: list[str], fmt: str, text_column: str) -> Iterator[dict]:
    """Documents of local files, read lazily in order: a .txt line, or a JSON object of a .jsonl line (a .json
    file may also hold one JSON list of objects). The text column must exist and hold text (or null: skipped);
    errors name file and line, including a file that is not UTF-8 or a damaged compressed file."""
    import lzma

    for path in paths:
        try:
            yield from _documents_of_file(path, fmt, text_column)
        except UnicodeDecodeError as error:
            raise UsageError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start} of its text)") from None
        except (EOFError, lzma.LZMAError, OSError) as error:  # a truncated .gz/.xz/.bz2, or plain text named .gz
            raise UsageError(f"{path} cannot be read: {first_line(error)} (a damaged or mislabelled compressed file?)") from None


def _documents_of_file(path: str, fmt: str, text_column: str) -> Iterator[dict]:
    with open_text(path) as handle:
        if fmt == "text":
            for line in handle:
                line = line.rstrip("\n")
                if line.strip():
                    yield {text_column: line}
            return
        first = handle.read(1)
        while first and first.isspace():
            first = handle.read(1)
        if first == "[":  # one JSON list
            try:
                records = json.loads(first + handle.read())
            except json.JSONDecodeError as error:
                raise UsageError(f"{path}: not a valid JSON list ({error})") from None
            numbered = enumerate(records, start=1)
        else:
            numbered = _json_lines(first, handle)
        for number, record in numbered:
            if not isinstance(record, dict) or text_column not in record:
                keys = list(record) if isinstance(record, dict) else type(record).__name__
                raise UsageError(f"{path}, record {number}: no {text_column!r} field (found {keys}); set --text_column_name")
            if record[text_column] is not None and not isinstance(record[text_column], str):
                raise UsageError(
                    f"{path}, record {number}: its {text_column!r} is a {type(record[text_column]).__name__}, not text"
                )
            yield record


def _json_lines(first: str, handle) -> Iterator[tuple[int, dict]]:
    """(line number, object) of a JSON-lines file whose first character was already read."""
    for number, line in enumerate(_prepend(first, handle), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(f"{handle.name}, line {number}: not valid JSON ({error})") from None


def _prepend(first: str, handle) -> Iterator[str]:
    if first:
        yield first + handle.readline()
    yield from handle


def load_documents(paths: list[str] | None, fmt: str | None, data_args: DataArguments, streaming: bool = True):
    """An iterable of documents: local files read lazily, or a hub dataset through `datasets`."""
    if paths is not None:
        return iter_local_documents(paths, fmt, data_args.text_column_name)
    import datasets

    try:
        dataset = datasets.load_dataset(
            data_args.dataset_name, data_args.dataset_config_name, split=data_args.dataset_split, streaming=streaming
        )
    except (ConnectionError, OSError, ValueError) as error:  # not found, offline, a wrong split or config name
        raise UsageError(f"--dataset_name {data_args.dataset_name}: {first_line(error)}") from None
    columns = dataset.column_names if dataset.column_names is not None else list(next(iter(dataset)).keys())
    if data_args.text_column_name not in columns:
        raise UsageError(
            f"--text_column_name {data_args.text_column_name!r} is not a column of the data (columns: {columns})"
        )
    return dataset


def iter_document_tokens(documents, tokenizer, text_column: str, batch_size: int) -> Iterator[list[int]]:
    """Token ids of each document: the tokenizer's own special tokens (BOS for LLaMA), the text, then EOS."""
    eos = tokenizer.eos_token_id
    batch: list[str] = []

    def encode(texts):
        for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
            yield ids + [eos] if eos is not None else ids

    for example in documents:
        text = example[text_column]
        if text:
            batch.append(text)
        if len(batch) >= batch_size:
            yield from encode(batch)
            batch = []
    if batch:
        yield from encode(batch)


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def cache_key(sources: list[str], tokenizer, text_column: str) -> str:
    """A hash of what the token stream depends on: the data (path, size, mtime), the tokenizer, the column."""
    digest = hashlib.sha256()
    digest.update(f"v{CACHE_FORMAT_VERSION}|{text_column}|".encode())
    for source in sources:
        if os.path.isfile(source):
            stat = os.stat(source)
            digest.update(f"{source}|{stat.st_size}|{stat.st_mtime_ns}|".encode())
        else:
            digest.update(f"{source}|".encode())
    vocab = tokenizer.get_vocab()
    digest.update(json.dumps(sorted(vocab.items())).encode())
    digest.update(f"{tokenizer.bos_token_id}|{tokenizer.eos_token_id}|{type(tokenizer).__name__}".encode())
    return digest.hexdigest()[:20]


def default_cache_dir() -> str:
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return os.path.join(home, "patch_level_tokens")


def write_token_file(documents, tokenizer, text_column: str, batch_size: int, path: str) -> tuple[int, int]:
    """Append the token ids of `documents` to the flat binary file `path`. Returns (tokens, documents)."""
    dtype = token_dtype(len(tokenizer))
    num_tokens = num_documents = 0
    with open(path, "wb") as out:
        for ids in iter_document_tokens(documents, tokenizer, text_column, batch_size):
            out.write(np.asarray(ids, dtype=dtype).tobytes())
            num_tokens += len(ids)
            num_documents += 1
    return num_tokens, num_documents


def _tokenize_one_file(job: tuple) -> tuple[int, int]:
    """Worker of the parallel tokenisation: one local file into one part file."""
    path, fmt, tokenizer, text_column, batch_size, part = job
    return write_token_file(iter_local_documents([path], fmt, text_column), tokenizer, text_column, batch_size, part)


def tokenize_to_cache(
    documents, tokenizer, text_column: str, batch_size: int, folder: str,
    paths: list[str] | None = None, fmt: str | None = None, num_workers: int = 1,
) -> dict:
    """Tokenise every document once into `<folder>/tokens.bin` (flat uint16/uint32 stream) + `meta.json`.

    With several local `paths` and `num_workers` > 1, the files are tokenised in parallel processes, one file
    each, and their streams concatenated in order: the same bytes as one process. Written to a temporary
    folder and renamed, so an interrupted run never leaves a half-written cache.
    """
    tmp_folder = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_folder, ignore_errors=True)
    os.makedirs(tmp_folder)
    try:
        meta = _tokenize_into(tmp_folder, documents, tokenizer, text_column, batch_size, paths, fmt, num_workers)
    except BaseException:  # bad data, Ctrl-C: no half-written temporary folder left behind
        shutil.rmtree(tmp_folder, ignore_errors=True)
        raise
    if os.path.isdir(folder):  # another process finished first
        shutil.rmtree(tmp_folder)
    else:
        os.replace(tmp_folder, folder)
    return meta


def _tokenize_into(tmp_folder, documents, tokenizer, text_column, batch_size, paths, fmt, num_workers) -> dict:
    """The body of `tokenize_to_cache`: tokens.bin and meta.json in `tmp_folder`; returns the meta."""
    tokens_file = os.path.join(tmp_folder, "tokens.bin")
    start = time.time()
    if paths is not None and num_workers > 1 and len(paths) > 1:
        from concurrent.futures import ProcessPoolExecutor

        parts = [os.path.join(tmp_folder, f"part-{i:05d}.bin") for i in range(len(paths))]
        jobs = [(path, fmt, tokenizer, text_column, batch_size, part) for path, part in zip(paths, parts)]
        with ProcessPoolExecutor(max_workers=min(num_workers, len(paths))) as pool:
            counts = list(pool.map(_tokenize_one_file, jobs))
        with open(tokens_file, "wb") as out:
            for part in parts:
                with open(part, "rb") as handle:
                    shutil.copyfileobj(handle, out, 64 * 1024 * 1024)
                os.remove(part)
    else:
        counts = [write_token_file(documents, tokenizer, text_column, batch_size, tokens_file)]
    meta = {
        "num_tokens": sum(c[0] for c in counts),
        "num_documents": sum(c[1] for c in counts),
        "dtype": np.dtype(token_dtype(len(tokenizer))).name,
        "tokenize_seconds": round(time.time() - start, 2),
    }
    with open(os.path.join(tmp_folder, "meta.json"), "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=2)
    return meta


def load_token_stream(folder: str) -> np.memmap:
    with open(os.path.join(folder, "meta.json"), encoding="utf-8") as handle:
        meta = json.load(handle)
    if meta["num_tokens"] == 0:
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(os.path.join(folder, "tokens.bin"), dtype=meta["dtype"], mode="r", shape=(meta["num_tokens"],))


def cached_token_stream(paths, fmt, data_args: DataArguments, tokenizer, training_args) -> tuple[np.ndarray, str]:
    """The token stream of a data set, tokenised once (by the main process) and then read from the cache."""
    sources = paths if paths is not None else [f"hub:{data_args.dataset_name}:{data_args.dataset_config_name}:{data_args.dataset_split}"]
    cache_root = data_args.data_cache_dir or default_cache_dir()
    folder = os.path.join(cache_root, cache_key(sources, tokenizer, data_args.text_column_name))
    with training_args.main_process_first(desc="tokenisation"):
        if not os.path.isdir(folder):
            logger.info("Tokenising %s into %s", ", ".join(sources), folder)
            os.makedirs(cache_root, exist_ok=True)
            documents = load_documents(paths, fmt, data_args, streaming=True)
            meta = tokenize_to_cache(
                documents, tokenizer, data_args.text_column_name, data_args.tokenize_batch_size, folder,
                paths=paths, fmt=fmt, num_workers=data_args.preprocessing_num_workers,
            )
            logger.info("Tokenised %d documents into %d tokens in %.1fs", meta["num_documents"], meta["num_tokens"], meta["tokenize_seconds"])
        else:
            logger.info("Reading tokenised data from the cache %s", folder)
    return load_token_stream(folder), folder


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
    """Blocks of `block_len` tokens from documents tokenised on the fly: skips the first `skip_tokens` of
    the stream, then yields `num_blocks` blocks, re-reading the data if it runs out (next epoch).

    One stream: read by at most one data-loader worker (several would each yield every block; `main`
    refuses that, and `__iter__` raises if it happens anyway)."""

    def __init__(self, make_documents, tokenizer, data_args: DataArguments, skip_tokens: int, num_blocks: int, block_len: int):
        self.make_documents, self.tokenizer, self.data_args = make_documents, tokenizer, data_args
        self.skip_tokens, self.num_blocks, self.block_len = skip_tokens, num_blocks, block_len

    def __len__(self) -> int:
        return self.num_blocks

    def _stream(self) -> Iterator[int]:
        while True:
            produced = False
            for ids in iter_document_tokens(
                self.make_documents(), self.tokenizer, self.data_args.text_column_name, self.data_args.tokenize_batch_size
            ):
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


@dataclass
class StagePlan:
    """The tokens of one stage: stream offset, blocks and what is dropped (for the report)."""

    name: str
    patch_size: int
    block_len: int  # tokens per sequence: K*T (patch stage) or T (token stage)
    start_token: int
    budget_tokens: int
    num_blocks: int

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_len

    @property
    def positions(self) -> int:
        return self.tokens // self.patch_size

    @property
    def dropped_tokens(self) -> int:
        return self.budget_tokens - self.tokens


def plan_stages(
    total_tokens: int, patch_fraction: float, patch_size: int, block_size: int, skip_fraction: float = 0.0
) -> list[StagePlan]:
    """Split a budget of `total_tokens` stream tokens: the first floor(λ*total) to the patch stage (blocks of
    K*T), the rest to the token stage (blocks of T). Only each stage's final partial block is dropped.
    With `skip_fraction`, the first floor(skip*total) tokens are left out and the rest is split."""
    skipped = math.floor(skip_fraction * total_tokens)
    total_tokens -= skipped
    patch_tokens = math.floor(patch_fraction * total_tokens)
    plans = []
    if patch_fraction > 0:
        length = patch_size * block_size
        plans.append(StagePlan("patch", patch_size, length, skipped, patch_tokens, patch_tokens // length))
    if patch_fraction < 1:
        rest = total_tokens - patch_tokens
        plans.append(StagePlan("token", 1, block_size, skipped + patch_tokens, rest, rest // block_size))
    return plans


# ---------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def patch_size_as(model, patch_size: int):
    """Temporarily run `model` at another patch size (same weights), e.g. K = 1 for token perplexity."""
    config = model.config
    saved = getattr(config, "patch_size", None)
    config.patch_size = patch_size
    try:
        yield model
    finally:
        config.patch_size = saved


class PatchTrainer(Trainer):
    """Trainer for `PatchLlamaForCausalLM`: counts the K-way loss's targets for exact gradient
    accumulation, logs the per-offset losses (and the patch stage's loss as `patch_loss`), and evaluates
    the patch stage both at patch level and as a token-level model (perplexity)."""

    def __init__(self, *args, patch_eval_dataset=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.patch_eval_dataset = patch_eval_dataset
        self._offset_loss_sum: torch.Tensor | None = None
        self._offset_loss_count = 0

    @property
    def stage_patch_size(self) -> int:
        return get_patch_size(self.model.config)

    def _get_num_items_in_batch(self, batch_samples, device):
        patch_size = self.stage_patch_size
        if patch_size > 1:  # the first patch is never a target: count labels[..., K:], not labels[..., 1:]
            batch_samples = [
                {**batch, "shift_labels": loss_target_labels(batch["labels"], patch_size)} if "labels" in batch else batch
                for batch in batch_samples
            ]
        return super()._get_num_items_in_batch(batch_samples, device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        offset_losses = getattr(outputs, "offset_losses", None)
        if offset_losses is not None and model.training:
            offset_losses = offset_losses.detach()
            self._offset_loss_sum = offset_losses if self._offset_loss_sum is None else self._offset_loss_sum + offset_losses
            self._offset_loss_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self.stage_patch_size > 1:
            logs["patch_loss"] = logs.pop("loss")
        if self._offset_loss_sum is not None and self._offset_loss_count and "patch_loss" in logs:
            means = (self._offset_loss_sum / self._offset_loss_count).tolist()
            for offset, value in enumerate(means, start=1):
                logs[f"offset_{offset}_loss"] = round(value, 4)
            self._offset_loss_sum, self._offset_loss_count = None, 0
        super().log(logs, *args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = {}
        patch_size = self.stage_patch_size
        if patch_size > 1 and self.patch_eval_dataset is not None and eval_dataset is None:
            metrics.update(super().evaluate(self.patch_eval_dataset, ignore_keys, f"{metric_key_prefix}_patch"))
        with patch_size_as(self.model, 1):
            token_metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        loss = token_metrics.get(f"{metric_key_prefix}_loss")
        if loss is not None:
            token_metrics[f"{metric_key_prefix}_perplexity"] = math.exp(min(loss, 100.0))
            self.log({f"{metric_key_prefix}_perplexity": token_metrics[f"{metric_key_prefix}_perplexity"]})
        metrics.update(token_metrics)
        return metrics


# ---------------------------------------------------------------------------------------------------------
# The job: output directory, resume, stages, results
# ---------------------------------------------------------------------------------------------------------


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


def run_identity(model_args, data_args, patch_args, training_args) -> dict:
    """What defines a run: a re-run with the same identity resumes, a different one is refused."""
    return {
        "config_name": model_args.config_name,
        "model_name_or_path": model_args.model_name_or_path,
        "train_file": data_args.train_file,
        "dataset_name": data_args.dataset_name,
        "validation_file": data_args.validation_file,
        "skip_data_fraction": data_args.skip_data_fraction,
        "block_size": data_args.block_size,
        "patch_size": patch_args.patch_size,
        "patch_data_fraction": patch_args.patch_data_fraction,
        "max_steps": training_args.max_steps,
        "num_train_epochs": training_args.num_train_epochs,
        "seed": training_args.seed,
        # What a resume would otherwise silently change: the budget and split (sequences per optimizer step,
        # over all ranks: per-device batch, accumulation and world size may change if their product does not),
        # the token stream, and the optimizer schedule that the checkpoint restores.
        "tokenizer_name": model_args.tokenizer_name,
        "sequences_per_step": global_batch_size(training_args),
        "patch_sequences_per_step": (
            math.prod(stage_batch_settings(patch_args, training_args)) * training_args.world_size
            if patch_args.has_patch_stage else None
        ),
        "patch_max_steps": patch_args.patch_max_steps,
        "learning_rate": training_args.learning_rate,
        "patch_learning_rate": patch_args.patch_learning_rate,
        "lr_scheduler_type": str(training_args.lr_scheduler_type),
        "warmup_steps": training_args.warmup_steps,
        "patch_warmup_steps": patch_args.patch_warmup_steps,
    }


def check_same_run(output_dir: str, identity: dict) -> None:
    """Refuse to resume or report a run recorded in `output_dir` with another identity. Keys the record does
    not hold (a run from an earlier version of this script) are not compared."""
    record = Path(output_dir) / RUN_ARGS_FILE
    if not record.is_file():
        return
    previous = json.loads(record.read_text())
    changed = {k: (previous[k], v) for k, v in identity.items() if k in previous and previous[k] != v}
    if changed:
        details = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise UsageError(
            f"--output_dir {output_dir} holds a different run ({details}): choose another directory "
            "or pass --overwrite_output_dir"
        )


def prepare_output_dir(output_dir: str, identity: dict, overwrite: bool, is_main: bool) -> None:
    """Refuse an output directory holding an unrelated run; record this run's identity."""
    path = Path(output_dir)
    record = path / RUN_ARGS_FILE
    if path.exists() and any(path.iterdir()):
        if overwrite:
            if is_main:
                logger.warning("--overwrite_output_dir: deleting the contents of %s", output_dir)
                for child in path.iterdir():
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        elif not record.is_file():
            raise UsageError(
                f"--output_dir {output_dir} is not empty and holds no run of this script ({RUN_ARGS_FILE} missing): "
                "choose another directory or pass --overwrite_output_dir"
            )
        else:
            check_same_run(output_dir, identity)
    if is_main:
        path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(record, identity)


def file_in_the_way(path: str | Path) -> Path | None:
    """The file that stops `path` from being (or becoming) a folder: `path` itself or its nearest existing
    ancestor, when that is not a folder; None otherwise."""
    path = Path(path)
    nearest = next((p for p in [path, *path.parents] if p.exists()), None)
    return nearest if nearest is not None and not nearest.is_dir() else None


def write_json_atomic(path, payload: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(tmp, path)


def stage_batch_settings(patch_args: PatchArguments, training_args: TrainingArguments) -> tuple[int, int]:
    """(micro-batch, gradient accumulation) of the patch stage: the user's, or the paper's default of the
    same tokens per optimizer step as the token stage (K times fewer sequences of K*T tokens)."""
    k = patch_args.patch_size
    batch = patch_args.patch_per_device_train_batch_size
    accumulation = patch_args.patch_gradient_accumulation_steps
    token_batch, token_accumulation = training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps
    if batch is not None or accumulation is not None:
        return batch or token_batch, accumulation or token_accumulation
    if token_batch % k == 0:
        return token_batch // k, token_accumulation
    if (token_batch * token_accumulation) % k == 0 and token_accumulation % k == 0:
        return token_batch, token_accumulation // k
    raise UsageError(
        f"the patch stage keeps the tokens per optimizer step of the token stage, which needs "
        f"--per_device_train_batch_size ({token_batch}) or --gradient_accumulation_steps ({token_accumulation}) "
        f"divisible by --patch_size K={k}; or set --patch_per_device_train_batch_size and "
        "--patch_gradient_accumulation_steps"
    )


def stage_training_args(training_args: RunTrainingArguments, patch_args: PatchArguments, plan: StagePlan, output_dir: str, max_steps: int):
    """The TrainingArguments of one stage: its own output folder, batch, learning rate, warmup and length."""
    changes = {"output_dir": output_dir, "max_steps": max_steps, "num_train_epochs": 1.0}
    if plan.name == "patch":
        batch, accumulation = stage_batch_settings(patch_args, training_args)
        changes.update(per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)
        if patch_args.patch_learning_rate is not None:
            changes["learning_rate"] = patch_args.patch_learning_rate
        if patch_args.patch_warmup_steps is not None:
            changes["warmup_steps"] = patch_args.patch_warmup_steps
    if training_args.use_liger_kernel:
        changes["liger_kernel_config"] = liger_config_for_stage(training_args.liger_kernel_config, plan.patch_size)
    fields = {f.name: getattr(training_args, f.name) for f in dataclasses.fields(training_args) if f.init}
    fields.update(changes)
    return RunTrainingArguments(**fields)


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` (a checkpoint-N) cannot be resumed from, or None. transformers writes a checkpoint in
    place and its trainer_state.json last, so a job killed while saving leaves one without it, or with
    half-written files; the header of each safetensors file and the state are read to tell."""
    from safetensors import safe_open

    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except ValueError:
        return "trainer_state.json is not valid JSON"
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(weights), "pt") as handle:
                handle.keys()
        except Exception as error:  # safetensors raises its own error type for a damaged file
            return f"{weights.name} is unreadable ({first_line(error)})"
    return None


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint-N of `output_dir` that a resume can load; newer damaged ones are skipped with a
    warning (and left in place). None if there is none."""
    if not os.path.isdir(output_dir):
        return None
    numbered = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    for candidate in sorted(numbered, key=lambda p: int(p.name.split("-", 1)[1]), reverse=True):
        problem = checkpoint_problem(candidate)
        if problem is None:
            return str(candidate)
        logger.warning("Not resuming from %s: %s (a save that did not finish?)", candidate, problem)
    return None


def stage_max_steps(plan: StagePlan, patch_args: PatchArguments, training_args: TrainingArguments) -> int:
    """A stage's max_steps: -1 (one pass over its blocks), or --patch_max_steps for the patch stage when it
    stops before the end of its blocks. Past them the Trainer would start over the same blocks, so a larger
    --patch_max_steps stops at the end of the data instead (with a warning)."""
    if plan.name != "patch" or not patch_args.patch_max_steps:
        return -1
    batch, accumulation = stage_batch_settings(patch_args, training_args)
    sequences = patch_args.patch_max_steps * batch * accumulation * training_args.world_size
    if sequences >= plan.num_blocks:
        logger.warning(
            "--patch_max_steps %d would take %d sequences, but the patch stage has %d: it stops after one pass over "
            "them instead of repeating them", patch_args.patch_max_steps, sequences, plan.num_blocks,
        )
        return -1
    return patch_args.patch_max_steps


def global_batch_size(args: TrainingArguments) -> int:
    """Sequences per optimizer step over all ranks."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


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


def build_model(model_args: ModelArguments, init_from: str | None, patch_size: int, attn_implementation: str):
    """A PatchLlamaForCausalLM at `patch_size`: from weights (`init_from`) or from the config, seeded."""
    if init_from is not None:
        model = PatchLlamaForCausalLM.from_pretrained(init_from, attn_implementation=attn_implementation)
    else:
        config = LlamaConfig.from_pretrained(model_args.config_name)
        config._attn_implementation = attn_implementation
        model = PatchLlamaForCausalLM(config)
    model.config.patch_size = patch_size
    model.config.use_cache = False
    return model


def save_stage_model(trainer: Trainer, folder: str) -> None:
    """`trainer.save_model(folder)`, except after DeepSpeed training: then DeepSpeed's fp32 master weights.

    With bf16 (or fp16), DeepSpeed trains a 16-bit copy of the weights and keeps the fp32 master weights in
    its ZeRO optimizer; `trainer.save_model` would save the 16-bit copy. Here each parameter's master is
    gathered whole (`deepspeed.utils.safe_get_full_fp32_param`, ZeRO-1/2/3: a collective, so every rank runs
    this, parameter by parameter) and the main process saves them as float32: what DDP and FSDP save, and
    what the token stage starts from (`MasterWeightsFrom`). Where DeepSpeed has no fp32 master (no ZeRO
    optimizer, e.g. ZeRO-0 with fp16), the 16-bit save."""
    engine = trainer.deepspeed  # the training engine after trainer.train() under DeepSpeed, else None
    if engine is None or engine.optimizer is None:
        trainer.save_model(folder)
        return
    from deepspeed.utils import safe_get_full_fp32_param

    state_dict = {}
    for name, param in trainer.model.named_parameters():
        master = safe_get_full_fp32_param(param)
        if master is None:  # the same parameters on every rank: all of them fall back together
            logger.warning("DeepSpeed keeps no fp32 master of %s: saving the %s module weights", name, param.dtype)
            trainer.save_model(folder)
            return
        if trainer.args.should_save:
            state_dict[name] = master.detach().to("cpu", torch.float32)
    if trainer.args.should_save:
        trainer.model.save_pretrained(folder, state_dict=state_dict)
        trainer.model.config.dtype = "float32"  # save_pretrained recorded the module's 16-bit dtype
        trainer.model.config.save_pretrained(folder)
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(folder)
    trainer.accelerator.wait_for_everyone()


class MasterWeightsFrom(TrainerCallback):
    """Under DeepSpeed, start the fp32 master weights from a saved float32 model, not from its 16-bit rounding.

    With bf16 (or fp16), DeepSpeed casts the model to 16 bits when it builds its engine and builds the fp32
    masters from that cast copy, so the fp32 weights that the patch stage handed over would be rounded. At
    the start of a stage that is not resumed, this sets every parameter's master from `folder`
    (`deepspeed.utils.safe_set_full_fp32_param`, ZeRO-1/2/3: each rank sets its own partition). The 16-bit
    module weights are already those weights rounded. A resumed stage keeps its checkpoint's masters."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step > 0:
            return
        from deepspeed.utils import safe_set_full_fp32_param
        from safetensors import safe_open

        params = dict(model.named_parameters())
        index = self.folder / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
        missing = set(params)
        for file in files:
            with safe_open(self.folder / file, framework="pt") as weights:
                for name in missing & set(weights.keys()):
                    safe_set_full_fp32_param(params[name], weights.get_tensor(name).float())
                    missing.discard(name)
        if missing:
            raise RuntimeError(f"{self.folder} has no weights for {sorted(missing)}")


def run_stage(plan, stage_args, model, train_dataset, eval_datasets, tokenizer, master_weights_from=None):
    """Train one stage (resuming from its last checkpoint if any), save its model, evaluate it.
    `master_weights_from`: the saved model that `model` was loaded from, whose float32 weights DeepSpeed's
    fp32 master weights start from (see `MasterWeightsFrom`)."""
    token_eval, patch_eval = eval_datasets
    trainer = PatchTrainer(
        model=model,
        args=stage_args,
        train_dataset=train_dataset,
        eval_dataset=token_eval,
        patch_eval_dataset=patch_eval if plan.patch_size > 1 else None,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    if master_weights_from is not None and trainer.is_deepspeed_enabled:
        trainer.add_callback(MasterWeightsFrom(master_weights_from))
    checkpoint = last_complete_checkpoint(stage_args.output_dir)
    if checkpoint:
        logger.info("Resuming the %s stage from %s", plan.name, checkpoint)
    start = time.time()
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    wall = time.time() - start
    metrics = {
        "steps": trainer.state.global_step,
        "train_loss": train_result.training_loss,
        "train_runtime_s": round(wall, 2),
        "resumed_from": checkpoint,
    }
    if token_eval is not None:
        metrics.update(trainer.evaluate())
    return trainer, metrics


def report(results: dict) -> None:
    line = f"perplexity {results['perplexity']:.3f}" if results.get("perplexity") is not None else "no validation set"
    print(
        f"[run_clm] done: {line}; relative cost nominal {results['relative_cost_nominal']:.3f} "
        f"(λ/K + 1 - λ), measured {results['relative_cost_measured']:.3f} (positions / tokens); "
        f"results in {results['output_dir']}/{ALL_RESULTS_FILE}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, patch_args, training_args = parse_arguments(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO if training_args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity(logging.WARNING)
    output_dir = training_args.output_dir
    if output_dir is None:
        raise UsageError("give --output_dir")

    if training_args.resume_from_checkpoint is not None:
        raise UsageError(
            "--resume_from_checkpoint is not used: run_clm.py resumes by itself from the newest complete checkpoint "
            "in --output_dir (and goes straight to the token stage once the patch stage is complete); re-run the "
            "same command"
        )
    for name, folder in (("output_dir", output_dir), ("data_cache_dir", data_args.data_cache_dir)):
        blocking = file_in_the_way(folder) if folder else None
        if blocking is not None:
            raise UsageError(f"--{name} {folder}: {blocking} is a file, not a folder")
    # Also checks the patch stage's batch settings (stage_batch_settings raises) before any data is read.
    identity = run_identity(model_args, data_args, patch_args, training_args)

    # A finished job: report and change nothing (the same job: a changed one is refused).
    results_file = Path(output_dir) / ALL_RESULTS_FILE
    if results_file.is_file() and not training_args.overwrite_output_dir:
        check_same_run(output_dir, identity)
        results = json.loads(results_file.read_text())
        if training_args.should_log:
            logger.info("%s already holds a finished run; nothing to do (use --overwrite_output_dir to redo it)", output_dir)
            report(results)
        return results

    # Inputs, checked before any work.
    train_paths = train_format = None
    if data_args.train_file is not None:
        train_paths, train_format = check_data_files(data_args.train_file, "train_file")
    eval_paths = eval_format = None
    if data_args.validation_file is not None:
        eval_paths, eval_format = check_data_files(data_args.validation_file, "validation_file")
    if data_args.validation_file is None and training_args.eval_strategy != "no":
        raise UsageError(
            f"--eval_strategy {training_args.eval_strategy.value} needs a --validation_file (or set --eval_strategy no)"
        )
    if training_args.use_liger_kernel:
        check_liger_environment(training_args.use_cpu)
    caveat = torch_compile_caveat(training_args)
    if caveat:
        logger.warning(caveat)
    if data_args.streaming and training_args.max_steps <= 0:
        raise UsageError("--streaming needs --max_steps: it fixes the token budget that --patch_data_fraction splits")
    if data_args.streaming and training_args.dataloader_num_workers > 1:
        raise UsageError(
            f"--streaming tokenises one stream of blocks, which --dataloader_num_workers "
            f"{training_args.dataloader_num_workers} would read that many times over (every block repeated): use "
            "--dataloader_num_workers 1 (tokenise in a background process) or 0, or drop --streaming to use the cache"
        )
    config = load_model_config(model_args.model_name_or_path or model_args.config_name)
    tokenizer = load_tokenizer(model_args.tokenizer_name)
    if len(tokenizer) > config.vocab_size:
        raise UsageError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}")
    if data_args.block_size > config.max_position_embeddings:
        raise UsageError(
            f"--block_size {data_args.block_size} exceeds the model's max_position_embeddings {config.max_position_embeddings}"
        )
    if patch_args.patch_size > 1 and not patch_args.has_patch_stage:
        logger.warning("--patch_size %d is ignored: --patch_data_fraction is 0 (token-level baseline)", patch_args.patch_size)
    with training_args.main_process_first(desc="output directory"):
        prepare_output_dir(output_dir, identity, training_args.overwrite_output_dir, training_args.should_save)
    set_seed(training_args.seed)

    # Data: tokenise once into the on-disk cache; blocks for each stage.
    block_size, k = data_args.block_size, patch_args.patch_size
    token_batch = global_batch_size(training_args)
    if data_args.streaming:
        dataset_tokens = None
        total_tokens = training_args.max_steps * token_batch * block_size
    else:
        stream, cache_folder = cached_token_stream(train_paths, train_format, data_args, tokenizer, training_args)
        dataset_tokens = len(stream)
        if dataset_tokens == 0:
            raise UsageError("--train_file holds no text")
        if training_args.max_steps > 0:
            total_tokens = training_args.max_steps * token_batch * block_size
        else:
            total_tokens = math.floor(training_args.num_train_epochs * dataset_tokens)
    plans = plan_stages(total_tokens, patch_args.patch_data_fraction, k, block_size, data_args.skip_data_fraction)
    for plan in plans:
        if plan.num_blocks == 0:
            raise UsageError(
                f"the {plan.name} stage gets {plan.budget_tokens} training tokens, fewer than one block of "
                f"{plan.block_len} (block_size {block_size}{f' x patch_size {k}' if plan.patch_size > 1 else ''}): "
                "give more data or epochs, or lower --block_size / --patch_data_fraction"
            )
        logger.info(
            "%s stage: %d blocks of %d tokens = %d tokens (%d positions), starting at stream token %d; %d tokens dropped",
            plan.name, plan.num_blocks, plan.block_len, plan.tokens, plan.positions, plan.start_token, plan.dropped_tokens,
        )

    def make_train_dataset(plan: StagePlan):
        if data_args.streaming:
            return StreamingTokenBlocks(
                lambda: load_documents(train_paths, train_format, data_args, streaming=True),
                tokenizer, data_args, plan.start_token, plan.num_blocks, plan.block_len,
            )
        return TokenBlocks(stream, plan.start_token, plan.num_blocks, plan.block_len)

    eval_datasets = (None, None)
    if eval_paths is not None:
        eval_stream, _ = cached_token_stream(eval_paths, eval_format, data_args, tokenizer, training_args)
        eval_blocks = len(eval_stream) // block_size
        if eval_blocks == 0:
            raise UsageError(f"--validation_file has {len(eval_stream)} tokens, fewer than one block of {block_size}")
        if data_args.max_eval_blocks:
            eval_blocks = min(eval_blocks, data_args.max_eval_blocks)
        token_eval = TokenBlocks(eval_stream, 0, eval_blocks, block_size)
        patch_eval = TokenBlocks(eval_stream, 0, max(1, eval_blocks // k), k * block_size) if len(eval_stream) >= k * block_size else None
        eval_datasets = (token_eval, patch_eval)

    attn_implementation = resolve_attn_implementation(model_args.attn_implementation)
    logger.info("Attention: %s", attn_implementation)

    results = {"output_dir": output_dir, "patch_size": k, "patch_data_fraction": patch_args.patch_data_fraction,
               "block_size": block_size, "dataset_tokens": dataset_tokens, "budget_tokens": total_tokens,
               "attn_implementation": attn_implementation}
    init_from = model_args.model_name_or_path
    final_model = None
    for plan in plans:
        if plan.name == "patch":
            stage_dir = os.path.join(output_dir, PATCH_STAGE_DIR)
            marker = Path(stage_dir) / STAGE_COMPLETE_FILE
            if marker.is_file():
                logger.info("The patch stage is complete (%s): going straight to the token stage", marker)
                results["patch_stage"] = json.loads(marker.read_text())
                init_from = stage_dir
                continue
        else:
            stage_dir = output_dir
        args = stage_training_args(training_args, patch_args, plan, stage_dir, stage_max_steps(plan, patch_args, training_args))
        model = build_model(model_args, init_from, plan.patch_size, attn_implementation)
        handover = init_from if plan.name == "token" and patch_args.has_patch_stage else None
        trainer, metrics = run_stage(plan, args, model, make_train_dataset(plan), eval_datasets, tokenizer, handover)
        global_batch = global_batch_size(args)
        blocks_seen = min(plan.num_blocks, metrics["steps"] * global_batch)
        stage_results = {
            "blocks": plan.num_blocks, "block_tokens": plan.block_len, "tokens": blocks_seen * plan.block_len,
            "positions": blocks_seen * plan.block_len // plan.patch_size, "planned_tokens": plan.tokens,
            "dropped_tokens": plan.dropped_tokens, "start_token": plan.start_token, "patch_size": plan.patch_size,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps, "learning_rate": args.learning_rate,
            "world_size": args.world_size, "tokens_per_step": global_batch * plan.block_len,
            **metrics,
        }
        model.config.patch_size = 1 if plan.name == "token" else plan.patch_size
        save_stage_model(trainer, stage_dir)
        trainer.save_state()  # <stage_dir>/trainer_state.json: the stage's whole log history
        if plan.name == "patch":
            if trainer.args.should_save:
                write_json_atomic(Path(stage_dir) / STAGE_COMPLETE_FILE, stage_results)  # written last: the model is complete
            trainer.accelerator.wait_for_everyone()
            init_from = stage_dir
        results[f"{plan.name}_stage"] = stage_results
        final_model = (trainer, plan)

    # λ = 1: the patch model is the final model; save it as a token-level (K = 1) checkpoint.
    trainer, plan = final_model if final_model else (None, None)
    if not patch_args.has_token_stage:
        if trainer is None:  # the patch stage was complete before this run
            model = build_model(model_args, init_from, 1, attn_implementation)
            trainer = PatchTrainer(model=model, args=stage_training_args(training_args, patch_args, plans[0], output_dir, -1),
                                   eval_dataset=eval_datasets[0], processing_class=tokenizer, data_collator=default_data_collator)
        trainer.model.config.patch_size = 1
        save_stage_model(trainer, output_dir)
        if eval_datasets[0] is not None:
            results["final_eval"] = trainer.evaluate()

    stages = [results[f"{p.name}_stage"] for p in plans]
    tokens = sum(s["tokens"] for s in stages)
    positions = sum(s["positions"] for s in stages)
    lam = patch_args.patch_data_fraction
    results["relative_cost_nominal"] = lam / k + 1 - lam if lam > 0 else 1.0
    results["relative_cost_measured"] = positions / tokens if tokens else float("nan")
    results["tokens"], results["positions"] = tokens, positions
    last = stages[-1] if patch_args.has_token_stage else results.get("final_eval", {})
    results["eval_loss"] = last.get("eval_loss")
    results["perplexity"] = last.get("eval_perplexity")
    if trainer is None or trainer.args.should_save:
        write_json_atomic(results_file, results)
        report(results)
    return results


def run_cli(entry_point, program: str) -> None:
    """Run `entry_point()`; a UsageError becomes one line on stderr naming `program`, and exit code 2."""
    try:
        entry_point()
    except UsageError as error:
        print(f"{program}: error: {usage_message(error)}", file=sys.stderr)
        sys.exit(2)


def usage_message(error: UsageError) -> str:
    """The message of a UsageError; one raised in a data-loader worker (`--streaming` with a worker) arrives
    re-raised by torch with the worker's whole traceback in its message: keep only the original message."""
    message = str(error)
    if "Original Traceback" in message:
        last = [line for line in message.strip().splitlines() if line.strip()][-1]
        message = last.split(f"{UsageError.__name__}: ", 1)[-1]
    return message


def cli() -> None:
    run_cli(main, "run_clm.py")


if __name__ == "__main__":
    cli()
