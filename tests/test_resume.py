"""Issue 12: a run never destroys what it did not write, resumes only what it started, and reports the same
figures whether or not it was interrupted; and the defaults that surprised (pad token, repeated data, Ctrl-C).

Tiny jobs on CPU (hidden 32, 2 layers, T = 32): the output folder's rules are checked on `prepare_output_dir`
with folders laid out by hand, and end to end on the issue's own examples."""

import dataclasses
import json
import logging

import pytest
from test_run_clm import Interrupt, interrupt_at, job_args

import run_clm
from patch_training.cli import UsageError
from patch_training.compat import transformers_at_least
from patch_training.cli import write_json_atomic
from patch_training.identity import MAY_CHANGE, batch_identity, init_weights_identity, run_identity
from patch_training.run_dir import RUN_ARGS_FILE, STAGE_PROGRESS_FILE, check_same_run, prepare_output_dir
from patch_training.stages import repetition_warning

# ---------------------------------------------------------------------------------------------------------
# Kind 1: --overwrite_output_dir removes this script's outputs and nothing else
# ---------------------------------------------------------------------------------------------------------


def write(path, text="x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


OWN = ["config.json", "model.safetensors", "all_results.json", "trainer_state.json", "generation_config.json",
       "tokenizer.json", "checkpoint-4/optimizer.pt", "checkpoint-4/trainer_state.json", "runs/events.out",
       "patch_stage/config.json", "patch_stage/stage_complete.json", "patch_stage/checkpoint-2/optimizer.pt"]


def run_folder(tmp_path, claimed=True):
    """A folder laid out as a finished run leaves it (RUN_ARGS_FILE only when `claimed`)."""
    folder = tmp_path / "out"
    for name in OWN:
        write(folder / name)
    if claimed:
        write_json_atomic(folder / RUN_ARGS_FILE, {"seed": 1})
    return folder


# Each member: (input paths inside the output folder, files written where they lie).
INPUTS_INSIDE = {
    "train_file": ["corpus/train.jsonl"],
    "tokenizer_folder": ["tok"],
    "token_cache": ["cache"],
    "validation_file_in_patch_stage": ["patch_stage/valid.jsonl"],
    "several": ["corpus/train.jsonl", "corpus/valid.jsonl", "tok", "cache"],
}


@pytest.mark.parametrize("member", INPUTS_INSIDE)
def test_overwrite_removes_only_own_outputs_and_keeps_inputs(tmp_path, member):
    """Regression: --overwrite_output_dir deleted everything in the folder, the run's own inputs included."""
    folder = run_folder(tmp_path)
    inputs = [folder / p for p in INPUTS_INSIDE[member]]
    for path in inputs:
        write(path / "tokenizer.json" if path.name in ("tok", "cache") else path, "input")
    prepare_output_dir(str(folder), {"seed": 2}, overwrite=True, is_main=True, inputs=[str(p) for p in inputs])
    for path in inputs:
        assert path.exists(), f"{path} (an input) was deleted"
    for name in OWN:
        if not any(p == folder / name or p in (folder / name).parents for p in inputs):
            assert not (folder / name).exists(), f"{name} (an output) was not deleted"
    assert json.loads((folder / RUN_ARGS_FILE).read_text()) == {"seed": 2}


@pytest.mark.parametrize("overwrite", [True, False])
@pytest.mark.parametrize("claimed", [True, False], ids=["run_folder", "not_a_run_folder"])
def test_foreign_files_are_refused_and_kept(tmp_path, overwrite, claimed):
    """A file this script did not write (notes.txt, or output-looking names in a folder it never claimed) is
    refused with or without --overwrite_output_dir, named, and left in place with everything else."""
    folder = run_folder(tmp_path, claimed=claimed)
    write(folder / "notes.txt", "mine")
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    if claimed and not overwrite:  # a plain resume deletes nothing: allowed, foreign files stay
        prepare_output_dir(str(folder), {"seed": 1}, overwrite=False, is_main=True)
    else:
        named = "notes.txt" if claimed else "all_results.json, checkpoint-4/, config.json"
        with pytest.raises(UsageError, match=rf"holds files this script did not write \({named}"):
            prepare_output_dir(str(folder), {"seed": 1}, overwrite=overwrite, is_main=True)
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    assert (folder / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("where", ["config.json", "patch_stage/config.json", "checkpoint-3/data.jsonl"])
@pytest.mark.parametrize("overwrite", [True, False])
def test_input_where_the_run_writes_is_refused(tmp_path, where, overwrite):
    """An input lying where the run writes (a --config_name that is the output folder's config.json) would be
    written over or deleted: refused, with or without the flag, and nothing is touched."""
    folder = run_folder(tmp_path)
    the_input = write(folder / where, "input")
    with pytest.raises(UsageError, match="is an input of this run but lies at"):
        prepare_output_dir(str(folder), {"seed": 1}, overwrite=overwrite, is_main=True, inputs=[str(the_input)])
    assert the_input.read_text() == "input" and (folder / "model.safetensors").exists()


def synthetic_corpus(path, documents=300):
    """A few hundred short documents (about 40 tokens each)."""
    words = "the king said that a patch of tokens is read as one position by the model".split()
    lines = [json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(30))}) for i in range(documents)]
    write(path, "\n".join(lines) + "\n")
    return path


