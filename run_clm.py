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

Each of the paper's choices can be changed on its own (README, "Recipes beyond the paper": Token Superposition
Training's): the split by a fraction r of the optimizer steps (`--patch_step_fraction`), patch steps with the token
steps' positions rather than tokens (`--patch_batch_mode positions`), the optimizer state and one schedule carried
across the switch (`--patch_switch continue`), and weighted offsets in the K-way loss (`--patch_offset_weights`).

Works under `python`, `torchrun`, `accelerate launch` and `deepspeed`. Re-running the same command resumes
an interrupted job; re-running a finished one reports its results and changes nothing.

This file is the driver: the arguments and `main()`. The work is done by the `patch_training` package beside
it (readers, token cache, blocks, stages, resume, models, trainer, results) and the model by
`modeling_llama_patch.py`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from patch_training.cli import (
    UsageError, blank_as_unset, folder_problem, parse_arguments as parse_command_line, refuse_below, run_cli,
)
from patch_training.liger import check_liger_environment, check_liger_kernel_config
from patch_training.readers import DataSource, split_file_list
from patch_training.results import ALL_RESULTS_FILE, add_job_totals, recipe_results, report
from patch_training.resume import (
    STREAM_INDEX_FILE,
    batch_identity,
    data_files_identity,
    check_output_folder,
    check_output_not_an_input,
    check_same_run,
    claim_output_dir,
    output_dir_lock,
    run_identity,
    write_json_atomic,
)
from patch_training.stages import (
    PATCH_BATCH_MODES,
    PATCH_SWITCHES,
    global_batch_size,
    plan_stages,
    repetition_warning,
    split_fractions,
    stage_steps,
)
from patch_training.training_args import (
    RunTrainingArguments,
    check_patch_stage_settings,
    check_trainer_settings,
    torch_compile_caveat,
)

# The model, the Trainer, the data pipeline and the token cache are imported in the functions that use them, so
# that `--help` and a usage error answer without loading them.

logger = logging.getLogger("run_clm")

DEFAULT_TOKENIZER = "data/llama2_tokenizer"


