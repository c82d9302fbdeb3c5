"""Argument checks at parse time: non-finite numbers, the seed's range, --lr_scheduler_kwargs against the
scheduler, duplicate keys in JSON, settings that break the patch stage; and failures to write as one line
(`run_cli`). Nothing here trains."""

import dataclasses
import errno
import json
import os
import re

import pytest
import torch
from conftest import REPO_ROOT, tiny_llama_config

import run_clm
from patch_training.cli import UsageError, folder_problem, refuse_non_finite, run_cli, write_error_message
from patch_training.training_args import check_patch_stage_settings

TINY_PATCH = str(REPO_ROOT / "configs" / "train" / "tiny-patch.json")


def parse(*flags, config=TINY_PATCH):
    return run_clm.parse_arguments([config, "--output_dir", "/tmp/never-written", "--max_steps", "4",
                                    "--eval_strategy", "no", *flags])


def write_config(tmp_path, text: str) -> str:
    path = tmp_path / "job.json"
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------------------------------------------------
# Non-finite numbers
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("learning_rate", "inf", r"^--learning_rate must be a finite number, got inf$"),
        ("learning_rate", "nan", r"^--learning_rate must be a number, got nan$"),
        ("patch_learning_rate", "nan", r"^--patch_learning_rate must be a number, got nan$"),  # run_clm's own class
        ("patch_learning_rate", "inf", r"^--patch_learning_rate must be a finite number, got inf$"),
        ("patch_warmup_steps", "inf", r"^--patch_warmup_steps must be a finite number, got inf$"),
        ("weight_decay", "inf", r"^--weight_decay must be a finite number, got inf$"),
        ("adam_epsilon", "inf", r"^--adam_epsilon must be a finite number, got inf$"),
        ("max_grad_norm", "nan", r"^--max_grad_norm must be a number, got nan$"),
        ("max_grad_norm", "-inf", r"^--max_grad_norm must be a finite number, got -inf$"),
        ("num_train_epochs", "nan", r"^--num_train_epochs must be a number, got nan$"),
        ("num_train_epochs", "inf", r"^--num_train_epochs must be a finite number, got inf$"),
        ("warmup_steps", "nan", r"^--warmup_steps must be a number, got nan$"),
        ("save_steps", "inf", r"^--save_steps must be a finite number, got inf$"),  # was OverflowError in transformers
        ("logging_steps", "inf", r"^--logging_steps must be a finite number, got inf$"),
        ("eval_delay", "nan", r"^--eval_delay must be a number, got nan$"),
        ("neftune_noise_alpha", "inf", r"^--neftune_noise_alpha must be a finite number, got inf$"),
        ("label_smoothing_factor", "nan", r"^--label_smoothing_factor must be a number, got nan$"),
        ("label_smoothing_factor", "1", r"^--label_smoothing_factor must lie in \[0, 1\), got 1.0$"),
        ("num_train_epochs", "-1", r"^--num_train_epochs must be >= 0, got -1.0$"),
        ("logging_steps", "-1", r"^--logging_steps must be >= 0, got -1(\.0)?$"),
        ("eval_steps", "-5", r"^--eval_steps must be >= 0, got -5(\.0)?$"),
        ("eval_delay", "-1", r"^--eval_delay must be >= 0, got -1(\.0)?$"),
        ("seed", "-1", r"^--seed must lie in \[0, 2\*\*32 - 1\] \(numpy's seed range\), got -1$"),
        ("seed", str(2**32), r"^--seed must lie in \[0, 2\*\*32 - 1\] \(numpy's seed range\), got 4294967296$"),
    ],
)
def test_bad_number_is_refused_at_parse_time(flag, value, message):
    with pytest.raises(UsageError, match=message):
        parse(f"--{flag}={value}")


