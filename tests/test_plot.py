"""scripts/plot_curves.py on two real tiny runs of run_clm.py (a token-level baseline and a patch run):
the curve extracted from the logs, and the PNGs."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from conftest import DATA_DIR, REPO_ROOT, TOKENIZER_DIR

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import plot_curves  # noqa: E402
from plot_curves import extract_curve, tokens_per_step  # noqa: E402

K = 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{label: run dir}: 10 optimizer steps each, batch 4 x 32 tokens; the patch run has λ = 0.5, K = 4 and
    evaluates (5 validation blocks) every 2 steps as well as at the end of each stage."""
    import run_clm

    root = tmp_path_factory.mktemp("plot_runs")
    common = [
        "--config_name", str(REPO_ROOT / "configs" / "model" / "llama-tiny.json"),
        "--tokenizer_name", str(TOKENIZER_DIR),
        "--train_file", str(DATA_DIR / "sample_train.jsonl"),
        "--validation_file", str(DATA_DIR / "wikitext-103-test.jsonl"),
        "--block_size", "32", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
        "--max_steps", "10", "--max_eval_blocks", "5", "--logging_steps", "1", "--save_steps", "1000",
        "--data_cache_dir", str(root / "cache"), "--report_to", "none",
    ]
    dirs = {"baseline": root / "baseline", "patch": root / "patch"}
    run_clm.main(common + ["--output_dir", str(dirs["baseline"])])
    run_clm.main(common + [
        "--output_dir", str(dirs["patch"]), "--patch_size", str(K), "--patch_data_fraction", "0.5",
        "--eval_strategy", "steps", "--eval_steps", "2",
    ])
    return dirs


def test_tokens_per_step_recovers_the_world_size():
    stage = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 3, "block_tokens": 256}
    # one pass over 53 blocks with a global batch of 12 (2 ranks): 5 steps, the last one partial
    assert tokens_per_step({**stage, "steps": 5, "tokens": 53 * 256}) == 12 * 256
    assert tokens_per_step({**stage, "steps": 5, "tokens": 60 * 256}) == 12 * 256  # max_steps reached first
    assert tokens_per_step({**stage, "steps": 5, "tokens": 53 * 256, "world_size": 4}) == 24 * 256
    assert tokens_per_step({**stage, "tokens_per_step": 1000}) == 1000


def test_baseline_curve(runs):
    results = json.loads((runs["baseline"] / "all_results.json").read_text())
    curve = extract_curve(runs["baseline"])
    train = curve.train
    assert curve.patch_size == 1 and curve.switch_tokens is None
    assert set(train["stage"]) == {"token"} and len(train["loss"]) == results["token_stage"]["steps"]
    assert np.all(np.diff(train["tokens"]) > 0)
    np.testing.assert_allclose(train["cost"], train["tokens"])  # token level: one token costs one token
    np.testing.assert_allclose(train["tokens"], train["step"] * 4 * 32)
    assert curve.total_tokens == results["tokens"]
    assert curve.eval["loss"][-1] == pytest.approx(results["eval_loss"])


def test_patch_curve_cost_is_one_kth_in_the_patch_stage(runs):
    results = json.loads((runs["patch"] / "all_results.json").read_text())
    patch_tokens = results["patch_stage"]["tokens"]
    curve = extract_curve(runs["patch"], label="patch")
    train = curve.train
    patch, token = train["stage"] == "patch", train["stage"] == "token"
    assert curve.patch_size == K and patch.any() and token.any()
    assert np.all(np.diff(train["tokens"]) > 0), "tokens must grow across the stage switch"
    assert np.all(np.diff(train["cost"]) > 0)
    assert curve.switch_tokens == patch_tokens and curve.switch_cost == pytest.approx(patch_tokens / K)
    assert train["tokens"][patch].max() <= patch_tokens < train["tokens"][token].min()

    # the cost of a token: 1/K in the patch stage, 1 in the token stage
    np.testing.assert_allclose(train["cost"][patch], train["tokens"][patch] / K)
    np.testing.assert_allclose(train["cost"][token] - curve.switch_cost, train["tokens"][token] - patch_tokens)
    patch_slope = np.diff(train["cost"][patch]) / np.diff(train["tokens"][patch])
    token_slope = np.diff(train["cost"][token]) / np.diff(train["tokens"][token])
    np.testing.assert_allclose(patch_slope, 1 / K)
    np.testing.assert_allclose(token_slope, 1.0)
    assert curve.total_cost / curve.total_tokens == pytest.approx(results["relative_cost_measured"])

    # validation points: every 2 steps and at the end of each stage, token-level in both stages
    assert {"patch", "token"} <= set(curve.eval["stage"])
    assert len(curve.eval["loss"]) >= 4 and np.all(np.isfinite(curve.eval["loss"]))
    assert curve.eval["loss"][-1] == pytest.approx(results["eval_loss"])
    # per-offset losses: K of them, logged at each patch-stage step
    assert sorted(curve.offsets) == list(range(1, K + 1))
    steps, _ = curve.offsets[1]
    np.testing.assert_array_equal(steps, train["step"][patch])


