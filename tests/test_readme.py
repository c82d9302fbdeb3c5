"""The README's commands run as written (the run folders they name are the ones the configs write, the files
they name exist), generated files stay out of git, and the scripts' defaults fit the machine (issue 12)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def produced_run_folders() -> set[str]:
    """The runs/ folders something writes: the training configs' output_dir, the README's own --output_dir
    flags, the GPU suite's OUT_DIR in the README's commands, and the GPU sweep's report folder."""
    folders = {json.loads(p.read_text())["output_dir"] for p in (REPO_ROOT / "configs" / "train").glob("*.json")}
    folders |= set(re.findall(r"--output_dir (runs/[\w.-]+)", README))
    folders |= set(re.findall(r"gpu_suite\.sh (runs/[\w.-]+)", README))  # its OUT_DIR argument
    sweep = (REPO_ROOT / "scripts" / "sweep_gpu.sh").read_text()
    folders |= {f"runs/{name}" for name in re.findall(r"^REPORT=\$\{OUT:-runs\}/([\w.-]+)$", sweep, re.M)}
    return folders


def test_readme_run_folders_are_the_ones_the_configs_write():
    """Before, the README's examples named runs/llama-370m-patch, which no config writes (they write
    runs/llama-370m-patch-k4-lambda0.67)."""
    named = set(re.findall(r"(?<![\w/.])(runs/[\w.-]*[\w-])", README))
    assert named, "the README names no run folder: the pattern is out of date"
    produced = produced_run_folders()
    unknown = sorted(name for name in named if name not in produced)
    assert not unknown, f"the README names run folders that nothing writes: {unknown} (written: {sorted(produced)})"


def test_readme_commands_name_existing_files():
    """Every configs/, scripts/, benchmarks/ and data/ file a README code block names exists."""
    blocks = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", README, re.S))
    named = set(re.findall(r"(?<![\w/.])((?:configs|scripts|benchmarks)/[\w./-]+\.(?:json|py|sh|yaml))", blocks))
    assert named
    missing = sorted(p for p in named if "*" not in p and not (REPO_ROOT / p).exists())
    assert not missing, f"README commands name missing files: {missing}"


def test_no_generated_file_in_git():
    """Before, token caches were committed under data/pile/tokens/ and the plot and lm_eval commands wrote into
    the repository root, which git did not ignore."""
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=REPO_ROOT, check=True).stdout.split()
    generated = [p for p in tracked if p.startswith("data/pile/tokens/") or p.endswith(("tokens.bin", ".png"))
                 and not p.startswith("benchmarks/results/")]
    assert not generated, f"generated files in git: {generated}"
    for output in ("data/pile/tokens/x/tokens.bin", "outputs/plots/curves.png", "outputs/lm_eval/m/r.json",
                   "outputs/eval/ppl.json", "runs/x/all_results.json"):
        ignored = subprocess.run(["git", "check-ignore", "-q", output], cwd=REPO_ROOT).returncode == 0
        assert ignored, f"{output} is not ignored by git"
    for default in re.findall(r"--(?:output|offsets_output) (\S+)", README):
        assert default.startswith(("outputs/", "runs/", "$")), f"README writes {default} outside an ignored folder"


def test_lm_eval_harness_device_defaults_to_the_one_that_exists(tmp_path):
    """Before, scripts/eval_lm_harness.sh passed --device cuda by default and ended in a traceback on a machine
    without CUDA. A stand-in lm_eval on PATH records the arguments it gets."""
    import torch

    fake = tmp_path / "bin" / "lm_eval"
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\necho "$@" > "$ARGS_FILE"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
           "ARGS_FILE": str(tmp_path / "args"), "PYTHON": sys.executable}
    env.pop("DEVICE", None)
    model = tmp_path / "tiny-patch"
    model.mkdir()
    (model / "config.json").write_text("{}")
    done = subprocess.run(["bash", "scripts/eval_lm_harness.sh", str(model)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "args").read_text().split()
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert args[args.index("--device") + 1] == expected
    assert args[args.index("--output_path") + 1] == "outputs/lm_eval/tiny-patch"
    # Regression: a folder that is not there (or holds no model) went to lm_eval, which tried it as a hub id
    # (58 lines ending in HFValidationError); now one line and exit code 2, lm_eval not started.
    for missing in (tmp_path / "nope", tmp_path / "bin"):
        (tmp_path / "args").unlink(missing_ok=True)
        done = subprocess.run(["bash", "scripts/eval_lm_harness.sh", str(missing)], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True)
        assert (done.returncode, done.stderr.strip().splitlines()) == (
            2, [f"scripts/eval_lm_harness.sh: error: {missing} is not a model folder (no config.json in it)"])
        assert not (tmp_path / "args").exists()


@pytest.mark.parametrize("path", ["scripts/plot_curves.py"])
def test_plot_default_output_is_ignored(path):
    source = (REPO_ROOT / path).read_text()
    assert 'default="outputs/plots/curves.png"' in source
    assert Path(REPO_ROOT / ".gitignore").read_text().count("/outputs/") >= 1