@pytest.mark.parametrize("key, value, message", [
    ("learning_rate", "Infinity", r"^--learning_rate must be a finite number, got inf$"),
    ("weight_decay", "NaN", r"^--weight_decay must be a number, got nan$"),
    ("patch_learning_rate", "-Infinity", r"^--patch_learning_rate must be >= 0, got -inf$"),
])
def test_non_finite_number_in_a_config_file_is_refused(tmp_path, key, value, message):
    """Python's JSON reader takes NaN and Infinity; they reach the same check as the flags."""
    text = json.dumps({**json.loads(open(TINY_PATCH).read()), key: 1.0}).replace(f'"{key}": 1.0', f'"{key}": {value}')
    with pytest.raises(UsageError, match=message):
        parse(config=write_config(tmp_path, text))


def test_meaningful_numbers_are_still_accepted():
    """+inf where it means something (max_grad_norm: measure, never clip), the seed's range ends."""
    assert parse("--max_grad_norm=inf")[3].max_grad_norm == float("inf")
    assert parse("--seed=0")[3].seed == 0
    assert parse(f"--seed={2**32 - 1}")[3].seed == 2**32 - 1
    assert parse("--label_smoothing_factor=0.1")[3].label_smoothing_factor == 0.1


def test_refuse_non_finite_covers_every_float_field():
    """The check is generic: any float field of any argument dataclass, not a list of names."""

    @dataclasses.dataclass
    class Other:
        ratio: float = 0.5
        maybe: float | None = None
        count: int = 3

    refuse_non_finite(Other())
    refuse_non_finite(Other(maybe=2.0))
    with pytest.raises(UsageError, match=r"^--maybe must be a finite number, got inf$"):
        refuse_non_finite(Other(maybe=float("inf")))
    with pytest.raises(UsageError, match=r"^--ratio must be a number, got nan$"):
        refuse_non_finite(Other(ratio=float("nan")))


# ---------------------------------------------------------------------------------------------------------
# --lr_scheduler_kwargs
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr_scheduler_kwargs", '{"min_lr": 1e-5}'],
         r"^--lr_scheduler_kwargs for --lr_scheduler_type cosine: unknown key\(s\) min_lr \(cosine takes only num_cycles\)$"),
        (["--lr_scheduler_kwargs", '{"num_warmup_steps": 3, "zzz": 1}'],
         r"cosine: unknown key\(s\) num_warmup_steps, zzz \(cosine takes only num_cycles\)$"),
        (["--lr_scheduler_type", "constant", "--lr_scheduler_kwargs", '{"min_lr": 1e-5}'],
         r"constant: unknown key\(s\) min_lr \(constant takes none\)$"),
        (["--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr_ratio": 0.1}'],
         r"cosine_with_min_lr: unknown key\(s\) min_lr_ratio \(cosine_with_min_lr takes only num_cycles, min_lr, min_lr_rate\)$"),
        (["--lr_scheduler_type", "cosine_with_min_lr"], r"cosine_with_min_lr: One of min_lr or min_lr_rate should be set"),
        (["--lr_scheduler_type", "warmup_stable_decay"], r"warmup_stable_decay: .*missing 1 required positional argument: 'num_decay_steps'"),
        (["--lr_scheduler_type", "polynomial", "--lr_scheduler_kwargs", '{"lr_end": 1}'], r"polynomial: lr_end \(1\) must be smaller"),
        (["--lr_scheduler_type", "reduce_lr_on_plateau", "--eval_strategy", "steps", "--lr_scheduler_kwargs", '{"bogus": 3}'],
         r"reduce_lr_on_plateau: .*unexpected keyword argument 'bogus'"),
    ],
)
def test_bad_lr_scheduler_kwargs_are_refused_at_parse_time(flags, message):
    """Regression: a TypeError from the scheduler function once the data was tokenised."""
    with pytest.raises(UsageError, match=message):
        parse(*flags)


