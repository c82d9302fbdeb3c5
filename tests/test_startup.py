"""`run_clm.py --help` and a usage error answer without loading the model, the Trainer or DeepSpeed (issue 12:
every command printed DeepSpeed's "Setting accelerator to CPU" line and took seconds to start)."""

import subprocess
import sys

from conftest import REPO_ROOT

# (modeling_llama_patch is light once TrainingArguments has loaded transformers: 0.06 s; PatchArguments uses it.)
HEAVY = ("deepspeed", "transformers.trainer", "patch_training.trainer", "datasets")


def test_parsing_and_a_usage_error_load_nothing_heavy():
    """After parsing the arguments (and after a usage error), none of HEAVY is imported."""
    code = (
        "import sys, run_clm\n"
        "from patch_training.cli import UsageError\n"
        "run_clm.parse_arguments(['--config_name', 'x', '--train_file', 'data/sample_train.jsonl', '--output_dir', 'o'])\n"
        "try:\n"
        "    run_clm.main(['--config_name', 'x', '--train_file', 'data/sample_train.jsonl', '--output_dir', 'o',\n"
        "                  '--learning_rate', '-1'])\n"
        "except UsageError:\n"
        "    pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout


def test_help_prints_no_deepspeed_line():
    done = subprocess.run([sys.executable, "run_clm.py", "--help"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0 and "--patch_data_fraction" in done.stdout
    assert "accelerator to" not in done.stdout + done.stderr and "ds_accelerator" not in done.stdout + done.stderr
    assert done.stderr.strip() == "", done.stderr
