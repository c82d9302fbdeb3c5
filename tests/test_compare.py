"""scripts/compare.py: the equal-compute comparison's CPU preset end to end (the plumbing, not the science: 24
run_clm.py runs in this process, the table, the costs each run measures, the schedules, the plot), its worker
processes, the tied model through the superposition recipe's handover, the plan of the GPU preset, the statistics
and the sentence made from them, and its bad input."""

import json
import math
import re
import subprocess
import sys

import pytest
from conftest import IN_THE_WAY, REPO_ROOT, path_in_the_way, refused_as_in_the_way

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import compare  # noqa: E402
import sweep  # noqa: E402

SCRIPT = str(REPO_ROOT / "scripts" / "compare.py")
CORPUS_TOKENS = 51_100_900  # ../shared/data/corpus/README.md: the training shards, LLaMA-2 tokens


def log_history(folder):
    return json.loads((folder / "trainer_state.json").read_text())["log_history"]


def reference_learning_rates(schedule: str, steps: int, warmup_ratio: float, peak: float, decay_steps=None):
    """The learning rate of each optimizer step 1..steps of one schedule, from transformers' own functions: the rate
    a step uses is the schedule's value before it (the Trainer logs that one)."""
    import torch
    from transformers.optimization import (
        get_cosine_schedule_with_warmup,
        get_wsd_schedule,
    )

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    warmup = math.ceil(warmup_ratio * steps)
    if schedule == "wsd":
        scheduler = get_wsd_schedule(optimizer, warmup, decay_steps, num_training_steps=steps)
    else:
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


def logged_rates(run_dir, stage_dirs):
    """{job step: learning rate} over the stages' log histories, the token stage's steps after the patch stage's."""
    rates, offset = {}, 0
    for folder in stage_dirs:
        history = log_history(run_dir / folder)
        rates.update({offset + entry["step"]: entry["learning_rate"] for entry in history if "learning_rate" in entry})
        offset += max(entry["step"] for entry in history)
    return rates


@pytest.fixture(scope="module")
def cpu_comparison(tmp_path_factory):
    """The CPU preset, run once for the module: its report and folders."""
    root = tmp_path_factory.mktemp("compare")
    report = compare.main(["--preset", "cpu", "--output_root", str(root / "runs"), "--report_dir", str(root / "report")])
    return report, root


def test_cpu_preset_runs_every_recipe_budget_and_seed_at_equal_compute(cpu_comparison):
    report, root = cpu_comparison
    rows = report["runs"]
    settings = compare.PRESETS["cpu"]["settings"]
    block, batch = settings["block_size"], settings["per_device_train_batch_size"]
    assert report["budgets"] == [128, 256, 512]  # 4x from the smallest to the largest
    assert sorted((r["budget_positions"], r["recipe"], r["seed"]) for r in rows) == sorted(
        (b, name, s) for b in (128, 256, 512) for name in ("token", "paper", "tst-k4", "tst-k6") for s in (1, 2))
    tokens_per_position = {"token": 1.0, "paper": 2.0, "tst-k4": 0.3 * 4 + 0.7, "tst-k6": 0.3 * 6 + 0.7}
    for row in rows:
        results = json.loads((root / "report" / "runs" / row["label"] / "all_results.json").read_text())
        assert results["perplexity"] == row["perplexity"] and math.isfinite(row["perplexity"])
        assert results["positions"] == row["positions"] and results["tokens"] == row["tokens"]
        # Equal compute: every recipe's positions are the budget, off by the whole blocks each stage leaves out (a
        # block of T positions per stage) and the rounding of the token budget to whole steps (half a step's tokens).
        budget = row["budget_positions"]
        slack = 2 * block + batch * block / 2
        assert abs(row["positions"] - budget) <= slack, row
        assert abs(row["tokens"] - tokens_per_position[row["recipe"]] * budget) <= slack * 6, row
        # No token read twice: the token budget lies within the data, and the stages read one pass over their parts.
        assert results["budget_tokens"] <= results["dataset_tokens"]
        for stage in ("patch_stage", "token_stage"):
            if stage in results:
                assert results[stage]["tokens"] <= results[stage]["planned_tokens"]
        if row["recipe"] == "token":
            assert "patch_stage" not in results and row["tokens"] == row["positions"]
        elif row["recipe"] == "paper":
            assert results["patch_size"] == 4 and results["patch_data_fraction"] == pytest.approx(2 / 3)
            assert (results["patch_batch_mode"], results["patch_switch"]) == ("tokens", "restart")
        else:
            assert results["patch_size"] == int(row["recipe"][-1]) and results["patch_split_by"] == "patch_step_fraction"
            assert results["patch_step_fraction"] == 0.3
            assert (results["patch_batch_mode"], results["patch_switch"]) == ("positions", "continue")
            steps = results["schedule_steps"]
            assert abs(results["patch_step_fraction_measured"] - 0.3) <= 1 / steps + 1e-9  # whole steps