@pytest.mark.parametrize("flags, expected", [
    (["--lr_scheduler_kwargs", '{"num_cycles": 0.5}'], {"num_cycles": 0.5}),
    (["--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr": 1e-5}'], {"min_lr": 1e-5}),
    (["--lr_scheduler_type", "cosine_warmup_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr_rate": 0.1}'], {"min_lr_rate": 0.1}),
    (["--lr_scheduler_type", "warmup_stable_decay", "--lr_scheduler_kwargs", '{"num_decay_steps": 3}'], {"num_decay_steps": 3}),
    (["--lr_scheduler_type", "linear"], None),
])
def test_good_lr_scheduler_kwargs_are_accepted(flags, expected):
    assert (parse(*flags)[3].lr_scheduler_kwargs or None) == expected


def test_lr_scheduler_kwargs_in_a_config_file_are_checked(tmp_path):
    values = json.loads(open(TINY_PATCH).read())
    with pytest.raises(UsageError, match=r"cosine: unknown key\(s\) min_lr"):
        parse(config=write_config(tmp_path, json.dumps({**values, "lr_scheduler_kwargs": {"min_lr": 1e-5}})))
    accepted = {**values, "lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr": 1e-5}}
    assert parse(config=write_config(tmp_path, json.dumps(accepted)))[3].lr_scheduler_kwargs == {"min_lr": 1e-5}


# ---------------------------------------------------------------------------------------------------------
# Duplicate keys in JSON
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, key", [
    ('{"learning_rate": 0.003, "block_size": 32, "learning_rate": 0.5}', "learning_rate"),  # top level
    ('{"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr": 1e-5, "min_lr": 0.5}}', "min_lr"),  # nested
    ('{"train_file": "a.jsonl", "train_file": "b.jsonl"}', "train_file"),
])
def test_duplicate_key_in_a_config_file_is_refused(tmp_path, text, key):
    """Regression: json kept the last value without a word (a silently different run)."""
    path = write_config(tmp_path, text)
    with pytest.raises(UsageError, match=rf"^config file {path} has the key '{key}' twice \(JSON would keep only the last one\)"):
        parse(config=path)


@pytest.mark.parametrize("flag, text, key", [
    ("lr_scheduler_kwargs", '{"num_cycles": 0.5, "num_cycles": 1}', "num_cycles"),
    ("liger_kernel_config", '{"rope": true, "rope": false}', "rope"),
])
def test_duplicate_key_in_a_json_flag_is_refused(flag, text, key):
    with pytest.raises(UsageError, match=rf"^--{flag} has the key '{key}' twice"):
        parse(f"--{flag}", text)


# ---------------------------------------------------------------------------------------------------------
# Failures to write: one line, exit code 1
# ---------------------------------------------------------------------------------------------------------


def run_and_capture(capsys, entry_point):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(entry_point, "run_clm.py")
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def raise_error(error):
    def entry_point():
        raise error
    return entry_point


@pytest.mark.parametrize("number, path, line", [
    (errno.EACCES, "/out/run_args.json.tmp-29841", "cannot write /out/run_args.json.tmp-29841: [Errno 13] Permission denied"),
    (errno.EPERM, "/out/patch_stage", "cannot write /out/patch_stage: [Errno 1] Operation not permitted"),
    (errno.EROFS, "/out/run_args.json.tmp-1", "cannot write /out/run_args.json.tmp-1: [Errno 30] Read-only file system"),
    (errno.ENOSPC, "/cache/tokens.bin", "cannot write /cache/tokens.bin: [Errno 28] No space left on device"),
    (errno.EDQUOT, "/cache/tokens.bin", f"cannot write /cache/tokens.bin: [Errno {errno.EDQUOT}] {os.strerror(errno.EDQUOT)}"),
])
def test_write_failure_naming_a_file_is_one_line(capsys, number, path, line):
    """OSError(errno, strerror, filename) builds the same exception (and subclass) that the OS call raises."""
    code, err = run_and_capture(capsys, raise_error(OSError(number, os.strerror(number), path)))
    assert (code, err) == (1, [f"run_clm.py: error: {line}"])


