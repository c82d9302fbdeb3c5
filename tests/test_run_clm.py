"""End-to-end tests of run_clm.py on a tiny Llama on CPU: both stages train, the λ split is exact, the token
stage starts fresh, interrupted runs resume, finished runs are left alone, bad input is refused clearly,
and the final model loads in a stock transformers pipeline."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import DATA_DIR, REPO_ROOT, TOKENIZER_DIR
from safetensors.torch import load_file

import run_clm
from patch_training import token_cache
from patch_training.cli import UsageError, run_cli
from patch_training.readers import check_data_files
from patch_training.trainer import PatchTrainer
from patch_training.training_args import torch_compile_caveat

TRAIN_FILE = str(DATA_DIR / "sample_train.jsonl")
VALID_FILE = str(DATA_DIR / "wikitext-103-test.jsonl")


def job_args(workdir, output_dir, **overrides):
    """Command-line arguments of a tiny two-stage job: T=32, K=4, λ=1/2, a budget of 12 token-level steps."""
    values = {
        "config_name": str(workdir / "model_config"),
        "tokenizer_name": str(TOKENIZER_DIR),
        "train_file": TRAIN_FILE,
        "validation_file": VALID_FILE,
        "data_cache_dir": str(workdir / "token_cache"),
        "output_dir": str(output_dir),
        "block_size": 32,
        "patch_size": 4,
        "patch_data_fraction": 0.5,
        "per_device_train_batch_size": 4,
        "max_steps": 12,
        "learning_rate": 3e-3,
        "warmup_steps": 2,
        "logging_steps": 1,
        "save_steps": 4,
        "max_eval_blocks": 4,
        "eval_strategy": "no",
        "report_to": "none",
        "seed": 7,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    values.update(overrides)
    argv = []
    for key, value in values.items():
        if value is None:
            continue
        argv += [f"--{key}", str(value)]
    return argv


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def initial_weights(workdir, seed=7):
    """The weights run_clm starts from: the config's model built right after set_seed(seed)."""
    from transformers import LlamaConfig, set_seed

    from modeling_llama_patch import PatchLlamaForCausalLM

    set_seed(seed)
    return PatchLlamaForCausalLM(LlamaConfig.from_pretrained(workdir / "model_config")).state_dict()


def max_abs_difference(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in b if k in a)