def test_the_schedules_are_the_recipes(cpu_comparison):
    """The learning rate of every step, as logged, against transformers' schedules built independently: cosine per
    stage, restarted at the switch, for the paper's recipe; one warmup-stable-decay schedule over both stages (decay
    0.2 of the steps) for the superposition recipe; one cosine for token level."""
    report, root = cpu_comparison
    peak, warmup = compare.PRESETS["cpu"]["settings"]["learning_rate"], compare.PRESETS["cpu"]["settings"]["warmup_steps"]
    for row in report["runs"]:
        if row["budget_positions"] != 512 or row["seed"] != 1:
            continue
        run = root / "report" / "runs" / row["label"]
        results = json.loads((run / "all_results.json").read_text())
        if row["recipe"] == "token":
            expected = reference_learning_rates("cosine", results["token_stage"]["steps"], warmup, peak)
            assert list(logged_rates(run, ["."]).values()) == pytest.approx(expected)
        elif row["recipe"] == "paper":
            for stage, folder in (("patch_stage", "patch_stage"), ("token_stage", ".")):
                expected = reference_learning_rates("cosine", results[stage]["steps"], warmup, peak)
                assert list(logged_rates(run, [folder]).values()) == pytest.approx(expected)
        else:
            decay = max(1, round(0.2 * row["steps_budget"]))
            expected = reference_learning_rates("wsd", results["schedule_steps"], warmup, peak, decay)
            rates = logged_rates(run, ["patch_stage", "."])
            assert sorted(rates) == list(range(1, results["schedule_steps"] + 1))
            assert [rates[step] for step in sorted(rates)] == pytest.approx(expected)


def test_the_report_holds_the_table_the_answer_and_the_figures(cpu_comparison):
    report, root = cpu_comparison
    report_dir = root / "report"
    saved = json.loads((report_dir / "compare.json").read_text())
    assert saved["answer"] == report["answer"] and len(saved["runs"]) == 24
    table = (report_dir / "compare.md").read_text()
    for entry in saved["summary"]:
        for name, group in entry["groups"].items():
            chosen = [r["perplexity"] for r in saved["runs"]
                      if r["budget_positions"] == entry["budget_positions"] and r["recipe"] == name]
            # The seed statistics, recomputed here.
            assert group["mean"] == pytest.approx(sum(chosen) / len(chosen))
            assert group["spread"] == pytest.approx((max(chosen) - min(chosen)) / 2)
            assert f"{group['mean']:.2f} ± {group['spread']:.2f}" in table
    assert f"**Answer.** {saved['answer']}" in table
    assert saved["answer"].startswith("At equal compute on this 4.2M-parameter Llama (2 seeds a point)")
    # The loss around the switch, for every run with a switch (the paper's and the superposition recipes).
    assert len(saved["switch"]) == 18
    for entry in saved["switch"]:
        assert entry["jump"] == pytest.approx(entry["first_token_loss"] - entry["last_patch_loss"])
        assert entry["gap"] == pytest.approx(entry["first_token_loss"] - entry["baseline_loss"])
    assert "| 512 | superposition K=6" in table
    for figure in ("compare.png", "switch.png"):
        assert (report_dir / figure).stat().st_size > 10_000
    for row in saved["runs"]:
        run = report_dir / "runs" / row["label"]
        assert (run / "trainer_state.json").is_file()
        assert (run / "patch_stage" / "trainer_state.json").is_file() == (row["recipe"] != "token")