# ---------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    """Which model to train: a config of any decoder-only causal LM in transformers (Llama, Qwen, Mistral, Gemma,
    OLMo, MoE models, ...) to start from scratch, or a checkpoint to continue pre-training from."""

    config_name: str | None = field(
        default=None,
        metadata={
            "help": "A model config JSON file or folder of any decoder-only causal LM (e.g. configs/model/llama-370m.json, "
            "configs/model/qwen3-0.6b.json): train from scratch."
        },
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A checkpoint folder or hub name to continue from instead of random weights (e.g. a stock Qwen3 "
            "or Llama checkpoint, or a patch-stage model); loaded in float32."
        },
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer folder or hub name. Default: the checkpoint's own with --model_name_or_path, else the "
            "bundled LLaMA-2 tokenizer (data/llama2_tokenizer, vocab 32000)."
        },
    )
    attn_implementation: str = field(
        default="auto",
        metadata={
            "help": "eager, sdpa, flash_attention_2, or auto: FlashAttention-2 when flash_attn imports on a CUDA "
            "machine, else SDPA."
        },
    )
    loss_implementation: str = field(
        default="auto",
        metadata={
            "help": "The training loss: auto (the fused LM-head + K-way loss, which never holds the positions x "
            "vocabulary logits, where it is exact for the architecture, else the stock head and the chunked K-way "
            "loss, said in one log line), fused (refuse an architecture it is not exact for) or unfused (the "
            "stock head: more memory, and on one H200 about 5%% faster a step for the 370M model at vocabulary "
            "32,000; see the README's Throughput)."
        },
    )

    def __post_init__(self):
        blank_as_unset(self)
        if self.config_name is None and self.model_name_or_path is None:
            raise UsageError("give --config_name (a model config JSON, to train from scratch) or --model_name_or_path")
        if self.attn_implementation not in ("auto", "eager", "sdpa", "flash_attention_2"):
            raise UsageError(
                f"--attn_implementation must be auto, eager, sdpa or flash_attention_2, got {self.attn_implementation!r}"
            )
        from modeling_llama_patch import LOSS_IMPLEMENTATIONS

        if self.loss_implementation not in LOSS_IMPLEMENTATIONS:
            raise UsageError(
                f"--loss_implementation must be {', '.join(LOSS_IMPLEMENTATIONS)}, got {self.loss_implementation!r}"
            )
        if self.tokenizer_name is None:
            self.tokenizer_name = self.model_name_or_path or DEFAULT_TOKENIZER


@dataclass
class DataArguments:
    """What to train and evaluate on, and how it is cut into blocks."""

    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Training data: .txt (a document per line), .jsonl/.json (a JSON object per line, or one JSON "
            "list), optionally .gz/.xz/.bz2/.zst compressed; .parquet; .arrow; a datasets.save_to_disk folder; a "
            "folder of such files; a glob pattern such as 'data/*.jsonl.zst' (expanded in sorted order). Several, "
            "comma-separated (or a JSON list in a config file), formats may mix."
        },
    )
    validation_file: str | None = field(
        default=None,
        metadata={"help": "Validation data for token-level perplexity (e.g. data/wikitext-103-test.jsonl); the same formats as --train_file."},
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
            "--max_steps, which then fixes the token budget that λ splits. The tokens of each part of the data are "
            "recorded in <output_dir>/stream_index.jsonl, so the token stage and a resume start at their stream "
            "position without re-reading what came before."
        },
    )
    data_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where tokenised data is cached (one folder per data set, tokenizer and text column). Default: "
            "$HF_HOME/patch_level_tokens or ~/.cache/huggingface/patch_level_tokens. On a filesystem shared by "
            "several nodes, one process tokenises (a file lock) and the others wait, then read."
        },
    )
    tokenize_batch_size: int = field(default=1000, metadata={"help": "Documents per tokenizer call."})
    preprocessing_num_workers: int = field(
        default=1,
        metadata={
            "help": "Processes that tokenise the training data in parallel: files, and parts of one large file "
            "(Parquet row groups, Arrow record batches, byte ranges of an uncompressed .jsonl/.txt) or hub shards. "
            "The cache is byte-identical to one process's."
        },
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
        blank_as_unset(self)
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
    # Recipes beyond the paper (README, "Recipes beyond the paper"): each choice independently, the paper's by default.
    patch_step_fraction: float | None = field(
        default=None,
        metadata={
            "help": "r, the fraction of the job's optimizer steps spent in the patch stage, instead of λ "
            "(Token Superposition Training's way of setting it). Converted exactly to the token split "
            "λ = r*P / (r*P + (1-r)*Q), P and Q the patch and token stages' tokens per step; both are reported."
        },
    )
    patch_batch_mode: str = field(
        default="tokens",
        metadata={
            "help": "What a patch-stage step holds equal to a token-stage step: tokens (the paper: K times fewer "
            "sequences of K*T tokens) or positions (the variant: as many sequences of K*T as the token stage has "
            "of T, so the same compute and K times the tokens per step)."
        },
    )
    patch_switch: str = field(
        default="restart",
        metadata={
            "help": "At the switch to token level: restart (the paper: weights only, a fresh optimizer and a new "
            "warmup and schedule) or continue (the variant: AdamW's state and one learning-rate schedule over "
            "both stages' steps, warmup once)."
        },
    )
    patch_offset_weights: str | None = field(
        default=None,
        metadata={
            "help": "Weights of the K targets of the patch loss: power:<alpha> (w_k ~ k^-alpha, k = 1..K) or a JSON "
            "list of K non-negative numbers; scaled to mean 1. Default: the paper's plain mean. The logged "
            "offset_k_loss stay unweighted."
        },
    )

    def __post_init__(self):
        from modeling_llama_patch import validate_patch_size

        blank_as_unset(self)
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
        self._check_recipe()

    def _check_recipe(self) -> None:
        """The choices beyond the paper: refuse contradictory or impossible combinations in one line."""
        r = self.patch_step_fraction
        if r is not None:
            if self.patch_data_fraction != 0:
                raise UsageError(
                    f"give one of --patch_data_fraction (λ, a fraction of the tokens; got {self.patch_data_fraction}) "
                    f"and --patch_step_fraction (r, a fraction of the optimizer steps; got {r}), not both"
                )
            if not 0.0 <= r <= 1.0:
                raise UsageError(f"--patch_step_fraction (r) must lie in [0, 1], got {r}")
            if r > 0 and self.patch_size == 1:
                raise UsageError(f"--patch_step_fraction={r} needs --patch_size K > 1: with K = 1 there is no patch stage")
        if self.patch_batch_mode not in PATCH_BATCH_MODES:
            raise UsageError(f"--patch_batch_mode must be {' or '.join(PATCH_BATCH_MODES)}, got {self.patch_batch_mode!r}")
        if self.patch_switch not in PATCH_SWITCHES:
            raise UsageError(f"--patch_switch must be {' or '.join(PATCH_SWITCHES)}, got {self.patch_switch!r}")
        if self.patch_switch == "continue":
            for name in ("patch_learning_rate", "patch_warmup_steps"):
                if getattr(self, name) is not None:
                    raise UsageError(
                        f"--{name} sets a schedule of the patch stage's own, but --patch_switch continue runs one "
                        "schedule over both stages (--learning_rate, --warmup_steps): drop one of them"
                    )
        from patch_training.offset_weights import parse_offset_weights

        parse_offset_weights(self.patch_offset_weights, self.patch_size)  # UsageError for bad weights

    @property
    def offset_weights(self) -> tuple[float, ...] | None:
        """The patch loss's K weights of mean 1, or None (the paper's mean)."""
        from patch_training.offset_weights import parse_offset_weights

        return parse_offset_weights(self.patch_offset_weights, self.patch_size)

    @property
    def _split_fraction(self) -> float:
        """λ or r, whichever sets the split (both 0 and 1 mean the same in either)."""
        return self.patch_data_fraction if self.patch_step_fraction is None else self.patch_step_fraction

    @property
    def has_patch_stage(self) -> bool:
        return self._split_fraction > 0

    @property
    def has_token_stage(self) -> bool:
        return self._split_fraction < 1


ARGUMENT_CLASSES = (ModelArguments, DataArguments, PatchArguments, RunTrainingArguments)


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, PatchArguments, RunTrainingArguments]:
    """Parse the command line: flags, a lone `*.json` config file, or a config file followed by flags that
    override its values (`run_clm.py configs/train/x.json --output_dir runs/y`)."""
    return parse_command_line(ARGUMENT_CLASSES, argv)


# ---------------------------------------------------------------------------------------------------------
# Checks of the inputs, before any work
# ---------------------------------------------------------------------------------------------------------


def check_output_dir(data_args: DataArguments, training_args: RunTrainingArguments) -> str:
    """The output folder, checked: given, not a path under a file (nor is the cache folder), and no
    --resume_from_checkpoint (this script resumes by itself)."""
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
        problem = folder_problem(f"--{name}", folder)
        if problem:
            raise UsageError(problem)
    return output_dir


def input_paths(model_args: ModelArguments, data_args: DataArguments, training_args: RunTrainingArguments) -> list[str]:
    """The local paths that the run reads (data files, model config or weights, tokenizer, token cache,
    DeepSpeed config): never deleted or written over, even inside --output_dir."""
    paths = [model_args.config_name, model_args.model_name_or_path, model_args.tokenizer_name, data_args.data_cache_dir]
    for spec in (data_args.train_file, data_args.validation_file):
        paths += split_file_list(spec or "")  # 'a,b' or a JSON list
    if isinstance(training_args.deepspeed, str):
        paths.append(training_args.deepspeed)
    return [p.strip() for p in paths if p and p.strip() and os.path.exists(p.strip())]


def job_identity(model_args, data_args, patch_args, training_args) -> dict:
    """What a re-run must share to resume this job (`resume.run_identity`): every argument but the documented
    `MAY_CHANGE` ones, the global batch of each stage, and the files the data patterns expand to. UsageError
    when the patch stage's batch cannot be derived."""
    derived = {**batch_identity(patch_args, training_args), **data_files_identity(data_args)}
    return run_identity((model_args, data_args, patch_args, training_args), derived)


