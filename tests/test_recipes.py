"""Recipes beyond the paper (issue 17), each choice against an independent reference on a tiny job (T=32, K=4):

- `--patch_step_fraction r`: the split equals the token split it claims (λ = r*P / (r*P + (1-r)*Q), checked with
  exact fractions over many batch shapes, and on a job whose steps and tokens are counted by hand);
- `--patch_batch_mode positions`: the positions per optimizer step that the model actually reads are equal in
  both stages (recorded from the model's inputs), K times the tokens;
- `--patch_switch continue`: AdamW's state after the switch equals the state before it, the learning rate follows
  one naive warmup + cosine schedule over both stages' steps, and a job killed in either stage or right after the
  switch ends with the uninterrupted weights;
- bad combinations are refused in one line.
The per-offset weights are tested in tests/test_offset_weights.py.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from fractions import Fraction

import pytest
import torch
from conftest import REPO_ROOT
from test_run_clm import Interrupt, interrupt_at, job_args, max_abs_difference, weights
from transformers import TrainerCallback

import run_clm
from patch_training.cli import UsageError
from patch_training.stages import (
    plan_stages,
    step_fraction_from_token_fraction,
    token_fraction_from_step_fraction,
)
from patch_training.trainer import PatchTrainer


# ---------------------------------------------------------------------------------------------------------
# The step fraction r <-> the token fraction λ
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [0.1, 0.2, 0.25, 0.5, 0.75, 1 / 3])
@pytest.mark.parametrize("p, q", [(512, 512), (2048, 512), (384, 640), (4096, 1024)])
def test_step_fraction_converts_exactly(r, p, q):
    """The reference is built from steps: a job of s_p patch steps and s_t token steps with s_p / (s_p + s_t) = r
    (r's decimal as a fraction) reads s_p*P and s_t*Q tokens, so its token fraction is s_p*P / (s_p*P + s_t*Q).
    The conversion gives exactly that λ (rational arithmetic) and converts it back to r; in the paper's batch
    (P = Q) a step fraction is a token fraction."""
    r_exact = Fraction(repr(r))
    for scale in (1, 3, 1000):  # the same r at any budget
        patch_steps, token_steps = r_exact.numerator * scale, (r_exact.denominator - r_exact.numerator) * scale
        reference = Fraction(patch_steps * p, patch_steps * p + token_steps * q)
        assert token_fraction_from_step_fraction(r, p, q) == reference
    assert step_fraction_from_token_fraction(reference, p, q) == r_exact
    if p == q:
        assert reference == r_exact


def plan_job(workdir, **overrides):
    """(λ, r, plans) as run_clm.main computes them, for the arguments of `job_args` with `overrides`."""
    from patch_training.stages import split_fractions

    argv = job_args(workdir, workdir / "unused", **overrides)
    _, data_args, patch_args, training_args = run_clm.parse_arguments(argv)
    lam, r = split_fractions(patch_args, training_args, data_args.block_size)
    total = training_args.max_steps * training_args.per_device_train_batch_size * data_args.block_size
    return lam, r, plan_stages(total, lam, patch_args.patch_size, data_args.block_size)


@pytest.mark.parametrize("mode, r, lam", [("tokens", 0.25, 0.25), ("positions", 0.2, 0.5), ("positions", 0.5, 0.8)])
def test_step_fraction_plans_the_token_split_it_claims(workdir, mode, r, lam):
    """--patch_step_fraction r plans exactly what --patch_data_fraction λ plans, λ being the hand-computed
    token fraction of r (positions: a patch step reads K = 4 times the tokens, λ = 4r / (4r + 1 - r))."""
    from_r = plan_job(workdir, patch_data_fraction=None, patch_step_fraction=r, patch_batch_mode=mode)
    from_lam = plan_job(workdir, patch_data_fraction=lam, patch_batch_mode=mode)
    assert from_r[0] == Fraction(repr(lam)) and from_lam[1] == Fraction(repr(r))
    assert from_r[2] == from_lam[2]


# ---------------------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------------------


class Recorder(TrainerCallback):
    """What each stage's Trainer did, for the tests: the model's training inputs (patch size, input shape) per
    micro-batch, and the optimizer's state when training begins and ends."""

    events: list = []

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.events.append(("begin", self.trainer.stage_patch_size, copy.deepcopy(optimizer.state_dict())))

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        self.events.append(("end", self.trainer.stage_patch_size, copy.deepcopy(optimizer.state_dict())))


@pytest.fixture
def recorded(monkeypatch):
    """Record every stage's optimizer state at train begin/end and the shapes of its training inputs."""
    Recorder.events = []
    shapes = []
    init, compute_loss = PatchTrainer.__init__, PatchTrainer.compute_loss

    def patched_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(Recorder(self))

    def patched_compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            shapes.append((self.stage_patch_size, tuple(inputs["input_ids"].shape)))
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(PatchTrainer, "__init__", patched_init)
    monkeypatch.setattr(PatchTrainer, "compute_loss", patched_compute_loss)
    return Recorder.events, shapes


def test_the_variant_recipe_by_step_fraction(workdir, tmp_path, recorded):
    """All of the variant's choices at once. r = 0.2 with the positions batch mode: λ = 1/2, a budget of 8 token
    steps (1,024 tokens) gives the patch stage 512 tokens = 4 blocks of 128 = 1 step of 4 sequences, the token
    stage 16 blocks of 32 = 4 steps. Every training micro-batch holds 4 x 32 = 128 positions in both stages (read
    from the model's inputs), the patch stage 4 times the tokens; the accounting says so both ways and the measured
    cost is positions/tokens. The power-law weights reach the training loss (patch_loss is the weighted mean of
    the unweighted offset losses, all offsets counting equally here); the schedule is continued."""
    _, shapes = recorded
    results = run_clm.main(job_args(workdir, tmp_path / "job", patch_data_fraction=None, patch_step_fraction=0.2,
                                    patch_batch_mode="positions", patch_switch="continue", patch_offset_weights="power:1",
                                    max_steps=8, save_steps=100))
    patch, token = results["patch_stage"], results["token_stage"]
    assert (patch["steps"], token["steps"]) == (1, 4) and (patch["tokens"], token["tokens"]) == (512, 512)
    assert results["patch_data_fraction"] == 0.5 and results["patch_step_fraction"] == 0.2
    assert results["patch_split_by"] == "patch_step_fraction" and results["patch_batch_mode"] == "positions"
    assert results["patch_step_fraction_measured"] == 0.2 and results["patch_token_fraction_measured"] == 0.5
    assert patch["positions_per_step"] == token["positions_per_step"] == 128
    assert patch["tokens_per_step"] == 4 * token["tokens_per_step"]
    positions = {(k, shape[0] * shape[1] // k) for k, shape in shapes}
    assert positions == {(4, 128), (1, 128)}, positions  # what the model read: 4 x (4*32) and 4 x 32 tokens
    assert results["relative_cost_measured"] == (512 / 4 + 512) / 1024
    assert results["relative_cost_nominal"] == pytest.approx(0.5 / 4 + 0.5)
    weights = [4 * k**-1 / sum(j**-1 for j in range(1, 5)) for k in range(1, 5)]
    assert results["patch_offset_weights"] == pytest.approx(weights) and results["schedule_steps"] == 5
    (logged,) = [e for e in json.loads((tmp_path / "job" / "patch_stage" / "trainer_state.json").read_text())["log_history"]
                 if "patch_loss" in e]
    offsets = [logged[f"offset_{k}_loss"] for k in range(1, 5)]
    assert logged["patch_loss"] == pytest.approx(sum(w * o for w, o in zip(weights, offsets)) / 4, abs=1e-3)
    assert logged["patch_loss"] != pytest.approx(sum(offsets) / 4, abs=1e-3)  # not the plain mean


def test_offset_weights_as_a_list_in_a_config_file(workdir, tmp_path):
    config = tmp_path / "job.json"
    config.write_text(json.dumps({"config_name": str(workdir / "model_config"), "train_file": "x.jsonl",
                                  "output_dir": str(tmp_path / "job"), "patch_size": 4, "patch_data_fraction": 0.5,
                                  "patch_offset_weights": [4, 3, 2, 1]}))
    _, _, patch_args, _ = run_clm.parse_arguments([str(config)])
    assert patch_args.offset_weights == pytest.approx((1.6, 1.2, 0.8, 0.4))
    # The launchers pass a config as flags (scripts/config_args.py): the same weights.
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import config_args

    _, _, from_flags, _ = run_clm.parse_arguments(config_args.run_clm_args([str(config)]))
    assert from_flags == patch_args


def naive_cosine_lrs(peak: float, warmup: int, total: int) -> list[float]:
    """The learning rate transformers logs after each step 1..total of a linear warmup then cosine decay to 0
    (the rate of the step just taken: that of step index j - 1)."""
    rates = []
    for j in range(total):
        if j < warmup:
            rates.append(peak * j / warmup)
        else:
            progress = (j - warmup) / (total - warmup)
            rates.append(peak * 0.5 * (1 + math.cos(math.pi * progress)))
    return rates


CONTINUE = dict(patch_switch="continue", lr_scheduler_type="cosine")


@pytest.fixture(scope="module")
def continued_job(workdir):
    """One uninterrupted --patch_switch continue job (6 patch steps, 6 token steps), with its recorded states."""
    Recorder.events = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        init = PatchTrainer.__init__

        def patched_init(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self.add_callback(Recorder(self))

        monkeypatch.setattr(PatchTrainer, "__init__", patched_init)
        output_dir = workdir / "continued"
        results = run_clm.main(job_args(workdir, output_dir, **CONTINUE))
    return output_dir, results, list(Recorder.events)


def test_continue_carries_the_optimizer_state(continued_job):
    """The token stage's AdamW state when it begins is the patch stage's when it ended, tensor for tensor
    (exp_avg, exp_avg_sq, step = 6); at the end every step counts both stages (12)."""
    _, results, events = continued_job
    (_, k_end, patch_end), = [e for e in events if e[0] == "end" and e[1] == 4]
    (_, _, token_begin), = [e for e in events if e[0] == "begin" and e[1] == 1]
    (_, _, token_end), = [e for e in events if e[0] == "end" and e[1] == 1]
    assert patch_end["state"].keys() == token_begin["state"].keys() and patch_end["state"]
    for index, state in patch_end["state"].items():
        assert state.keys() == token_begin["state"][index].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for name, value in state.items():
            assert torch.equal(value, token_begin["state"][index][name]), (index, name)
    assert {float(s["step"]) for s in patch_end["state"].values()} == {6.0}
    assert {float(s["step"]) for s in token_end["state"].values()} == {12.0}
    assert results["patch_switch"] == "continue" and results["schedule_steps"] == 12


def test_continue_follows_one_schedule(continued_job):
    """The logged learning rates of both stages, one after the other, are one naive warmup (2 steps) + cosine
    schedule over 12 steps; the token stage does not warm up again."""
    output_dir, _, _ = continued_job
    rates = []
    for folder in (output_dir / "patch_stage", output_dir):
        history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
        rates += [entry["learning_rate"] for entry in history if "learning_rate" in entry]
    assert rates == pytest.approx(naive_cosine_lrs(3e-3, 2, 12), rel=1e-6, abs=1e-12)


def test_restart_is_unchanged_and_differs_from_continue(workdir, continued_job, tmp_path):
    """The default (restart) job warms up again in the token stage; continue's final weights differ from it."""
    results = run_clm.main(job_args(workdir, tmp_path / "restart", lr_scheduler_type="cosine"))
    history = json.loads((tmp_path / "restart" / "trainer_state.json").read_text())["log_history"]
    assert [e["learning_rate"] for e in history if "learning_rate" in e][0] == 0.0  # a new warmup
    assert results["patch_switch"] == "restart" and results["schedule_steps"] is None
    assert max_abs_difference(weights(tmp_path / "restart"), weights(continued_job[0])) > 1e-4


@pytest.mark.parametrize("stage_patch_size, step", [(4, 5), (1, 0), (1, 5)],
                         ids=["in_patch_stage", "right_after_the_switch", "in_token_stage"])
def test_continue_resumes_across_the_switch(workdir, continued_job, tmp_path, monkeypatch, stage_patch_size, step):
    """Killed in the patch stage (resumes from its checkpoint-4), right after the switch (the token stage starts
    again from the carried state) or in the token stage (resumes from its checkpoint-4): the re-run ends with the
    uninterrupted job's weights and learning rates."""
    output_dir = tmp_path / "job"
    interrupt_at(monkeypatch, stage_patch_size, step)
    with pytest.raises(Interrupt):
        run_clm.main(job_args(workdir, output_dir, **CONTINUE))
    monkeypatch.undo()
    results = run_clm.main(job_args(workdir, output_dir, **CONTINUE))
    reference_dir, reference, _ = continued_job
    assert max_abs_difference(weights(output_dir), weights(reference_dir)) < 1e-5
    token_log = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    reference_log = json.loads((reference_dir / "trainer_state.json").read_text())["log_history"]
    rates = [e["learning_rate"] for e in token_log if "learning_rate" in e]
    assert rates == pytest.approx([e["learning_rate"] for e in reference_log if "learning_rate" in e])
    assert results["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Bad combinations
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"patch_step_fraction": 0.5}, r"give one of --patch_data_fraction .* and --patch_step_fraction .*, not both"),
        ({"patch_data_fraction": None, "patch_step_fraction": 1.5}, r"--patch_step_fraction \(r\) must lie in \[0, 1\]"),
        ({"patch_data_fraction": None, "patch_size": 1, "patch_step_fraction": 0.5}, r"needs --patch_size K > 1"),
        ({"patch_batch_mode": "compute"}, r"--patch_batch_mode must be tokens or positions"),
        ({"patch_switch": "keep"}, r"--patch_switch must be restart or continue"),
        ({"patch_switch": "continue", "patch_learning_rate": 1e-3}, r"--patch_learning_rate sets a schedule"),
        ({"patch_switch": "continue", "patch_warmup_steps": 3}, r"--patch_warmup_steps sets a schedule"),
        ({"patch_batch_mode": "positions", "patch_per_device_train_batch_size": 2}, r"--patch_batch_mode positions sets"),
        ({"patch_offset_weights": "[1, 2]"}, r"--patch_offset_weights \[1, 2\]: 2 weights for K=4"),
        ({"patch_offset_weights": "[1, -2, 1, 1]"}, r"finite and >= 0"),
        ({"patch_size": 1, "patch_data_fraction": 0, "patch_offset_weights": "power:1"}, r"needs --patch_size K > 1"),
    ],
)
def test_bad_recipe_is_refused_in_one_line(workdir, tmp_path, overrides, message):
    with pytest.raises(UsageError, match=message) as caught:
        run_clm.main(job_args(workdir, tmp_path / "job", **overrides))
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "job").exists()