def test_a_second_call_reports_the_finished_runs_again(cpu_comparison, capsys):
    report, root = cpu_comparison
    again = compare.main(["--preset", "cpu", "--output_root", str(root / "runs"), "--report_dir", str(root / "again"),
                          "--budgets", "128", "--seeds", "1"])
    first = {r["label"]: r["perplexity"] for r in report["runs"]}
    assert {r["label"]: r["perplexity"] for r in again["runs"]} == {
        label: value for label, value in first.items() if label.startswith("positions-128/") and label.endswith("seed1")}
    assert all(r["wall_time_s"] is None for r in again["runs"])  # finished before: no wall time measured


def test_worker_processes_and_the_tied_model_through_the_handover(tmp_path):
    """--jobs 2 (the gpu preset's): runs in two worker processes, each log in its own file; with a tied head (the
    gpu preset's model kind) through the superposition recipe's carried optimizer state and schedule, and data
    loader workers inside the worker processes."""
    config = json.loads((REPO_ROOT / "configs" / "model" / "llama-tiny.json").read_text())
    (tmp_path / "tied.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    done = subprocess.run(
        [sys.executable, SCRIPT, "--preset", "cpu", "--output_root", str(tmp_path / "runs"), "--jobs", "2",
         "--recipes", "token,tst-k4", "--seeds", "1", "--budgets", "256", "--",
         "--config_name", str(tmp_path / "tied.json"), "--dataloader_num_workers", "1"],
        capture_output=True, text=True, cwd=REPO_ROOT, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    report = json.loads((tmp_path / "runs" / "report" / "compare.json").read_text())
    assert report["jobs"] == 2 and len(report["runs"]) == 2
    params, non_embedding = sweep.count_parameters(str(tmp_path / "tied.json"))
    assert (report["parameters"], report["non_embedding_parameters"]) == (params, non_embedding)
    tst = next(r for r in report["runs"] if r["recipe"] == "tst-k4")
    log = (tmp_path / "runs" / "report" / "runs" / tst["label"] / "run_clm.log").read_text()
    assert "Carried the optimizer state and schedule on from" in log
    assert "[run_clm] done: perplexity" not in done.stdout  # the runs' output went to their logs


def test_a_failed_run_ends_with_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, SCRIPT, "--preset", "cpu", "--output_root", str(tmp_path / "r"), "--recipes", "token",
         "--seeds", "1", "--budgets", "128", "--", "--learning_rate", "-1"],
        capture_output=True, text=True, cwd=REPO_ROOT, check=False,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "compare.py: error: the positions-128/token-seed1 run failed: --learning_rate must be >= 0, got -1.0. "
        "Runs already finished are kept: the same command goes on from there")


# ---------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------


def test_the_gpu_preset_plan(capsys):
    """24 runs over 3 budgets spanning 4x; each recipe's token budget is its tokens per position times the budget;
    the largest run reads a quarter of the corpus (no token twice); the estimate leaves the 9-minute command room."""
    settings = compare.PRESETS["gpu"]["settings"]
    per_step = settings["per_device_train_batch_size"] * settings["block_size"]
    budgets = compare.parse_counts(compare.PRESETS["gpu"]["budgets"], 1)
    recipes = compare.parse_recipes(compare.DEFAULT_RECIPES, 0.3)
    plans = compare.plan_runs(budgets, recipes, [1, 2], per_step, 0.2)
    assert len(plans) == 24 and max(budgets) / min(budgets) >= 4
    assert [p.steps for p in plans[:4]] == [160] * 4 and [p.max_steps for p in plans[:4]] == [160, 320, 304, 400]
    assert all(p.positions == p.steps * per_step for p in plans)
    assert [p.seed for p in plans] == [1] * 12 + [2] * 12  # whole seeds first
    assert max(p.tokens for p in plans) <= CORPUS_TOKENS / 3
    params, non_embedding = sweep.count_parameters(settings["config_name"])
    assert (params, non_embedding) == (41_689_600, 25_305_600) and non_embedding / params > 0.6
    assert compare.estimate_total(plans, per_step, compare.GPU_SPEED) < 7.5 * 60
    assert compare.main(["--preset", "gpu", "--dry_run", "--train_file", str(REPO_ROOT / "data" / "sample_train.jsonl")])
    out = capsys.readouterr().out
    assert "[compare] 24 runs: 4 recipes x 3 budgets x 2 seeds, 32,768 positions a step, 2 at a time" in out
    assert re.search(r"estimated \d+ s for all runs one after another", out)