def test_issue_example_overwrite_keeps_the_training_file(workdir, tmp_path):
    """The issue's case: a folder holding notes.txt and corpus/train.jsonl, used as --output_dir with its own
    training file and --overwrite_output_dir (deleting everything, then failing on "train.jsonl cannot be read",
    would cost the user's files). Refused, naming notes.txt; without notes.txt the run trains there, and a second
    --overwrite_output_dir run replaces its outputs and keeps the training file and the token cache kept inside
    the folder."""
    folder = tmp_path / "project"
    train = synthetic_corpus(folder / "corpus" / "train.jsonl")
    write(folder / "notes.txt", "mine")
    args = job_args(workdir, folder, train_file=train, data_cache_dir=folder / "cache", max_steps=2,
                    warmup_steps=0, save_steps=1, overwrite_output_dir="true", validation_file=None)
    with pytest.raises(UsageError, match=r"holds files this script did not write \(notes.txt\)"):
        run_clm.main(args)
    assert (folder / "notes.txt").read_text() == "mine" and train.is_file()
    (folder / "notes.txt").unlink()
    run_clm.main(args)
    assert (folder / "checkpoint-1").is_dir() and (folder / "cache").is_dir()
    results = run_clm.main(args)
    assert train.is_file() and (folder / "cache").is_dir() and (folder / "all_results.json").is_file()
    assert results["token_stage"]["resumed_from"] is None


# ---------------------------------------------------------------------------------------------------------
# Kind 2: the run identity is every argument but a documented list
# ---------------------------------------------------------------------------------------------------------


def parsed(workdir, tmp_path, **overrides):
    return run_clm.parse_arguments(job_args(workdir, tmp_path / "out", **overrides))


def identity_of(arguments):
    return run_identity(arguments, batch_identity(arguments[2], arguments[3]))


# MAY_CHANGE entries naming TrainingArguments fields that releases after the supported floor (5.17) added,
# with the release that added them: absent from an older transformers, they are not stale there.
NEWER_TRANSFORMERS_FIELDS = {"activation_checkpointing": "5.23", "activation_checkpointing_kwargs": "5.23"}


def test_every_argument_is_compared_or_may_change(workdir, tmp_path):
    """Walks the argument dataclasses: each field is in the identity or on MAY_CHANGE, never both, and MAY_CHANGE
    names only real fields. The next argument added (here or by transformers) is compared by default."""
    arguments = parsed(workdir, tmp_path)
    identity = identity_of(arguments)
    names = [f.name for cls in run_clm.ARGUMENT_CLASSES for f in dataclasses.fields(cls) if f.init]
    assert len(names) == len(set(names)), "two argument classes share a field name"
    for name in names:
        assert (name in identity) != (name in MAY_CHANGE), f"{name}: neither in the run identity nor on MAY_CHANGE"
    absent = set(MAY_CHANGE) - set(names)  # entries for TrainingArguments fields of a newer transformers only
    stale = {name for name in absent if transformers_at_least(NEWER_TRANSFORMERS_FIELDS.get(name, "0"))}
    assert not stale, f"stale MAY_CHANGE entries: {stale}"
    assert "hub_token" not in identity  # a secret is never written to run_args.json
    assert json.loads(json.dumps(identity)) == identity