def test_real_write_failures_are_one_line(capsys, tmp_path):
    """Real failures: a full device (/dev/full) with and without a file name, and torch.save onto it (a
    RuntimeError from torch's zip writer that names neither the errno nor the file)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")

    def write_full():
        with open("/dev/full", "w") as handle:
            handle.write("x" * 100000)
            handle.flush()

    code, err = run_and_capture(capsys, write_full)
    assert code == 1 and len(err) == 1
    assert err[0] in ("run_clm.py: error: cannot write: no space left on device ([Errno 28] No space left on device)",
                      "run_clm.py: error: cannot write /dev/full: [Errno 28] No space left on device")

    code, err = run_and_capture(capsys, lambda: os.write(os.open("/dev/full", os.O_WRONLY), b"x"))
    assert (code, err) == (1, ["run_clm.py: error: cannot write: no space left on device ([Errno 28] No space left on device)"])

    code, err = run_and_capture(capsys, lambda: torch.save({"w": torch.zeros(100000)}, "/dev/full"))
    assert code == 1 and len(err) == 1
    assert err[0].startswith("run_clm.py: error: torch.save could not write a checkpoint file (disk full or write error?): "
                             "[enforce fail at inline_container.cc")


@pytest.mark.parametrize("workers", [0, 1])
def test_write_failures_name_their_file_also_from_a_data_loader_worker(capsys, tmp_path, monkeypatch, workers):
    """Regression: write(2) names no file, so a full disk met while writing the token cache, the stream's index or
    a JSON record said only "cannot write: no space left on device"; and in a data-loader worker (--streaming with
    --dataloader_num_workers 1) torch re-raised the OSError from its text, without errno or file: a traceback.
    Now each names the file it wrote (`cli.naming_file`), in one line with exit code 1, with or without a worker.
    Other errors in a worker (EIO writing /proc) keep their traceback."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    from transformers import AutoTokenizer

    from conftest import DATA_DIR, TOKENIZER_DIR
    from patch_training import blocks
    from patch_training.readers import DataSource
    from patch_training.token_cache import write_token_file

    monkeypatch.setattr(blocks, "MARK_TOKENS", 100)
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    source = DataSource.from_files(str(DATA_DIR / "sample_train.jsonl"), "train_file")

    def stream(index_file):
        dataset = blocks.StreamingTokenBlocks(source, tokenizer, "text", 0, 40, 64, index_file=index_file)
        return lambda: list(torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=workers))

    full = "run_clm.py: error: cannot write /dev/full: [Errno 28] No space left on device"
    assert run_and_capture(capsys, stream("/dev/full")) == (1, [full])
    documents = [{"text": "some text"}] * 3000
    assert run_and_capture(capsys, lambda: write_token_file(documents, tokenizer, "text", 100, "/dev/full")) == (1, [full])
    if os.path.exists("/proc/version"):
        with pytest.raises(OSError, match="Input/output error"):
            run_cli(stream("/proc/version"), "run_clm.py")


def test_other_errors_keep_their_traceback(capsys, tmp_path):
    """Only write failures are turned into a line: a missing file, another errno without a file name, or an
    unrelated RuntimeError are bugs or other problems, and keep their traceback."""
    for error in (FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "missing")),
                  PermissionError(errno.EACCES, "Permission denied"),  # no file named: not ours to explain
                  RuntimeError("Size does not match at dimension 1"),
                  RuntimeError("[enforce fail at inline_container.cc:300] . PytorchStreamReader failed reading zip archive")):
        assert write_error_message(error) is None
        with pytest.raises(type(error)):
            run_cli(raise_error(error), "run_clm.py")


# ---------------------------------------------------------------------------------------------------------
# Settings that replace the patch stage's own loss
# ---------------------------------------------------------------------------------------------------------


