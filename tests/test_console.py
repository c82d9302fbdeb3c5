"""What a run prints and leaves for the user (docs/console.md), read from real tiny jobs of
`run_clm.py configs/train/tiny-patch.json` run as a user runs them: the job's plan line, a start and an end line per
stage, the closing table (the figures of all_results.json), the throughput in every training log (console,
trainer_state.json), the model card in every model folder (huggingface_hub reads it, its code loads the model), and
no DeepSpeed line in a run without DeepSpeed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from conftest import REPO_ROOT

STEPS, BATCH, BLOCK, K = 10, 8, 32, 4  # --max_steps 10 at λ = 2/3: 7 patch + 4 token steps (the --help example)
SECRET = "hf_notarealtokenbutasecret"  # --hub_token: must not reach any file the run writes


def run_job(out, cache, *flags: str) -> subprocess.CompletedProcess:
    """`python run_clm.py configs/train/tiny-patch.json` with a tiny budget, from the repository root (the config's
    relative paths), logging every 2 steps and evaluating every 3 (so that the throughput clock restarts)."""
    command = [sys.executable, "run_clm.py", "configs/train/tiny-patch.json",
               "--output_dir", str(out), "--data_cache_dir", str(cache), "--max_steps", str(STEPS),
               "--block_size", str(BLOCK), "--per_device_train_batch_size", str(BATCH), "--max_eval_blocks", "4",
               "--per_device_eval_batch_size", "4", "--logging_steps", "2", "--eval_steps", "3", "--save_steps", "4",
               "--warmup_steps", "1", "--disable_tqdm", "true", "--dataloader_num_workers", "0",
               "--hub_token", SECRET, *flags]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=900, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One two-stage job: (its output folder, its console output, its all_results.json, its data cache)."""
    root = tmp_path_factory.mktemp("console")
    out, cache = root / "tiny", root / "token_cache"
    done = run_job(out, cache)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, done.stdout + done.stderr, json.loads((out / "all_results.json").read_text()), cache


def lines_with(text: str, marker: str) -> list[str]:
    return [line for line in text.splitlines() if marker in line]


def test_each_stage_has_a_start_and_an_end_line(job):
    """In order: the job's plan, the patch stage's start and end, the token stage's start and end; their numbers are
    all_results.json's."""
    _, log, results, _ = job
    patch, token = results["patch_stage"], results["token_stage"]
    assert (patch["steps"], token["steps"]) == (7, 4)
    order = ["Job: a budget of", "patch stage (1 of 2, K = 4) starts:", "patch stage (1 of 2, K = 4) done:",
             "token stage (2 of 2, K = 1) starts:", "token stage (2 of 2, K = 1) done:"]
    found = [log.index(marker) for marker in order]
    assert found == sorted(found), "the lines come in the stages' order"
    for marker in order:
        assert len(lines_with(log, marker)) == 1, marker

    (plan,) = lines_with(log, "Job: a budget of")
    assert f"a budget of {results['budget_tokens']:,} training tokens" in plan
    assert f"--max_steps {STEPS} x {BATCH} sequences x {BLOCK} tokens" in plan and "not a count of optimizer steps" in plan
    assert "patch stage 7 optimizer steps, then token stage 4 optimizer steps (11 in all)" in plan
    assert "relative cost λ/K + 1 - λ = 0.500" in plan
    assert "pad_token_id 0 (<unk>, the tokenizer's)" in plan
    assert len(lines_with(log, "pad_token_id")) == 1, "the padding choice is said once"

    (start,) = lines_with(log, "patch stage (1 of 2, K = 4) starts:")
    assert f"7 optimizer steps, {patch['tokens']:,} tokens ({patch['positions']:,} positions)" in start
    assert f"2 sequences x {K * BLOCK} tokens = {2 * K * BLOCK:,} tokens ({2 * BLOCK} positions) per step" in start
    assert "(2 per device x 1 accumulation x 1 process)" in start
    assert "lr 0.003 cosine, 1 warmup steps" in start and "from random weights (seed 42)" in start
    (start,) = lines_with(log, "token stage (2 of 2, K = 1) starts:")
    assert f"4 optimizer steps, {token['tokens']:,} tokens ({token['positions']:,} positions)" in start
    assert f"{BATCH} sequences x {BLOCK} tokens" in start
    assert "from the patch stage's weights only (a fresh optimizer and schedule)" in start

    for name, record, folder in (("patch", patch, "patch_stage"), ("token", token, None)):
        (end,) = lines_with(log, f"{name} stage ({1 if name == 'patch' else 2} of 2, K = {record['patch_size']}) done:")
        assert f"{record['steps']} optimizer steps, {record['tokens']:,} tokens ({record['positions']:,} positions)" in end
        assert f"in {record['train_runtime_s']:,.1f} s ({round(record['tokens'] / record['train_runtime_s']):,} tokens/s" in end
        assert f"eval loss {record['eval_loss']:.4f} (perplexity {record['eval_perplexity']:,.1f})" in end
        assert ("patch loss" in end) is (name == "patch")
        assert end.rstrip().endswith(str(job[0] / folder) if folder else str(job[0]))