def test_the_model_config_counts_as_built():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig.from_pretrained(str(REPO_ROOT / "configs" / "model" / "llama-42m.json")))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    assert sweep.count_parameters("configs/model/llama-42m.json") == (total, total - model.get_input_embeddings().weight.numel())


@pytest.mark.parametrize("text, names", [
    ("token,paper,tst-k4,tst-k6", ["token", "paper", "tst-k4", "tst-k6"]),
    ("paper-k4,tst-k8,token-wsd", ["paper", "tst-k8", "token-wsd"]),
    ("paper-k8", ["paper-k8"]),
])
def test_recipes(text, names):
    recipes = compare.parse_recipes(text, 0.3)
    assert [r.name for r in recipes] == names
    for recipe in recipes:
        k = recipe.patch_size
        if recipe.name.startswith("tst"):
            assert recipe.tokens_per_position == pytest.approx(0.3 * k + 0.7) and recipe.wsd
        elif recipe.name.startswith("paper"):  # 1 / (λ/K + 1 - λ) with λ = 2/3: 2 at K = 4, 2.4 at K = 8
            assert recipe.tokens_per_position == pytest.approx(1 / ((2 / 3) / k + 1 / 3)) and not recipe.wsd
        else:
            assert recipe.tokens_per_position == 1.0 and recipe.wsd == (recipe.name == "token-wsd")


@pytest.mark.parametrize("text", ["token,token", "paper,paper-k4", "tst", "tst-k1", "paper-k1", "bag-k4", "", "Token"])
def test_bad_recipes(text):
    assert compare.parse_recipes(text, 0.3) is None


@pytest.mark.parametrize("text, counts", [("128,256,512", [128, 256, 512]), ("1.31M,2.62m", [1_310_000, 2_620_000]),
                                          ("64K, 1e5", [64_000, 100_000])])
def test_counts(text, counts):
    assert compare.parse_counts(text, 1) == counts


@pytest.mark.parametrize("text", ["0", "1.5", "1,1", "x", "1e400", "nan", "inf", "-3", "1,,2", "1.0000001M"])
def test_bad_counts(text):
    assert compare.parse_counts(text, 1) is None


# ---------------------------------------------------------------------------------------------------------
# The numbers and the sentence
# ---------------------------------------------------------------------------------------------------------


def rows_of(perplexities: dict) -> list[dict]:
    """Rows as run_row makes them, from {(budget, recipe): [perplexity of each seed]}."""
    rows = []
    for (budget, recipe), values in perplexities.items():
        for seed, value in enumerate(values, start=1):
            rows.append({"budget_positions": budget, "steps_budget": budget // 10, "recipe": recipe, "seed": seed,
                         "perplexity": value, "tokens": budget, "positions": budget, "train_time_s": 1.0,
                         "wall_time_s": 2.0})
    return rows


RECIPES = compare.parse_recipes("token,paper,tst-k4", 0.3)


def sentence(perplexities: dict, recipes=RECIPES) -> str:
    rows = rows_of(perplexities)
    return compare.answer(compare.summarise(rows, recipes), recipes, "41.7M-parameter Llama")


def test_a_recipe_best_beyond_the_spread_at_every_budget_is_named():
    text = sentence({(100, "token"): [500, 510], (100, "paper"): [520, 530], (100, "tst-k4"): [450, 460],
                     (400, "token"): [300, 302], (400, "paper"): [310, 320], (400, "tst-k4"): [280, 290]})
    assert text == ("At equal compute on this 41.7M-parameter Llama (2 seeds a point), the superposition recipe (K=4) "
                    "gives the best model at every budget from 100 to 400 positions, beyond the seed spread "
                    "(WikiText-103 perplexity at 400 positions: token-level training 301 ± 1, the paper's recipe "
                    "(K=4) 315 ± 5, the superposition recipe (K=4) 285 ± 5).")


