"""What a long run meets, each a kind with several members, on tiny CPU jobs (`test_run_clm.job_args`: T = 32,
K = 4, λ = 1/2, 6 patch and 6 token steps):

1. divergence: a non-finite loss, gradient norm or weight stops the run in one line (exit code 3), nothing
   non-finite is saved, and checkpoint rotation never deletes the newest complete, finite state;
2. early returns: a stage that returns before its planned steps is never marked complete, whatever stopped it;
3. preemption: SIGTERM or SIGUSR1 stops every rank at a step boundary with a complete checkpoint, one line and
   exit code 75; the re-run resumes to the uninterrupted run's weights;
4. damaged checkpoints: a checkpoint missing or cutting short anything a resume loads is skipped with a warning
   naming it, for the next older complete one;
6. settings that may change on a resume (the cadence of logging and saving) do change;
9. a failure to write, whatever library meets it, is one line naming the file, and earlier checkpoints stay."""

import json
import math
import os
import re
import resource
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from safetensors.torch import load_file
from test_run_clm import Interrupt, interrupt_at, job_args, max_abs_difference, weights

import run_clm
from patch_training.cli import EXIT_DIVERGED, EXIT_PREEMPTED, Diverged, Preempted, StoppedEarly, WriteFailure, run_cli
from patch_training.trainer import PatchTrainer


def checkpoints(folder):
    return sorted((p for p in folder.glob("checkpoint-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))


def all_finite(folder) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(folder / "model.safetensors")).values())


def at_step(monkeypatch, stage_patch_size, step, action):
    """Run `action(trainer)` once, before the optimizer step `step` of the stage with this patch size."""
    original = PatchTrainer.training_step
    done = []

    def training_step(self, *args, **kwargs):
        if self.stage_patch_size == stage_patch_size and self.state.global_step == step - 1 and not done:
            done.append(step)
            action(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PatchTrainer, "training_step", training_step)


# ---------------------------------------------------------------------------------------------------------
# 1. Divergence
# ---------------------------------------------------------------------------------------------------------


def nan_weight(trainer):
    """A NaN in the LM head: every logit row's log-sum-exp, and so the loss, turns NaN."""
    with torch.no_grad():
        trainer.model.get_output_embeddings().weight[0, 0] = float("nan")


def nan_unused_weight(trainer):
    """A NaN in the embedding of token 0 (<unk>), which no block holds: loss and gradients stay finite, the weights
    do not."""
    with torch.no_grad():
        trainer.model.get_input_embeddings().weight[0, 0] = float("nan")


def nan_gradient(trainer):
    """A gradient that turns NaN on its way (the loss itself stays finite)."""
    parameter = trainer.model.get_output_embeddings().weight
    handle = []

    def hook(gradient):
        handle[0].remove()
        return torch.full_like(gradient, float("nan"))

    handle.append(parameter.register_hook(hook))


DIVERGENCES = {
    # member: (job overrides, stage patch size and step of the injection or None, stage, what the line names)
    "huge learning rate in the token stage": ({"learning_rate": 1e30, "patch_learning_rate": 3e-3}, None, "token",
                                              r"non-finite (loss|gradient norm|weights)"),
    "NaN weight in the patch stage": ({}, (4, 3), "patch", r"non-finite loss and gradient norm at optimizer step 3"),
    "NaN gradient in the token stage": ({}, (1, 5), "token", r"non-finite gradient norm at optimizer step 5"),
    "NaN in an unused weight": ({}, (4, 3), "patch", r"non-finite weights at optimizer step 4"),
}
INJECTIONS = {"NaN weight in the patch stage": nan_weight, "NaN gradient in the token stage": nan_gradient,
              "NaN in an unused weight": nan_unused_weight}


@pytest.mark.parametrize("member", list(DIVERGENCES))
def test_divergence_stops_the_run_and_saves_nothing_non_finite(workdir, tmp_path, monkeypatch, capsys, member):
    """Regression: the run trained to the end, printed "done", exited 0 and wrote an all-NaN final model, and
    --save_total_limit 1 rotated the last finite checkpoint away for NaN ones."""
    overrides, injection, stage, named = DIVERGENCES[member]
    output_dir = tmp_path / "job"
    if injection is not None:
        at_step(monkeypatch, *injection, INJECTIONS[member])
    argv = job_args(workdir, output_dir, save_steps=2, save_total_limit=1, **overrides)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: run_clm.main(argv), "run_clm.py")
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == EXIT_DIVERGED
    line = err[-1]
    assert line.startswith(f"run_clm.py: the {stage} stage diverged: ") and re.search(named, line), line
    stage_dir = output_dir / ("patch_stage" if stage == "patch" else "")
    assert not (stage_dir / "model.safetensors").exists() and not (output_dir / "all_results.json").exists()
    assert not (output_dir / "patch_stage" / "stage_complete.json").exists() or stage == "token"
    kept = checkpoints(stage_dir)
    assert kept and all(all_finite(c) for c in kept), "a non-finite checkpoint was saved, or none is left"
    assert str(kept[-1]) in line, "the line names the newest finite checkpoint"