def table_rows(log: str) -> dict[str, list[str]]:
    """The closing table's rows by their first cell."""
    lines = log.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["stage", "K", "steps"])
    return {line.split()[0]: line.split() for line in lines[header + 1: header + 4]}


def test_the_job_ends_with_a_table_of_its_stages(job):
    """Per stage and for the job: K, steps, tokens, positions, time, tokens/s, losses, perplexity, as in
    all_results.json; then the relative cost; then the one-line summary."""
    _, log, results, _ = job
    rows = table_rows(log)
    for name in ("patch", "token"):
        record = results[f"{name}_stage"]
        assert rows[name][:7] == [name, str(record["patch_size"]), f"{record['steps']:,}", f"{record['tokens']:,}",
                                  f"{record['positions']:,}", f"{record['train_runtime_s']:,.1f}",
                                  f"{round(record['tokens'] / record['train_runtime_s']):,}"]
        assert rows[name][7:] == [f"{record['train_loss']:,.4f}", f"{record['eval_loss']:,.4f}",
                                  f"{record['eval_perplexity']:,.1f}"]
    assert rows["job"][1:4] == ["11", f"{results['tokens']:,}", f"{results['positions']:,}"]
    assert rows["job"][-2:] == [f"{results['eval_loss']:,.4f}", f"{results['perplexity']:,.1f}"]
    assert (f"relative cost {results['relative_cost_nominal']:.3f} nominal (λ/K + 1 - λ), "
            f"{results['relative_cost_measured']:.3f} measured (positions / tokens)") in log
    assert log.index("relative cost") < log.index("[run_clm] done")


def test_every_training_log_carries_its_throughput(job):
    """tokens_per_second and positions_per_second in every training log of both stages, in trainer_state.json and on
    the console: positions are tokens / K; no mfu on a CPU (no known peak)."""
    out, log, _, _ = job
    for folder, k in ((out / "patch_stage", K), (out, 1)):
        history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
        training = [entry for entry in history if "grad_norm" in entry]
        assert [entry["step"] for entry in training] == ([2, 4, 6] if k == K else [2, 4])
        for entry in training:
            assert entry["tokens_per_second"] > 0 and isinstance(entry["tokens_per_second"], int)
            assert entry["tokens_per_second"] == pytest.approx(k * entry["positions_per_second"], abs=k)
            assert "mfu" not in entry
        assert not [e for e in history if "grad_norm" not in e and "tokens_per_second" in e], "only training logs"
    printed = [line for line in log.splitlines() if line.startswith("{") and "grad_norm" in line]
    assert len(printed) == 5 and all("'tokens_per_second': " in line for line in printed)


def test_no_deepspeed_line_without_deepspeed(job):
    """DeepSpeed is installed here, but a run without --deepspeed never imports it: no "Setting accelerator to CPU"
    line (deepspeed 0.19's, printed at import on a machine without a GPU)."""
    _, log, _, _ = job
    assert "accelerator to" not in log and "ds_accelerator" not in log and "[real_accelerator" not in log


def card_of(folder):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


def python_block(text: str) -> str:
    (block,) = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    return block


