"""scripts/replicate.py end to end on a tenth of the CPU preset's budget: the three runs through run_clm.py, the
cost each one measures against the paper's formula (λ/K + 1 - λ), the table, the curves; and its bad input."""

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

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
    """Before, a failing run_clm.py call ended replicate.py with subprocess's CalledProcessError traceback."""
    done = subprocess.run(
        [sys.executable, SCRIPT, "--preset", "cpu", "--output_root", str(tmp_path / "r"), "--", "--learning_rate", "-1"],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "run_clm.py: error: --learning_rate must be >= 0, got -1.0" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("replicate.py: error: the token run failed (run_clm.py exit code 2")