def test_divergence_watch_reports_the_first_bad_step():
    """The watch against a naive record: the first step whose loss or norm was not finite, and which it was."""
    from patch_training.guards import DivergenceWatch

    watch = DivergenceWatch()
    series = [(1, 2.0, 1.0), (2, 2.0, float("inf")), (3, float("nan"), float("nan")), (4, 1.0, 1.0)]
    for step, loss, norm in series:
        watch.observe(step, torch.tensor(loss), torch.tensor(norm))
    assert watch.first_bad_step() == (2, False, True)
    fresh = DivergenceWatch()
    fresh.observe(1, torch.tensor(1.0), 0.5)  # a norm already on the host (DeepSpeed's)
    fresh.observe(2, torch.tensor(math.nan), None)  # no norm measured
    assert fresh.first_bad_step() == (2, True, False)
    with pytest.raises(Diverged, match=r"the patch stage diverged: a non-finite loss at optimizer step 2; .* no "
                                       r"checkpoint of it was saved"):
        fresh.check("patch", lambda: None)


def complete_checkpoint(folder):
    """A checkpoint folder with every file a resume loads, as transformers and this project write them."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": int(folder.name.split("-")[1])}))
    (folder / "stage_progress.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({"state": torch.zeros(2)}, folder / name)


def test_rotation_keeps_the_newest_complete_checkpoint(tmp_path):
    """--save_total_limit never lets the newest complete checkpoint go for newer incomplete ones (left by a
    killed attempt that got further); incomplete ones go, and the limit counts complete ones."""
    from patch_training.run_dir import checkpoint_problem, checkpoints_to_delete

    for step in (2, 4, 6):
        complete_checkpoint(tmp_path / f"checkpoint-{step}")
    (tmp_path / "checkpoint-8").mkdir()  # cut short: no state, no weights
    complete_checkpoint(tmp_path / "checkpoint-10")
    (tmp_path / "checkpoint-10" / "optimizer.pt").unlink()
    assert checkpoint_problem(tmp_path / "checkpoint-6") is None
    assert checkpoint_problem(tmp_path / "checkpoint-10") == "no optimizer.pt"
    names = [p.name for p in checkpoints_to_delete(str(tmp_path), 1)]
    assert sorted(names) == ["checkpoint-10", "checkpoint-2", "checkpoint-4", "checkpoint-8"]
    assert sorted(p.name for p in checkpoints_to_delete(str(tmp_path), 2)) == [
        "checkpoint-10", "checkpoint-2", "checkpoint-8"]
    assert [p.name for p in checkpoints_to_delete(str(tmp_path), 1, protected=str(tmp_path / "checkpoint-2"))] == [
        "checkpoint-10", "checkpoint-8", "checkpoint-4"]
    assert checkpoints_to_delete(str(tmp_path), None) == []


# ---------------------------------------------------------------------------------------------------------
# 2 and 3. Early returns and preemption
# ---------------------------------------------------------------------------------------------------------


def send(signal_number):
    def action(trainer):
        os.kill(os.getpid(), signal_number)
    return action


def stop_training(trainer):
    trainer.control.should_training_stop = True  # what a user callback (early stopping) does


@pytest.mark.parametrize("member", ["SIGTERM in the patch stage", "SIGUSR1 in the token stage",
                                    "a callback's stop in the patch stage", "a callback's stop in the token stage"])
def test_a_stage_returned_early_is_not_complete_and_resumes_exactly(workdir, finished_job, tmp_path, monkeypatch, member):
    """Regression: with --enable_jit_checkpoint, SIGTERM wrote stage_complete.json after 7 of 100 patch steps and the
    job trained the whole token stage and exited 0; in the token stage all_results.json was written after 6 of 12
    steps and a re-run said "nothing to do"; without the flag SIGTERM lost everything since the last save."""
    stage_patch_size = 4 if "patch" in member else 1
    output_dir = tmp_path / "job"
    action = stop_training if "callback" in member else send(getattr(signal, member.split()[0]))
    at_step(monkeypatch, stage_patch_size, 3, action)
    expected = StoppedEarly if "callback" in member else Preempted
    with pytest.raises(expected) as stopped:
        run_clm.main(job_args(workdir, output_dir))
    monkeypatch.undo()
    stage_dir = output_dir / ("patch_stage" if stage_patch_size == 4 else "")
    assert "checkpoint-3" in str(stopped.value) and (stage_dir / "checkpoint-3" / "trainer_state.json").is_file()
    assert not (output_dir / "all_results.json").exists()
    if stage_patch_size == 4:
        assert not (output_dir / "patch_stage" / "stage_complete.json").exists()
    results = run_clm.main(job_args(workdir, output_dir))
    reference_dir, reference = finished_job
    assert results[f"{'patch' if stage_patch_size == 4 else 'token'}_stage"]["resumed_from"].endswith("checkpoint-3")
    assert max_abs_difference(weights(output_dir), weights(reference_dir)) < 1e-5
    assert results["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-4)


def test_a_signal_before_training_stops_at_once(workdir, tmp_path, monkeypatch):
    """SIGTERM while the data is read (tokenising can take hours): one line, exit code 75, nothing claimed."""
    from patch_training import job

    original = job.training_tokens

    def tokens_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(job, "training_tokens", tokens_then_signal)
    with pytest.raises(Preempted, match=r"preempted \(SIGTERM\): nothing since the last saved state is lost"):
        run_clm.main(job_args(workdir, tmp_path / "job"))
    assert not (tmp_path / "job" / "run_args.json").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the handler in place before was not restored"


def test_enable_jit_checkpoint_is_refused(workdir, tmp_path):
    with pytest.raises(Exception, match=r"--enable_jit_checkpoint"):
        run_clm.main(job_args(workdir, tmp_path / "job", enable_jit_checkpoint="true"))


def run_command(argv, **kwargs):
    return subprocess.Popen([sys.executable, "run_clm.py", *argv], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGUSR1"])
def test_preemption_of_a_real_process(workdir, finished_job, tmp_path, signal_name):
    """The whole path as a scheduler meets it: the signal from outside once the patch stage trains, the process
    ends with exit code 75 and one line, and the same command run again ends with the uninterrupted weights."""
    output_dir = tmp_path / "job"
    argv = job_args(workdir, output_dir, logging_steps=1, disable_tqdm="true")
    process = run_command(argv)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "patch_loss" in line:  # the patch stage has taken a step
            process.send_signal(getattr(signal, signal_name))
            break
    lines += process.stdout.readlines()
    assert process.wait(timeout=300) == EXIT_PREEMPTED, "".join(lines[-20:])
    assert re.search(rf"run_clm.py: preempted \({signal_name}\): its state is saved \(the patch stage at step \d+ of 6",
                     "".join(lines)), "".join(lines[-5:])
    assert "Traceback" not in "".join(lines)
    rerun = run_command(argv)
    output = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, output[-3000:]
    reference_dir, _ = finished_job
    assert max_abs_difference(weights(output_dir), weights(reference_dir)) < 1e-5


# ---------------------------------------------------------------------------------------------------------
# 4. Damaged checkpoints
# ---------------------------------------------------------------------------------------------------------

DAMAGES = {
    "optimizer.pt missing": lambda c: (c / "optimizer.pt").unlink(),
    "scheduler.pt missing": lambda c: (c / "scheduler.pt").unlink(),
    "optimizer.pt cut short": lambda c: (c / "optimizer.pt").write_bytes((c / "optimizer.pt").read_bytes()[:5000]),
    "scheduler.pt cut short": lambda c: (c / "scheduler.pt").write_bytes((c / "scheduler.pt").read_bytes()[:100]),
    "stage_progress.json missing": lambda c: (c / "stage_progress.json").unlink(),
    "model.safetensors missing": lambda c: (c / "model.safetensors").unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_checkpoint_missing_what_a_resume_loads_is_skipped(workdir, finished_job, tmp_path, monkeypatch, caplog,
                                                             damage):
    """Regression: without optimizer.pt or scheduler.pt the resume silently started a fresh AdamW and restarted the
    warmup (weights off by 8.7e-3); a cut optimizer.pt ended in a torch traceback with no fallback."""
    output_dir = tmp_path / "job"
    interrupt_at(monkeypatch, 1, step=5)  # in the token stage, with checkpoints at steps 2 and 4
    with pytest.raises(Interrupt):
        run_clm.main(job_args(workdir, output_dir, save_steps=2))
    monkeypatch.undo()
    DAMAGES[damage](output_dir / "checkpoint-4")
    results = run_clm.main(job_args(workdir, output_dir, save_steps=2))
    file_name = damage.split()[0]
    assert re.search(rf"Not resuming from .*checkpoint-4: [^\n]*{re.escape(file_name)}", caplog.text), caplog.text[-2000:]
    assert results["token_stage"]["resumed_from"].endswith("checkpoint-2")
    reference_dir, reference = finished_job
    assert max_abs_difference(weights(output_dir), weights(reference_dir)) < 1e-5


# ---------------------------------------------------------------------------------------------------------
# 6. Settings that may change on a resume take effect
# ---------------------------------------------------------------------------------------------------------


def test_a_resume_takes_the_new_saving_and_logging_cadence(workdir, tmp_path, monkeypatch):
    """Regression: resumed with --save_steps 3 --logging_steps 2, the stage still saved at 8 and 12 and logged every
    step (transformers restores the checkpoint's cadence from its trainer_state.json)."""
    output_dir = tmp_path / "job"
    interrupt_at(monkeypatch, 1, step=5)
    with pytest.raises(Interrupt):
        run_clm.main(job_args(workdir, output_dir, save_steps=4, logging_steps=1))
    monkeypatch.undo()
    run_clm.main(job_args(workdir, output_dir, save_steps=3, logging_steps=2))
    saved = {int(p.name.split("-")[1]) for p in checkpoints(output_dir)}
    assert {6} <= saved and 8 not in saved, saved
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    logged = [entry["step"] for entry in history if "loss" in entry]
    assert [step for step in logged if step > 4] == [6], logged  # the token stage has 6 steps: 6 is its last
    state = json.loads((output_dir / "checkpoint-6" / "trainer_state.json").read_text())
    assert (state["save_steps"], state["logging_steps"]) == (3, 2)


# ---------------------------------------------------------------------------------------------------------
# 9. Failures to write
# ---------------------------------------------------------------------------------------------------------


class FileSizeLimit:
    """A limit on the size of the files this process writes (RLIMIT_FSIZE): writing past it fails with EFBIG,
    "File too large", as a full disk fails with ENOSPC, in every library (SIGXFSZ is ignored meanwhile)."""

    def __init__(self, limit: int):
        self.limit = limit

    def __enter__(self):
        self.previous = resource.getrlimit(resource.RLIMIT_FSIZE)
        self.handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.previous[1]))
        return self

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_FSIZE, self.previous)
        signal.signal(signal.SIGXFSZ, self.handler)