def test_label_smoothing_is_refused_with_a_patch_stage():
    """transformers' label smoother computes a token loss from the logits instead of the model's K-way patch
    loss: "Size does not match at dimension 1" at the first patch step, after the folder was claimed."""
    training_args = parse("--label_smoothing_factor", "0.1")[3]
    with pytest.raises(UsageError, match=r"^--label_smoothing_factor 0.1 does not work with the patch stage"):
        check_patch_stage_settings(training_args, has_patch_stage=True)
    check_patch_stage_settings(training_args, has_patch_stage=False)  # token level: the smoother works
    check_patch_stage_settings(parse()[3], has_patch_stage=True)  # no smoothing: fine


# ---------------------------------------------------------------------------------------------------------
# Settings accepted by transformers that run_clm would not honour, or that fail only once the Trainer is built
# ---------------------------------------------------------------------------------------------------------


LATE_FAILURES = {  # flags -> the start of the one line
    "missing_optimizer_package": (["--optim", "adamw_bnb_8bit"], "--optim adamw_bnb_8bit: You need to install `bitsandbytes`"),
    "missing_package_needing_the_model": (["--optim", "galore_adamw"], "--optim galore_adamw: You need to install `galore_torch`"),
    "bad_optim_args": (["--optim", "sgd", "--optim_args", "foo"], "--optim sgd with --optim_args 'foo': not enough values"),
    "compile_backend": (["--torch_compile", "true", "--torch_compile_backend", "nonsense"],
                        "--torch_compile_backend 'nonsense' is not a backend accelerate knows (eager, aot_eager, inductor"),
    "compile_mode": (["--torch_compile", "true", "--torch_compile_mode", "fast"], "--torch_compile_mode 'fast' is not one"),
    "compile_regions_alone": (["--torch_compile_regions", "true"],
                              "--torch_compile_regions compiles by regions: it needs --torch_compile true"),
    "push_to_hub_offline": (["--push_to_hub", "true"], "--push_to_hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set"),
    "push_to_hub_unreachable": (["--push_to_hub", "true", "--hub_token", "hf_not_a_token"],
                                "--push_to_hub cannot reach the Hugging Face Hub as a logged-in user ("),
    "do_train_false": (["--do_train", "false"], "--do_train false: run_clm.py always trains"),
    "do_predict": (["--do_predict", "true"], "--do_predict: run_clm.py has no prediction step"),
    "drop_last": (["--dataloader_drop_last", "true"], "--dataloader_drop_last true: not supported by run_clm.py: it would drop the last validation blocks"),
    "fp16_on_cpu": (["--fp16", "true", "--use_cpu", "true"], "--fp16 needs a GPU"),
    "fp16_eval_on_cpu": (["--fp16_full_eval", "true", "--use_cpu", "true"], "--fp16_full_eval needs a GPU"),
}


@pytest.mark.parametrize("member", LATE_FAILURES)
def test_settings_that_would_fail_late_or_do_nothing_are_refused_up_front(tmp_path, monkeypatch, member):
    """Regression: a missing optimizer package, unparsable --optim_args, an unknown compile backend and --push_to_hub
    offline each gave a traceback once the Trainer was built, after the folder was claimed (and, with
    --overwrite_output_dir, the earlier outputs deleted); a re-run with the fix was then refused as another run.
    --do_train false, --do_predict, --dataloader_drop_last and --fp16 on a CPU were accepted and not honoured
    (drop_last silently evaluated fewer blocks). Now each is one line before any work; the folder is not made."""
    from huggingface_hub import constants

    from test_run_clm import job_args

    flags, line = LATE_FAILURES[member]
    if member == "push_to_hub_offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    if member == "push_to_hub_unreachable":  # a real request, refused by a closed local port
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    workdir = tmp_path / "work"
    tiny_llama_config(max_position_embeddings=256).save_pretrained(workdir / "model_config")
    argv = job_args(workdir, tmp_path / "out") + flags
    with pytest.raises(UsageError) as refused:
        run_clm.main(argv)
    assert str(refused.value).startswith(line), str(refused.value)
    assert "\n" not in str(refused.value) and not (tmp_path / "out").exists()