def path_state(path: str) -> str:
    """What identifies the content of a local path without reading it (`readers.content_stamp`)."""
    from patch_training.readers import content_stamp

    return content_stamp(path)


def init_weights_identity(model_name_or_path: str | None) -> dict | None:
    """{file: `path_state`} of the files a local --model_name_or_path folder's weights load from
    (`models.weight_files`), None for a hub name or no checkpoint. Only those: the folder may also hold a run's
    checkpoints and logs, or this run's own output folder, which change while the weights do not."""
    from patch_training.models import weight_files

    if not (model_name_or_path and os.path.isdir(model_name_or_path)):
        return None
    return {name: path_state(os.path.join(model_name_or_path, name)) for name in weight_files(model_name_or_path)}


def content_identity(model_args, config, tokenizer, train_source, eval_source) -> dict:
    """What the run's input paths hold, for `job_identity`'s record: a file rewritten in place between attempts
    (another shard under the same name, an edited model config, another tokenizer) is another run, refused on
    resume like a changed flag. Data files are identified as the token cache identifies them, without reading
    them: size and modification time (`path_state`); the starting weights by their files (`init_weights_identity`);
    the model config by its values, the tokenizer by `token_cache.tokenizer_fingerprint`; the data files also by
    the version of the rule they are read by (`readers.READING_RULE_VERSION`: another rule may read other documents
    from the same files)."""
    from patch_training.readers import READING_RULE_VERSION
    from patch_training.token_cache import tokenizer_fingerprint

    def data(source):
        return None if source is None else {name: path_state(name) for name in source.names}

    values = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    return {
        "model_config": json.loads(json.dumps(values, sort_keys=True, default=str)),
        "init_weight_files": init_weights_identity(model_args.model_name_or_path),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "train_data": data(train_source),
        "validation_data": data(eval_source),
        "reading_rule_version": READING_RULE_VERSION,
    }