# The tiny model's files: weights 8.2 MB (untied 32,000 x 32 embedding and head, float32), optimizer state twice
# that. A limit between the two lets the weights through and stops the optimizer state.
WRITE_FAILURES = {
    "the weights of a checkpoint": (5_000_000, "model.safetensors", "patch_stage/checkpoint-2"),
    "the optimizer state of a checkpoint": (12_000_000, "optimizer.pt", "patch_stage/checkpoint-2"),
}


@pytest.mark.parametrize("member", list(WRITE_FAILURES))
def test_a_failure_to_write_names_the_file(workdir, finished_job, tmp_path, monkeypatch, capsys, member):
    """Regression: a full disk while writing weights escaped as a safetensors traceback naming no file; on
    optimizer.pt the line named no file."""
    limit, file_name, folder = WRITE_FAILURES[member]
    output_dir = tmp_path / "job"
    argv = job_args(workdir, output_dir, save_steps=2)
    original = PatchTrainer._save_checkpoint

    def save_under_the_limit(self, *args, **kwargs):  # the first checkpoint of the patch stage, under the limit
        with FileSizeLimit(limit):
            return original(self, *args, **kwargs)

    monkeypatch.setattr(PatchTrainer, "_save_checkpoint", save_under_the_limit)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: run_clm.main(argv), "run_clm.py")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 1
    assert line.startswith(f"run_clm.py: error: cannot write {output_dir / folder / file_name}: "), line
    monkeypatch.undo()
    results = run_clm.main(argv)  # the damaged checkpoint is skipped: the run starts the stage again
    reference_dir, _ = finished_job
    assert results["patch_stage"]["resumed_from"] is None
    assert max_abs_difference(weights(output_dir), weights(reference_dir)) < 1e-5


