"""Experiment tracking (`--report_to`): one job is one run in TensorBoard / W&B, with a step that continues across
the switch from patch to token level and the paper's axes (training tokens, compute in token-level
equivalents) equal to the accounting of all_results.json; a resume leaves no duplicated points; a tracker that
is not installed is refused in one line. Event files are read with TensorBoard's own reader."""

import json
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from test_run_clm import Interrupt, interrupt_at, job_args

import run_clm
from patch_training import tracking
from patch_training.cli import run_cli

PATCH_STEPS = TOKEN_STEPS = 6  # the tiny job of test_run_clm.job_args: 12 token-level steps, λ = 1/2, K = 4


def tracked_job_args(workdir, output_dir, **overrides):
    """The tiny two-stage job reporting to TensorBoard, with an evaluation every 3 steps of each stage."""
    values = dict(report_to="tensorboard", eval_strategy="steps", eval_steps=3, max_eval_blocks=2)
    values.update(overrides)
    return job_args(workdir, output_dir, **values)


def event_files(output_dir):
    return sorted(output_dir.rglob("events.out.tfevents.*"))


def scalars(logging_dir):
    """{tag: [(step, value), ...]} as TensorBoard shows them (its EventAccumulator, which drops the points a
    restarted writer's purge_step orphans)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logging_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def raw_steps(logging_dir, tag):
    """Every step written for `tag` in the folder's event files, purged or not (tensorboard's file loader)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for path in sorted(logging_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            if any(value.tag == tag for value in event.summary.value):
                steps.append(event.step)
    return steps


@pytest.fixture(scope="module")
def tracked_job(workdir):
    output_dir = workdir / "tracked"
    results = run_clm.main(tracked_job_args(workdir, output_dir))
    return output_dir, results


def test_one_tensorboard_run_on_the_job_axes(tracked_job):
    """One log folder for the job, named after the output folder; steps 1..12 across the switch, each logged
    once; the patch stage's loss on steps 1..6 and the token stage's on 7..12, equal to each stage's own log;
    the token and compute axes equal all_results.json at the end of each stage, and K splits the stages."""
    output_dir, results = tracked_job
    logging_dir = output_dir / "runs" / output_dir.name
    assert {path.parent for path in event_files(output_dir)} == {logging_dir}
    curves = scalars(logging_dir)
    assert [step for step, _ in curves["train/tokens"]] == list(range(1, PATCH_STEPS + TOKEN_STEPS + 1))
    # The Trainer logs more than once at some steps (loss, evaluation, the run's summary): each tag once per step.
    for tag, points in curves.items():
        tag_steps = [step for step, _ in points]
        assert tag_steps == sorted(set(tag_steps)), f"{tag}: steps {tag_steps} not strictly increasing"

    patch_log = json.loads((output_dir / "patch_stage" / "trainer_state.json").read_text())["log_history"]
    token_log = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    expected_patch = [(e["step"], e["patch_loss"]) for e in patch_log if "patch_loss" in e]
    expected_token = [(PATCH_STEPS + e["step"], e["loss"]) for e in token_log if "loss" in e]
    assert [(s, pytest.approx(v, rel=1e-5)) for s, v in expected_patch] == curves["train/patch_loss"]
    assert [(s, pytest.approx(v, rel=1e-5)) for s, v in expected_token] == curves["train/loss"]
    assert [s for s, _ in curves["train/offset_4_loss"]] == list(range(1, PATCH_STEPS + 1))
    assert [s for s, _ in curves["eval/perplexity"]] == [3, 6, 9, 12]  # every 3 steps of each stage, on the job axis

    patch, token = results["patch_stage"], results["token_stage"]
    tokens, positions, k = (dict(curves[f"train/{name}"]) for name in ("tokens", "positions", "patch_size"))
    assert (tokens[PATCH_STEPS], positions[PATCH_STEPS]) == (patch["tokens"], patch["positions"])
    assert (tokens[PATCH_STEPS + TOKEN_STEPS], positions[PATCH_STEPS + TOKEN_STEPS]) == (results["tokens"], results["positions"])
    assert results["tokens"] == patch["tokens"] + token["tokens"]
    # Step by step, a naive count: each step reads tokens_per_step tokens; a patch-stage token costs 1/K.
    for step in range(1, PATCH_STEPS + TOKEN_STEPS + 1):
        in_patch = step <= PATCH_STEPS
        read = min(step, PATCH_STEPS) * patch["tokens_per_step"] + max(step - PATCH_STEPS, 0) * token["tokens_per_step"]
        cost = min(step, PATCH_STEPS) * patch["tokens_per_step"] / 4 + max(step - PATCH_STEPS, 0) * token["tokens_per_step"]
        assert (tokens[step], positions[step], k[step]) == (read, cost, 4 if in_patch else 1), step


def test_the_throughput_reaches_the_tracker_on_the_job_axis(tracked_job):
    """tokens_per_second and positions_per_second of every training log of both stages, at the job step, equal to
    trainer_state.json's; positions are tokens / K in the patch stage."""
    output_dir, _ = tracked_job
    curves = scalars(output_dir / "runs" / output_dir.name)
    logged = []
    for folder, offset in ((output_dir / "patch_stage", 0), (output_dir, PATCH_STEPS)):
        logged += [(offset + e["step"], e["tokens_per_second"], e["positions_per_second"]) for e in
                   json.loads((folder / "trainer_state.json").read_text())["log_history"] if "grad_norm" in e]
    assert [step for step, _, _ in logged] == list(range(1, PATCH_STEPS + TOKEN_STEPS + 1))
    assert curves["train/tokens_per_second"] == [(step, pytest.approx(tokens)) for step, tokens, _ in logged]
    assert curves["train/positions_per_second"] == [(step, pytest.approx(positions)) for step, _, positions in logged]
    for step, tokens, positions in logged:
        assert tokens == pytest.approx((4 if step <= PATCH_STEPS else 1) * positions, abs=4), step


def test_plot_curves_reads_the_tracked_job(tracked_job, tmp_path):
    """scripts/plot_curves.py still works from the job's files alone (no tracker read)."""
    import sys

    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import plot_curves

    output_dir, results = tracked_job
    (curve,) = plot_curves.main(["--run", f"job={output_dir}", "--output", str(tmp_path / "curves.png")])
    assert curve.total_tokens == results["tokens"] and curve.total_cost == results["positions"]
    assert (tmp_path / "curves.png").is_file()


@pytest.mark.parametrize("stage_patch_size", [4, 1], ids=["in_patch_stage", "in_token_stage"])
def test_resume_leaves_no_duplicated_or_missing_points(workdir, tracked_job, tmp_path, monkeypatch, stage_patch_size):
    """A job killed at stage step 5 (checkpoint at 4) and re-run logs steps 5.. again. Before, TensorBoard showed
    them twice (and the token stage's in another folder, from step 0); now the resumed writer's purge_step drops
    the killed attempt's, and the curves are the uninterrupted job's: the same steps and axes, each step once."""
    output_dir = tmp_path / "job"
    interrupt_at(monkeypatch, stage_patch_size, step=5)
    with pytest.raises(Interrupt):
        run_clm.main(tracked_job_args(workdir, output_dir))
    monkeypatch.undo()
    run_clm.main(tracked_job_args(workdir, output_dir))

    logging_dir = output_dir / "runs" / "job"
    assert {path.parent for path in event_files(output_dir)} == {logging_dir}
    killed_at = 5 if stage_patch_size == 4 else PATCH_STEPS + 5
    assert raw_steps(logging_dir, "train/tokens").count(killed_at) == 2, "the killed attempt logged nothing to purge"
    curves = scalars(logging_dir)
    reference_dir, _ = tracked_job
    reference = scalars(reference_dir / "runs" / reference_dir.name)
    for tag in ("train/tokens", "train/positions", "train/patch_size", "eval/perplexity"):
        assert curves[tag] == reference[tag], tag
    for tag in ("train/patch_loss", "train/loss"):
        assert [s for s, _ in curves[tag]] == [s for s, _ in reference[tag]]
        assert [v for _, v in curves[tag]] == pytest.approx([v for _, v in reference[tag]], rel=1e-4)


def test_patch_stage_only_job_logs_its_final_evaluation_once(workdir, tmp_path):
    """λ = 1: the job re-evaluates the patch model as the final model at the last step; that evaluation is the
    stage's own last one, which the trackers already have: each tag once per step, the axes those of
    all_results.json."""
    output_dir = tmp_path / "patch-only"
    results = run_clm.main(tracked_job_args(workdir, output_dir, patch_data_fraction=1.0))
    curves = scalars(output_dir / "runs" / "patch-only")
    for tag, points in curves.items():
        tag_steps = [step for step, _ in points]
        assert tag_steps == sorted(set(tag_steps)), f"{tag}: steps {tag_steps} not strictly increasing"
    steps = results["patch_stage"]["steps"]
    assert [s for s, _ in curves["eval/perplexity"]] == [3, 6, 9, 12] and steps == 12
    assert dict(curves["train/tokens"])[steps] == results["tokens"]
    assert dict(curves["train/positions"])[steps] == results["positions"]


@pytest.mark.parametrize(
    "report_to, message",
    [
        ("mlflow", "--report_to mlflow: mlflow is not available here: pip install mlflow"),
        ("tensorboard", "--report_to tensorboard: tensorboard is not available here: pip install tensorboard"),
        ("tensorboard,mlflow", "--report_to mlflow: mlflow is not available here: pip install mlflow"),
        ("tensorbord", "--report_to 'tensorbord' is not a tracker transformers knows"),
    ],
)
def test_missing_tracker_is_one_line_before_any_work(workdir, tmp_path, capsys, monkeypatch, report_to, message):
    """Regression: a tracker that is not installed ended in transformers' RuntimeError traceback once the first
    stage's Trainer was built. Now: one line naming the package, exit code 2, and the output folder not made."""
    monkeypatch.setitem(tracking.TRACKER_REQUIREMENTS, "mlflow", (lambda: False, "pip install mlflow"))  # absent
    if report_to == "tensorboard":  # installed here: simulate its absence
        monkeypatch.setitem(tracking.TRACKER_REQUIREMENTS, "tensorboard", (lambda: False, "pip install tensorboard"))
    output_dir = tmp_path / "job"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: run_clm.main(tracked_job_args(workdir, output_dir, report_to=report_to)), "run_clm.py")
    assert exit_info.value.code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"run_clm.py: error: {message}"), errors
    assert not output_dir.exists()