def check_output_outside_data(output_dir: str, data_args) -> None:
    """UsageError when --output_dir lies where --train_file or --validation_file reads: in a folder it names, or
    where one of its glob patterns can reach (`data/*` reads a folder `data/run`, `data/**/*.json` the files in it;
    `readers.pattern_may_reach`), whether the output folder exists yet or not. The run's own outputs (its JSON
    files, checkpoints) would be read as data by the next attempt, which would then be refused as another run or
    train on them."""
    import glob

    from patch_training.readers import pattern_may_reach

    output = Path(output_dir).resolve()
    for name, spec in (("train_file", data_args.train_file), ("validation_file", data_args.validation_file)):
        for entry in split_file_list(spec or ""):  # 'a,b' or a JSON list
            if glob.has_magic(entry):
                parts = Path(entry).parts  # the pattern from its first folder that exists, symbolic links resolved
                base = next(i for i in range(len(parts), -1, -1) if not glob.has_magic(os.path.join("", *parts[:i])))
                resolved = os.path.join(os.path.realpath(os.path.join(".", *parts[:base])), *parts[base:])
                inside = pattern_may_reach(entry, output_dir) or pattern_may_reach(resolved, str(output))
                what = f"{entry}, a pattern"
            else:
                inside = os.path.isdir(entry) and (output == Path(entry).resolve() or Path(entry).resolve() in output.parents)
                what = f"{entry}, a folder"
            if inside:
                raise UsageError(
                    f"--output_dir {output_dir} lies in {what} that --{name} reads: the run's outputs "
                    "would become its data on the next attempt; choose an --output_dir outside it"
                )