def test_write_failure_reasons_of_other_libraries():
    """The one-line reason for what each library raises on a full disk, a quota, a file size limit."""
    from patch_training.cli import writing

    members = [
        (OSError(28, "No space left on device"), "[Errno 28] No space left on device"),
        (RuntimeError("Error while serializing: I/O error: File too large (os error 27)"), "[Errno 27] File too large"),
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"), "torch.save"),
        (OSError(122, "Disk quota exceeded", "/x/y.json"), "[Errno 122] Disk quota exceeded"),
    ]
    for error, reason in members:
        with pytest.raises(WriteFailure) as failure, writing("/out/checkpoint-2/optimizer.pt"):
            raise error
        named = "/x/y.json" if getattr(error, "filename", None) else "/out/checkpoint-2/optimizer.pt"
        assert str(failure.value).startswith(f"cannot write {named}: ") and reason in str(failure.value)
    with pytest.raises(ValueError), writing("/out/x"):  # not a failure to write: unchanged
        raise ValueError("something else")


# ---------------------------------------------------------------------------------------------------------
# 5. Options that would break a guarantee are refused; every option is classified
# ---------------------------------------------------------------------------------------------------------


def test_every_training_argument_is_classified():
    """Each TrainingArguments setting of the installed transformers is either allowed to change between attempts
    (identity.MAY_CHANGE), honoured exactly (HONOURED) or refused at other values (REFUSED); a new upstream option
    fails here, by name, until it is examined."""
    import dataclasses

    from transformers import TrainingArguments

    from patch_training.identity import MAY_CHANGE
    from patch_training.training_args import HONOURED, REFUSED

    names = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    groups = {"MAY_CHANGE": set(MAY_CHANGE) & names, "HONOURED": set(HONOURED), "REFUSED": set(REFUSED)}
    unclassified = sorted(names - set().union(*groups.values()))
    assert not unclassified, f"TrainingArguments settings in no group: {unclassified}"
    twice = [(a, b, groups[a] & groups[b]) for a in groups for b in groups if a < b and groups[a] & groups[b]]
    assert not twice, f"settings in two groups: {twice}"


