"""Faults a newcomer's trial found (2026-11-30), each as a class of input with several members:

- bad data after --overwrite_output_dir deleted the finished model before the data was read;
- a resume (or a finished run's report) went on when an input file was rewritten in place (data, model config);
- a checkpoint saved with --save_only_model was resumed with a fresh optimizer, without a word;
- a second run into a folder in use resumed from, and rotated away, the first run's checkpoints;
- an --output_dir inside a data folder read its own outputs as data on the next attempt.

Tiny jobs on CPU (`test_run_clm.job_args`: hidden 32, 2 layers, T = 32)."""

import json
import lzma
import os
import re
import subprocess
import sys
import time

import pytest
from test_resume import synthetic_corpus, write
from test_run_clm import Interrupt, interrupt_at, job_args

import run_clm
from patch_training.cli import UsageError
from patch_training.cli import describe_change
from patch_training.run_dir import LOCK_FILE, RUN_ARGS_FILE, check_output_outside_data, input_paths

SMALL = dict(save_steps=2, validation_file=None)


def snapshot(folder):
    """Every file of `folder` (but the lock) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


# Each member: a file name and what to write there; every one is refused while the data is read.
BAD_DATA = {
    "number_as_text": ("bad.jsonl", lambda path: write(path, '{"text": "fine words here"}\n{"text": 42}\n')),
    "not_json": ("bad.jsonl", lambda path: write(path, '{"text": "fine"}\n{"text": oops\n')),
    "truncated_xz": ("bad.jsonl.xz", lambda path: path.write_bytes(
        lzma.compress(synthetic_corpus(path.with_name("src.jsonl")).read_bytes())[:200])),
    "only_blank_lines": ("blank.jsonl", lambda path: write(path, "\n  \n\n")),
    "wrong_column": ("content.jsonl", lambda path: write(path, '{"content": "fine words"}\n' * 20)),
    "not_utf8": ("latin1.txt", lambda path: path.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 20)),
    "parquet_without_text": ("table.parquet", lambda path: __import__("pyarrow.parquet").parquet.write_table(
        __import__("pyarrow").table({"content": ["fine words"] * 20}), path)),
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, workdir):
    """A finished run's folder and its files."""
    folder = tmp_path_factory.mktemp("finished") / "out"
    run_clm.main(job_args(workdir, folder, train_file=synthetic_corpus(folder.parent / "train.jsonl"), **SMALL))
    before = snapshot(folder)
    assert "model.safetensors" in before and "all_results.json" in before
    return folder, before


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("member", BAD_DATA)
def test_bad_data_with_overwrite_keeps_the_finished_run(workdir, finished_run, tmp_path, member, streaming):
    """Regression: --overwrite_output_dir deleted the finished model, then the data was refused; the folder was left
    holding run_args.json alone. Now every input is read before the folder is claimed; with --streaming, which
    reads the data while training, the start of each file is read first (`DataSource.check_starts`: its first
    documents, a table's schema), which finds these (before: the model was deleted, then the stream failed)."""
    folder, before = finished_run
    name, make = BAD_DATA[member]
    make(tmp_path / name)
    with pytest.raises(UsageError, match=re.escape(name) if member != "only_blank_lines" else "no text"):
        run_clm.main(job_args(workdir, folder, train_file=tmp_path / name, overwrite_output_dir="true",
                              streaming=streaming, **SMALL))
    assert snapshot(folder) == before


@pytest.mark.parametrize("overwrite", ["true", "false"])
@pytest.mark.parametrize("member", ["model_is_the_folder", "model_is_its_patch_stage", "tokenizer_is_the_folder",
                                    "cache_is_the_folder"])
def test_an_input_that_is_the_output_folder_is_refused(workdir, finished_run, member, overwrite):
    """Regression: continuing from the model in the output folder itself (or from its patch_stage/) with
    --overwrite_output_dir deleted that model, then failed to load it ("Unrecognized model"). Now an input that
    is the output folder, or a folder the run writes, is refused in one line before anything is touched."""
    folder, before = finished_run
    inputs = {"model_is_the_folder": dict(model_name_or_path=folder, config_name=None),
              "model_is_its_patch_stage": dict(model_name_or_path=folder / "patch_stage", config_name=None),
              "tokenizer_is_the_folder": dict(tokenizer_name=folder),
              "cache_is_the_folder": dict(data_cache_dir=folder)}[member]
    with pytest.raises(UsageError, match=r"is an input of this run .* and the folder where it writes"):
        run_clm.main(job_args(workdir, folder, overwrite_output_dir=overwrite, **{**SMALL, **inputs}))
    assert snapshot(folder) == before