def test_continue_under_deepspeed_is_refused(workdir, tmp_path):
    """The carried optimizer state lives in DeepSpeed's engine: refused in one line, before any work."""
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 1}}))
    with pytest.raises(UsageError, match="--patch_switch continue .* --deepspeed it is not supported"):
        run_clm.main(job_args(workdir, tmp_path / "job", deepspeed=str(config), **CONTINUE))
    assert not (tmp_path / "job").exists()


def test_plots_read_the_recipe(continued_job, tmp_path):
    """scripts/plot_curves.py: the job-step axis runs on across the switch (where the one schedule of a continued
    job lives), the switch is at the patch stage's steps, the label names the recipe; the figures are written."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import plot_curves

    output_dir, results, _ = continued_job
    curves = plot_curves.main(["--run", f"continue={output_dir}", "--output", str(tmp_path / "c.png"),
                               "--offsets_output", str(tmp_path / "o.png")])
    curve = curves[0]
    assert curve.recipe == "continued schedule" and curve.switch_step == results["patch_stage"]["steps"] == 6
    assert list(curve.train["job_step"]) == list(range(1, 13))
    assert curve.total_cost / curve.total_tokens == pytest.approx(results["relative_cost_measured"])
    assert (tmp_path / "c.png").stat().st_size > 10_000 and (tmp_path / "o.png").stat().st_size > 10_000
    assert plot_curves.recipe_label({"patch_split_by": "patch_step_fraction", "patch_step_fraction": 0.2,
                                     "patch_data_fraction": 0.5, "patch_batch_mode": "positions",
                                     "patch_offset_weights": [1.5, 0.5]}) == "r=0.2 (λ=0.5), positions/step, weighted offsets"


def test_continue_after_a_restart_patch_stage_is_one_line(workdir, tmp_path, monkeypatch):
    """A patch stage finished with --patch_switch restart saved no optimizer state: re-running it with continue is
    refused in one line (by the run identity once it compares every argument, else when the state is missing)."""
    output_dir = tmp_path / "job"
    interrupt_at(monkeypatch, 1, 0)
    with pytest.raises(Interrupt):
        run_clm.main(job_args(workdir, output_dir, lr_scheduler_type="cosine"))
    monkeypatch.undo()
    with pytest.raises(UsageError, match="patch_switch") as caught:
        run_clm.main(job_args(workdir, output_dir, **CONTINUE))
    assert "\n" not in str(caught.value)
    assert (output_dir / "patch_stage" / "stage_complete.json").is_file()  # the finished stage is kept
