"""scripts/eval_perplexity.py: each protocol against a naive loop over the stock model's own loss, and the
blocks protocol against run_clm.py's in-training evaluation of a real tiny run (all_results.json)."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import DATA_DIR, REPO_ROOT, TOKENIZER_DIR, tiny_llama_config

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import eval_perplexity  # noqa: E402
from eval_perplexity import evaluate_perplexity, plan_windows  # noqa: E402

T = 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture(scope="module")
def stream():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 32000, (5 * T + 7,), generator=generator)  # 5 blocks and a partial one


def naive_blocks_perplexity(model, stream, block_size):
    """Mean of the stock model's loss over non-overlapping blocks (each has T-1 targets), exponentiated."""
    losses = []
    with torch.no_grad():
        for begin in range(0, len(stream) - block_size + 1, block_size):
            block = stream[begin : begin + block_size][None]
            losses.append(model(input_ids=block, labels=block).loss.item())
    return math.exp(sum(losses) / len(losses)), len(losses) * (block_size - 1)


def naive_sliding_nll(model, stream, block_size, stride):
    """Hugging Face's sliding-window recipe, one window at a time: the labels of already-scored tokens are
    -100, and the stock loss (a mean over the labels that count) is weighted by their number."""
    nll, count, scored_until = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(stream), stride):
            end = min(begin + block_size, len(stream))
            window = stream[begin:end][None]
            labels = window.clone()
            labels[:, : max(scored_until - begin, 0)] = -100
            valid = int((labels[:, 1:] != -100).sum())  # the model shifts: position 0 is never a target
            nll += model(input_ids=window, labels=labels).loss.item() * valid
            count += valid
            scored_until = end
            if end == len(stream):
                break
    return nll, count


def test_blocks_equals_naive_stock_loss(model, stream):
    expected, scored = naive_blocks_perplexity(model, stream, T)
    result = evaluate_perplexity(model, stream, T, batch_size=2, protocol="blocks")
    assert result["blocks"] == 5 and result["evaluated_tokens"] == 5 * T  # the partial block is dropped
    assert result["scored_tokens"] == scored == 5 * (T - 1)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_max_blocks_evaluates_the_first_blocks(model, stream):
    expected, _ = naive_blocks_perplexity(model, stream[: 2 * T], T)
    result = evaluate_perplexity(model, stream, T, batch_size=4, max_blocks=2)
    assert result["blocks"] == 2 and result["scored_tokens"] == 2 * (T - 1)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_sliding_with_stride_t_is_blocks(model, stream):
    blocks = evaluate_perplexity(model, stream, T, batch_size=3, protocol="blocks")
    sliding = evaluate_perplexity(model, stream, T, batch_size=1, protocol="sliding", stride=T)
    assert plan_windows(5 * T, T, "sliding", T) == plan_windows(5 * T, T, "blocks")
    assert sliding["scored_tokens"] == blocks["scored_tokens"]
    assert sliding["nll_sum"] == pytest.approx(blocks["nll_sum"], rel=1e-6)


@pytest.mark.parametrize("stride", [1, 2, 5, 8, 15, 16])
def test_sliding_windows_score_every_token_once(stride):
    num_tokens = 5 * T
    windows = plan_windows(num_tokens, T, "sliding", stride)
    scored = [p for w in windows for p in range(w.end - w.num_targets, w.end)]
    if stride < T:
        assert sorted(scored) == list(range(1, num_tokens))  # every token but the first, once
    else:
        assert len(scored) == len(set(scored)) == 5 * (T - 1)  # S = T: the first token of each block has no context
    for w in windows[1:]:
        assert w.end - w.num_targets - w.begin >= max(T - stride, 1)  # context of each scored token
        assert w.length <= T


@pytest.mark.parametrize("stride", [5, 15])
def test_sliding_equals_naive_recipe(model, stream, stride):
    num_tokens = 5 * T
    result = evaluate_perplexity(model, stream, T, batch_size=3, protocol="sliding", stride=stride)
    nll, count = naive_sliding_nll(model, stream[:num_tokens], T, stride)
    assert result["scored_tokens"] == count == num_tokens - 1
    assert math.isfinite(result["perplexity"])
    assert result["nll_sum"] == pytest.approx(nll, rel=1e-5)