def test_the_readme_continued_pretraining_command_runs(workdir, finished_run, tmp_path):
    """Regression: the documented continued pre-training command (tiny-patch.json with --config_name "" and
    --tokenizer_name "", docs/training.md) was refused: "" reached the tokenizer loader as a name. A blank optional
    text value now unsets it (`cli.blank_as_unset`), for every such field: the tokenizer is the checkpoint's, the
    config too."""
    import shlex

    from conftest import REPO_ROOT

    folder, _ = finished_run
    lines = (REPO_ROOT / "docs" / "training.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if "--model_name_or_path runs/tiny-patch" in line)
    command = lines[start].rstrip("\\") + " " + lines[start + 1].split("#")[0]  # the command and its continuation
    argv = shlex.split(command)[2:]  # after "python run_clm.py"
    assert argv[:1] == ["configs/train/tiny-patch.json"] and argv[argv.index("--tokenizer_name") + 1] == ""
    argv = [str(REPO_ROOT / argv[0])] + [str(folder) if a == "runs/tiny-patch" else a for a in argv[1:]]
    argv += ["--output_dir", str(tmp_path / "continued"), "--max_steps", "4", "--eval_strategy", "no",
             "--train_file", str(folder.parent / "train.jsonl"), "--data_cache_dir", str(workdir / "token_cache")]
    model_args, data_args, *_ = run_clm.parse_arguments(argv)
    assert model_args.config_name is None and model_args.tokenizer_name == str(folder)
    results = run_clm.main(argv)
    assert results["token_stage"]["steps"] > 0
    blank = run_clm.parse_arguments(argv + ["--validation_file", " ", "--patch_offset_weights", ""])
    assert blank[1].validation_file is None and blank[2].patch_offset_weights is None


@pytest.mark.parametrize("change, named", [
    ({"max_position_embeddings": 64}, "max_position_embeddings 256 -> 64"),
    ({"hidden_size": 128, "intermediate_size": 256}, "hidden_size 32 -> 128, intermediate_size"),
    ({"rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}, "rope_parameters"),
    ({}, None),  # the checkpoint's own model: taken
])
def test_a_config_beside_a_checkpoint_must_describe_it(workdir, finished_run, tmp_path, change, named):
    """Regression: --config_name beside --model_name_or_path was silently ignored (the checkpoint's config was
    used; a config file setting config_name plus a checkpoint flag gave no word). Now a config describing
    another model is refused in one line naming what differs, before any work; the checkpoint's own model
    (differing only in what saving records: architectures, dtype, special tokens) is taken."""
    from patch_training.models import check_one_model_config

    folder, before = finished_run
    values = json.loads((workdir / "model_config" / "config.json").read_text())
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**values, **change}))
    if named is None:
        check_one_model_config(str(config), str(folder))
        return
    with pytest.raises(UsageError, match=r"^--config_name .* and --model_name_or_path .* describe different models "
                                         rf"\(.*{re.escape(named)}.*\); the run would start from the checkpoint"):
        run_clm.main(job_args(workdir, tmp_path / "out", config_name=config, model_name_or_path=folder, **SMALL))
    assert not (tmp_path / "out").exists() and snapshot(folder) == before


@pytest.mark.parametrize("member", ["number_as_text", "only_blank_lines"])
def test_a_refused_first_run_does_not_claim_the_folder(workdir, tmp_path, member):
    """Regression: a first run refused for its data left run_args.json, and the corrected command was refused as
    "a different run". Now nothing is recorded until the data has been read."""
    folder = tmp_path / "out"
    name, make = BAD_DATA[member]
    make(tmp_path / name)
    with pytest.raises(UsageError):
        run_clm.main(job_args(workdir, folder, train_file=tmp_path / name, **SMALL))
    assert not (folder / RUN_ARGS_FILE).exists()
    results = run_clm.main(job_args(workdir, folder, train_file=synthetic_corpus(tmp_path / "good.jsonl"), **SMALL))
    assert results["token_stage"]["steps"] > 0