def test_the_same_settings_done_right_are_taken(tmp_path):
    """What the checks take: an installed optimizer with parsable arguments, known compile settings, the
    flags' defaults."""
    from patch_training.training_args import RunTrainingArguments, check_trainer_settings

    for flags in ({"optim": "sgd", "optim_args": "momentum=0.9"}, {"optim": "adafactor"},
                  {"torch_compile": True, "torch_compile_backend": "aot_eager", "torch_compile_mode": "max-autotune"},
                  {"do_predict": False, "dataloader_drop_last": False, "fp16": False}):
        args = RunTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **flags)
        check_trainer_settings(args)
        assert args.do_train


def test_regional_compilation_flag_and_accelerate_switch_agree(tmp_path, monkeypatch):
    """--torch_compile_regions sets accelerate's switch (ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION), and the switch
    set by `accelerate launch`'s config turns the flag on, so the run's recorded settings say what accelerate does;
    a value accelerate cannot read is one line (it failed later with accelerate's traceback)."""
    from patch_training.training_args import REGIONAL_COMPILATION_ENV, RunTrainingArguments

    def make(**flags):
        return RunTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **flags)

    monkeypatch.setenv(REGIONAL_COMPILATION_ENV, "false")  # restored after the test
    assert make(torch_compile=True).torch_compile_regions is False
    assert make(torch_compile=True, torch_compile_regions=True).torch_compile_regions is True
    assert os.environ[REGIONAL_COMPILATION_ENV] == "true"
    for value, regions in (("1", True), ("Yes", True), ("off", False)):
        monkeypatch.setenv(REGIONAL_COMPILATION_ENV, value)
        assert make(torch_compile=True).torch_compile_regions is regions
        assert make().torch_compile_regions is False  # without compiling, the switch does nothing
    monkeypatch.setenv(REGIONAL_COMPILATION_ENV, "maybe")
    with pytest.raises(UsageError) as refused:
        make(torch_compile=True)
    assert str(refused.value) == ("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION='maybe' is not a truth value (accelerate "
                                  "reads y, yes, t, true, on, 1 or n, no, f, false, off, 0)")


@pytest.mark.parametrize("flags", [["--max_step", "4"], ["--output_d", "/tmp/elsewhere"], ["--learning_r=0.1"],
                                   ["--patch_si", "2"]], ids=" ".join)
def test_an_abbreviated_flag_is_refused(flags):
    """Regression: argparse took an unambiguous prefix of a flag as the flag (`--max_step 4` as --max_steps), so
    a config key with a typo, which the launchers pass as a flag, changed another setting without a word (a
    config file given to run_clm.py refuses the same key as unknown). Now refused in one line, in both forms."""
    config = str(REPO_ROOT / "configs/train/tiny-patch.json")
    for argv in ([config, *flags], ["--config_name", str(REPO_ROOT / "configs/model/llama-tiny.json"),
                                    "--train_file", "x.jsonl", *flags]):
        with pytest.raises(UsageError, match=re.escape(flags[0])):
            run_clm.parse_arguments(argv)