def test_two_stages_train_and_split_is_exact(workdir, finished_job):
    """Both stages change the weights; the λ split gives the first half of the budget to the patch stage
    (blocks of K*T) and the rest to the token stage (blocks of T), with nothing lost but partial blocks."""
    output_dir, results = finished_job
    budget = 12 * 4 * 32
    assert results["budget_tokens"] == budget
    patch, token = results["patch_stage"], results["token_stage"]
    assert patch["block_tokens"] == 128 and token["block_tokens"] == 32
    assert token["start_token"] == budget // 2
    assert patch["tokens"] + patch["dropped_tokens"] == budget // 2
    assert token["tokens"] + token["dropped_tokens"] == budget - budget // 2
    assert patch["dropped_tokens"] < 128 and token["dropped_tokens"] < 32
    # Same tokens per optimizer step in both stages: K times fewer sequences of K*T tokens.
    assert patch["per_device_train_batch_size"] == 1 and token["per_device_train_batch_size"] == 4
    assert patch["steps"] == 6 and token["steps"] == 6
    assert patch["tokens_per_step"] == token["tokens_per_step"] == 4 * 32 and patch["world_size"] == 1
    assert patch["positions"] == patch["tokens"] // 4 and token["positions"] == token["tokens"]
    assert results["relative_cost_nominal"] == pytest.approx(0.5 / 4 + 0.5)
    assert results["relative_cost_measured"] == pytest.approx(0.625)
    assert np.isfinite(results["perplexity"]) and results["perplexity"] > 1

    start = initial_weights(workdir)
    after_patch = weights(output_dir / "patch_stage")
    final = weights(output_dir)
    assert max_abs_difference(after_patch, start) > 1e-3, "the patch stage did not train"
    assert max_abs_difference(final, after_patch) > 1e-3, "the token stage did not train"
    config = json.loads((output_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config.get("patch_size", 1) == 1
    assert json.loads((output_dir / "patch_stage" / "config.json").read_text())["patch_size"] == 4


def test_token_stage_starts_with_fresh_optimizer_and_schedule(finished_job):
    """The token stage's AdamW state counts only its own steps and its schedule restarts with warmup."""
    output_dir, results = finished_job
    optimizer = torch.load(output_dir / "checkpoint-4" / "optimizer.pt", weights_only=False)
    steps = {float(state["step"]) for state in optimizer["state"].values()}
    assert steps == {4.0}, f"token-stage AdamW steps {steps}: state carried over from the patch stage"
    token_log = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    patch_log = json.loads((output_dir / "patch_stage" / "trainer_state.json").read_text())["log_history"]
    token_lrs = [entry["learning_rate"] for entry in token_log if "learning_rate" in entry]
    patch_lrs = [entry["learning_rate"] for entry in patch_log if "learning_rate" in entry]
    # Both stages: 2 warmup steps from 0 to 3e-3 (transformers logs the rate of the step just taken), then decay.
    assert token_lrs[:3] == pytest.approx([0.0, 1.5e-3, 3e-3]), "the token stage's warmup did not restart"
    assert token_lrs == pytest.approx(patch_lrs)
    assert any("patch_loss" in entry and "offset_4_loss" in entry for entry in patch_log)
    assert all("patch_loss" not in entry for entry in token_log)
    assert any("eval_patch_loss" in entry for entry in patch_log), "no patch-level evaluation"
    assert any("eval_perplexity" in entry for entry in patch_log), "no token-level perplexity of the patch model"


def test_rerun_of_finished_job_changes_nothing(workdir, finished_job):
    """Re-running a finished job reports its results and touches no file."""
    output_dir, results = finished_job
    before = {p: p.stat().st_mtime_ns for p in output_dir.rglob("*")}
    again = run_clm.main(job_args(workdir, output_dir))
    assert again == json.loads((output_dir / "all_results.json").read_text())
    assert {p: p.stat().st_mtime_ns for p in output_dir.rglob("*")} == before


class Interrupt(Exception):
    pass


def interrupt_at(monkeypatch, stage_patch_size, step):
    """Make the Trainer of the stage with this patch size raise at the given optimizer step."""
    original = PatchTrainer.training_step

    def training_step(self, *args, **kwargs):
        if self.stage_patch_size == stage_patch_size and self.state.global_step >= step:
            raise Interrupt(f"interrupted at step {step}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PatchTrainer, "training_step", training_step)


@pytest.mark.parametrize("stage_patch_size", [4, 1], ids=["in_patch_stage", "in_token_stage"])
def test_resume_after_interruption(workdir, finished_job, tmp_path, monkeypatch, stage_patch_size):
    """An interrupted job re-run with the same command resumes from its last checkpoint (the finished patch
    stage is not re-run) and ends with the same weights as the uninterrupted job."""
    output_dir = tmp_path / "job"
    interrupt_at(monkeypatch, stage_patch_size, step=5)
    with pytest.raises(Interrupt):
        run_clm.main(job_args(workdir, output_dir))
    monkeypatch.undo()
    assert not (output_dir / "all_results.json").exists()
    if stage_patch_size == 4:
        assert not (output_dir / "patch_stage" / "stage_complete.json").exists()
    else:
        patch_weights_before = weights(output_dir / "patch_stage")

    results = run_clm.main(job_args(workdir, output_dir))
    stage = "patch_stage" if stage_patch_size == 4 else "token_stage"
    assert results[stage]["resumed_from"].endswith("checkpoint-4")
    if stage_patch_size == 1:  # the patch stage was finished: not re-run
        assert results["patch_stage"]["resumed_from"] is None
        assert max_abs_difference(weights(output_dir / "patch_stage"), patch_weights_before) == 0
    reference_dir, reference = finished_job
    assert max_abs_difference(weights(output_dir), weights(reference_dir)) < 1e-5
    assert results["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-4)


@pytest.mark.parametrize("damage", ["state_missing", "weights_truncated"])
def test_resume_skips_a_checkpoint_whose_save_did_not_finish(workdir, finished_job, tmp_path, monkeypatch, damage):
    """A job killed while saving leaves its newest checkpoint without trainer_state.json (transformers writes it
    last) or with a half-written file. Regression: a re-run picked it and died in a traceback. It resumes
    from the newest complete one and ends where the uninterrupted job ends."""
    output_dir = tmp_path / "job"
    interrupt_at(monkeypatch, 1, step=5)  # in the token stage, with checkpoints at steps 2 and 4
    with pytest.raises(Interrupt):
        run_clm.main(job_args(workdir, output_dir, save_steps=2))
    monkeypatch.undo()
    newest = output_dir / "checkpoint-4"
    if damage == "state_missing":
        (newest / "trainer_state.json").unlink()
    else:
        weights_file = newest / "model.safetensors"
        weights_file.write_bytes(weights_file.read_bytes()[:1000])

    results = run_clm.main(job_args(workdir, output_dir, save_steps=2))
    assert results["token_stage"]["resumed_from"].endswith("checkpoint-2")
    reference_dir, reference = finished_job
    assert max_abs_difference(weights(output_dir), weights(reference_dir)) < 1e-5
    assert results["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-4)


def test_changed_rerun_of_a_finished_job_is_refused(workdir, finished_job):
    """Regression: a finished job's folder re-run with other settings printed the old results as if they were the
    new ones. Settings that a resume would silently ignore or mix (the batch, the schedule) count too."""
    output_dir, _ = finished_job
    with pytest.raises(UsageError, match=r"holds a different run \(max_steps: 12 -> 16\)"):
        run_clm.main(job_args(workdir, output_dir, max_steps=16))
    with pytest.raises(UsageError, match=r"sequences_per_step: 4 -> 8; patch_sequences_per_step: 1 -> 2"):
        run_clm.main(job_args(workdir, output_dir, gradient_accumulation_steps=2))
    with pytest.raises(UsageError, match=r"learning_rate: 0.003 -> 0.001"):
        run_clm.main(job_args(workdir, output_dir, learning_rate=1e-3))
    # The same sequences per step from another split of them between micro-batch and accumulation: the same run.
    assert run_clm.main(job_args(workdir, output_dir, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                 patch_per_device_train_batch_size=1, patch_gradient_accumulation_steps=1)
            )["perplexity"] == finished_job[1]["perplexity"]


def test_patch_max_steps_beyond_the_data_stops_after_one_pass(workdir, finished_job, tmp_path):
    """--patch_max_steps caps the patch stage; before, a cap above its data made the Trainer repeat the data."""
    results = run_clm.main(job_args(workdir, tmp_path / "job", patch_max_steps=1000, save_steps=100))
    assert results["patch_stage"]["steps"] == finished_job[1]["patch_stage"]["steps"] == 6
    capped = run_clm.main(job_args(workdir, tmp_path / "capped", patch_max_steps=2, save_steps=100))
    assert capped["patch_stage"]["steps"] == 2


@pytest.mark.parametrize("regions", [False, True], ids=["whole_model", "regions"])
def test_torch_compile_job_matches_eager(workdir, finished_job, tmp_path, monkeypatch, caplog, regions):
    """--torch_compile true runs both stages, the stage switch and evaluation, and ends where eager does; so does
    --torch_compile_regions true (accelerate's regional compilation: the decoder layers compiled, the top-level
    forward with the patch means and the K-way loss eager). Both train with the fused LM-head loss: no fallback
    line (regional compilation wraps the head in torch.compile, which the fused loss looks through)."""
    import modeling_llama_patch
    from patch_training.training_args import REGIONAL_COMPILATION_ENV

    monkeypatch.setattr(modeling_llama_patch, "_LOGGED", set())

    monkeypatch.setenv(REGIONAL_COMPILATION_ENV, "false")  # restored after the test
    compiled = []  # per stage: (whole model compiled, first decoder layer compiled)
    train = PatchTrainer.train

    def recording_train(self, *args, **kwargs):
        output = train(self, *args, **kwargs)
        wrapped = self.model_wrapped
        layer = (wrapped._orig_mod if isinstance(wrapped, torch._dynamo.eval_frame.OptimizedModule) else wrapped).model.layers[0]
        compiled.append((isinstance(wrapped, torch._dynamo.eval_frame.OptimizedModule),
                         isinstance(layer, torch._dynamo.eval_frame.OptimizedModule)))
        return output

    monkeypatch.setattr(PatchTrainer, "train", recording_train)
    output_dir = tmp_path / "compiled"
    with caplog.at_level("WARNING", logger="modeling_llama_patch"):
        results = run_clm.main(job_args(workdir, output_dir, torch_compile=True, save_steps=100,
                                        **({"torch_compile_regions": True} if regions else {})))
    assert compiled == [(not regions, regions)] * 2  # both stages
    assert not [r for r in caplog.records if "fused LM-head loss" in r.getMessage()]
    reference_dir, reference = finished_job
    assert results["patch_stage"]["steps"] == 6 and results["token_stage"]["steps"] == 6
    assert max_abs_difference(weights(output_dir), weights(reference_dir)) < 1e-3
    assert results["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-3)
    assert not any(key.startswith("_orig_mod") for key in weights(output_dir))  # a stock checkpoint


def test_activation_checkpointing_job_matches_plain(workdir, finished_job, tmp_path, monkeypatch):
    """--gradient_checkpointing true (--activation_checkpointing in newer transformers) is on in both stages
    and changes nothing but memory: the same weights and perplexity as the job without it."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    flag = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    checkpointing = []
    train = PatchTrainer.train

    def recording_train(self, *args, **kwargs):
        output = train(self, *args, **kwargs)
        # Newer transformers name it `is_activation_checkpointing`; `is_gradient_checkpointing` is then a
        # deprecated alias that warns.
        renamed = hasattr(type(self.model), "is_activation_checkpointing")
        property_name = "is_activation_checkpointing" if renamed else "is_gradient_checkpointing"
        checkpointing.append((self.stage_patch_size, getattr(self.model, property_name)))
        return output

    monkeypatch.setattr(PatchTrainer, "train", recording_train)
    output_dir = tmp_path / "checkpointed"
    results = run_clm.main(job_args(workdir, output_dir, save_steps=100, **{flag: True}))
    assert checkpointing == [(4, True), (1, True)]
    reference_dir, reference = finished_job
    assert max_abs_difference(weights(output_dir), weights(reference_dir)) < 1e-5
    assert results["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-5)


def test_torch_compile_under_zero3_is_flagged():
    """ZeRO-3 + torch.compile runs partly eager (dynamo gives up on ZeRO-3's per-module hooks, seen in a
    2-process CPU run); the job warns. ZeRO-2 compiles fully (tests/test_multiprocess.py) and is not flagged."""
    configs = REPO_ROOT / "configs"

    def caveat(*flags):
        return torch_compile_caveat(run_clm.parse_arguments([str(configs / "train" / "tiny-patch.json"), *flags])[3])

    zero2, zero3 = str(configs / "deepspeed" / "zero2.json"), str(configs / "deepspeed" / "zero3.json")
    assert "ZeRO-3" in caveat("--deepspeed", zero3, "--torch_compile", "true")
    assert caveat("--deepspeed", zero3) is None
    assert caveat("--deepspeed", zero2, "--torch_compile", "true") is None
    assert caveat("--torch_compile", "true") is None


def test_half_written_patch_stage_is_not_used(workdir, finished_job, tmp_path):
    """Without its completion marker, the patch stage is resumed (from its last checkpoint), never skipped."""
    import shutil

    source_dir, _ = finished_job
    output_dir = tmp_path / "job"
    shutil.copytree(source_dir / "patch_stage", output_dir / "patch_stage")
    shutil.copy(source_dir / "run_args.json", output_dir / "run_args.json")
    (output_dir / "patch_stage" / "stage_complete.json").unlink()
    results = run_clm.main(job_args(workdir, output_dir))
    assert results["patch_stage"]["resumed_from"].endswith("checkpoint-6")
    assert (output_dir / "patch_stage" / "stage_complete.json").exists()


def test_final_model_in_stock_pipeline(finished_job):
    """The final model loads with stock transformers in a fresh process (no import of this project) and
    generates through pipeline() offline."""
    output_dir, _ = finished_job
    code = (
        "import transformers, sys\n"
        f"m, info = transformers.AutoModelForCausalLM.from_pretrained({str(output_dir)!r}, output_loading_info=True)\n"
        "assert type(m).__name__ == 'LlamaForCausalLM', type(m)\n"
        "assert not info['missing_keys'] and not info['unexpected_keys'], info\n"
        f"p = transformers.pipeline('text-generation', model={str(output_dir)!r})\n"
        "out = p('The king said', max_new_tokens=5, do_sample=False)[0]['generated_text']\n"
        "assert out.startswith('The king said') and len(out) > len('The king said'), out\n"
        "assert 'run_clm' not in sys.modules and 'modeling_llama_patch' not in sys.modules\n"
        "print('OK', out)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", code], cwd=output_dir, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OK" in done.stdout


def test_streaming_worker_error_is_one_line(workdir, tmp_path, capsys):
    """A data error found in the loader's worker process (--streaming, 1 worker) reaches the shell as the
    original one-line message; before, torch's re-raise carried the worker's whole traceback (24 lines)."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    argv = job_args(workdir, tmp_path / "job", streaming=True, train_file=str(empty), dataloader_num_workers=1)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: run_clm.main(argv), "run_clm.py")
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == ["run_clm.py: error: the streamed training data holds no text"]


def test_streaming_two_stage_job(workdir, tmp_path, caplog):
    """A streaming two-stage job runs to the end (the reference code crashes on len() of the stream), with a
    worker tokenising the stream; it records and logs what it streamed, null and empty texts counted (before:
    skipped without a word under --streaming): the data's numbers once it has been read whole."""
    import logging

    lines = open(TRAIN_FILE, encoding="utf-8").read().splitlines()
    texts = [json.loads(line)["text"] for line in lines][:6]
    data = tmp_path / "with_nulls.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in [None, texts[0], "", *texts[1:], None]))
    with caplog.at_level(logging.INFO, logger="run_clm"):
        results = run_clm.main(job_args(workdir, tmp_path / "job", streaming=True, max_steps=4, save_steps=100,
                                        train_file=str(data), dataloader_num_workers=1))
    assert results["patch_stage"]["steps"] == 2 and results["token_stage"]["steps"] == 2
    assert np.isfinite(results["perplexity"])
    streamed = results["streamed_data"]
    assert streamed["documents"] <= 9 and streamed["skipped_empty"] == sum(t is None or t == "" for t in
                                                                          [None, texts[0], "", *texts[1:], None][:streamed["documents"]])
    assert streamed["tokens"] >= results["tokens"] and streamed["skipped_empty"] >= 2
    assert json.loads((tmp_path / "job" / "all_results.json").read_text())["streamed_data"] == streamed
    assert any(r.getMessage().startswith(f"Streamed {streamed['documents'] - streamed['skipped_empty']} documents of the "
                                         f"training data ({streamed['skipped_empty']} null or empty texts skipped)")
               and r.getMessage().endswith(f"of which the stages trained on {results['tokens']:,}: the stream reads ahead of training")
               for r in caplog.records)


def test_json_config_file(workdir, tmp_path):
    """A *.json first argument is a config file (flags after it override it); a list of training files is
    accepted; a wrongly typed value is refused with its key named."""
    values = {"config_name": "configs/model/llama-tiny.json", "output_dir": str(tmp_path / "job"),
              "train_file": [TRAIN_FILE, TRAIN_FILE], "block_size": 32, "patch_size": 4,
              "patch_data_fraction": 0.5, "learning_rate": 3e-4, "bf16": False, "max_eval_blocks": None}
    config = tmp_path / "job.json"
    config.write_text(json.dumps(values))
    model_args, data_args, patch_args, training_args = run_clm.parse_arguments([str(config)])
    assert patch_args.patch_size == 4 and data_args.block_size == 32 and training_args.learning_rate == 3e-4
    paths, fmt = check_data_files(data_args.train_file, "train_file")
    assert paths == [TRAIN_FILE, TRAIN_FILE] and fmt == "json"

    overridden = run_clm.parse_arguments([str(config), "--block_size", "64", "--output_dir", str(tmp_path / "other")])
    assert overridden[1].block_size == 64 and overridden[3].output_dir == str(tmp_path / "other")
    assert overridden[2].patch_data_fraction == 0.5 and overridden[3].learning_rate == 3e-4
    assert overridden[1].train_file == f"{TRAIN_FILE},{TRAIN_FILE}"

    config.write_text(json.dumps({**values, "block_size": "32"}))
    with pytest.raises(UsageError, match=r"key 'block_size' must be int, got '32'"):
        run_clm.parse_arguments([str(config)])


# ---------------------------------------------------------------------------------------------------------
# Bad input: a clear message naming the argument, before any work
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"patch_data_fraction": 1.5}, r"--patch_data_fraction .*\[0, 1\], got 1.5"),
        ({"patch_data_fraction": -0.1}, r"--patch_data_fraction .*got -0.1"),
        ({"patch_size": 0}, r"--patch_size.*K=0"),
        ({"patch_size": 1, "patch_data_fraction": 0.5}, r"--patch_data_fraction=0.5 needs --patch_size K > 1"),
        ({"train_file": "/nonexistent/train.jsonl"}, r"--train_file: file /nonexistent/train.jsonl does not exist"),
        # LlamaConfig filled a JSON that is not a model config, or a folder without config.json, with its 7B defaults.
        ({"config_name": str(REPO_ROOT / "configs" / "deepspeed" / "zero2.json")}, r"zero2.json is not a model config: its model_type is None"),
        ({"config_name": None, "model_name_or_path": str(TOKENIZER_DIR)}, r"llama2_tokenizer: no config.json there"),
        ({"block_size": 1}, r"--block_size must be >= 2 \(a block of one position has no next token"),
        ({"resume_from_checkpoint": "/some/checkpoint-10"}, r"--resume_from_checkpoint is not used: run_clm.py resumes by itself"),
        ({"validation_file": None, "eval_strategy": "steps", "eval_steps": 2}, r"--eval_strategy steps needs a --validation_file"),
        ({"data_cache_dir": str(REPO_ROOT / "README.md" / "cache")}, r"--data_cache_dir .*README.md is a file, not a folder"),
        ({"tokenizer_name": "/nonexistent/tokenizer"}, r"--tokenizer_name /nonexistent/tokenizer does not exist"),
        ({"tokenizer_name": str(REPO_ROOT / "configs")}, r"--tokenizer_name .*configs: no tokenizer to load"),
        ({"validation_file": "/nonexistent/valid.jsonl"}, r"--validation_file: file /nonexistent/valid.jsonl does not exist"),
        ({"train_file": str(REPO_ROOT / "tests" / "conftest.py")}, r"unsupported extension for .*conftest.py"),
        ({"block_size": 100000}, r"--block_size 100000 exceeds the model's max_position_embeddings"),
        ({"max_steps": 1, "per_device_train_batch_size": 4, "patch_data_fraction": 0.5}, r"the patch stage gets 64 training tokens, fewer than one block of 128"),
        ({"per_device_train_batch_size": 3}, r"divisible by --patch_size K=4"),
        ({"streaming": True, "max_steps": -1}, r"--streaming needs --max_steps"),
        ({"streaming": True, "dataloader_num_workers": 2}, r"--streaming .* --dataloader_num_workers 2 would read"),
        ({"preprocessing_num_workers": -3}, r"--preprocessing_num_workers must be >= 1, got -3"),
        ({"train_file": None, "dataset_name": "nonexistent_xyz/abc"}, r"--dataset_name nonexistent_xyz/abc: Couldn't reach"),
        ({"train_file": '["data/x.jsonl"'}, r"file list .* is not a valid JSON list"),
        # transformers lets these through; torch would fail at the first step, or the run would silently differ.
        ({"per_device_train_batch_size": 0}, r"--per_device_train_batch_size must be >= 1, got 0"),
        ({"gradient_accumulation_steps": 0}, r"--gradient_accumulation_steps must be >= 1, got 0"),
        ({"learning_rate": -1}, r"--learning_rate must be >= 0, got -1"),
        ({"patch_learning_rate": -1}, r"--patch_learning_rate must be >= 0, got -1"),
        ({"adam_beta2": 1.0}, r"--adam_beta2 must lie in \[0, 1\), got 1.0"),
        ({"weight_decay": -0.1}, r"--weight_decay must be >= 0, got -0.1"),
        ({"max_grad_norm": -1}, r"--max_grad_norm must be >= 0 \(0 turns gradient clipping off\)"),
        ({"save_steps": 0}, r"--save_steps must be > 0 .* 0 would save no checkpoint"),
    ],
)
def test_bad_input_is_refused(workdir, tmp_path, overrides, message):
    output_dir = tmp_path / "job"
    with pytest.raises(UsageError, match=message):
        run_clm.main(job_args(workdir, output_dir, **overrides))
    assert not (output_dir / "patch_stage").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_transformers_argument_errors_are_one_line(tmp_path):
    """transformers' own checks in TrainingArguments (here: a paper config's bf16 on a CPU-only machine) come
    out as one line and exit code 2, like ours, instead of a traceback from inside transformers."""
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run_clm.py"), str(REPO_ROOT / "configs" / "train" / "llama-370m-token.json"),
         "--output_dir", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert done.returncode == 2
    message = done.stderr.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("run_clm.py: error: ") and "bf16" in message[0], done.stderr
    assert not (tmp_path / "o").exists()


def test_output_dir_that_is_a_file_is_refused(workdir, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    for output_dir in (a_file, a_file / "run"):
        with pytest.raises(UsageError, match=r"--output_dir .*a_file(/run)?: .*a_file is a file, not a folder"):
            run_clm.main(job_args(workdir, output_dir))
    assert a_file.read_text() == "mine"


@pytest.mark.parametrize("name", ["output_dir", "data_cache_dir"])
def test_a_folder_option_that_is_a_link_to_nothing_is_refused(workdir, tmp_path, name):
    """A broken link passed the check (it tested os.path.exists) and os.makedirs then failed with a
    FileExistsError traceback, after the run had claimed its folder."""
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    folders = {"output_dir": tmp_path / "job", name: link / "sub"}
    with pytest.raises(UsageError, match=rf"--{name} .*link/sub: .*link is a link to nothing, not a folder"):
        run_clm.main(job_args(workdir, folders.pop("output_dir"), **{k: str(v) for k, v in folders.items()}))
    assert link.is_symlink() and not (tmp_path / "job").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_refused(workdir, tmp_path):
    path = tmp_path / "secret.jsonl"
    path.write_text('{"text": "x"}\n')
    path.chmod(0)
    with pytest.raises(UsageError, match="is not readable"):
        run_clm.main(job_args(workdir, tmp_path / "job", train_file=str(path)))


def test_unknown_json_key_is_refused(tmp_path):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"output_dir": str(tmp_path), "config_name": "x", "train_file": TRAIN_FILE, "patch_sise": 4}))
    with pytest.raises(UsageError, match="unknown keys: patch_sise"):
        run_clm.parse_arguments([str(config)])


