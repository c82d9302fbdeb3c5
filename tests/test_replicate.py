"""scripts/replicate.py end to end on a tenth of the CPU preset's budget: the three runs through run_clm.py, the
cost each one measures against the paper's formula (λ/K + 1 - λ), the table, the curves; and its bad input."""

import json
import math
import subprocess
import sys

import pytest
from conftest import IN_THE_WAY, REPO_ROOT, path_in_the_way, refused_as_in_the_way

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import replicate  # noqa: E402

SCRIPT = str(REPO_ROOT / "scripts" / "replicate.py")


def test_small_replication_measures_the_promised_costs(tmp_path):
    root = tmp_path / "replication"
    done = subprocess.run(
        [sys.executable, SCRIPT, "--preset", "cpu", "--epochs", "0.1", "--output_root", str(root),
         "--data_cache_dir", str(tmp_path / "cache"), "--", "--max_eval_blocks", "4", "--eval_strategy", "no"],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((root / "replication.json").read_text())
    runs = {run["name"]: run for run in report["runs"]}
    assert list(runs) == ["token", "patch", "tail"]
    # Costs in positions over the token run's budget: 1 (token), 2/3 / 4 + 1/3 = 0.5 (patch), 1/3 (tail);
    # blocks are whole, so each is off by at most a block or two of the 18,944-token budget.
    assert runs["token"]["relative_cost"] == pytest.approx(1.0, abs=0.01)
    assert runs["patch"]["relative_cost"] == pytest.approx(0.5, abs=0.02)
    assert runs["tail"]["relative_cost"] == pytest.approx(1 / 3, abs=0.02)
    assert runs["patch"]["tokens"] == pytest.approx(runs["token"]["tokens"], rel=0.03)  # the same data, read as patches
    assert all(math.isfinite(run["perplexity"]) and run["perplexity"] > 1 for run in runs.values())
    table = (root / "replication.md").read_text()
    assert all(f"| {name} |" in table for name in runs)
    assert (root / "curves.png").stat().st_size > 0 and (root / "offsets.png").stat().st_size > 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--epochs", "0"], "--epochs must be > 0, got 0.0"),
        (["--runs", "token,bogus"], "--runs takes distinct names among token,patch,tail, got 'token,bogus'"),
        (["--runs", "patch,patch"], "--runs takes distinct names"),
        (["--train_file", "/nope.jsonl"], "--train_file: no such file /nope.jsonl"),
    ],
)
def test_bad_input_is_refused_before_any_run(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        replicate.main(["--preset", "cpu", "--output_root", str(tmp_path / "r"), *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_failed_run_ends_with_one_line_not_a_traceback(tmp_path):
    """Regression: a failing run_clm.py call ended replicate.py with subprocess's CalledProcessError traceback."""
    done = subprocess.run(
        [sys.executable, SCRIPT, "--preset", "cpu", "--output_root", str(tmp_path / "r"), "--", "--learning_rate", "-1"],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "run_clm.py: error: --learning_rate must be >= 0, got -1.0" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("replicate.py: error: the token run failed (run_clm.py exit code 2")


@pytest.fixture
def no_run(monkeypatch):
    """replicate.train fails the test: bad input must be refused before the first run starts."""
    def train(*args, **kwargs):
        raise AssertionError("a run was started")

    monkeypatch.setattr(replicate, "train", train)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400", "Infinity", "NaN"])
def test_a_non_finite_epochs_is_refused_before_any_run(tmp_path, capsys, no_run, value):
    """Regression: `--epochs inf` (not nan: `nan > 0` is false) started the first run, which then failed. The rule
    and words of patch_training.cli.refuse_non_finite, for every float option."""
    with pytest.raises(SystemExit) as exit_info:
        replicate.main(["--preset", "cpu", "--output_root", str(tmp_path / "r"), f"--epochs={value}"])
    number = float(value)
    expected = "a number, got nan" if math.isnan(number) else f"a finite number, got {number}"
    assert exit_info.value.code == 2 and f"replicate.py: error: --epochs must be {expected}" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_every_float_option_is_checked(capsys):
    """refuse_non_finite_options finds the float options of any parser (replicate.py's has only --epochs)."""
    import argparse

    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--a", type=float, default=1.0)
    parser.add_argument("--b", type=float, default=None)
    parser.add_argument("--n", type=int, default=3)
    replicate.refuse_non_finite_options(parser, parser.parse_args(["--a", "2"]))  # finite, and None: fine
    for argv, message in ((["--b=-inf"], "--b must be a finite number, got -inf"), (["--a", "nan"], "--a must be a number, got nan")):
        with pytest.raises(SystemExit):
            replicate.refuse_non_finite_options(parser, parser.parse_args(argv))
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"x: error: {message}"


@pytest.mark.parametrize("flag", ["--output_root", "--data_cache_dir"])
@pytest.mark.parametrize("below", [False, True])
@pytest.mark.parametrize("kind", IN_THE_WAY)
def test_a_folder_option_that_is_a_file_is_one_line(tmp_path, capsys, no_run, flag, below, kind):
    """Regression: --output_root naming a file (or a path under one) ended in a FileExistsError traceback."""
    blocker = path_in_the_way(tmp_path, kind)
    folder = blocker / "sub" if below else blocker
    argv = ["--preset", "cpu", "--output_root", str(tmp_path / "r"), flag, str(folder)]
    refused_as_in_the_way(replicate.main, "replicate.py", argv, flag, folder, blocker, kind, capsys)
    assert not (tmp_path / "r").exists()


def test_relative_folders_are_taken_from_the_current_folder(tmp_path, monkeypatch):
    """run_clm.py runs in the repository root and this script reads its results where it runs: a relative
    --output_root was one folder for the one and another for the other."""
    seen = {}

    def train(settings, name, fraction, patch_size, skip, args, extra, prog="replicate.py"):
        seen.update(output_root=args.output_root, data_cache_dir=args.data_cache_dir)
        raise KeyboardInterrupt

    monkeypatch.setattr(replicate, "train", train)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        replicate.main(["--preset", "cpu", "--output_root", "r", "--data_cache_dir", "cache"])
    assert seen == {"output_root": str(tmp_path / "r"), "data_cache_dir": str(tmp_path / "cache")}


@pytest.mark.parametrize("extra, expected", [
    ([], "configs/model/llama-tiny.json"),
    (["--config_name", "configs/model/llama-20m.json"], "configs/model/llama-20m.json"),
    (["--config-name=configs/model/llama-20m.json"], "configs/model/llama-20m.json"),
    (["--config_name", "a.json", "--eval_strategy", "no", "--config_name", "b.json"], "b.json"),
])
def test_the_report_records_the_settings_given_after_the_separator(extra, expected):
    """Regression: `sweep.py -- --config_name X` trained X (the flags after `--` come last in each run's command)
    but counted the parameters of, and reported, the preset's model. `settings_given_after` takes what those
    flags give the settings' keys, in every spelling run_clm.py reads, the last one winning; other keys keep the
    preset's values."""
    settings = replicate.settings_given_after(dict(replicate.PRESETS["cpu"]), extra)
    assert settings["config_name"] == expected
    assert {k: v for k, v in settings.items() if k != "config_name"} == {
        k: v for k, v in replicate.PRESETS["cpu"].items() if k != "config_name"}
    from types import SimpleNamespace

    import run_clm

    run_args = SimpleNamespace(validation_file="v.jsonl", output_root="/tmp/r", epochs=1.0, seed=42, data_cache_dir=None)
    command = replicate.run_clm_command(settings, "token", 0.0, 4, 0.0, run_args, extra)
    model_args = run_clm.parse_arguments(command[2:])[0]  # the reference: what run_clm.py's parser reads
    assert model_args.config_name == expected