def test_log_history_falls_back_to_the_last_checkpoint(runs, tmp_path):
    """A run without the per-stage trainer_state.json (older run_clm.py): the last checkpoint's is read."""
    import shutil

    copy = tmp_path / "patch"
    shutil.copytree(runs["patch"], copy, ignore=shutil.ignore_patterns("*.safetensors", "*.pt", "*.pth", "*.bin"))
    removed = [copy / "trainer_state.json", copy / "patch_stage" / "trainer_state.json"]
    for path in removed:
        path.unlink()
    assert list(copy.glob("checkpoint-*/trainer_state.json")) and list(copy.glob("patch_stage/checkpoint-*/trainer_state.json"))
    full, fallback = extract_curve(runs["patch"]), extract_curve(copy)
    for column in ("step", "tokens", "cost", "loss"):
        np.testing.assert_allclose(fallback.train[column], full.train[column])
    assert fallback.eval["loss"][-1] == pytest.approx(full.eval["loss"][-1])  # the end-of-stage evaluation, from all_results.json


def test_plots_are_written(runs, tmp_path):
    """Into folders that do not exist yet (before: a FileNotFoundError traceback from matplotlib)."""
    curves_png, offsets_png = tmp_path / "new" / "curves.png", tmp_path / "other" / "deeper" / "offsets.png"
    curves = plot_curves.main([
        "--run", f"baseline={runs['baseline']}", "--run", f"patch={runs['patch']}",
        "--output", str(curves_png), "--offsets_output", str(offsets_png),
    ])
    assert [c.label for c in curves] == ["baseline", "patch"]
    for png in (curves_png, offsets_png):
        assert png.stat().st_size > 10_000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_results_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="all_results.json"):
        extract_curve(tmp_path)
    with pytest.raises(SystemExit):
        plot_curves.main(["--run", f"x={tmp_path}", "--output", str(tmp_path / "c.png")])