def check_inputs(model_args, data_args, patch_args, training_args):
    """Check the data, the run settings, the model config and the tokenizer against each other.
    Returns (training DataSource, validation DataSource or None, model config, tokenizer)."""
    from patch_training.models import (
        check_model_settings, check_one_model_config, check_tokenizer_fits_model, load_model_config, load_tokenizer,
    )
    from patch_training.tracking import check_report_to

    if data_args.train_file is not None:
        train_source = DataSource.from_files(data_args.train_file, "train_file", data_args.text_column_name)
    else:
        train_source = DataSource(data_args.text_column_name, dataset_name=data_args.dataset_name,
                                  dataset_config_name=data_args.dataset_config_name, dataset_split=data_args.dataset_split)
    eval_source = None
    if data_args.validation_file is not None:
        eval_source = DataSource.from_files(data_args.validation_file, "validation_file", data_args.text_column_name)
    if data_args.validation_file is None and training_args.eval_strategy != "no":
        raise UsageError(
            f"--eval_strategy {training_args.eval_strategy.value} needs a --validation_file (or set --eval_strategy no)"
        )
    check_report_to(training_args.report_to)
    check_trainer_settings(training_args)
    check_world_size(training_args)
    if patch_args.patch_switch == "continue" and (training_args.deepspeed or training_args.fsdp):
        raise UsageError(
            "--patch_switch continue carries the optimizer state across the switch under DDP or one device; "
            f"with --{'deepspeed' if training_args.deepspeed else 'fsdp'} it is not supported yet (use --patch_switch restart)"
        )
    check_patch_stage_settings(training_args, patch_args.has_patch_stage)
    caveat = torch_compile_caveat(training_args)
    if caveat:
        logger.warning(caveat)
    if training_args.save_only_model and training_args.save_strategy != "no":
        logger.warning("--save_only_model: checkpoints hold only the weights, so an interrupted run cannot resume "
                       "from them (a re-run is refused; --overwrite_output_dir starts over)")
    if data_args.streaming and training_args.max_steps <= 0:
        raise UsageError("--streaming needs --max_steps: it fixes the token budget that --patch_data_fraction splits")
    if data_args.streaming and training_args.dataloader_num_workers > 1:
        raise UsageError(
            f"--streaming tokenises one stream of blocks, which --dataloader_num_workers "
            f"{training_args.dataloader_num_workers} would read that many times over (every block repeated): use "
            "--dataloader_num_workers 1 (tokenise in a background process) or 0, or drop --streaming to use the cache"
        )
    check_one_model_config(model_args.config_name, model_args.model_name_or_path)
    config = load_model_config(model_args.model_name_or_path or model_args.config_name)
    check_model_settings(config, model_args.model_name_or_path, model_args.loss_implementation)
    if training_args.use_liger_kernel:
        check_liger_environment(training_args.use_cpu, config.model_type)
        check_liger_kernel_config(training_args.liger_kernel_config, config.model_type)
    tokenizer = load_tokenizer(model_args.tokenizer_name)
    check_tokenizer_fits_model(tokenizer, f"--tokenizer_name {model_args.tokenizer_name}", config, model_args.model_name_or_path)
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions is not None and data_args.block_size > max_positions:
        raise UsageError(
            f"--block_size {data_args.block_size} exceeds the model's max_position_embeddings {max_positions}"
        )
    if patch_args.patch_size > 1 and not patch_args.has_patch_stage:
        logger.warning("--patch_size %d is ignored: --patch_data_fraction is 0 (token-level baseline)", patch_args.patch_size)
    return train_source, eval_source, config, tokenizer


def check_world_size(training_args) -> None:
    """UsageError when the launcher started several processes (WORLD_SIZE > 1) but transformers runs this one
    alone: on a machine without a GPU, a launch without --use_cpu true. Each process then trained and saved on its
    own into the same --output_dir, one of them failed on the folder's lock ("in use by another run") and the
    other left a checkpoint of a world size of 1 that the corrected command refused."""
    launched = os.environ.get("WORLD_SIZE", "1")
    if launched.isdigit() and int(launched) > 1 and training_args.world_size == 1:
        import torch

        fix = "add --use_cpu true to run the processes as one job on CPU" if not torch.cuda.is_available() else (
            "check the launcher's settings")
        raise UsageError(f"launched as {launched} processes (WORLD_SIZE={launched}), but each would train alone "
                         f"(the Trainer's world size is 1): {fix}")


