#!/usr/bin/env python
"""Patch-level then token-level training of a causal LM, in one launch.

A fork of the shape of transformers' `examples/pytorch/language-modeling/run_clm.py` (argument dataclasses
parsed by `HfArgumentParser`; a lone `*.json` argument is a config file) that adds patch-level training
(Shao, Meng, Zhou, ICLR 2025, arXiv:2407.12665):

1. the first fraction λ (`--patch_data_fraction`) of the training tokens is read in patches of K
   (`--patch_size`) tokens: sequences of K*T tokens, T patches each, K-way next-patch loss;
2. only the weights are kept (`<output_dir>/patch_stage/`); with a fresh optimizer, scheduler and trainer
   state, ordinary token-level training (K = 1, sequences of T tokens) runs on the remaining 1 - λ.

Relative cost λ/K + 1 - λ of a token-level run on the same tokens. λ = 0 is the token-level baseline.

Each of the paper's choices can be changed on its own (docs/recipes.md: Token Superposition
Training's): the split by a fraction r of the optimizer steps (`--patch_step_fraction`), patch steps with the token
steps' positions rather than tokens (`--patch_batch_mode positions`), the optimizer state and one schedule carried
across the switch (`--patch_switch continue`), and weighted offsets in the K-way loss (`--patch_offset_weights`).

Works under `python`, `torchrun`, `accelerate launch` and `deepspeed`. Re-running the same command resumes
an interrupted job; re-running a finished one reports its results and changes nothing.

This file is the driver: the arguments and `main()`, which reads as the algorithm in six steps. The work is
done by the `patch_training` package beside it (`job`: inputs and plan; `run_dir`: the output folder, resume
and completion; `stage_loop`: the stages) and the model by `modeling_llama_patch.py`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

from patch_training.cli import UsageError, blank_as_unset, parse_arguments as parse_command_line, refuse_below, run_cli
from patch_training.guards import preemption_signals
from patch_training.job import load_inputs, plan_job
from patch_training.run_dir import RunDir
from patch_training.stages import PATCH_BATCH_MODES, PATCH_SWITCHES
from patch_training.training_args import RunTrainingArguments

logger = logging.getLogger("run_clm")

DEFAULT_TOKENIZER = "data/llama2_tokenizer"


# ---------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    """Which model to train: a config of any decoder-only causal LM in transformers (Llama, Qwen, Mistral, Gemma,
    OLMo, MoE models, ...) to start from scratch, or a checkpoint to continue pre-training from."""

    _argument_group_name = "model"

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
            "32,000; see docs/throughput.md)."
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

    _argument_group_name = "data"

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

    _argument_group_name = "patch-level training"

    patch_size: int = field(default=1, metadata={"help": "K, the number of tokens per patch in the patch stage."})
    patch_data_fraction: float = field(
        default=0.0,
        metadata={
            "help": "λ, the fraction of the training data used at patch level: 0 = token-level baseline, "
            "0 < λ < 1 = both stages, 1 = patch stage only."
        },
    )
    patch_per_device_train_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Patch-stage micro-batch per device in sequences of K*T tokens. Default: the token stage's "
            "--per_device_train_batch_size / K (the same tokens per optimizer step), or with --patch_batch_mode "
            "positions the token stage's."
        },
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
    # Recipes beyond the paper (docs/recipes.md): each choice independently, the paper's by default.
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


class JobArguments(NamedTuple):
    """The parsed arguments of a job, one dataclass per group."""

    model: ModelArguments
    data: DataArguments
    patch: PatchArguments
    training: RunTrainingArguments


ARGUMENT_CLASSES = (ModelArguments, DataArguments, PatchArguments, RunTrainingArguments)


def parse_arguments(argv: list[str] | None = None) -> JobArguments:
    """Parse the command line: flags, a lone `*.json` config file, or a config file followed by flags that
    override its values (`run_clm.py configs/train/x.json --output_dir runs/y`). UsageError for any bad value."""
    return JobArguments(*parse_command_line(ARGUMENT_CLASSES, argv))


def configure_logging(training_args: RunTrainingArguments) -> None:
    """This script's log lines on the main process (warnings only elsewhere); transformers' warnings only."""
    import transformers

    level = logging.INFO if training_args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    transformers.utils.logging.set_verbosity(logging.WARNING)


# ---------------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    # 1. The arguments: flags, or a JSON config file and flags that override it; each group checks its own.
    args = parse_arguments(argv)
    configure_logging(args.training)
    # 2. The inputs: data sources, model config and tokenizer, loaded once and checked against each other and
    #    against the run settings, before anything is written.
    inputs = load_inputs(args)
    # 3. The run folder: the run's identity and the folder's rules. A finished run reports and changes nothing.
    run = RunDir.open(args, inputs)
    if run.finished:
        return run.report_finished()
    # From here on a second run into the folder is refused, and SIGTERM or SIGUSR1 stops the run with its state
    # saved and exit code 75 (guards.py): re-running the same command resumes it.
    with run.locked(), preemption_signals():
        # 4. Tokenise once (the on-disk cache, or a stream) and split the token budget between the stages (λ).
        job = plan_job(args, inputs, run.stream_index_file)
        # 5. Every input has been read: claim the folder (an overwritten run's outputs are deleted only now).
        run.claim()
        # 6. Train the stages in order (the patch stage hands its weights to the token stage), save, report.
        from patch_training.stage_loop import train_stages  # the Trainer loads only for a job that trains

        return run.finish(train_stages(job, run))


def cli() -> None:
    run_cli(main, "run_clm.py", on_interrupt="interrupted; re-running the same command resumes from the last checkpoint")


if __name__ == "__main__":
    cli()