def test_bad_arguments_are_refused(model, stream):
    with pytest.raises(ValueError, match="stride"):
        evaluate_perplexity(model, stream, T, protocol="sliding", stride=T + 1)
    with pytest.raises(ValueError, match="no block"):
        evaluate_perplexity(model, stream[: T - 1], T)
    with pytest.raises(ValueError, match="protocol"):
        plan_windows(T, T, "overlapping")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "/nonexistent"], r"--model /nonexistent: no such folder \(a local folder: nothing is downloaded\)"),
        (["--model", str(TOKENIZER_DIR)], r"no config.json in it"),
        (["--model", "MODEL", "--tokenizer", "/nope"], r"--tokenizer /nope: no such folder"),
        (["--model", "MODEL", "--block_size", "0"], r"--block_size must be >= 2"),
        (["--model", "MODEL", "--protocol", "sliding", "--stride", "0"], r"--stride must be >= 1, got 0"),
        (["--model", "MODEL", "--device", "bogus"], r"--device bogus: "),
    ]
    + ([] if torch.cuda.is_available() else [(["--model", "MODEL", "--device", "cuda"], r"torch sees no CUDA GPU here")]),
)
def test_command_line_errors_are_one_line(tmp_path, capsys, flags, message):
    """Exit code 2 and one line naming the flag; before, a 0 block size or stride silently fell back to the
    default, and a missing folder or absent GPU ended in a library traceback."""
    import re

    (tmp_path / "config.json").write_text("{}")  # MODEL: a folder with a config, for the other flags' checks
    with pytest.raises(SystemExit) as exit_info:
        eval_perplexity.parse_args([str(tmp_path) if flag == "MODEL" else flag for flag in flags])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_command_line_error_from_the_shell():
    import subprocess

    done = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "eval_perplexity.py"), "--model", "/nonexistent"],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "eval_perplexity.py: error: --model /nonexistent: no such folder (a local folder: nothing is downloaded)")


# ---------------------------------------------------------------------------------------------------------
# Against run_clm.py's own evaluation of a real run
# ---------------------------------------------------------------------------------------------------------