def wandb_records(path):
    """The records of a W&B transaction log (`run-<id>.wandb`): a 7-byte header (":W&B", 0xBEE1, version 0), then
    LevelDB-log records (checksum 4 bytes, length 2, type 1: full, first, middle, last) in blocks of 32 KiB,
    each block's tail shorter than a record header zero-filled. (wandb 0.31 reads it in Go only.)"""
    data = Path(path).read_bytes()
    assert data[:7] == b":W&B\xe1\xbe\x00", data[:7]
    position, pieces = 7, []
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:
            position += 32768 - position % 32768
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        if kind == 0:
            break
        pieces.append(data[position + 7:position + 7 + length])
        position += 7 + length
        if kind in (1, 4):  # full, last
            yield b"".join(pieces)
            pieces = []


def wandb_history(run_dir):
    """The history rows of an offline W&B run folder, parsed with wandb's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    rows = []
    for data in wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


def test_wandb_offline_one_run_with_increasing_global_step(workdir, tmp_path, monkeypatch):
    """W&B (offline): both stages in one run, named after the output folder, `train/global_step` increasing
    across the switch, the axes logged with every point."""
    pytest.importorskip("wandb")
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    output_dir = tmp_path / "wandb-job"
    try:
        results = run_clm.main(tracked_job_args(workdir, output_dir, report_to="wandb", eval_strategy="no"))
        run = wandb.run
        assert run is not None and run.name == "wandb-job"
        assert run.id == json.loads((output_dir / "runs" / "wandb-job" / "run.json").read_text())["run_id"]
    finally:
        wandb.finish()
        wandb.teardown()  # wandb keeps its settings (WANDB_DIR) for the process otherwise
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    rows = [row for row in wandb_history(run_dir) if "train/global_step" in row]
    steps = [row["train/global_step"] for row in rows if "train/loss" in row or "train/patch_loss" in row]
    assert steps == list(range(1, PATCH_STEPS + TOKEN_STEPS + 1))
    assert all(a <= b for a, b in zip([r["train/global_step"] for r in rows], [r["train/global_step"] for r in rows][1:]))
    patch_end = [row for row in rows if "train/patch_loss" in row][-1]
    job_end = [row for row in rows if "train/loss" in row][-1]
    patch = results["patch_stage"]
    assert (patch_end["train/tokens"], patch_end["train/positions"], patch_end["train/patch_size"]) == (patch["tokens"], patch["positions"], 4)
    assert (job_end["train/tokens"], job_end["train/positions"], job_end["train/patch_size"]) == (results["tokens"], results["positions"], 1)


def test_wandb_resume_continues_the_run_without_duplicates(workdir, tmp_path, monkeypatch):
    """W&B (offline): a job killed in the token stage (step 5, checkpoint at 4) and re-run in a new W&B session
    resumes the same run id, and its points are each step once: the re-run does not log again the step the
    killed attempt had logged past the checkpoint (W&B cannot drop points as TensorBoard does)."""
    pytest.importorskip("wandb")
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    output_dir = tmp_path / "wandb-resumed"
    argv = tracked_job_args(workdir, output_dir, report_to="wandb", eval_strategy="no")
    try:
        with monkeypatch.context() as patched:
            interrupt_at(patched, 1, step=5)
            with pytest.raises(Interrupt):
                run_clm.main(argv)
        wandb.finish()  # as if the process had ended
        results = run_clm.main(argv)
    finally:
        wandb.finish()
        wandb.teardown()  # wandb keeps its settings (WANDB_DIR) for the process otherwise
    run_id = json.loads((output_dir / "runs" / "wandb-resumed" / "run.json").read_text())["run_id"]
    run_dirs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 2 and all(next(d.glob("run-*.wandb")).name == f"run-{run_id}.wandb" for d in run_dirs)
    rows = [row for d in run_dirs for row in wandb_history(d) if "train/loss" in row or "train/patch_loss" in row]
    assert [row["train/global_step"] for row in rows] == list(range(1, PATCH_STEPS + TOKEN_STEPS + 1))
    assert (rows[-1]["train/tokens"], rows[-1]["train/positions"]) == (results["tokens"], results["positions"])