def rewrite_data(tmp_path, args_dir):
    path = tmp_path / "train.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(json.dumps({"text": json.loads(line)["text"][::-1]}) for line in lines) + "\n")
    return r"train_data: \S*train.jsonl '\d+ bytes, modified"


def edit_model_config(tmp_path, config_dir):
    path = config_dir / "config.json"
    values = json.loads(path.read_text())
    values["rms_norm_eps"] = 0.001
    path.write_text(json.dumps(values))
    return r"model_config: rms_norm_eps [0-9.e-]+ -> 0\.001"


def add_a_shard(tmp_path, config_dir):
    synthetic_corpus(tmp_path / "data" / "b.jsonl", documents=20)
    return r"train_files: "


REWRITES = {"data_file": rewrite_data, "model_config": edit_model_config, "shard_in_folder": add_a_shard}


def rewritable_job(workdir, tmp_path, member):
    """A job whose model config and data lie in `tmp_path`, free to be rewritten."""
    import shutil

    config_dir = tmp_path / "model_config"
    shutil.copytree(workdir / "model_config", config_dir)
    if member == "shard_in_folder":
        synthetic_corpus(tmp_path / "data" / "a.jsonl")
        train = tmp_path / "data"
    else:
        train = synthetic_corpus(tmp_path / "train.jsonl")
    return config_dir, job_args(workdir, tmp_path / "out", train_file=train, config_name=config_dir, **SMALL)


@pytest.mark.parametrize("member", REWRITES)
def test_an_input_rewritten_in_place_is_another_run(workdir, tmp_path, monkeypatch, member):
    """Regression: a data file or model config rewritten under the same path between an interruption and the re-run
    was resumed without a word (the first steps on the old data, the rest on the new). Now it is refused like a
    changed flag, naming what changed; a finished run is not reported as if it had used the new inputs."""
    config_dir, args = rewritable_job(workdir, tmp_path, member)
    interrupt_at(monkeypatch, 4, step=3)
    with pytest.raises(Interrupt):
        run_clm.main(args)
    monkeypatch.undo()
    time.sleep(0.01)  # a later modification time on file systems with coarse timestamps
    pattern = REWRITES[member](tmp_path, config_dir)
    with pytest.raises(UsageError, match="holds a different run .*" + pattern):
        run_clm.main(args)


def test_a_finished_run_with_rewritten_data_is_not_reported(workdir, tmp_path):
    config_dir, args = rewritable_job(workdir, tmp_path, "data_file")
    run_clm.main(args)
    assert run_clm.main(args)["token_stage"]["steps"] > 0  # the same inputs: reported again
    rewrite_data(tmp_path, config_dir)
    with pytest.raises(UsageError, match="holds a different run .*train_data"):
        run_clm.main(args)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl.gz"])
def test_a_run_recorded_under_another_reading_rule_is_another_run(workdir, tmp_path, suffix):
    """The run identity holds, per data file, its `readers.content_stamp`, and once the version of the rule the
    files are read by (`readers.READING_RULE_VERSION`): a run recorded under another rule may have read other
    documents from the same files, so its resume is refused in one line naming both versions; a run recorded
    under this rule resumes."""
    import gzip

    from patch_training.readers import READING_RULE_VERSION, content_stamp
    from patch_training.run_dir import check_same_run

    corpus = synthetic_corpus(tmp_path / "c.jsonl").read_text()
    data = tmp_path / f"train{suffix}"
    if suffix == ".txt":
        data.write_text("".join(json.loads(line)["text"] + "\n" for line in corpus.splitlines()))
    else:
        data.write_bytes(gzip.compress(corpus.encode()))
    folder = tmp_path / "out"
    run_clm.main(job_args(workdir, folder, train_file=data, max_steps=2, warmup_steps=0, **SMALL))
    record = json.loads((folder / RUN_ARGS_FILE).read_text())
    assert record["train_data"] == {str(data): content_stamp(str(data))}
    assert record["reading_rule_version"] == READING_RULE_VERSION
    check_same_run(str(folder), record)
    (folder / RUN_ARGS_FILE).write_text(json.dumps({**record, "reading_rule_version": READING_RULE_VERSION + 1}))
    with pytest.raises(UsageError, match=rf"holds a different run \(reading_rule_version: {READING_RULE_VERSION + 1} -> "
                                         rf"{READING_RULE_VERSION}\)"):
        check_same_run(str(folder), record)