def test_bad_dpi_is_a_clear_error(runs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plot_curves.main(["--run", f"patch={runs['patch']}", "--output", str(tmp_path / "c.png"), "--dpi", "0"])
    assert exit_info.value.code == 2 and "--dpi must be >= 1, got 0" in capsys.readouterr().err


def run_flags(runs):
    return ["--run", f"baseline={runs['baseline']}", "--run", f"patch={runs['patch']}"]


def refused(argv, capsys) -> str:
    """The error line of a refused command (exit code 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        plot_curves.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    return err.strip().splitlines()[-1]


def wrote(capsys) -> list[str]:
    return [line.split("wrote ", 1)[1] for line in capsys.readouterr().out.splitlines() if " wrote " in line]


def test_an_existing_folder_or_a_name_without_extension(runs, tmp_path, capsys):
    """Regression: `--output <existing folder>` wrote <folder>.png and `--output .../9` wrote 9.png, each printing
    the name given. A folder (existing, or written with a trailing /) gets curves.png / offsets.png inside; a
    name without an extension gets matplotlib's default, .png; what is printed is what was written."""
    folder = tmp_path / "plots2"
    folder.mkdir()
    plot_curves.main([*run_flags(runs), "--output", str(folder), "--offsets_output", str(tmp_path / "9")])
    expected = [folder / "curves.png", tmp_path / "9.png"]
    assert wrote(capsys) == [str(path) for path in expected]
    assert sorted(tmp_path.rglob("*.png")) == sorted(expected) and not (tmp_path / "plots2.png").exists()
    assert all(path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in expected)
    # the same folder for both, and a new one named with a trailing /: both plots in it, side by side
    plot_curves.main([*run_flags(runs), "--output", f"{tmp_path / 'new'}/", "--offsets_output", f"{tmp_path / 'new'}/"])
    assert wrote(capsys) == [str(tmp_path / "new" / "curves.png"), str(tmp_path / "new" / "offsets.png")]
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["curves.png", "offsets.png"]


def test_other_formats_by_extension(runs, tmp_path, capsys):
    plot_curves.main(["--run", f"patch={runs['patch']}", "--output", str(tmp_path / "c.PDF"), "--offsets_output", str(tmp_path / "o.svg")])
    assert wrote(capsys) == [str(tmp_path / "c.PDF"), str(tmp_path / "o.svg")]
    assert (tmp_path / "c.PDF").read_bytes()[:5] == b"%PDF-" and b"<svg" in (tmp_path / "o.svg").read_bytes()[:1000]


@pytest.mark.parametrize("name", ["x.csv", "x.txt", "model.safetensors", "trainer_state.json", "curves.png.bak"])
@pytest.mark.parametrize("flag", ["--output", "--offsets_output"])
def test_an_extension_matplotlib_cannot_write_is_one_line(runs, tmp_path, capsys, name, flag):
    """Regression: matplotlib's ValueError traceback, after the run folders were read. The formats named are
    matplotlib's own list."""
    from matplotlib.figure import Figure

    outputs = {"--output": str(tmp_path / "c.png"), flag: str(tmp_path / name)}
    line = refused([*run_flags(runs), *(item for pair in outputs.items() for item in pair)], capsys)
    extension = name.rsplit(".", 1)[1]
    supported = ", ".join(f".{ext}" for ext in sorted(Figure().canvas.get_supported_filetypes()))
    assert line == f"plot_curves.py: error: {flag} {tmp_path / name}: matplotlib cannot write .{extension} files; give one of {supported}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("offsets", ["c.png", "./c.png", "sub/../c.png", "c", "link.png", "hard.png"])
def test_the_same_file_for_both_plots_is_refused(runs, tmp_path, capsys, monkeypatch, offsets):
    """Regression: the offsets plot replaced the curves plot without a word."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "c.png").write_bytes(b"old")
    (tmp_path / "link.png").symlink_to(tmp_path / "c.png")
    (tmp_path / "hard.png").hardlink_to(tmp_path / "c.png")
    line = refused([*run_flags(runs), "--output", "c.png", "--offsets_output", offsets], capsys)
    assert line.startswith("plot_curves.py: error: --output and --offsets_output are the same file")
    assert (tmp_path / "c.png").read_bytes() == b"old"


@pytest.mark.parametrize("target", ["all_results.json", "trainer_state.json", "patch_stage/trainer_state.json"])
@pytest.mark.parametrize("flag", ["--output", "--offsets_output"])
def test_an_output_that_is_an_input_is_refused(runs, tmp_path, capsys, target, flag):
    """A link named *.png to a file the plot reads (or that file, by its name) is refused; the file is intact."""
    source = runs["patch"] / target
    before = source.read_bytes()
    (tmp_path / "link.png").symlink_to(source)
    for given in (tmp_path / "link.png", source):
        outputs = {"--output": str(tmp_path / "c.png"), flag: str(given)}
        line = refused([*run_flags(runs), *(item for pair in outputs.items() for item in pair)], capsys)
        assert f"{flag} {given}" in line and ("which the plot reads (run 'patch')" in line or "cannot write .json" in line)
    assert source.read_bytes() == before and not (tmp_path / "c.png").exists()


@pytest.mark.parametrize(
    "specs, label",
    [
        (["same={baseline}", "same={patch}"], "same"),
        (["{root}/a/run", "{root}/b/run"], "run"),  # bare folders: labelled by their names
        (["run={baseline}", "{root}/b/run"], "run"),
    ],
)
def test_two_runs_with_one_label_are_refused(runs, tmp_path, capsys, specs, label):
    """Regression: the legend showed two identical labels."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "run").symlink_to(runs["patch"])
    argv = []
    for spec in specs:
        argv += ["--run", spec.format(root=tmp_path, **runs)]
    line = refused([*argv, "--output", str(tmp_path / "c.png")], capsys)
    assert line.startswith(f"plot_curves.py: error: --run: 2 runs have the label {label!r}") and "LABEL=DIR" in line
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("text, message", [('{"tokens": 1, "tokens": 2}', "has the key 'tokens' twice"),
                                           ('{"tokens": ', "is not valid JSON")])
def test_a_broken_results_file_is_one_line(tmp_path, capsys, text, message):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "all_results.json").write_text(text)
    line = refused(["--run", f"x={tmp_path / 'run'}", "--output", str(tmp_path / "c.png")], capsys)
    assert line.startswith(f"plot_curves.py: error: {tmp_path / 'run' / 'all_results.json'}") and message in line