def test_every_model_folder_has_a_model_card(job, tmp_path):
    """README.md in the final model's folder and the patch stage's: huggingface_hub reads its metadata; it says the
    method, K, λ, the recipe, the data and its token counts, each stage's steps and tokens, the cost, the evaluation
    and the versions; its code loads the model with stock transformers and generates."""
    import transformers

    out, _, results, _ = job
    for folder, stage in ((out, "token_stage"), (out / "patch_stage", "patch_stage")):
        card = card_of(folder)
        assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
        assert "patch-level-training" in card.data.tags and "arxiv:2407.12665" in card.data.tags
        text = card.text
        assert "https://arxiv.org/abs/2407.12665" in text and "λ = 0.6667" in text and "K = 4" in text
        assert "`data/sample_train.jsonl`" in text and f"{results['dataset_tokens']:,} tokens" in text
        assert f"Budget: {results['budget_tokens']:,} tokens, set by `--max_steps {STEPS}`" in text
        assert "`data/wikitext-103-test.jsonl`" in text
        assert f"**{results[stage]['eval_perplexity']:,.2f}**" in text
        assert f"| optimizer steps | {results['patch_stage']['steps']} |" in text
        assert f"transformers {transformers.__version__}" in text and "trust_remote_code" in text
        # the card's own code, run as a user would: stock AutoModelForCausalLM, no trust_remote_code
        code = python_block(text).replace("print(", "generated = (")
        scope = {}
        exec(compile(code, "README.md", "exec"), scope)  # noqa: S102  (the card's code, what a user runs)
        assert type(scope["model"]).__name__ == "LlamaForCausalLM" and scope["generated"].startswith("The king said")
    final = card_of(out).text
    assert "0.500 nominal (λ/K + 1 - λ), 0.500 measured" in final and "patch-stage model" not in final
    assert "This is the **patch-stage model**" in card_of(out / "patch_stage").text
    assert "| token stage |" not in card_of(out / "patch_stage").text


def test_the_model_card_holds_no_secret_and_no_unnamed_path(job):
    """Only what the user passed: no --hub_token, no cache folder, and no absolute path but the --output_dir given."""
    out, _, _, cache = job
    for folder in (out, out / "patch_stage"):
        text = (folder / "README.md").read_text()
        assert SECRET not in text and str(cache) not in text and "/.cache/" not in text
        text = re.sub(r"https?://\S+", "", text)  # (the paper's link)
        for path in re.findall(r"(?<![\w.])/[\w./-]+", text):
            assert path.startswith(str(out)), path
    assert SECRET not in (out / "run_args.json").read_text()