REFUSED_MEMBERS = {
    "ignore_data_skip": ["--ignore_data_skip", "true"],
    "auto_find_batch_size": ["--auto_find_batch_size", "true"],
    "load_best_model_at_end": ["--load_best_model_at_end", "true", "--eval_strategy", "steps", "--eval_steps", "4"],
    "enable_jit_checkpoint": ["--enable_jit_checkpoint", "true"],
    "dataloader_in_order": ["--dataloader_in_order", "false"],
    "train_sampling_strategy": ["--train_sampling_strategy", "group_by_length"],
    "label_names": ["--label_names", "target"],
    "split_batches": ["--accelerator_config", '{"split_batches": true}'],
    "even_batches": ["--accelerator_config", '{"even_batches": false}'],
    "use_seedable_sampler": ["--accelerator_config", '{"use_seedable_sampler": false}'],
}


@pytest.mark.parametrize("member", list(REFUSED_MEMBERS))
def test_options_that_break_a_guarantee_are_refused_before_anything_is_written(workdir, tmp_path, member):
    """Regression: --ignore_data_skip true was accepted and the resumed stage restarted its block order (32 of 96
    blocks trained twice, 32 never)."""
    from patch_training.cli import UsageError

    argv = job_args(workdir, tmp_path / "job") + REFUSED_MEMBERS[member]
    with pytest.raises(UsageError, match=rf"{member}.*not supported by run_clm.py"):
        run_clm.main(argv)
    assert not (tmp_path / "job").exists()