def test_folder_problem_says_what_os_makedirs_would_fail_on(tmp_path, monkeypatch):
    """`folder_problem` names the file in the way of a folder option exactly when os.makedirs(exist_ok=True) fails
    on it: a file, a path under a file, a link to nothing (the twin in scripts/replicate.py checked with lexists,
    the one in resume.py with exists, so a broken link passed and os.makedirs then failed with a traceback), a
    path under such a link; and is None for a folder, a link to a folder, a path to be made, a relative path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("keep")
    (tmp_path / "folder").mkdir()
    (tmp_path / "to-folder").symlink_to(tmp_path / "folder")
    (tmp_path / "to-nothing").symlink_to(tmp_path / "gone")
    cases = {
        "file": "file is a file", "file/sub": "file is a file", "to-nothing": "to-nothing is a link to nothing",
        "to-nothing/sub/x": "to-nothing is a link to nothing", "folder": None, "to-folder/new/sub": None,
        "new/sub": None, str(tmp_path / "folder" / "new"): None, "": None,
    }
    for given, expected in cases.items():
        problem = folder_problem("--x", given)
        try:
            os.makedirs(given or ".", exist_ok=True)
            made = True
        except OSError:
            made = False
        assert made == (problem is None), given
        if expected is not None:
            assert problem == f"--x {given}: {expected}, not a folder"
    assert (tmp_path / "file").read_text() == "keep" and os.path.islink(tmp_path / "to-nothing")


def test_training_arguments_pickle_as_stock_and_copy_as_ours():
    """transformers' Trainer torch.saves its arguments into every checkpoint (training_args.bin), which needed this
    project to load (No module named 'patch_training'): RunTrainingArguments pickles as the stock TrainingArguments
    with the same values, and copies (copy, deepcopy) stay RunTrainingArguments."""
    import copy
    import io
    import pickle

    import torch
    from transformers import TrainingArguments

    from patch_training.training_args import RunTrainingArguments

    args = RunTrainingArguments(output_dir="/tmp/x", report_to="none", use_cpu=True, learning_rate=1e-3,
                                lr_scheduler_type="cosine", lr_scheduler_kwargs='{"num_cycles": 0.25}')
    buffer = io.BytesIO()
    torch.save(args, buffer)
    assert b"patch_training" not in buffer.getvalue()
    buffer.seek(0)
    for loaded in (torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(args))):
        assert type(loaded) is TrainingArguments
        ours = args.to_dict()  # every stock field with our value; our extra fields stay as attributes
        assert loaded.to_dict() == {k: ours[k] for k in loaded.to_dict()} and set(loaded.to_dict()) <= set(ours)
        assert loaded.overwrite_output_dir is False and loaded.do_train is True
    for clone in (copy.copy(args), copy.deepcopy(args)):
        assert type(clone) is RunTrainingArguments and clone.to_dict() == args.to_dict()
    assert copy.deepcopy(args).lr_scheduler_kwargs is not args.lr_scheduler_kwargs


def test_a_regional_run_does_not_make_the_next_run_in_the_process_regional(tmp_path, monkeypatch):
    """The switch that --torch_compile_regions sets for accelerate is this process's, not the launcher's: the next
    arguments made in the same process (a notebook running run_clm twice, a benchmark, the test suite, which
    parses every config) neither compile by regions nor record that they do, unless they ask; the launcher's switch
    still counts. (Regression: parsing the 141gb config in the test process made a later whole-model DeepSpeed job,
    launched from it, compile by regions.)"""
    from patch_training.training_args import REGIONAL_COMPILATION_ENV, RunTrainingArguments

    def make(**flags):
        return RunTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **flags)

    monkeypatch.delenv(REGIONAL_COMPILATION_ENV, raising=False)
    assert make(torch_compile=True, torch_compile_regions=True).torch_compile_regions is True
    assert os.environ[REGIONAL_COMPILATION_ENV] == "true"  # for accelerate, in this run
    assert make(torch_compile=True).torch_compile_regions is False  # the next run, whole model
    assert REGIONAL_COMPILATION_ENV not in os.environ
    make(torch_compile=True, torch_compile_regions=True)
    make()  # not compiling at all takes it back too (a process launched after it would inherit it)
    assert REGIONAL_COMPILATION_ENV not in os.environ
    monkeypatch.setenv(REGIONAL_COMPILATION_ENV, "true")  # the launcher's switch
    assert make(torch_compile=True).torch_compile_regions is True
    assert make(torch_compile=True).torch_compile_regions is True and os.environ[REGIONAL_COMPILATION_ENV] == "true"
