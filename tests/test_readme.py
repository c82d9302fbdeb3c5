"""The commands of README.md and docs/*.md name what exists (the run folders they name are the ones the configs or
the pages' own commands write, the files they name exist), generated files stay out of git, the scripts' defaults
fit the machine, and the README stays a page whose first screen starts the project. Running the pages' code blocks
is tests/test_docs.py's part."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
PAGES = {path.relative_to(REPO_ROOT).as_posix(): path.read_text(encoding="utf-8")
         for path in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]}
ALL_PAGES = "\n".join(PAGES.values())


def produced_run_folders() -> set[str]:
    """The runs/ folders something writes: the training configs' output_dir, the pages' own --output_dir
    flags, the GPU suite's OUT_DIR in the pages' commands, and the GPU sweep's report folder."""
    folders = {json.loads(p.read_text())["output_dir"] for p in (REPO_ROOT / "configs" / "train").glob("*.json")}
    folders |= set(re.findall(r"--output_dir (runs/[\w.-]+)", ALL_PAGES))
    folders |= set(re.findall(r"gpu_suite\.sh (runs/[\w.-]+)", ALL_PAGES))  # its OUT_DIR argument
    sweep = (REPO_ROOT / "scripts" / "sweep_gpu.sh").read_text()
    folders |= {f"runs/{name}" for name in re.findall(r"^REPORT=\$\{OUT:-runs\}/([\w.-]+)$", sweep, re.MULTILINE)}
    return folders


@pytest.mark.parametrize("page", sorted(PAGES))
def test_run_folders_are_the_ones_something_writes(page):
    """A page that names runs/llama-370m-patch, which no config writes (they write
    runs/llama-370m-patch-k4-lambda0.67), sends its reader to a folder that is not there."""
    named = set(re.findall(r"(?<![\w/.])(runs/[\w.-]*[\w-])", PAGES[page]))
    produced = produced_run_folders()
    unknown = sorted(name for name in named if name not in produced)
    assert not unknown, f"{page} names run folders that nothing writes: {unknown} (written: {sorted(produced)})"
    assert set(re.findall(r"(?<![\w/.])(runs/[\w.-]*[\w-])", README)), "the README names no run folder: the pattern is out of date"


@pytest.mark.parametrize("page", sorted(PAGES))
def test_commands_name_existing_files(page):
    """Every configs/, scripts/ and benchmarks/ file a page's code block names exists (tests/test_docs.py checks
    more paths, and the flags, block by block)."""
    blocks = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", PAGES[page], re.DOTALL))
    named = set(re.findall(r"(?<![\w/.])((?:configs|scripts|benchmarks)/[\w./-]+\.(?:json|py|sh|yaml))", blocks))
    missing = sorted(p for p in named if "*" not in p and not (REPO_ROOT / p).exists())
    assert not missing, f"{page}: commands name missing files: {missing}"
    assert re.findall(r"(?<![\w/.])((?:configs|scripts|benchmarks)/[\w./-]+\.(?:json|py|sh|yaml))", README)


def test_readme_fits_on_a_page():
    """The README says what the project is and how to start; the rest lives in docs/ by topic."""
    lines = README.count("\n")
    assert lines <= 350, f"README.md has {lines} lines: move detail into docs/"


def test_quick_start_is_on_the_first_screen():
    """A fresh reader finds the two commands that work on a fresh machine, the demo job and the tests, within the
    README's first 40 lines, each with how long it takes."""
    first_screen = README.splitlines()[:40]
    for command in ("python run_clm.py configs/train/tiny-patch.json", "python -m pytest -q tests"):
        line = next((line for line in first_screen if line.startswith(command)), None)
        assert line is not None, f"{command!r} is not on the README's first screen"
        assert re.search(r"~?\d+ min", line), f"the README's quick start does not say how long {command!r} takes"


def test_no_generated_file_in_git():
    """Token caches stay out of git, and what the pages' commands write (plots, evaluation results) lands in a
    folder git ignores, never in the repository root."""
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=REPO_ROOT, check=True).stdout.split()
    generated = [p for p in tracked if p.startswith("data/pile/tokens/") or p.endswith(("tokens.bin", ".png"))
                 and not p.startswith("benchmarks/results/")]
    assert not generated, f"generated files in git: {generated}"
    for output in ("data/pile/tokens/x/tokens.bin", "outputs/plots/curves.png", "outputs/lm_eval/m/r.json",
                   "outputs/eval/ppl.json", "runs/x/all_results.json"):
        ignored = subprocess.run(["git", "check-ignore", "-q", output], check=False, cwd=REPO_ROOT).returncode == 0
        assert ignored, f"{output} is not ignored by git"
    for page, text in PAGES.items():
        for output in re.findall(r"--(?:output|offsets_output|output_json|output_root|report_dir) (\S+)", text):
            assert output.startswith(("outputs/", "runs/", "$", "/")), f"{page} writes {output} outside an ignored folder"


def test_lm_eval_harness_device_defaults_to_the_one_that_exists(tmp_path):
    """scripts/eval_lm_harness.sh passes the device torch sees (cuda would end in a traceback on a machine without
    CUDA). A stand-in lm_eval on PATH records the arguments it gets."""
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
    done = subprocess.run(["bash", "scripts/eval_lm_harness.sh", str(model)], check=False, cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "args").read_text().split()
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert args[args.index("--device") + 1] == expected
    assert args[args.index("--output_path") + 1] == "outputs/lm_eval/tiny-patch"
    # A folder that is not there (or holds no model) is one line and exit code 2, lm_eval not started (lm_eval would
    # try it as a hub id and end in an HFValidationError traceback).
    for missing in (tmp_path / "nope", tmp_path / "bin"):
        (tmp_path / "args").unlink(missing_ok=True)
        done = subprocess.run(["bash", "scripts/eval_lm_harness.sh", str(missing)], check=False, cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True)
        assert (done.returncode, done.stderr.strip().splitlines()) == (
            2, [f"scripts/eval_lm_harness.sh: error: {missing} is not a model folder (no config.json in it)"])
        assert not (tmp_path / "args").exists()


@pytest.mark.parametrize("path", ["scripts/plot_curves.py"])
def test_plot_default_output_is_ignored(path):
    source = (REPO_ROOT / path).read_text()
    assert 'default="outputs/plots/curves.png"' in source
    assert Path(REPO_ROOT / ".gitignore").read_text().count("/outputs/") >= 1