def test_token_level_best_everywhere_says_no_patch_recipe_pays():
    text = sentence({(100, "token"): [400, 401], (100, "paper"): [420, 430], (100, "tst-k4"): [410, 415]})
    assert "token-level training gives the best model at 100 positions, beyond the seed spread: no patch recipe pays" in text


def test_overlapping_seeds_are_level_not_a_win():
    """A lower mean whose seeds overlap the baseline's is "level"; a difference beyond the spread is better/worse."""
    perplexities = {(100, "token"): [500, 520], (100, "paper"): [505, 530], (100, "tst-k4"): [450, 455],
                    (400, "token"): [300, 310], (400, "paper"): [330, 340], (400, "tst-k4"): [295, 305]}
    summary = compare.summarise(rows_of(perplexities), RECIPES)
    assert [e["against_token"] for e in summary] == [{"paper": "level", "tst-k4": "better"},
                                                     {"paper": "worse", "tst-k4": "level"}]
    assert [e["best"] for e in summary] == ["tst-k4", "tst-k4"] and [e["best_clear"] for e in summary] == [True, False]
    text = sentence(perplexities)
    assert ("no recipe is best beyond the seed spread at every budget from 100 to 400 positions; against token-level "
            "training, the paper's recipe (K=4) is worse at 1 and level at 1 of 2 budgets, the superposition recipe "
            "(K=4) is better at 1 and level at 1 of 2 budgets") in text


def test_one_seed_decides_nothing():
    text = sentence({(100, "token"): [500], (100, "tst-k4"): [300]}, compare.parse_recipes("token,tst-k4", 0.3))
    assert "(1 seed a point)" in text and "the superposition recipe (K=4) is undecided (one seed) at 1 of 1 budget" in text


def test_without_token_level_the_lowest_mean_is_given():
    recipes = compare.parse_recipes("paper,tst-k4", 0.3)
    text = sentence({(100, "paper"): [500, 501], (100, "tst-k4"): [495, 502]}, recipes)
    assert "no recipe is best beyond the seed spread at 100 positions; the lowest mean: the superposition recipe (K=4) at 100" in text