def test_describe_change_names_only_the_changed_entries():
    old = {f"shard{i}": "1 bytes" for i in range(1000)}
    new = {**old, "shard7": "2 bytes"}
    assert describe_change("train_data", old, new) == "train_data: shard7 '1 bytes' -> '2 bytes'"
    many = {k: "3 bytes" for k in old}
    assert describe_change("train_data", old, many).endswith("and 995 more")
    assert describe_change("seed", 1, 2) == "seed: 1 -> 2"


@pytest.mark.parametrize("stage_patch_size", [4, 1], ids=["in_patch_stage", "in_token_stage"])
def test_a_model_only_checkpoint_is_not_resumed(workdir, tmp_path, monkeypatch, stage_patch_size):
    """Regression: a run interrupted with --save_only_model true resumed from weights alone with a fresh optimizer and
    schedule (perplexity 4907 vs 5490 uninterrupted), saying only "Resuming". Now the re-run is refused in one line,
    also when the flag is dropped for the re-run (the checkpoint still holds no optimizer state)."""
    args = job_args(workdir, tmp_path / "out", save_only_model="true", **SMALL)
    interrupt_at(monkeypatch, stage_patch_size, step=3)
    with pytest.raises(Interrupt):
        run_clm.main(args)
    monkeypatch.undo()
    for rerun in (args, job_args(workdir, tmp_path / "out", **SMALL)):
        with pytest.raises(UsageError, match=r"checkpoint-2 holds only the model .*--overwrite_output_dir"):
            run_clm.main(rerun)
    results = run_clm.main(args + ["--overwrite_output_dir", "true"])
    assert results["token_stage"]["resumed_from"] is None


def test_a_folder_in_use_is_refused(workdir, tmp_path):
    """Regression: a second run started into the folder of a running one resumed from its newest checkpoint; its
    checkpoint rotation then deleted the folder the first was saving into (a SafetensorError traceback). Now the
    first run holds a lock (another process here) and the second is refused; once it is released, the run goes."""
    folder = tmp_path / "out"
    folder.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, filelock; lock = filelock.FileLock(sys.argv[1]); lock.acquire(); "
         "print('held', flush=True); sys.stdin.read()", str(folder / LOCK_FILE)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UsageError, match="is in use by another run"):
            run_clm.main(job_args(workdir, folder, **SMALL))
        assert not (folder / RUN_ARGS_FILE).exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert run_clm.main(job_args(workdir, folder, **SMALL))["token_stage"]["steps"] > 0


@pytest.mark.parametrize("member", ["train_folder", "recursive_glob", "validation_folder", "the_folder_itself",
                                    "json_list", "folder_glob", "glob_of_folders_below"])
def test_an_output_dir_inside_a_data_folder_is_refused(workdir, tmp_path, member):
    """Regression: the first run succeeded and the identical re-run was refused as a different run (its outputs,
    JSON files and checkpoints, had become training files). Now refused up front, before anything is written."""
    data = tmp_path / "data"
    synthetic_corpus(data / "a.jsonl")
    output = data if member == "the_folder_itself" else data / "out"
    spec = {"train_folder": dict(train_file=data), "recursive_glob": dict(train_file=f"{data}/**/*.jsonl"),
            "validation_folder": dict(validation_file=data, train_file=synthetic_corpus(tmp_path / "t.jsonl")),
            "the_folder_itself": dict(train_file=data),
            "json_list": dict(train_file=json.dumps([str(tmp_path / "t.jsonl"), str(data)])),
            "folder_glob": dict(train_file=f"{data}/*"),  # reads the folder data/out: its JSON files
            "glob_of_folders_below": dict(train_file=f"{tmp_path}/d*/*")}[member]
    if member == "json_list":
        synthetic_corpus(tmp_path / "t.jsonl")
    with pytest.raises(UsageError, match="a (folder|pattern) that --(train|validation)_file reads"):
        run_clm.main(job_args(workdir, output, **{**SMALL, **spec}))
    assert not (data / "out").exists()