def test_parallelism_config_is_refused():
    """Tensor or context parallelism (a ParallelismConfig object: no command-line form) is refused in one line."""
    from patch_training.cli import UsageError
    from patch_training.training_args import RunTrainingArguments, check_settings_run_clm_does_not_honour

    args = RunTrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    args.parallelism_config = object()
    with pytest.raises(UsageError, match="--parallelism_config .*not supported"):
        check_settings_run_clm_does_not_honour(args)


# ---------------------------------------------------------------------------------------------------------
# 7. A stage that does not outlast its warmup
# ---------------------------------------------------------------------------------------------------------

WARMUPS = {
    # member: (job overrides, refused, what the line names)
    "λ 0.97 leaves the token stage one step": ({"patch_data_fraction": 0.97}, True,
                                               r"the token stage has 1 optimizer step, no more than its 2 warmup steps "
                                               r"\(--warmup_steps 2\): its only step would use learning rate 0"),
    "one step of a token-level job": ({"max_steps": 1, "patch_data_fraction": 0}, True,
                                      r"the token stage has 1 optimizer step, no more than its 2 warmup steps"),
    "--max_steps below the warmup": ({"max_steps": 4, "warmup_steps": 5, "patch_data_fraction": 0}, False,
                                     r"the token stage has 4 optimizer steps, no more than its 5 warmup steps "
                                     r"\(--warmup_steps 5\): its learning rate peaks at 60% of 0.003"),
    "the patch stage's own warmup": ({"patch_warmup_steps": 10}, False, r"the patch stage has 6 optimizer steps, no "
                                     r"more than its 10 warmup steps \(--patch_warmup_steps 10"),
    "one schedule over both stages": ({"patch_switch": "continue", "warmup_steps": 0.99}, False,
                                      r"the job has 12 optimizer steps, no more than its 12 warmup steps"),
}


@pytest.mark.parametrize("member", list(WARMUPS))
def test_a_stage_shorter_than_its_warmup_is_refused_or_named(workdir, tmp_path, caplog, member):
    """Regression: λ = 0.97 left the token stage one step at learning rate 0: the final model equalled the patch model
    bit for bit while λ 0.97 and cost 0.272 were reported; --max_steps below the warmup peaked at a tenth of the
    learning rate without a word. A stage whose one step would learn nothing is refused; one that never reaches
    its peak is named in one warning."""
    from patch_training.cli import UsageError

    overrides, refused, named = WARMUPS[member]
    if refused:
        with pytest.raises(UsageError, match=named):
            run_clm.main(job_args(workdir, tmp_path / "job", **overrides))
        assert not (tmp_path / "job" / "run_args.json").exists()
    else:
        run_clm.main(job_args(workdir, tmp_path / "job", **overrides))
        assert len(re.findall(named, caplog.text)) == 1, caplog.text[-3000:]


# ---------------------------------------------------------------------------------------------------------
# 8. Tokenisation memory does not grow with the longest document
# ---------------------------------------------------------------------------------------------------------

MEMORY_PROBE = """
import json, resource, sys
from transformers import AutoTokenizer
from patch_training.token_cache import iter_token_batches
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
text = ("the king said unto the people, " * (int(sys.argv[2]) // 31 + 1))[:int(sys.argv[2])]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tokens = sum(len(row) for batch in iter_token_batches([{"text": text}], tokenizer, "text", 1000, prefetch=0) for row in batch)
print(json.dumps({"extra_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, "tokens": tokens}))
"""


