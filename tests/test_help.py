"""`run_clm.py --help` (patch_training/arguments_help.py): the flags in groups, transformers' flags whose meaning
changes here explained in this project's words (--max_steps above all: a token budget, not a step count), each
flag once, no doubled or empty defaults; and the parser still parses exactly as transformers' own."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from transformers import HfArgumentParser, TrainingArguments

import run_clm
from patch_training.arguments_help import CHANGED_HERE


@pytest.fixture(scope="module")
def help_text() -> str:
    done = subprocess.run([sys.executable, "run_clm.py", "--help"], capture_output=True, text=True, cwd=REPO_ROOT,
                          check=False)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return done.stdout


GROUPS = ["model:", "data:", "patch-level training:",
          "training: transformers' flags whose meaning changes in a two-stage job:",
          "training: transformers' TrainingArguments, applied to each stage:"]


def group_of(text: str, flag: str) -> str:
    """The group heading under which `flag` is listed."""
    heading = None
    for line in text.splitlines():
        if line and not line.startswith(" "):
            heading = line
        elif line.startswith(f"  {flag} ") or line == f"  {flag}":  # an invocation, not a help line naming it
            return heading
    raise AssertionError(f"{flag} not listed")


def test_flags_are_grouped(help_text):
    headings = [line for line in help_text.splitlines() if line in GROUPS]
    assert headings == GROUPS
    assert help_text.splitlines()[0] == "usage: run_clm.py [CONFIG.json] [--FLAG VALUE ...]"
    assert group_of(help_text, "--config_name") == "model:"
    assert group_of(help_text, "--train_file") == "data:"
    assert group_of(help_text, "--patch_data_fraction") == "patch-level training:"
    assert group_of(help_text, "--bf16") == GROUPS[-1]
    for name in CHANGED_HERE:
        assert group_of(help_text, f"--{name}") == GROUPS[3], name


def test_max_steps_says_what_it_does_here(help_text):
    """Not transformers' "the total number of training steps to perform": a token budget that λ splits."""
    section = help_text.split("--max_steps MAX_STEPS", 1)[1].split("\n  --", 1)[0]
    words = " ".join(section.split())
    assert "NOT a number of optimizer steps here" in words and "the job's token budget" in words
    assert "--max_steps 10 at λ = 2/3: 7 patch + 4 token steps" in words
    assert "total number of training steps" not in help_text


def test_the_max_steps_example_is_what_the_job_plans():
    """The help's example, computed as a job plans it: tiny-patch.json (λ = 0.6667, K = 4) with --max_steps 10."""
    from patch_training.console import planned_stage_steps
    from patch_training.stages import global_batch_size, plan_stages

    args = run_clm.parse_arguments(["configs/train/tiny-patch.json", "--max_steps", "10", "--output_dir", "unused"])
    budget = 10 * global_batch_size(args.training) * args.data.block_size
    plans = plan_stages(budget, args.patch.patch_data_fraction, args.patch.patch_size, args.data.block_size)
    assert [planned_stage_steps(args, plan) for plan in plans] == [7, 4]


def test_each_flag_is_shown_once_with_one_default(help_text):
    """The dash aliases (--max-steps) are not listed; no help ends in "(default: None)", none says its default
    twice ("(default: see above). (default: None)")."""
    assert "--max-steps" not in help_text and "--per-device-train-batch-size" not in help_text
    assert "(default: None)" not in help_text and "see above" not in help_text
    flat = " ".join(help_text.split())
    assert "Default: the token stage's --per_device_train_batch_size / K" in flat
    for line in help_text.splitlines():
        assert line.count("(default:") <= 1, line


def test_every_changed_flag_is_a_training_argument():
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    assert set(CHANGED_HERE) <= names


@pytest.mark.parametrize("argv", [
    ["configs/train/tiny-patch.json", "--max-steps", "4", "--output_dir", "o"],
    ["--config_name", "c.json", "--train_file", "data/sample_train.jsonl", "--output_dir", "o", "--patch_size", "4",
     "--patch_data_fraction", "0.5", "--per-device-train-batch-size", "4", "--no_average_tokens_across_devices",
     "--bf16", "false", "--report_to", "none", "--eval_strategy", "steps", "--validation_file", "v.jsonl"],
])
def test_parses_as_transformers_parser_does(argv):
    """The aliases still parse, and every value equals what transformers' HfArgumentParser makes of the command."""
    from patch_training.cli import load_config_file

    ours = run_clm.parse_arguments(argv)
    stock = HfArgumentParser(run_clm.ARGUMENT_CLASSES, allow_abbrev=False)
    if argv[0].endswith(".json"):
        stock.set_defaults(**load_config_file(argv[0], run_clm.ARGUMENT_CLASSES))
        argv = argv[1:]
    theirs = stock.parse_args_into_dataclasses(args=argv)
    for mine, reference in zip(ours, theirs):
        values = [{f.name: getattr(a, f.name) for f in dataclasses.fields(a) if f.init} for a in (mine, reference)]
        assert values[0] == values[1]


def test_the_docs_explain_every_changed_flag():
    """docs/console.md's table of transformers' flags whose meaning changes here names each of them."""
    page = (REPO_ROOT / "docs" / "console.md").read_text()
    table = page.split("## transformers' flags whose meaning changes here", 1)[1]
    for name in CHANGED_HERE:
        assert f"`--{name}`" in table, name