def check_plans(plans, block_size: int) -> None:
    """Refuse a stage with less than one block of training tokens; log each stage's share of the stream."""
    for plan in plans:
        if plan.num_blocks == 0:
            raise UsageError(
                f"the {plan.name} stage gets {plan.budget_tokens} training tokens, fewer than one block of "
                f"{plan.block_len} (block_size {block_size}{f' x patch_size {plan.patch_size}' if plan.patch_size > 1 else ''}): "
                "give more data or epochs, or lower --block_size / --patch_data_fraction"
            )
        logger.info(
            "%s stage: %d blocks of %d tokens = %d tokens (%d positions), starting at stream token %d; %d tokens dropped",
            plan.name, plan.num_blocks, plan.block_len, plan.tokens, plan.positions, plan.start_token, plan.dropped_tokens,
        )


# ---------------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    # Parse the arguments: flags, or a JSON config file (and flags that override it).
    model_args, data_args, patch_args, training_args = parse_arguments(argv)
    import transformers

    from patch_training.models import resolve_attn_implementation

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO if training_args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity(logging.WARNING)
    output_dir = check_output_dir(data_args, training_args)
    check_output_outside_data(output_dir, data_args)
    # Also checks the patch stage's batch settings (stage_batch_settings raises) before any data is read.
    identity = job_identity(model_args, data_args, patch_args, training_args)
    train_source, eval_source, config, tokenizer = check_inputs(model_args, data_args, patch_args, training_args)
    identity.update(content_identity(model_args, config, tokenizer, train_source, eval_source))
    check_output_not_an_input(output_dir, input_paths(model_args, data_args, training_args))

    # A finished job: report and change nothing (the same job: a changed one is refused).
    results_file = Path(output_dir) / ALL_RESULTS_FILE
    if results_file.is_file() and not training_args.overwrite_output_dir:
        check_same_run(output_dir, identity)
        results = json.loads(results_file.read_text())
        if training_args.should_log:
            logger.info("%s already holds a finished run; nothing to do (use --overwrite_output_dir to redo it)", output_dir)
            report(results)
        return results

    # Check every input before any work. The folder is locked now (a second run into it is refused) but
    # claimed, and with --overwrite_output_dir emptied of the earlier run's outputs, only once the data has been
    # read: bad data never costs a finished model.
    attn_implementation = resolve_attn_implementation(model_args.attn_implementation, config)
    with output_dir_lock(output_dir, training_args.should_save):
        with training_args.main_process_first(desc="output directory"):
            outdated = check_output_folder(output_dir, identity, training_args.overwrite_output_dir,
                                           inputs=input_paths(model_args, data_args, training_args))
        return train_job(model_args, data_args, patch_args, training_args, output_dir, identity, outdated,
                         train_source, eval_source, tokenizer, attn_implementation)