def test_a_long_single_line_document_tokenises_in_bounded_memory(tokenizer_dir):
    """Regression: one 50 MB single-line document took 4.3 GB (the fast tokenizer holds ~75 bytes a character of its
    input); under a memory cap the tokenizer aborted with exit code 134 and no message. A 6 MB document now adds
    a few bytes a character (its tokens as Python ints), whatever its length."""
    characters = 6_000_000
    probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE, tokenizer_dir, str(characters)], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]
    measured = json.loads(probe.stdout.strip().splitlines()[-1])
    assert measured["extra_kib"] * 1024 / characters < 25, measured  # the whole call would take ~75 bytes a character
    assert measured["tokens"] > characters // 10


def test_pieces_of_a_long_document_give_its_tokens(tokenizer, foreign_tokenizer_dir):
    """The cut rule against the whole document: the pieces join to the text, each cut lies before whitespace, a
    document under the piece size gets exactly its whole tokenisation, and a byte-level BPE gives the whole's
    tokens at the cuts too; SentencePiece's dummy prefix may add one token a cut, and the text decodes back."""
    from transformers import AutoTokenizer

    from patch_training.token_cache import batch_encoder, document_pieces, encode_bounded, eos_rule

    text = " ".join(f"word{i % 97}" for i in range(5000)) + "\nlast line"
    pieces = document_pieces(text, 2000, search=500)
    assert "".join(pieces) == text and all(len(p) <= 2000 for p in pieces) and len(pieces) > 10
    assert all(p[0] in " \n\t" for p in pieces[1:])
    assert document_pieces("x" * 5000, 2000, search=500) == ["x" * 2000, "x" * 2000, "x" * 1000]  # no whitespace
    for tok in (AutoTokenizer.from_pretrained(foreign_tokenizer_dir), tokenizer):
        eos, appends = eos_rule(tok)
        whole = batch_encoder(tok)([text])[0]
        cut = encode_bounded([text], batch_encoder(tok), batch_encoder(tok, special_tokens=False), eos, appends,
                             piece_chars=2000)[0]
        short = encode_bounded(["a short text"], batch_encoder(tok), batch_encoder(tok, special_tokens=False), eos,
                               appends, piece_chars=2000)[0]
        assert short == batch_encoder(tok)(["a short text"])[0]
        if tok is tokenizer:  # SentencePiece: a dummy prefix at each piece's start, the text unchanged
            assert 0 <= len(cut) - len(whole) <= len(pieces) and tok.decode(cut, skip_special_tokens=True) == text
        else:
            assert cut == whole


# ---------------------------------------------------------------------------------------------------------
# 10. The distributed backend is checked and recorded
# ---------------------------------------------------------------------------------------------------------

FSDP_REQUESTS = {
    "--fsdp full_shard": (["--fsdp", "full_shard"], {}),
    "an accelerate FSDP config (v1)": ([], {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}),
    "an accelerate FSDP config (v2)": ([], {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}),
}


@pytest.mark.parametrize("member", list(FSDP_REQUESTS))
def test_fsdp_without_a_gpu_is_refused_before_anything_is_written(workdir, tmp_path, monkeypatch, member):
    """Regression: configs/accelerate/fsdp_8gpu.yaml with 2 CPU processes failed with a RuntimeError traceback after
    claiming the output folder, and with fsdp_sync_module_states false both FSDP versions "completed" as plain DDP
    without a word."""
    from patch_training.cli import UsageError

    flags, environment = FSDP_REQUESTS[member]
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UsageError, match="FSDP needs CUDA GPUs"):
        run_clm.main(job_args(workdir, tmp_path / "job") + flags)
    assert not (tmp_path / "job").exists()


def test_the_backend_used_is_recorded(finished_job):
    """all_results.json says what each stage trained with (here one process: accelerate's NO)."""
    _, results = finished_job
    for record in (results["patch_stage"], results["token_stage"], results):
        assert record["distributed"] == {"backend": "NO", "world_size": 1}