def test_plot_of_partial_results(tmp_path):
    rows = rows_of({(100, "token"): [500, 510], (100, "tst-k4"): [450]})
    compare.plot(compare.summarise(rows, RECIPES), RECIPES, rows, "x", str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before any run
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_run(monkeypatch):
    """compare.train_one (each run) fails the test: bad input must be refused before any run."""
    def train_one(*args, **kwargs):
        raise AssertionError("a run was started")

    monkeypatch.setattr(compare, "train_one", train_one)


@pytest.mark.parametrize("flags, message", [
    (["--budgets", "0"], "--budgets takes distinct whole numbers of positions >= 1"),
    (["--budgets", "64,64.0"], "--budgets takes distinct whole numbers"),
    (["--budgets", "100,110"], "--budgets 100,110 round to the same number of steps of 64 positions: 2"),
    (["--seeds", "1,1"], "--seeds takes distinct whole numbers in [0, 2**32 - 1]"),
    (["--seeds", "4294967296"], "--seeds takes distinct whole numbers in [0, 2**32 - 1]"),
    (["--recipes", "token,bag"], "--recipes takes distinct names among token, token-wsd, paper, paper-k<K>, tst-k<K>"),
    (["--step_fraction", "1"], "--step_fraction (r) must lie in (0, 1), got 1.0"),
    (["--decay_fraction", "0"], "--decay_fraction must lie in (0, 1], got 0.0"),
    (["--step_fraction", "nan"], "--step_fraction must be a number, got nan"),
    (["--decay_fraction", "inf"], "--decay_fraction must be a finite number, got inf"),
    (["--jobs", "0"], "--jobs must be >= 1, got 0"),
    (["--train_file", "/nope.jsonl"], "--train_file: no such file /nope.jsonl"),
    (["--validation_file", "/nope.jsonl"], "--validation_file: no such file /nope.jsonl"),
])
def test_bad_input_is_refused_before_any_run(tmp_path, capsys, no_run, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--preset", "cpu", "--output_root", str(tmp_path / "r"), *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_plan_that_would_repeat_data_is_refused(tmp_path, capsys, no_run):
    """No token is read twice within a run: a budget whose largest run needs more tokens than the data holds is
    refused once the data is tokenised, before any run."""
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--preset", "cpu", "--output_root", str(tmp_path / "r"), "--budgets", "100K", "--seeds", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert re.search(r"compare.py: error: the tst-k6 run at 99,968 positions reads 249,920 tokens, more than the "
                     r"training data's [\d,]+ \(less a margin of 192 for whole blocks\): no token is read twice", err)


def test_the_gpu_preset_without_the_prepared_corpus(tmp_path, capsys, monkeypatch, no_run):
    settings = {**compare.PRESETS["gpu"]["settings"], "train_file": ""}
    monkeypatch.setitem(compare.PRESETS, "gpu", {**compare.PRESETS["gpu"], "settings": settings})
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--preset", "gpu", "--output_root", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    assert "python scripts/compare.py --preset gpu --prepare" in capsys.readouterr().err
    assert compare.main(["--preset", "gpu", "--dry_run"])["plans"]  # the plan needs no data


@pytest.mark.parametrize("flag", ["--output_root", "--report_dir", "--data_cache_dir"])
@pytest.mark.parametrize("kind", IN_THE_WAY)
def test_a_folder_option_that_is_a_file_is_one_line(tmp_path, capsys, no_run, flag, kind):
    blocker = path_in_the_way(tmp_path, kind)
    argv = ["--preset", "cpu", "--output_root", str(tmp_path / "r"), flag, str(blocker)]
    refused_as_in_the_way(compare.main, "compare.py", argv, flag, blocker, blocker, kind, capsys)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("extra, positions", [(["--per_device_train_batch_size", "8"], 128),
                                              (["--block_size=32", "--gradient_accumulation_steps", "2"], 256)])
def test_the_batch_given_after_the_separator_sizes_the_plan(capsys, extra, positions):
    """Regression: the flags after `--` arrive as text; a batch of "8" made the positions a step "8" x 16 (a string)."""
    plans = compare.main(["--preset", "cpu", "--dry_run", "--budgets", "1024", "--", *extra])["plans"]
    assert {p["positions"] for p in plans} == {1024} and {p["steps"] for p in plans} == {1024 // positions}
    assert f"{positions:,} positions a step" in capsys.readouterr().out


@pytest.mark.parametrize("extra", [["--per_device_train_batch_size", "x"], ["--block_size", "0"]])
def test_a_bad_batch_after_the_separator_is_one_line(tmp_path, capsys, no_run, extra):
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--preset", "cpu", "--output_root", str(tmp_path / "r"), "--", *extra])
    assert exit_info.value.code == 2
    assert "--per_device_train_batch_size, --gradient_accumulation_steps, --block_size take whole numbers >= 1" in (
        capsys.readouterr().err)


def start_method() -> str:
    import multiprocessing

    return multiprocessing.get_start_method()


def test_worker_processes_start_their_data_loaders_as_this_process_does():
    """Regression: a worker process is spawned, and spawn became its default start method, so the Trainer's data
    loaders started their workers by importing torch, transformers and the script anew (an evaluation of 8 blocks
    took 28 s instead of 1.5 s on a loaded CPU)."""
    import multiprocessing

    pool = compare.make_pool(1)
    try:
        assert pool.submit(start_method).result() == multiprocessing.get_start_method()
    finally:
        pool.shutdown()


@pytest.mark.parametrize("text, message", [('{"text": ""}\n', "holds no text"),
                                           ("not json\n", "line 1: not valid JSON")])
def test_unreadable_training_data_is_one_line(tmp_path, capsys, no_run, text, message):
    (tmp_path / "train.jsonl").write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--preset", "cpu", "--output_root", str(tmp_path / "r"), "--train_file", str(tmp_path / "train.jsonl")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.strip().splitlines()[-1].startswith("compare.py: error: ")