def train_job(model_args, data_args, patch_args, training_args, output_dir, identity, outdated, train_source,
              eval_source, tokenizer, attn_implementation) -> dict:
    """Tokenise, plan the stages, claim the output folder (`claim_output_dir`), train and report; `main` has
    checked the inputs and the folder, and holds its lock."""
    from transformers import set_seed

    from patch_training.blocks import streamed_counts, training_blocks, validation_blocks
    from patch_training.token_cache import cached_token_stream, skipped_note
    from patch_training.trainer import StageArguments, StageJob, train_stages

    set_seed(training_args.seed)

    # Tokenise once into the on-disk cache (or stream), and split the token budget between the stages.
    block_size, k = data_args.block_size, patch_args.patch_size
    cache = dict(cache_dir=data_args.data_cache_dir, batch_size=data_args.tokenize_batch_size)
    steps_budget = training_args.max_steps * global_batch_size(training_args) * block_size
    stream = dataset_tokens = None
    if data_args.streaming:  # read during training, after the claim: check what can be checked now
        train_source.check_starts()
        total_tokens = steps_budget
    else:
        stream, _ = cached_token_stream(train_source, tokenizer, training_args, num_workers=data_args.preprocessing_num_workers, **cache)
        dataset_tokens = len(stream)
        if dataset_tokens == 0:
            raise UsageError("--train_file holds no text")
        total_tokens = steps_budget if training_args.max_steps > 0 else math.floor(training_args.num_train_epochs * dataset_tokens)
        warning = repetition_warning(total_tokens, dataset_tokens, epochs_requested=training_args.max_steps <= 0)
        if warning:
            logger.warning(warning)
    # λ (a fraction of the tokens) given, or derived exactly from r (a fraction of the optimizer steps).
    patch_fraction, step_fraction = split_fractions(patch_args, training_args, block_size)
    plans = plan_stages(total_tokens, patch_fraction, k, block_size, data_args.skip_data_fraction)
    check_plans(plans, block_size)
    stage_args = StageArguments(training_args, patch_args, output_dir)  # each made right before its stage's Trainer

    # --patch_switch continue: one schedule over both stages' optimizer steps, the optimizer state carried on.
    continued = patch_args.patch_switch == "continue" and len(plans) == 2
    schedule_steps = sum(stage_steps(plan, stage_args(plan)) for plan in plans) if continued else None

    train_dataset = functools.partial(training_blocks, stream=stream, source=train_source, tokenizer=tokenizer,
                                      batch_size=data_args.tokenize_batch_size, write_index=training_args.should_save,
                                      index_file=os.path.join(output_dir, STREAM_INDEX_FILE))
    eval_datasets = (None, None)
    if eval_source is not None:
        eval_stream, _ = cached_token_stream(eval_source, tokenizer, training_args, **cache)
        eval_datasets = validation_blocks(eval_stream, block_size, k, data_args.max_eval_blocks)

    # Every input has been read: claim the folder (delete an overwritten run's outputs, record this run).
    with training_args.main_process_first(desc="output directory"):
        claim_output_dir(output_dir, identity, outdated, training_args.should_save)

    logger.info("Attention: %s", attn_implementation)

    # Train each stage: the patch stage (skipped once complete) hands its weights to the token stage; with λ = 1
    # the patch model is the final model.
    results = {"output_dir": output_dir, "patch_size": k, "patch_data_fraction": float(patch_fraction),
               "block_size": block_size, "dataset_tokens": dataset_tokens, "budget_tokens": total_tokens,
               "attn_implementation": attn_implementation,
               **recipe_results(patch_args, step_fraction, schedule_steps)}
    job = StageJob(output_dir=output_dir, run_name=training_args.run_name, config_name=model_args.config_name,
                   init_from=model_args.model_name_or_path, attn_implementation=attn_implementation,
                   loss_implementation=model_args.loss_implementation, offset_weights=patch_args.offset_weights,
                   has_patch_stage=patch_args.has_patch_stage, has_token_stage=patch_args.has_token_stage,
                   continued=continued, schedule_steps=schedule_steps)
    trainer, final_eval = train_stages(job, plans, stage_args, train_dataset, eval_datasets, tokenizer, results)

    # Report: the accounting of both stages and the relative cost, in all_results.json.
    results_file = Path(output_dir) / ALL_RESULTS_FILE
    stages = [results[f"{p.name}_stage"] for p in plans]
    add_job_totals(results, stages, patch_fraction, k, stages[-1] if patch_args.has_token_stage else final_eval)
    if data_args.streaming:  # what the stream read of the data, null texts included (the cache logs it up front)
        results["streamed_data"] = streamed = streamed_counts(os.path.join(output_dir, STREAM_INDEX_FILE))
        if streamed and (trainer is None or trainer.args.should_save):
            logger.info("Streamed %s documents of the training data%s, %s tokens read (%d of its %d parts read whole), "
                        "of which the stages trained on %s: the stream reads ahead of training",
                        f"{streamed['documents'] - streamed['skipped_empty']:,}",
                        skipped_note({"num_skipped_empty": streamed["skipped_empty"]}), f"{streamed['tokens']:,}",
                        streamed["parts_read_whole"], streamed["parts"], f"{results['tokens']:,}")
    if trainer is None or trainer.args.should_save:
        write_json_atomic(results_file, results)
        report(results)
    return results


def cli() -> None:
    run_cli(main, "run_clm.py", on_interrupt="interrupted; re-running the same command resumes from the last checkpoint")


if __name__ == "__main__":
    cli()