def test_a_finished_run_prints_its_table_again(job):
    """Re-running the finished job's command reports it, table included, and writes nothing."""
    out, _, results, cache = job
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    done = run_job(out, cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "already holds a finished run" in done.stderr
    rows = table_rows(done.stdout)
    assert rows["patch"][2] == str(results["patch_stage"]["steps"]) and rows["token"][2] == str(results["token_stage"]["steps"])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


@pytest.mark.parametrize("fraction, stages", [(0.0, ("token",)), (1.0, ("patch",))], ids=["token_only", "patch_only"])
def test_one_stage_jobs_print_and_card_their_models(tmp_path, job, fraction, stages):
    """λ = 0 (the baseline) and λ = 1 (the patch stage's model becomes the final, token-level one): a start and end line
    per stage that ran, the table's rows, and a card that loads in every model folder."""
    out = tmp_path / f"lambda{fraction:g}"
    done = run_job(out, job[3], "--patch_data_fraction", str(fraction), "--max_steps", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    for name in stages:
        assert len(lines_with(log, f"{name} stage (1 of 1")) == 2, name  # starts, done
    assert set(table_rows(log)) >= {*stages, "job"}
    (plan,) = lines_with(log, "Job: a budget of")
    if fraction == 0.0:
        assert "λ = 0: token level only (the baseline): token stage 4 optimizer steps;" in plan and "K =" not in plan
    else:
        assert "λ = 1 of the tokens at patch level, K = 4: patch stage 4 optimizer steps;" in plan
    folders = [out] + ([out / "patch_stage"] if fraction == 1.0 else [])
    for folder in folders:
        text = card_of(folder).text
        assert ("token level only" in text) is (fraction == 0.0)
    if fraction == 1.0:  # the final model is the patch stage's, evaluated at K = 1 in the output folder
        results = json.loads((out / "all_results.json").read_text())
        assert f"**{results['final_eval']['eval_perplexity']:,.2f}**" in card_of(out).text
        assert "patch-stage model" not in card_of(out).text


def test_the_throughput_meter_measures_host_time_between_logs():
    """ThroughputMeter on a stage plan: tokens and positions of the steps since the clock started over the host time
    since, restarting at each measurement; mfu = FLOPs per position x positions/s / (peak x devices), only with both."""
    from patch_training.stages import StagePlan
    from patch_training.throughput import ThroughputMeter

    plan = StagePlan("patch", 4, 4 * 32, 0, 10**6, 1000)  # 1000 blocks of 128 tokens
    meter = ThroughputMeter(plan, global_batch=2, flops_per_position=6e6, peak_flops=1e9, world_size=2)
    start = time.perf_counter()
    meter.restart_clock(0)
    time.sleep(0.3)
    fields = meter.fields(3)  # 3 steps x 2 sequences x 128 tokens = 768 tokens, 192 positions
    elapsed = time.perf_counter() - start
    assert 768 / elapsed - 1 <= fields["tokens_per_second"] <= 768 / 0.3 + 1
    assert fields["positions_per_second"] == pytest.approx(fields["tokens_per_second"] / 4, abs=1)
    assert fields["mfu"] == pytest.approx(6e6 * fields["positions_per_second"] / 2e9, rel=1e-2)
    assert meter.fields(3) == {}, "no step since the last measurement"
    no_peak = ThroughputMeter(plan, 2, 6e6, None, 1)
    time.sleep(0.01)
    assert set(no_peak.fields(1)) == {"tokens_per_second", "positions_per_second"}


def test_push_to_hub_sends_the_job_s_card(tmp_path):
    """Trainer.push_to_hub writes its card with `create_model_card` before it uploads the folder: PatchTrainer writes
    the job's card (`model_card`) there; without one, transformers' own."""
    import torch
    from huggingface_hub import ModelCard
    from transformers import LlamaConfig, default_data_collator

    from modeling_llama_patch import PatchLlamaForCausalLM
    from patch_training.trainer import PatchTrainer
    from patch_training.training_args import RunTrainingArguments

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    args = RunTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = PatchTrainer(model=PatchLlamaForCausalLM(config), args=args, data_collator=default_data_collator,
                           train_dataset=[{"input_ids": torch.arange(8), "labels": torch.arange(8)}])
    trainer.create_model_card(model_name="stock")
    assert "generated_from_trainer" in (tmp_path / "README.md").read_text(), "transformers' own card without ours"
    trainer.model_card = ModelCard("---\nlibrary_name: transformers\n---\n\n# ours\n")
    trainer.create_model_card(model_name="ours")
    assert ModelCard.load(tmp_path / "README.md").text.strip() == "# ours"


def test_start_lines_say_what_each_stage_starts_from(tmp_path, job):
    """The recipe beyond the paper: r sets the split (the plan line says r and λ), and the token stage carries the patch
    stage's AdamW state and one schedule over both stages (its start line says so, and the schedule's length)."""
    out = tmp_path / "continued"
    done = run_job(out, job[3], "--patch_data_fraction", "0", "--patch_step_fraction", "0.5", "--patch_switch",
                   "continue", "--max_steps", "6")
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    results = json.loads((out / "all_results.json").read_text())
    steps = results["patch_stage"]["steps"] + results["token_stage"]["steps"]
    (plan,) = lines_with(log, "Job: a budget of")
    assert f"r = 0.5 of the optimizer steps at patch level (λ = {results['patch_data_fraction']:.4g} of the tokens), K = 4" in plan
    (start,) = lines_with(log, "token stage (2 of 2, K = 1) starts:")
    assert f"over both stages' {steps} steps" in start
    assert f"from the patch stage's weights, AdamW state and schedule: {out / 'patch_stage'}" in start


def test_a_resumed_stage_says_where_it_resumes(workdir, tmp_path, monkeypatch, caplog):
    """A job interrupted in its token stage, run again: the patch stage is not started again, and the token stage's
    start line names the checkpoint it resumes from; its logs after the resume carry their throughput."""
    import logging

    from test_run_clm import Interrupt, interrupt_at, job_args

    import run_clm

    out = tmp_path / "resumed"
    interrupt_at(monkeypatch, 1, step=5)
    with pytest.raises(Interrupt):
        run_clm.main(job_args(workdir, out))
    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="run_clm"):
        run_clm.main(job_args(workdir, out))
    messages = [record.getMessage() for record in caplog.records]
    assert not [m for m in messages if "patch stage (1 of 2, K = 4) starts" in m]
    (start,) = [m for m in messages if "token stage (2 of 2, K = 1) starts" in m]
    assert start.endswith(f"resuming from {out / 'checkpoint-4'}")
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    resumed = [e for e in history if "grad_norm" in e and e["step"] > 4]
    assert resumed and all(e["tokens_per_second"] > 0 for e in resumed)