def test_output_dir_with_unrelated_content_is_refused(workdir, finished_job, tmp_path):
    """A folder with foreign files, or another run's folder, is refused; nothing in it is touched."""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match=r"holds files this script did not write \(notes.txt\)"):
        run_clm.main(job_args(workdir, foreign))
    assert (foreign / "notes.txt").read_text() == "mine"

    output_dir, _ = finished_job
    (output_dir / "all_results.json").rename(output_dir / "all_results.json.bak")
    try:
        with pytest.raises(UsageError, match=r"holds a different run \(patch_data_fraction: 0.5 -> 0.25\)"):
            run_clm.main(job_args(workdir, output_dir, patch_data_fraction=0.25))
    finally:
        (output_dir / "all_results.json.bak").rename(output_dir / "all_results.json")


def test_cli_exit_code_and_message(tmp_path):
    """From the shell: exit code 2 and one line naming the argument, no traceback."""
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run_clm.py"), "--config_name", "x", "--train_file", TRAIN_FILE,
         "--output_dir", str(tmp_path / "o"), "--patch_data_fraction", "2"],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert done.returncode == 2
    assert "--patch_data_fraction" in done.stderr and "Traceback" not in done.stderr


def test_second_run_does_not_tokenise_again(workdir, finished_job, monkeypatch):
    """The token cache is reused: a new job on the same data never calls the tokenisation routine."""
    def fail(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(token_cache, "tokenize_to_cache", fail)
    results = run_clm.main(job_args(workdir, workdir / "second", max_steps=4, save_steps=100))
    assert results["dataset_tokens"] == finished_job[1]["dataset_tokens"]


def damaged_file(tmp_path, kind: str):
    """A data file of each kind that used to end in a library traceback (or, for a list, train silently)."""
    import gzip
    import lzma

    sample = (DATA_DIR / "sample_train.jsonl").read_bytes()
    path = tmp_path / {"latin1": "a.jsonl", "gz": "a.jsonl.gz", "xz": "a.jsonl.xz", "not_gz": "a.jsonl.gz",
                       "json_list": "a.json", "number": "a.jsonl", "list": "a.jsonl"}[kind]
    contents = {
        "latin1": b'{"text": "caf\xe9"}\n',  # "café" in Latin-1
        "gz": gzip.compress(sample)[:2000],
        "xz": lzma.compress(sample)[:2000],
        "not_gz": sample[:2000],
        "json_list": b'[{"text": "a"}, {"text"',
        "number": b'{"text": 123}\n',
        "list": b'{"text": ["a", "b"]}\n',
    }[kind]
    path.write_bytes(contents)
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("latin1", r"a.jsonl is not UTF-8 text \(invalid continuation byte"),
        ("gz", r"a.jsonl.gz cannot be read: Compressed file ended before the end-of-stream marker"),
        ("xz", r"a.jsonl.xz cannot be read: Compressed file ended before the end-of-stream marker"),
        ("not_gz", r"a.jsonl.gz holds uncompressed text, not gzip-compressed data: name it a.jsonl"),
        ("json_list", r"a.json: not a valid JSON list"),
        ("number", r"a.jsonl, record 1: its 'text' is an int, not text"),
        ("list", r"a.jsonl, record 1: its 'text' is a list, not text"),
    ],
)
def test_damaged_data_is_named_and_leaves_no_partial_cache(workdir, tmp_path, kind, message):
    path = damaged_file(tmp_path, kind)
    cache = tmp_path / "cache"
    with pytest.raises(UsageError, match=message):
        run_clm.main(job_args(workdir, tmp_path / "job", train_file=str(path), data_cache_dir=str(cache)))
    assert not any(cache.glob("*.tmp-*")), "a half-written token cache was left behind"