RUN_BLOCK_SIZE, RUN_EVAL_BLOCKS = 32, 5


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A two-stage run (K = 2, λ = 0.5) of a few steps, evaluated on the first 5 WikiText blocks of 32."""
    import run_clm

    root = tmp_path_factory.mktemp("eval_run")
    output_dir = root / "run"
    run_clm.main([
        "--config_name", str(REPO_ROOT / "configs" / "model" / "llama-tiny.json"),
        "--tokenizer_name", str(TOKENIZER_DIR),
        "--train_file", str(DATA_DIR / "sample_train.jsonl"),
        "--validation_file", str(DATA_DIR / "wikitext-103-test.jsonl"),
        "--block_size", str(RUN_BLOCK_SIZE), "--patch_size", "2", "--patch_data_fraction", "0.5",
        "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--max_steps", "6",
        "--max_eval_blocks", str(RUN_EVAL_BLOCKS), "--logging_steps", "2", "--save_steps", "1000",
        "--output_dir", str(output_dir), "--data_cache_dir", str(root / "cache"), "--report_to", "none",
    ])
    return output_dir, json.loads((output_dir / "all_results.json").read_text())


@pytest.mark.parametrize("stage", ["token_stage", "patch_stage"])
def test_blocks_equals_run_clm_eval_perplexity(tiny_run, tmp_path, stage):
    output_dir, results = tiny_run
    model_dir = output_dir if stage == "token_stage" else output_dir / "patch_stage"
    output_json = tmp_path / "ppl.json"
    result = eval_perplexity.main([
        "--model", str(model_dir), "--block_size", str(RUN_BLOCK_SIZE), "--max_blocks", str(RUN_EVAL_BLOCKS),
        "--batch_size", "2", "--device", "cpu", "--output_json", str(output_json), "--no_progress",
    ])
    assert result["perplexity"] == pytest.approx(results[stage]["eval_perplexity"], rel=1e-4)
    written = json.loads(output_json.read_text())
    assert written["perplexity"] == result["perplexity"]
    assert written["documents"] == 62 and written["scored_tokens"] == RUN_EVAL_BLOCKS * (RUN_BLOCK_SIZE - 1)
    assert "add_special_tokens=True" in written["statement"] and "blocks" in written["statement"]


def test_sliding_on_the_trained_model(tiny_run):
    output_dir, _ = tiny_run
    result = eval_perplexity.main([
        "--model", str(output_dir), "--protocol", "sliding", "--stride", "8", "--block_size", str(RUN_BLOCK_SIZE),
        "--max_blocks", str(RUN_EVAL_BLOCKS), "--batch_size", "4", "--device", "cpu", "--no_progress",
    ])
    assert result["scored_tokens"] == RUN_EVAL_BLOCKS * RUN_BLOCK_SIZE - 1
    assert math.isfinite(result["perplexity"])


def test_bad_model_data_or_output_is_one_line(tiny_run, tmp_path, foreign_tokenizer_dir):
    """Each used to end in a traceback (the last two after the whole evaluation had run); another model's
    tokenizer, smaller than the vocabulary, was accepted and gave a perplexity of the wrong text."""
    import shutil

    from patch_training.cli import UsageError

    run_dir, _ = tiny_run
    no_tokenizer, no_weights = tmp_path / "no_tokenizer", tmp_path / "no_weights"
    for folder, files in ((no_tokenizer, ("config.json", "model.safetensors")), (no_weights, ("config.json",))):
        folder.mkdir()
        for name in files:
            shutil.copy(run_dir / name, folder / name)
    small = tmp_path / "small.jsonl"
    small.write_text('{"text": "hi"}\n')
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [
        (["--model", str(run_dir), "--data", str(small), "--block_size", "32"], UsageError, "holds 3 tokens, fewer than one block of T=32"),
        (["--model", str(no_tokenizer)], UsageError, rf"--model {no_tokenizer}: no tokenizer to load \(the folder holds none of tokenizer.json"),
        (["--model", str(no_weights), "--tokenizer", str(TOKENIZER_DIR)], UsageError, "no file named model.safetensors"),
        (["--model", str(run_dir), "--tokenizer", foreign_tokenizer_dir], UsageError,
         rf"--tokenizer {foreign_tokenizer_dir} is not the tokenizer of --model {run_dir}: \d+ token ids differ"),
        (["--model", str(run_dir), "--output_json", str(tmp_path)], SystemExit, None),
        (["--model", str(run_dir), "--output_json", str(a_file / "r.json")], SystemExit, None),
    ]
    for flags, error, message in cases:
        with pytest.raises(error, match=message):
            eval_perplexity.main([*flags, "--no_progress"])


def test_the_result_never_replaces_an_input_or_a_file_it_did_not_write(tiny_run, tmp_path, capsys):
    """Regression: --output_json wrote over any path: the --data file, the evaluated model's config.json or
    model.safetensors (then unloadable, and run_clm.py still reported the run finished). Now refused in one line,
    before the evaluation, for the data file (also through a link), a file of the --model or --tokenizer folder,
    and any existing file that is not an earlier result; an earlier result is replaced. The checks after the
    model's config is read (block size beyond its context, a stride outside [1, T], a tokenizer larger than its
    vocabulary) exit 2 like the others (they exited 1)."""
    import shutil

    run_dir, _ = tiny_run
    model = tmp_path / "model"
    shutil.copytree(run_dir, model, ignore=shutil.ignore_patterns("checkpoint-*", "patch_stage"))
    data = tmp_path / "wt.jsonl"
    shutil.copy(REPO_ROOT / "data" / "wikitext-103-test.jsonl", data)
    (tmp_path / "link.jsonl").symlink_to(data)
    mine = tmp_path / "notes.json"
    mine.write_text('{"mine": true}\n')
    before = {p: p.read_bytes() for p in [data, mine, *model.iterdir()] if p.is_file()}
    base = ["--model", str(model), "--data", str(data), "--block_size", str(RUN_BLOCK_SIZE), "--max_blocks", "2",
            "--no_progress"]
    for target, words in ((data, "is the --data file"), (tmp_path / "link.jsonl", "is the --data file"),
                          (model / "config.json", "lies in the --model folder"),
                          (model / "model.safetensors", "lies in the --model folder"),
                          (model / "new.json", "lies in the --model folder"),
                          (mine, "is a file this script did not write")):
        with pytest.raises(SystemExit) as refused:
            eval_perplexity.main([*base, "--output_json", str(target)])
        assert refused.value.code == 2 and words in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_perplexity.main([*base, "--tokenizer", str(model), "--output_json", str(model / "tok.json")])
    assert {p: p.read_bytes() for p in before} == before
    result = tmp_path / "ppl.json"
    for _ in range(2):  # an earlier result is replaced
        eval_perplexity.main([*base, "--output_json", str(result)])
    assert json.loads(result.read_text())["perplexity"] > 1
    from patch_training.cli import run_cli

    for flags in (["--block_size", "100000"], ["--protocol", "sliding", "--block_size", "32", "--stride", "100"]):
        with pytest.raises(SystemExit) as refused:
            run_cli(lambda: eval_perplexity.main(["--model", str(model), "--max_blocks", "1", "--no_progress", *flags]),
                    "eval_perplexity.py")
        assert refused.value.code == 2, flags
