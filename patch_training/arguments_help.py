"""`run_clm.py --help`: the flags in groups (model, data, patch-level training, then transformers' training flags,
those whose meaning changes in a two-stage job first and in this project's words, `CHANGED_HERE`), each flag shown
once under its underscore name, and a default shown only where the help does not already say it.

`ArgumentParser` is transformers' `HfArgumentParser` with that layout; it parses exactly as the stock one (the
dash-separated aliases are still accepted, only not printed).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from types import MappingProxyType
from typing import get_type_hints

from transformers import HfArgumentParser, TrainingArguments

# transformers' TrainingArguments whose meaning changes when one launch trains a patch stage then a token stage: the
# help run_clm.py prints for them (docs/console.md repeats it).
CHANGED_HERE = {
    "output_dir": (
        "The job's folder: the final (token-level) model, its README.md model card, all_results.json and the token "
        "stage's checkpoints; the patch stage's model, card and checkpoints go to <output_dir>/patch_stage/. "
        "Re-running the same command resumes the job; re-running a finished one only reports it."
    ),
    "max_steps": (
        "NOT a number of optimizer steps here: it sets the job's token budget, max_steps x the global batch "
        "(--per_device_train_batch_size x --gradient_accumulation_steps x processes) x --block_size tokens, the "
        "tokens of that many token-level steps, which λ splits between the stages. A patch-stage step holds as "
        "many tokens as a token-stage step (--patch_batch_mode tokens), so the stages take about λ x max_steps and "
        "(1 - λ) x max_steps optimizer steps, each rounded up (--max_steps 10 at λ = 2/3: 7 patch + 4 token "
        "steps); with --patch_batch_mode positions the patch stage takes K times fewer. The job's first log line "
        "prints each stage's steps (`Job: ...`). -1 (the default): --num_train_epochs sets the budget."
    ),
    "num_train_epochs": (
        "Passes over the training data that make the job's token budget (epochs x the data's tokens; a fraction "
        "reads part of it), which λ splits: each stage reads its share once, so the `epoch` that each stage logs "
        "goes from 0 to 1 over that stage's own data. Not used when --max_steps is set."
    ),
    "per_device_train_batch_size": (
        "The token stage's micro-batch per device, in sequences of --block_size T tokens. The patch stage's, unless "
        "--patch_per_device_train_batch_size is set: this / K sequences of K*T tokens, the same tokens per step "
        "(or this many with --gradient_accumulation_steps / K when it is not divisible by K); with "
        "--patch_batch_mode positions, this many sequences of K*T tokens."
    ),
    "gradient_accumulation_steps": (
        "Micro-batches per optimizer step in both stages (the patch stage's: --patch_gradient_accumulation_steps "
        "when set, or this / K when the micro-batch is not divisible by K)."
    ),
    "learning_rate": (
        "Peak learning rate of the token stage, and of the patch stage unless --patch_learning_rate is set (with "
        "--patch_switch continue: of the one schedule over both stages)."
    ),
    "lr_scheduler_type": (
        "The learning-rate schedule, restarted in each stage over that stage's own optimizer steps (the paper's "
        "switch: a new warmup and schedule); with --patch_switch continue, one schedule over both stages' steps."
    ),
    "warmup_steps": (
        "Linear warmup of each stage's schedule, in that stage's optimizer steps (a number below 1: a fraction of "
        "that stage's steps); the patch stage's is --patch_warmup_steps when set. With --patch_switch continue, "
        "one warmup at the start of the job's one schedule."
    ),
    "logging_steps": (
        "Log every this many optimizer steps of each stage (a number below 1: a fraction of that stage's steps); "
        "the count restarts at the switch. Each training log also carries tokens_per_second, positions_per_second "
        "and, on a GPU whose peak is known, mfu."
    ),
    "eval_steps": (
        "With --eval_strategy steps: evaluate every this many optimizer steps of each stage (below 1: a fraction "
        "of that stage's steps). Default: --logging_steps."
    ),
    "save_steps": (
        "With --save_strategy steps: a checkpoint every this many optimizer steps of each stage, in the stage's "
        "folder (below 1: a fraction of that stage's steps)."
    ),
    "save_total_limit": "Checkpoints kept in each stage's folder (<output_dir>/patch_stage/ and <output_dir>); unset: all.",
    "eval_strategy": (
        "When each stage evaluates on --validation_file: the token-level loss and perplexity (the model run at "
        "K = 1) in both stages, and the patch-level loss (eval_patch_loss) in the patch stage. Each stage is also "
        "evaluated at its end."
    ),
    "seed": "Seeds the first stage's random weights and each stage's order of its blocks.",
    "report_to": (
        "Experiment trackers, several separated by commas (tensorboard,wandb), or none/all: one run for the whole "
        "job, its points on the job's step and on the tokens and positions axes, with each training log's "
        "tokens_per_second, positions_per_second and mfu."
    ),
}

USAGE = "%(prog)s [CONFIG.json] [--FLAG VALUE ...]"
EPILOG = ("A CONFIG.json (e.g. configs/train/tiny-patch.json) sets any of these flags; flags after it override its "
          "values. What a run prints, and the flags above in detail: docs/console.md.")


class HelpFormatter(argparse.HelpFormatter):
    """Each flag under its first long name only (`--max_steps MAX_STEPS`, not also `--max-steps MAX_STEPS`), and its
    default appended only where the help does not mention one and the default is set."""

    def _format_action_invocation(self, action):
        if not action.option_strings:
            return super()._format_action_invocation(action)
        name = next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
        if action.nargs == 0:
            return name
        return f"{name} {self._format_args(action, self._get_default_metavar_for_optional(action))}"

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default in (None, argparse.SUPPRESS) or "default" in text.lower() or not action.option_strings
                or "%(default)" in text):
            return text
        default = getattr(action.default, "value", action.default)
        return f"{text} (default: {str(default).replace('%', '%%')})"


def group_title(dtype) -> str:
    return getattr(dtype, "_argument_group_name", dtype.__name__)


def group_description(dtype) -> str | None:
    """The first paragraph of a dataclass's docstring, on one line."""
    doc = (dtype.__doc__ or "").strip()
    return " ".join(doc.split("\n\n")[0].split()) or None


class ArgumentParser(HfArgumentParser):
    """transformers' HfArgumentParser with run_clm.py's help layout (see the module docstring): a group per argument
    dataclass (titled by its `_argument_group_name`), and for a TrainingArguments class a first group of the flags
    whose meaning changes here (`CHANGED_HERE`), with their help replaced."""

    def __init__(self, dataclass_types, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("usage", USAGE)
        kwargs.setdefault("epilog", EPILOG)
        super().__init__(dataclass_types, **kwargs)

    def _add_dataclass_arguments(self, dtype):
        type_hints = get_type_hints(dtype)
        fields = [f for f in dataclasses.fields(dtype) if f.init]
        groups = {}
        if isinstance(dtype, type) and issubclass(dtype, TrainingArguments):
            groups["changed"] = self.add_argument_group(
                "training: transformers' flags whose meaning changes in a two-stage job",
                "One launch trains a patch stage, then a token stage, each with its own Trainer.")
        groups["own"] = self.add_argument_group(group_title(dtype), group_description(dtype))
        for field in fields:
            field.type = type_hints[field.name]
            if "changed" in groups and field.name in CHANGED_HERE:
                shown = copy.copy(field)
                shown.metadata = MappingProxyType({**field.metadata, "help": CHANGED_HERE[field.name]})
                self._parse_dataclass_field(groups["changed"], shown)
            else:
                self._parse_dataclass_field(groups["own"], field)