CHANGES = {  # the issue's case, then other settings that change what is computed
    "lr_scheduler_kwargs": ({"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": '{"min_lr_rate": 0.1}'},
                            {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": '{"min_lr_rate": 0.5}'}),
    "optim": ({}, {"optim": "adamw_torch"}),
    "adam_beta2": ({}, {"adam_beta2": 0.95}),
    "weight_decay": ({}, {"weight_decay": 0.1}),
    "max_grad_norm": ({}, {"max_grad_norm": 0.5}),
    "data_seed": ({}, {"data_seed": 3}),
    "label_smoothing_factor": ({}, {"label_smoothing_factor": 0.1}),
    "text_column_name": ({}, {"text_column_name": "content"}),
    "max_eval_blocks": ({}, {"max_eval_blocks": 8}),
    # Not the computation, but the job's one run in each tracker: another name split the curves of one job
    # between two TensorBoard runs (runs/<old> and runs/<new>) without a word.
    "run_name": ({}, {"run_name": "again"}),
}


@pytest.mark.parametrize("setting", CHANGES)
def test_changed_setting_is_refused_naming_it(workdir, tmp_path, setting):
    """Regression: only a hand-picked list was compared: another --lr_scheduler_kwargs (or optimizer, seed of the
    data order, ...) resumed silently. Now refused, naming the setting with its old and new value."""
    before, after = CHANGES[setting]
    folder = tmp_path / "out"
    prepare_output_dir(str(folder), identity_of(parsed(workdir, tmp_path, **before)), False, True)
    (folder / "patch_stage" / "checkpoint-4").mkdir(parents=True)  # progress to resume from (see the test below)
    with pytest.raises(UsageError, match=rf"holds a different run \({setting}: .+ -> .+\)"):
        prepare_output_dir(str(folder), identity_of(parsed(workdir, tmp_path, **after)), False, True)


@pytest.mark.parametrize("change", [
    {"logging_steps": 5}, {"save_steps": 2}, {"eval_steps": 3, "eval_strategy": "steps"}, {"dataloader_num_workers": 2},
    {"report_to": "tensorboard"}, {"disable_tqdm": False}, {"data_cache_dir": "/elsewhere"},
    {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "patch_per_device_train_batch_size": 1,
     "patch_gradient_accumulation_steps": 1},
])
def test_settings_that_may_change_resume(workdir, tmp_path, change):
    folder = tmp_path / "out"
    prepare_output_dir(str(folder), identity_of(parsed(workdir, tmp_path)), False, True)
    prepare_output_dir(str(folder), identity_of(parsed(workdir, tmp_path, **change)), False, True)


def test_a_record_without_some_settings_is_another_run(workdir, tmp_path):
    """Default-deny both ways: a recorded run that lacks settings this run has (a record written by another
    version of this script, or edited) is another run, each absent setting named, at most five of them."""
    folder = tmp_path / "out"
    folder.mkdir()
    identity = identity_of(parsed(workdir, tmp_path))
    write_json_atomic(folder / RUN_ARGS_FILE, {k: v for k, v in identity.items() if k != "seed"})
    with pytest.raises(UsageError, match=r"holds a different run \(seed: '\(absent\)' -> 7\)"):
        check_same_run(str(folder), identity)
    write_json_atomic(folder / RUN_ARGS_FILE, {k: identity[k] for k in ("config_name", "block_size", "learning_rate")})
    with pytest.raises(UsageError, match=r"'\(absent\)' -> .* and \d+ more\)"):
        check_same_run(str(folder), identity)
    write_json_atomic(folder / RUN_ARGS_FILE, {**identity, "a_setting_this_version_lacks": 1})
    with pytest.raises(UsageError, match=r"a_setting_this_version_lacks: 1 -> '\(absent\)'"):
        check_same_run(str(folder), identity)
    write_json_atomic(folder / RUN_ARGS_FILE, identity)
    check_same_run(str(folder), identity)


# ---------------------------------------------------------------------------------------------------------
# Kind 3: the reported figures do not depend on interruptions; kind 4: the pad token is recorded silently
# ---------------------------------------------------------------------------------------------------------

# Logging every 3 steps and saving every 4: the checkpoint falls between two logged losses.
CADENCE = dict(logging_steps=3, save_steps=4)


@pytest.fixture(scope="module")
def reference_job(workdir):
    """The uninterrupted job, recording the special-token warning transformers' Trainer would print."""
    import transformers.trainer_utils

    warnings = []
    with pytest.MonkeyPatch.context() as patch:
        original = transformers.trainer_utils.logger.warning
        patch.setattr(transformers.trainer_utils.logger, "warning",
                      lambda msg, *a, **k: (warnings.append(str(msg)), original(msg, *a, **k)))
        results = run_clm.main(job_args(workdir, workdir / "reference", **CADENCE))
    return workdir / "reference", results, warnings


@pytest.mark.parametrize("stage_patch_size", [4, 1], ids=["in_patch_stage", "in_token_stage"])
def test_results_after_resume_equal_uninterrupted(workdir, reference_job, tmp_path, monkeypatch, stage_patch_size):
    """Regression: train_loss after a kill-and-resume covered only the steps after the resume (8.8878 vs 9.4559).
    Now every stage figure is the whole stage's. A re-run with other settings is refused before resuming."""
    output_dir = tmp_path / "job"
    interrupt_at(monkeypatch, stage_patch_size, step=5)
    with pytest.raises(Interrupt):
        run_clm.main(job_args(workdir, output_dir, **CADENCE))
    monkeypatch.undo()
    with pytest.raises(UsageError, match=r"lr_scheduler_kwargs: None -> \{'num_cycles': 0.25\}"):
        run_clm.main(job_args(workdir, output_dir, **CADENCE, lr_scheduler_type="cosine",
                              lr_scheduler_kwargs='{"num_cycles": 0.25}'))

    results = run_clm.main(job_args(workdir, output_dir, **CADENCE))
    _, reference, _ = reference_job
    resumed = "patch_stage" if stage_patch_size == 4 else "token_stage"
    assert results[resumed]["resumed_from"].endswith("checkpoint-4")
    assert (output_dir / ("patch_stage" if stage_patch_size == 4 else "") / "checkpoint-4" / STAGE_PROGRESS_FILE).is_file()
    for stage in ("patch_stage", "token_stage"):
        assert results[stage]["steps"] == reference[stage]["steps"] == 6
        assert results[stage]["train_loss"] == reference[stage]["train_loss"], stage  # bit for bit
        assert results[stage]["train_runtime_s"] > 0
    # The logged losses too: the one logged after the resume covers steps 4-6, as in the uninterrupted run.
    for folder in ("patch_stage", "."):
        logged, expected = (
            [(e["step"], e.get("loss", e.get("patch_loss"))) for e in
             json.loads((root / folder / "trainer_state.json").read_text())["log_history"] if "grad_norm" in e]
            for root in (output_dir, reference_job[0])
        )
        assert logged == expected, folder
        # The stage's train_loss that reaches the trackers and trainer_state.json: transformers >= 5.2x divides the
        # (restored) sum by the steps of the last attempt only (10.12 where all_results.json said 6.857).
        final = [e for root in (output_dir, reference_job[0]) for e in
                 json.loads((root / folder / "trainer_state.json").read_text())["log_history"] if "train_loss" in e]
        stage = "patch_stage" if folder == "patch_stage" else "token_stage"
        assert [e["train_loss"] for e in final] == [results[stage]["train_loss"], reference[stage]["train_loss"]], folder
    assert results["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-4)


def test_pad_token_is_recorded_silently(reference_job, tokenizer):
    """Regression: every run printed "The tokenizer has new PAD/BOS/EOS tokens ... {'pad_token_id': 0}" (transformers'
    Trainer aligning the config). Now the tokenizer's ids are recorded on purpose before training."""
    output_dir, _, warnings = reference_job
    assert not [w for w in warnings if "PAD/BOS/EOS" in w], warnings
    for folder in (output_dir, output_dir / "patch_stage"):
        config = json.loads((folder / "config.json").read_text())
        generation = json.loads((folder / "generation_config.json").read_text())
        assert config["pad_token_id"] == generation["pad_token_id"] == tokenizer.pad_token_id == 0  # <unk>
        assert config["eos_token_id"] == tokenizer.eos_token_id and config["bos_token_id"] == tokenizer.bos_token_id


# ---------------------------------------------------------------------------------------------------------
# Kind 4: repeated data is worth a warning
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget, data, epochs_requested, expected", [
    (23_600_000_000, 190_000, False, "124,210.5 times"),  # the issue's paper config on a small file
    (5_000, 1_000, False, "5.0 times"),
    (4_000, 1_000, False, None),  # a few epochs: no warning
    (500, 1_000, False, None),
    (23_600_000_000, 190_000, True, None),  # asked for in --num_train_epochs: on purpose
])
def test_repetition_warning(budget, data, epochs_requested, expected):
    warning = repetition_warning(budget, data, epochs_requested)
    assert (warning is None) if expected is None else (expected in warning and "epochs" in warning)


def test_small_train_file_under_a_large_budget_warns_once(workdir, tmp_path, caplog):
    """End to end: a budget of 12 steps x 4 x 32 tokens over a file of 8 short documents (about 5 epochs)."""
    train = synthetic_corpus(tmp_path / "small.jsonl", documents=8)
    with caplog.at_level(logging.WARNING, logger="run_clm"):
        run_clm.main(job_args(workdir, tmp_path / "out", train_file=train, validation_file=None, save_steps=100,
                              patch_data_fraction=0.0, patch_size=1, max_steps=12))
    lines = [r.getMessage() for r in caplog.records if "times (epochs)" in r.getMessage()]
    assert len(lines) == 1, lines



# ---------------------------------------------------------------------------------------------------------
# Kind 4: Ctrl-C
# ---------------------------------------------------------------------------------------------------------


def test_ctrl_c_is_one_line_and_exit_code_130(workdir, tmp_path):
    """Regression: Ctrl-C printed a full KeyboardInterrupt traceback. Now one line saying the same command resumes,
    and exit code 130 (128 + SIGINT). SIGINT is sent once the job has saved its first checkpoint."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO_ROOT

    output_dir = tmp_path / "job"
    argv = job_args(workdir, output_dir, max_steps=100_000, save_steps=1, validation_file=None, patch_data_fraction=0,
                    patch_size=1)
    job = subprocess.Popen([sys.executable, str(REPO_ROOT / "run_clm.py"), *argv], cwd=REPO_ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (output_dir / "checkpoint-1" / "trainer_state.json").is_file():
            assert job.poll() is None and time.time() < deadline, "the job ended or never saved a checkpoint"
            time.sleep(0.2)
        job.send_signal(signal.SIGINT)
        _, stderr = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == (
        "run_clm.py: interrupted; re-running the same command resumes from the last checkpoint")


@pytest.mark.parametrize("progress", [None, "checkpoint-4", "patch_stage/checkpoint-4", "patch_stage/model.safetensors",
                                      "patch_stage/stage_complete.json", "all_results.json"])
def test_a_run_that_made_no_progress_is_taken_over_by_a_changed_command(workdir, tmp_path, caplog, progress):
    """A first run that failed after claiming its folder but before its first checkpoint (a model that does not
    load, a bad record deep in a streamed file) blocked the corrected command ("holds a different run"), leaving
    --overwrite_output_dir as the only way on. Now a claimed folder with no progress is taken over, with a warning
    naming what changed; with any progress (a checkpoint, a stage's model or results) the change is refused."""
    folder = tmp_path / "out"
    prepare_output_dir(str(folder), identity_of(parsed(workdir, tmp_path)), False, True)
    (folder / "runs").mkdir()  # the failed run's TensorBoard folder: kept, not progress
    if progress is not None:
        path = folder / progress
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if progress.endswith("checkpoint-4") else path.write_text("{}")
    changed = identity_of(parsed(workdir, tmp_path, learning_rate=1e-3))
    if progress is None:
        with caplog.at_level(logging.WARNING, logger="run_clm"):
            prepare_output_dir(str(folder), changed, False, True)
        assert "learning_rate: 0.003 -> 0.001" in caplog.text and "made no progress" in caplog.text
        assert json.loads((folder / RUN_ARGS_FILE).read_text())["learning_rate"] == 1e-3
        assert (folder / "runs").is_dir()
    else:
        with pytest.raises(UsageError, match=r"holds a different run \(learning_rate: 0.003 -> 0.001\)"):
            prepare_output_dir(str(folder), changed, False, True)


def test_the_starting_weights_are_identified_by_their_weight_files(workdir, tmp_path):
    """The identity of --model_name_or_path was every file under the folder: a run with its --output_dir inside
    the model's folder changed it with its own checkpoints, and deleting the source run's old checkpoints did too,
    so an interrupted run could never resume. Now only the files the weights load from count (one file, or an index
    and its shards), and a change names the file."""
    import os
    import shutil

    from transformers import AutoModelForCausalLM

    from patch_training.models import load_model_config

    source = tmp_path / "source"
    config = load_model_config(str(workdir / "model_config"))
    AutoModelForCausalLM.from_config(config).save_pretrained(source)
    (source / "checkpoint-5").mkdir()
    (source / "checkpoint-5" / "optimizer.pt").write_text("x")
    before = init_weights_identity(str(source))
    assert list(before) == ["model.safetensors"]
    (source / "continued" / "checkpoint-10").mkdir(parents=True)  # a run's output inside the model's folder
    (source / ".run_clm.lock").write_text("")
    shutil.rmtree(source / "checkpoint-5")  # disk freed
    assert init_weights_identity(str(source)) == before
    weights = source / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # rewritten in place
    folder = tmp_path / "out"
    prepare_output_dir(str(folder), {"init_weight_files": before}, False, True)
    (folder / "checkpoint-4").mkdir()
    with pytest.raises(UsageError, match=r"init_weight_files: model.safetensors '\d+ bytes, modified .*' -> '.*'"):
        prepare_output_dir(str(folder), {"init_weight_files": init_weights_identity(str(source))}, False, True)
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_config(config).save_pretrained(sharded, max_shard_size="100KB")
    names = list(init_weights_identity(str(sharded)))
    assert names[0] == "model.safetensors.index.json" and len(names) > 2
    assert set(names[1:]) == {p.name for p in sharded.glob("model-*-of-*.safetensors")}
    assert init_weights_identity("meta-llama/Llama-2-7b-hf") is None and init_weights_identity(None) is None


def test_deepspeed_runs_keep_their_world_size(workdir, tmp_path):
    """Per-device batch, accumulation and world size may split an unchanged global batch differently on a resume,
    except under DeepSpeed: ZeRO cannot load optimizer state partitioned over another number of ranks, and the
    accepted resume ended in a ZeRORuntimeException traceback. Now refused in one line naming the world sizes."""
    class Launched:  # the parsed arguments as a launch of `world_size` ranks, with or without DeepSpeed
        def __init__(self, args, **changed):
            self._args, self._changed = args, changed

        def __getattr__(self, name):
            return self._changed[name] if name in self._changed else getattr(self._args, name)

    model_args, data_args, patch_args, training_args = parsed(workdir, tmp_path, per_device_train_batch_size=8)
    two = Launched(training_args, world_size=2, per_device_train_batch_size=4, deepspeed="configs/deepspeed/zero2.json")
    one = Launched(training_args, world_size=1, per_device_train_batch_size=8, deepspeed="configs/deepspeed/zero2.json")
    folder = tmp_path / "ds"
    prepare_output_dir(str(folder), batch_identity(patch_args, two), False, True)
    (folder / "checkpoint-2").mkdir()
    with pytest.raises(UsageError, match=r"holds a different run \(deepspeed_world_size: 2 -> 1\)"):
        prepare_output_dir(str(folder), batch_identity(patch_args, one), False, True)
    without = [batch_identity(patch_args, Launched(a, deepspeed=None)) for a in (two, one)]
    assert without[0] == without[1] and without[0]["deepspeed_world_size"] is None  # DDP: may change