PATTERN_REACH = [  # (pattern, output folder, whether the pattern reads in it), relative to a folder
    ("data/*", "data/run", True), ("data/*", "data/run/sub", True), ("data/*", "data", True),
    ("data/**", "data/a/b/run", True), ("data/**/*.json", "data/run", True), ("data/*/*.jsonl", "data", True),
    ("data/*.jsonl", "data/x.jsonl/run", True), ("data/shard_*", "data/shard_run", True), ("data/.*", "data/.run", True),
    ("data/*.jsonl", "data/run", False), ("data/shard_*", "data/run", False), ("other/*", "data/run", False),
    ("data/*", "data/.run", False), ("data/**", "data/.x/run", False), ("data/*", "data/a/.b/run", False),
]


@pytest.mark.parametrize("pattern, output, reaches", PATTERN_REACH)
def test_where_a_pattern_reads(tmp_path, monkeypatch, pattern, output, reaches):
    """`pattern_may_reach` against what `expand_data_files` really reads: with JSON files written in the output
    folder and a subfolder, the pattern's expansion holds a file of that folder exactly when it is said to reach
    it (hidden names and all); and `check_output_outside_data` refuses exactly those, absolute or relative."""
    import types

    from patch_training.readers import expand_data_files, pattern_may_reach

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.jsonl").write_text('{"text": "x"}\n')
    assert pattern_may_reach(pattern, output) is reaches
    assert pattern_may_reach(str(tmp_path / pattern), str(tmp_path / output)) is reaches
    arguments = types.SimpleNamespace(train_file=pattern, validation_file=None)
    if reaches:
        with pytest.raises(UsageError, match=f"lies in {re.escape(pattern)}, a pattern that --train_file reads"):
            check_output_outside_data(output, arguments)
    else:
        check_output_outside_data(output, arguments)
    (tmp_path / output / "checkpoint-1").mkdir(parents=True, exist_ok=True)
    (tmp_path / output / "all_results.json").write_text("{}")
    (tmp_path / output / "checkpoint-1" / "stream.jsonl").write_text("{}\n")
    try:
        read = expand_data_files(pattern, "train_file")
    except UsageError:  # matches no data file
        read = []
    inside = [p for p in read if os.path.abspath(p).startswith(str(tmp_path / output) + os.sep)]
    assert bool(inside) is reaches, read


def test_label_smoothing_with_a_patch_stage_is_refused_before_any_work(workdir, tmp_path):
    """Regression: the patch stage crashed at its first step (transformers' label smoother replaced the K-way loss:
    "Size does not match at dimension 1"), after the folder was claimed. Now refused up front; the token-level
    baseline (--patch_data_fraction 0) takes it."""
    with pytest.raises(UsageError, match="--label_smoothing_factor 0.1 does not work with the patch stage"):
        run_clm.main(job_args(workdir, tmp_path / "out", label_smoothing_factor=0.1, **SMALL))
    assert not (tmp_path / "out" / RUN_ARGS_FILE).exists()
    results = run_clm.main(job_args(workdir, tmp_path / "out", label_smoothing_factor=0.1, patch_data_fraction=0, **SMALL))
    assert results["token_stage"]["steps"] == 12


def test_inputs_given_as_a_json_list_are_protected(workdir, tmp_path):
    """The run's inputs, which --overwrite_output_dir never deletes, include the files of a JSON-list
    --train_file/--validation_file (before, only comma lists were split: a JSON list's files inside the output
    folder, under a name like checkpoint-3/, counted as this script's outputs)."""
    folder = tmp_path / "out"
    train, valid = synthetic_corpus(folder / "checkpoint-3" / "train.jsonl"), synthetic_corpus(tmp_path / "v.jsonl")
    arguments = run_clm.parse_arguments(job_args(workdir, folder, train_file=json.dumps([str(train)]),
                                                 validation_file=f'["{valid}"]'))
    assert {str(train), str(valid)} <= set(input_paths(arguments[0], arguments[1], arguments[3]))
