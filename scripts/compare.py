#!/usr/bin/env python
"""Equal-compute comparison: for the same training compute, which recipe gives the better model?

The paper's Table 4 (and scripts/sweep.py) compare recipes on the same data; a user with a fixed GPU budget asks
about the same compute. Here every recipe of a budget gets the same number C of training positions (forward and
backward passes over one position each: the compute in token-level equivalents, the paper's §3.1), so a patch
recipe reads more tokens than token-level training does:

  token       token-level training on C tokens, cosine schedule;
  token-wsd   the same with the superposition recipe's warmup-stable-decay schedule (separates the schedule's share);
  paper       the paper's recipe, K = 4 (paper-k<K> for another K), λ = 2/3 of the tokens at patch level, the same
              tokens per step, optimizer and schedule restarted at the switch, cosine: 2C tokens at K = 4;
  tst-k<K>    Token Superposition Training's recipe on this project's options: r = --step_fraction of the
              optimizer steps at patch level (--patch_step_fraction), each step as many positions as a token step
              (--patch_batch_mode positions), AdamW's state and one warmup-stable-decay schedule carried across the
              switch (--patch_switch continue, --lr_scheduler_type warmup_stable_decay): (rK + 1 - r)·C tokens.

Each recipe runs at each budget with each seed, through run_clm.py's main() (in this process, or in --jobs
worker processes that share the GPU); no token is read twice within a run (the method is for abundant data: a
plan that would repeat data is refused). Every run is evaluated on WikiText-103 test, which no training file holds.

    python scripts/compare.py --preset cpu                 # the plumbing at toy scale (tens of seconds)
    python scripts/compare.py --preset gpu --prepare       # here, once: copy the corpus into .gpu_data/ (git-ignored)
    bash scripts/compare_gpu.sh                            # on one H100/H200: the whole comparison, tokenising included
    python scripts/compare.py --preset gpu --dry_run       # the plan and its estimated time, nothing trained

Writes to --report_dir (default <output_root>/report), rewritten after every finished run so that a comparison
cut short keeps what it finished: compare.md (the table of seed-mean perplexity ± spread, tokens seen, wall time;
each recipe against token-level; the loss around the switch; one sentence answering the question, generated
from the numbers), compare.json (all of it, with every run's row), compare.png (perplexity against compute, one
line per recipe: the paper's Figure 2, right), switch.png (the training loss of the largest budget's runs
against compute, the switch marked: scripts/plot_curves.py) and runs/<budget>/<recipe>-seed<s>/ (each run's
all_results.json and trainer_state.json files, and with --jobs > 1 its log). Extra arguments after `--` go to
every run_clm.py call. Re-running the same command reports the finished runs again and trains the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import re
import shutil
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# replicate: the run_clm.py flags, the environment, the checks of the options (and the repository on the path);
# sweep: the parameter count, the corpus for the GPU, --prepare.
import replicate
import sweep

from patch_training.cli import UsageError, usage_message
from patch_training.results import relative_cost_nominal

REPO_ROOT = replicate.REPO_ROOT
PROG = "compare.py"  # in its messages, also when main() is called from Python
PAPER_FRACTION = 2 / 3  # the paper's λ

# Step times of this comparison's model shape, measured: the 58M Llama of replicate.py's gpu preset (hidden 512,
# 8 layers, T = 1024, bf16, SDPA: llama-42m's shape, whose tied head costs the same) on one H100 80GB
# (benchmarks/results/replication-h100, torch 2.11): token steps of 65,536 positions took 200.4 ms, patch steps
# of 16 sequences of 4,096 tokens (16,384 positions, the K-way loss) 71.4 ms. The line through the two: 28.4 ms a
# step + 2.62 µs a position. Estimated, not measured: a --patch_batch_mode positions step costs 1.15 times a token
# step of as many positions (K tokens embedded per position, K targets per position in the loss); a run's own
# start (model, data loaders, handover at the switch, saving) 3.5 s. The evaluation on WikiText-103 took 0.9 s.
# Tokenising the 51.1M-token corpus with 7 workers took 14 s on one H200 (benchmarks/results/sweep-h200).
GPU_SPEED = {"step_s": 0.0284, "position_s": 2.62e-6, "patch_positions_factor": 1.15, "eval_s": 0.9,
             "run_start_s": 3.5, "tokenise_s": 14.0,
             "device": "one H100 80GB (an H200 has the same arithmetic and more memory bandwidth)"}

PRESETS = {
    # One H200 (or H100): the whole comparison in about 6 minutes, tokenising included (the estimate: --dry_run,
    # docs/equal-compute.md). A 41.7M-parameter Llama, 61% of it outside the (tied) embeddings; 32 sequences of
    # 1,024 tokens a step; budgets of 40, 80 and 160 token-level steps (1.31M to 5.24M positions, 4x); 4 recipes
    # x 3 budgets x 2 seeds = 24 runs, two at a time on the GPU. The largest run (tst-k6 at 5.24M positions)
    # reads 13.1M of the corpus's 51.1M tokens.
    "gpu": {
        "settings": {
            **replicate.PRESETS["gpu"],
            "config_name": "configs/model/llama-42m.json",
            "train_file": sweep.PRESETS["gpu"]["train_file"],
            "preprocessing_num_workers": 7,
            "per_device_train_batch_size": 32,
            "logging_steps": 2,
            "dataloader_num_workers": 2,
        },
        "budgets": "1310720,2621440,5242880",
        "jobs": 2,
        "speed": GPU_SPEED,
    },
    # The plumbing (not the science) in tens of seconds on two CPU cores: the tiny model, 4 blocks of 16 tokens
    # a step, budgets of 2, 4 and 8 steps (128 to 512 positions), 24 runs in this process.
    "cpu": {
        "settings": {**replicate.PRESETS["cpu"], "block_size": 16, "per_device_train_batch_size": 4,
                     "max_eval_blocks": 8, "logging_steps": 1},
        "budgets": "128,256,512",
        "jobs": 1,
        "speed": None,
    },
}
DEFAULT_RECIPES = "token,paper,tst-k4,tst-k6"
DEFAULT_SEEDS = "1,2"


# ---------------------------------------------------------------------------------------------------------
# Recipes and the plan
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """One way to spend a budget. `patch_size` K (1: token level); `data_fraction` λ (the paper's split of the
    tokens) or `step_fraction` r (the superposition recipe's split of the optimizer steps); `wsd`: the
    warmup-stable-decay schedule instead of cosine."""

    name: str
    patch_size: int = 1
    data_fraction: float = 0.0
    step_fraction: float | None = None
    wsd: bool = False

    @property
    def superposition(self) -> bool:
        return self.step_fraction is not None

    @property
    def tokens_per_position(self) -> float:
        """Training tokens read per position of compute: 1 at token level; 1 / (λ/K + 1 - λ) for the paper's split
        (2 at K = 4, λ = 2/3: the paper's §3.1); r·K + 1 - r for r of the steps at K tokens a position."""
        if self.superposition:
            return self.step_fraction * self.patch_size + 1 - self.step_fraction
        if self.data_fraction:
            return 1 / relative_cost_nominal(self.data_fraction, self.patch_size)
        return 1.0

    @property
    def short(self) -> str:
        """The recipe in a few words, for the answer's sentence."""
        if self.superposition:
            return f"the superposition recipe (K={self.patch_size})"
        if self.data_fraction:
            return f"the paper's recipe (K={self.patch_size})"
        return "token-level training with WSD" if self.wsd else "token-level training"

    @property
    def label(self) -> str:
        if self.superposition:
            return f"superposition K={self.patch_size} (r={self.step_fraction:g}, positions, continued, WSD)"
        if self.data_fraction:
            return f"paper K={self.patch_size} (λ=2/3, restarted, cosine)"
        return "token-level (WSD)" if self.wsd else "token-level"


def parse_recipes(text: str, step_fraction: float) -> list[Recipe] | None:
    """`token`, `token-wsd`, `paper`, `paper-k<K>`, `tst-k<K>` (K >= 2), comma-separated and distinct; None if not."""
    recipes = []
    for name in text.split(","):
        match = re.fullmatch(r"(paper|tst)(?:-k(\d+))?", name)
        if name == "token":
            recipes.append(Recipe(name))
        elif name == "token-wsd":
            recipes.append(Recipe(name, wsd=True))
        elif match and (match.group(1) == "paper" or match.group(2)) and int(match.group(2) or 4) >= 2:
            k = int(match.group(2) or 4)
            if match.group(1) == "paper":
                recipes.append(Recipe("paper" if k == 4 else name, patch_size=k, data_fraction=PAPER_FRACTION))
            else:
                recipes.append(Recipe(name, patch_size=k, step_fraction=step_fraction, wsd=True))
        else:
            return None
    return recipes if len({r.name for r in recipes}) == len(recipes) else None


def parse_counts(text: str, minimum: int) -> list[int] | None:
    """Distinct integers >= `minimum`, comma-separated; each may end in K or M (thousands, millions) and be a
    decimal or exponent as long as the count is whole (1.31M and 1e5 are, 1.5 is not). None if not."""
    counts = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmM]?)\s*", item)
        try:
            value = float(match.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[match.group(2).lower()] if match else None
        except ValueError:
            return None
        if value is None or not math.isfinite(value) or value != int(value) or value < minimum:
            return None
        counts.append(int(value))
    return counts if len(set(counts)) == len(counts) else None


@dataclass(frozen=True)
class RunPlan:
    """One run: `recipe` at the budget of `steps` token-level optimizer steps (`positions` = steps x sequences x
    block size), seed `seed`; `max_steps` x sequences x block size = `tokens`, the token budget that run_clm.py
    splits between the stages (`--max_steps`: a budget in tokens, independent of the data's size)."""

    recipe: Recipe
    steps: int
    positions: int
    seed: int
    max_steps: int
    tokens: int
    decay_steps: int | None  # the WSD schedule's decay (a fraction of the job's steps), None for cosine

    @property
    def budget_label(self) -> str:
        return f"positions-{self.positions}"

    @property
    def name(self) -> str:
        return f"{self.recipe.name}-seed{self.seed}"

    @property
    def label(self) -> str:
        return f"{self.budget_label}/{self.name}"


def plan_runs(budgets: list[int], recipes: list[Recipe], seeds: list[int], positions_per_step: int,
              decay_fraction: float) -> list[RunPlan]:
    """Every (budget, recipe, seed), seed-major: the first seed's runs of every budget and recipe (largest budget
    first) before the second seed's, so that a comparison cut short has whole seeds. A budget of C positions is
    round(C / positions_per_step) token-level steps."""
    plans = []
    for seed in seeds:
        for budget in sorted(budgets, reverse=True):
            steps = max(1, round(budget / positions_per_step))
            for recipe in recipes:
                max_steps = round(steps * recipe.tokens_per_position)
                decay = max(1, round(decay_fraction * steps)) if recipe.wsd else None
                plans.append(RunPlan(recipe, steps, steps * positions_per_step, seed, max_steps,
                                     max_steps * positions_per_step, decay))
    return plans


def stage_steps(plan: RunPlan) -> list[tuple[str, float, float]]:
    """(stage, optimizer steps, positions per step as a fraction of a token step's) of `plan`, from the recipe
    alone: a paper patch stage reads λ of the tokens with the token steps' tokens (1/K of their positions); a
    superposition patch stage is r of the steps with the token steps' positions."""
    r = plan.recipe
    if r.superposition:
        return [("patch-positions", r.step_fraction * plan.steps, 1.0), ("token", (1 - r.step_fraction) * plan.steps, 1.0)]
    if r.data_fraction:
        return [("patch", r.data_fraction * plan.max_steps, 1 / r.patch_size),
                ("token", (1 - r.data_fraction) * plan.max_steps, 1.0)]
    return [("token", float(plan.steps), 1.0)]


def estimate_seconds(plan: RunPlan, positions_per_step: int, speed: dict) -> float:
    """Seconds `plan` takes on the GPU of `speed` (GPU_SPEED): each step a fixed time plus a time per position
    (a positions-mode patch step's positions `patch_positions_factor` times dearer), its evaluations (one per
    stage, and the patch model's patch-level one), its start."""
    seconds, evaluations = speed["run_start_s"], 1.0
    for stage, steps, fraction in stage_steps(plan):
        per_position = speed["position_s"] * (speed["patch_positions_factor"] if stage == "patch-positions" else 1.0)
        seconds += steps * (speed["step_s"] + fraction * positions_per_step * per_position)
        evaluations += 1.5 if stage.startswith("patch") else 0.0
    return seconds + evaluations * speed["eval_s"]


# ---------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------


def run_argv(settings: dict, plan: RunPlan, output_root: str, validation_file: str, cache_dir: str, extra) -> list[str]:
    """run_clm.py's flags for `plan`: the shared recipe (replicate.run_clm_values), a budget in steps (--max_steps),
    evaluation only at the end of each stage, and the recipe's own flags."""
    args = SimpleNamespace(validation_file=validation_file, seed=plan.seed, data_cache_dir=cache_dir)
    values = replicate.run_clm_values(settings, os.path.join(output_root, plan.budget_label, plan.name), args)
    r = plan.recipe
    values.update(max_steps=plan.max_steps, eval_strategy="no", eval_steps=None, patch_size=r.patch_size)
    if r.superposition:
        values.update(patch_step_fraction=r.step_fraction, patch_batch_mode="positions", patch_switch="continue")
    else:
        values.update(patch_data_fraction=r.data_fraction)
    if r.wsd:
        values.update(lr_scheduler_type="warmup_stable_decay",
                      lr_scheduler_kwargs=json.dumps({"num_decay_steps": plan.decay_steps}))
    return replicate.run_clm_flags(values, extra)


def free_device_memory() -> None:
    """What a finished run left (the model, the optimizer, the Trainer's caches) back to the GPU, for the next
    run of this process."""
    import torch

    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


@contextlib.contextmanager
def output_to(log_path: str | None):
    """stdout and stderr (the file descriptors: run_clm.py's logging, the Trainer's prints) into `log_path` for
    the block; nothing changes with None."""
    if log_path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


_INTERRUPTED = False  # in a worker process, after Ctrl-C: the runs queued behind the interrupted one do not start


def train_one(argv: list[str], log_path: str | None = None, worker: bool = False) -> dict:
    """One run_clm.main(argv) in this process, in the repository root (where the presets' paths lead, as for
    replicate.py's subprocesses), its output into `log_path` if given: {"results": all_results.json's record or
    None, "error": one line or None, "wall_time_s", "finished_before": the run was complete before this call (its
    wall time is then no measure)}. A failure is the error's line; its traceback (a crash, not bad input) goes to
    the run's output. Ctrl-C propagates, except in a `worker` process, where it is the error "interrupted" and
    the worker starts no other run."""
    global _INTERRUPTED
    import run_clm

    output_dir = argv[argv.index("--output_dir") + 1]
    finished_before = os.path.isfile(os.path.join(output_dir, "all_results.json"))
    start, results, error = time.time(), None, None
    if _INTERRUPTED:
        return {"results": None, "error": "interrupted", "wall_time_s": 0.0, "finished_before": finished_before}
    environment = dict(os.environ)  # restored after the run: TrainingArguments sets ACCELERATE_DYNAMO_* in it
    with output_to(log_path), contextlib.chdir(REPO_ROOT):
        try:
            results = run_clm.main(argv)
        except UsageError as failure:
            error = usage_message(failure)
            print(f"run_clm.py: error: {error}", file=sys.stderr)
        except KeyboardInterrupt:
            if not worker:
                raise
            _INTERRUPTED, error = True, "interrupted"
        except Exception as failure:  # noqa: BLE001  (a crash: its traceback to the run's output, one line back)
            traceback.print_exc()
            error = f"{type(failure).__name__}: {failure}"
        finally:
            os.environ.clear()
            os.environ.update(environment)
            free_device_memory()
    return {"results": results, "error": error, "wall_time_s": time.time() - start, "finished_before": finished_before}


def stop_workers(pool) -> None:
    """Cancel the runs not started and end `pool`'s worker processes now (the runs they hold are lost; their
    output folders are unlocked by the processes' end). ProcessPoolExecutor.terminate_workers is Python 3.14's;
    before it, the executor's table of processes."""
    pool.shutdown(wait=False, cancel_futures=True)
    terminate = getattr(pool, "terminate_workers", None)
    if terminate is not None:
        terminate()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()


def init_worker(start_method: str) -> None:
    """A worker process's start: its own processes (the Trainer's data loader workers) start by `start_method`, the
    calling process's (fork on Linux), as in a run_clm.py process of its own. A process started by spawn has spawn
    as its default, which started every data loader's workers by importing torch, transformers and this script
    anew: seconds per loader on a free CPU, 28 s per evaluation on a loaded one."""
    import multiprocessing

    multiprocessing.set_start_method(start_method, force=True)


def make_pool(jobs: int):
    """`jobs` worker processes for the runs: spawned, not forked (this process holds a CUDA context once the
    environment is read), each started by `init_worker`."""
    import concurrent.futures
    import multiprocessing

    return concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=init_worker, initargs=(multiprocessing.get_start_method(),))


def warm_up() -> None:
    """A worker's imports and its CUDA context, made while the parent tokenises."""
    import torch

    import run_clm  # noqa: F401

    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")


def tokenise(settings: dict, validation_file: str, cache_dir: str) -> tuple[int, float | None]:
    """Tokenise the training and validation files into `cache_dir` as run_clm.py does (the same cache keys, so
    every run reads them), before any run: (tokens of the training data, seconds spent tokenising, None where
    both were in the cache already: sweep.tokenisation_seconds)."""
    from patch_training.models import load_tokenizer
    from patch_training.readers import DataSource
    from patch_training.token_cache import cached_token_stream

    existing = sweep.cache_records(cache_dir)
    one_process = SimpleNamespace(main_process_first=lambda desc: contextlib.nullcontext(), should_log=True,
                                  local_process_index=0)
    with contextlib.chdir(REPO_ROOT):
        tokenizer = load_tokenizer(os.path.join(REPO_ROOT, "data", "llama2_tokenizer"))
        train = DataSource.from_files(settings["train_file"], "train_file", "text")
        stream, _ = cached_token_stream(train, tokenizer, one_process, cache_dir=cache_dir,
                                        num_workers=settings.get("preprocessing_num_workers") or 1)
        evaluation = DataSource.from_files(validation_file, "validation_file", "text")
        cached_token_stream(evaluation, tokenizer, one_process, cache_dir=cache_dir)
    return len(stream), sweep.tokenisation_seconds(cache_dir, existing)


# ---------------------------------------------------------------------------------------------------------
# The numbers: seed statistics, verdicts, the sentence, the loss around the switch
# ---------------------------------------------------------------------------------------------------------


def run_row(plan: RunPlan, outcome: dict) -> dict:
    """A finished run's row: its plan, what it trained (replicate.result_row), the split as trained, the
    validation loss of the patch model at the switch, the wall time (None: finished by an earlier call)."""
    results = outcome["results"]
    row = {"label": plan.label, "budget_positions": plan.positions, "steps_budget": plan.steps,
           "recipe": plan.recipe.name, "seed": plan.seed, "max_steps": plan.max_steps, **replicate.result_row(results),
           "eval_loss": results["eval_loss"],
           "wall_time_s": None if outcome["finished_before"] else outcome["wall_time_s"],
           "optimizer_steps": sum(results[s]["steps"] for s in ("patch_stage", "token_stage") if s in results),
           "patch_token_fraction": results.get("patch_token_fraction_measured"),
           "patch_step_fraction": results.get("patch_step_fraction_measured"),
           "switch_eval_loss": (results.get("patch_stage") or {}).get("eval_loss") if "token_stage" in results else None,
           "output_dir": results["output_dir"]}
    return row


def group_stats(rows: list[dict]) -> dict:
    """Seed statistics of one (budget, recipe): perplexity mean, min, max and spread (half the range: mean ±
    spread covers every seed when there are two), and the means of tokens, positions and times."""
    values = [row["perplexity"] for row in rows]
    walls = [row["wall_time_s"] for row in rows if row["wall_time_s"] is not None]
    mean = sum(values) / len(values)
    return {"n": len(values), "mean": mean, "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / 2, "seeds": sorted(row["seed"] for row in rows),
            "tokens": sum(row["tokens"] for row in rows) / len(rows),
            "positions": sum(row["positions"] for row in rows) / len(rows),
            "train_time_s": sum(row["train_time_s"] for row in rows) / len(rows),
            "wall_time_s": sum(walls) / len(walls) if walls else None}


def verdict(a: dict, b: dict) -> str:
    """`a` against `b` (group_stats): "better" or "worse" (lower or higher perplexity) when their seed ranges
    do not overlap, i.e. the difference exceeds the spread; "level" when they overlap; "one seed" when either has
    a single seed, whose spread is unknown."""
    if a["n"] < 2 or b["n"] < 2:
        return "one seed"
    if a["max"] < b["min"]:
        return "better"
    if a["min"] > b["max"]:
        return "worse"
    return "level"


def summarise(rows: list[dict], recipes: list[Recipe]) -> list[dict]:
    """One entry per budget (smallest first): {budget_positions, steps_budget, groups: {recipe: group_stats},
    against_token: {recipe: verdict}, best: the recipe of the lowest mean, best_clear: whether the best's range
    lies below every other recipe's}."""
    budgets = sorted({row["budget_positions"] for row in rows})
    summary = []
    for budget in budgets:
        groups = {}
        for recipe in recipes:
            chosen = [row for row in rows if row["budget_positions"] == budget and row["recipe"] == recipe.name]
            if chosen:
                groups[recipe.name] = group_stats(chosen)
        token = groups.get("token")
        against = {name: verdict(g, token) for name, g in groups.items() if token and name != "token"}
        best = min(groups, key=lambda name: groups[name]["mean"])
        clear = len(groups) > 1 and all(verdict(groups[best], g) == "better" for name, g in groups.items() if name != best)
        steps = next(row["steps_budget"] for row in rows if row["budget_positions"] == budget)
        summary.append({"budget_positions": budget, "steps_budget": steps, "groups": groups, "against_token": against,
                        "best": best, "best_clear": clear})
    return summary


def perplexity_text(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def answer(summary: list[dict], recipes: list[Recipe], model: str) -> str:
    """One sentence that answers "for the same compute, which recipe gives the better model?" from `summary`
    (`summarise`): the recipe that is best beyond the seed spread at every budget if there is one; else, for each
    recipe, at how many budgets it is better than, worse than or level with token-level training (beyond the seed
    spread or not; "undecided" with one seed); else (no token-level run) the lowest mean at each budget. It ends
    with the largest budget's seed-mean perplexities."""
    if not summary:
        return "No run has finished yet."
    short = {r.name: r.short for r in recipes}
    seeds = min(g["n"] for entry in summary for g in entry["groups"].values())
    largest = summary[-1]
    at_largest = f"{sweep.human(largest['budget_positions'])} positions"
    span = (f"at {at_largest}" if len(summary) == 1 else
            f"at every budget from {sweep.human(summary[0]['budget_positions'])} to {at_largest}")
    scale = f"At equal compute on this {model} ({seeds} seed{'s' if seeds != 1 else ''} a point)"
    figures = ", ".join(f"{short[name]} {perplexity_text(g['mean'])} ± {perplexity_text(g['spread'])}"
                        for name, g in largest["groups"].items())
    figures = f" (WikiText-103 perplexity at {at_largest}: {figures})."

    winners = {entry["best"] for entry in summary}
    if len(winners) == 1 and all(entry["best_clear"] for entry in summary):
        best = winners.pop()
        tail = ": no patch recipe pays at this scale" if best == "token" else ""
        return f"{scale}, {short[best]} gives the best model {span}, beyond the seed spread{tail}{figures}"
    if not any("token" in entry["groups"] for entry in summary):
        bests = ", ".join(f"{short[e['best']]} at {sweep.human(e['budget_positions'])}" for e in summary)
        return f"{scale}, no recipe is best beyond the seed spread {span}; the lowest mean: {bests}{figures}"
    parts = []
    for recipe in recipes:
        verdicts = [entry["against_token"][recipe.name] for entry in summary if recipe.name in entry["against_token"]]
        if recipe.name == "token" or not verdicts:
            continue
        counts = [f"{word} at {verdicts.count(key)}" for key, word in (
            ("better", "better"), ("worse", "worse"), ("level", "level"), ("one seed", "undecided (one seed)"))
            if verdicts.count(key)]
        parts.append(f"{short[recipe.name]} is {' and '.join(counts)} of {len(verdicts)} budget"
                     f"{'s' if len(verdicts) != 1 else ''}")
    lead = f"{scale}, no recipe is best beyond the seed spread {span}; " if len(summary) > 1 else f"{scale}, "
    return f"{lead}against token-level training, {', '.join(parts)}{figures}"


def switch_numbers(rows: list[dict]) -> list[dict]:
    """The loss around the switch of every finished run with both stages, from its training log
    (plot_curves.extract_curve: losses against compute in positions): the last patch-stage loss (the K-way loss,
    not a token-level one), the first token-stage loss, the jump between them, the token-level run's loss at the
    same compute (same budget and seed, interpolated) and the gap to it, where (as a fraction of the budget) the
    run's loss first reaches the token-level run's again (None: not within the run), and the validation loss of
    the patch model at the switch (read token by token)."""
    import numpy as np
    import plot_curves

    baselines = {(row["budget_positions"], row["seed"]): row for row in rows if row["recipe"] == "token"}
    numbers = []
    for row in rows:
        if row["switch_eval_loss"] is None:
            continue
        curve = plot_curves.extract_curve(row["output_dir"])
        stage, cost, loss = curve.train.get("stage"), curve.train.get("cost"), curve.train.get("loss")
        if stage is None or not (stage == "patch").any() or not (stage == "token").any():
            continue
        first = int(np.argmax(stage == "token"))
        last_patch = float(loss[stage == "patch"][-1])
        entry = {"label": row["label"], "budget_positions": row["budget_positions"], "recipe": row["recipe"],
                 "seed": row["seed"], "switch_positions": curve.switch_cost, "last_patch_loss": last_patch,
                 "first_token_loss": float(loss[first]), "jump": float(loss[first]) - last_patch,
                 "baseline_loss": None, "gap": None, "caught_up_at": None, "switch_eval_loss": row["switch_eval_loss"]}
        base = baselines.get((row["budget_positions"], row["seed"]))
        if base is not None:
            ref = plot_curves.extract_curve(base["output_dir"]).train
            if len(ref.get("cost", [])):
                at = np.interp(cost, ref["cost"], ref["loss"])
                entry["baseline_loss"] = float(at[first])
                entry["gap"] = float(loss[first] - at[first])
                after = np.flatnonzero((stage == "token") & (loss <= at))
                entry["caught_up_at"] = float(cost[after[0]] / row["budget_positions"]) if len(after) else None
        numbers.append(entry)
    return numbers


# ---------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------


def markdown_table(summary: list[dict], recipes: list[Recipe]) -> str:
    labels = {r.name: r.label for r in recipes}
    lines = [("| budget (positions) | token-level steps | recipe | WikiText-103 perplexity (seed mean ± spread) | "
              "seeds | against token-level | tokens seen | positions (measured) | wall time a run (s) |"),
             "|---:|---:|---|---:|---:|---|---:|---:|---:|"]
    for entry in summary:
        for name, g in entry["groups"].items():
            mark = "**" if name == entry["best"] and entry["best_clear"] else ""
            against = entry["against_token"].get(name, "—")
            if against in ("better", "worse"):
                change = g["mean"] / entry["groups"]["token"]["mean"] - 1
                against = f"{against} ({change:+.1%})"
            wall = f"{g['wall_time_s']:.0f}" if g["wall_time_s"] is not None else "—"
            lines.append(f"| {entry['budget_positions']:,} | {entry['steps_budget']} | {labels[name]} | "
                         f"{mark}{g['mean']:.2f} ± {g['spread']:.2f}{mark} | {g['n']} | {against} | "
                         f"{g['tokens']:,.0f} | {g['positions']:,.0f} | {wall} |")
    return "\n".join(lines)


def switch_table(numbers: list[dict], recipes: list[Recipe]) -> str:
    labels = {r.name: r.label for r in recipes}
    lines = [("| budget (positions) | recipe | seeds | last patch loss (K-way) | first token loss | jump (nats) | "
              "token-level run at the same compute | gap (nats) | caught up at (fraction of the budget) | "
              "validation loss at the switch |"),
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    keys = sorted({(n["budget_positions"], n["recipe"]) for n in numbers})
    for budget, recipe in keys:
        group = [n for n in numbers if (n["budget_positions"], n["recipe"]) == (budget, recipe)]

        def mean(key, group=group):
            values = [n[key] for n in group if n[key] is not None]
            return sum(values) / len(values) if values else None

        def shown(value, form="{:.3f}"):
            return "—" if value is None else form.format(value)

        caught = [n["caught_up_at"] for n in group]
        caught_text = ", ".join("never" if c is None else f"{c:.2f}" for c in caught) if mean("baseline_loss") is not None else "—"
        lines.append(f"| {budget:,} | {labels[recipe]} | {len(group)} | {shown(mean('last_patch_loss'))} | "
                     f"{shown(mean('first_token_loss'))} | {shown(mean('jump'), '{:+.3f}')} | "
                     f"{shown(mean('baseline_loss'))} | {shown(mean('gap'), '{:+.3f}')} | {caught_text} | "
                     f"{shown(mean('switch_eval_loss'))} |")
    return "\n".join(lines)


def plot(summary: list[dict], recipes: list[Recipe], rows: list[dict], model: str, path: str) -> None:
    """WikiText-103 perplexity against training compute (positions, log axes), one line per recipe through the
    seed means, bars over the seeds' range, each seed a dot: the paper's Figure 2, right panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axis = plt.subplots(figsize=(8.5, 5.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, recipe in enumerate(recipes):
        points = [(entry["groups"][recipe.name], entry["budget_positions"]) for entry in summary
                  if recipe.name in entry["groups"]]
        if not points:
            continue
        colour = "black" if recipe.name == "token" else colours[index % len(colours)]
        x = [g["positions"] for g, _ in points]
        y = [g["mean"] for g, _ in points]
        error = [[g["mean"] - g["min"] for g, _ in points], [g["max"] - g["mean"] for g, _ in points]]
        axis.errorbar(x, y, yerr=error, fmt="o-", color=colour, capsize=4, linewidth=2 if recipe.name == "token" else 1.5,
                      label=recipe.label)
        seeds = [row for row in rows if row["recipe"] == recipe.name]
        axis.plot([row["positions"] for row in seeds], [row["perplexity"] for row in seeds], ".", color=colour, alpha=0.5)
    axis.set_xscale("log")
    axis.set_yscale("log")
    for ticks in (axis.xaxis, axis.yaxis):
        ticks.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: sweep.human(value)))
        ticks.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: sweep.human(value)))
    axis.tick_params(which="minor", labelsize=7)
    axis.set_xlabel("training compute (positions: forward and backward passes, token-level equivalents)")
    axis.set_ylabel("WikiText-103 perplexity (seed mean, range)")
    axis.set_title(f"Equal compute: {model}")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def copy_run_files(row: dict, report_dir: str, log_path: str | None) -> None:
    """A finished run's all_results.json, its stages' trainer_state.json (the log history) and its log into
    <report_dir>/runs/<budget>/<recipe>-seed<s>/, laid out as a run folder (scripts/plot_curves.py reads it)."""
    target = os.path.join(report_dir, "runs", row["label"])
    for relative in ("all_results.json", "trainer_state.json", os.path.join("patch_stage", "trainer_state.json")):
        source = os.path.join(row["output_dir"], relative)
        if os.path.isfile(source):
            os.makedirs(os.path.dirname(os.path.join(target, relative)), exist_ok=True)
            shutil.copy2(source, os.path.join(target, relative))
    if log_path and os.path.isfile(log_path):
        shutil.copy2(log_path, os.path.join(target, "run_clm.log"))


def write_report(report: dict, recipes: list[Recipe], report_dir: str, figures: bool = True) -> None:
    """compare.json and compare.md from `report`'s rows, and with `figures` compare.png and switch.png."""
    import plot_curves

    rows = report["runs"]
    summary = summarise(rows, recipes)
    numbers = switch_numbers(rows)
    report.update(summary=summary, switch=numbers, answer=answer(summary, recipes, report["model"]))
    tokenise = report.get("tokenise_s")
    notes = [
        f"Device: {report['device']}; torch {report['versions']['torch']}, transformers {report['versions']['transformers']}",
        (f"Model: {report['settings']['config_name']}, {report['parameters']:,} parameters "
         f"({report['non_embedding_parameters']:,} outside the embeddings); {report['positions_per_step']:,} positions "
         f"a step ({report['settings']['per_device_train_batch_size']} x {report['settings']['block_size']}); "
         f"learning rate {report['settings']['learning_rate']}, warmup {report['settings']['warmup_steps']}; "
         f"WSD decay: {report['decay_fraction']:g} of the job's steps; seeds {', '.join(map(str, report['seeds']))}."),
        f"Command: `{report['command']}`; {len(rows)} of {report['planned_runs']} runs finished, "
        f"{report['jobs']} at a time, in {report['total_wall_time_s']:.0f} s"
        + (f" (tokenising first: {tokenise:.0f} s)" if tokenise else ""),
        ("Budget: training positions, the same for every recipe at a budget (a patch-stage position holds K tokens and "
         "costs what a token-level position costs). Spread: half the range over the seeds; a difference is called "
         "better or worse only when the seeds' ranges do not overlap, otherwise level. Wall time: one run, "
         "start to end (runs sharing the GPU take longer each)."),
    ]
    sections = [
        "\n\n".join(notes),
        f"**Answer.** {report['answer']}",
        markdown_table(summary, recipes),
        ("Loss around the switch (training loss logged every "
         f"{report['settings']['logging_steps']} steps; the patch stage's loss is the K-way next-patch loss; gap: "
         "the first token-stage loss minus the token-level run's at the same compute; caught up: where the run's "
         "loss first reaches the token-level run's again, one value per seed; validation loss at the switch: the "
         "patch model read token by token on WikiText-103):"),
        switch_table(numbers, recipes) if numbers else "(no run with a switch has finished)",
    ]
    with open(os.path.join(report_dir, "compare.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    with open(os.path.join(report_dir, "compare.md"), "w", encoding="utf-8") as handle:
        handle.write("\n\n".join(sections) + "\n")
    if not figures:
        return
    if summary:
        plot(summary, recipes, rows, report["model"], os.path.join(report_dir, "compare.png"))
    largest = max((row["budget_positions"] for row in rows), default=None)
    first_seed = min((row["seed"] for row in rows), default=None)
    curves = [plot_curves.extract_curve(row["output_dir"], row["recipe"]) for row in rows
              if row["budget_positions"] == largest and row["seed"] == first_seed]
    if curves:
        plot_curves.plot_curves(curves, os.path.join(report_dir, "switch.png"))


# ---------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python scripts/compare.py", *argv])
    argv, extra = sweep.split_at_double_dash(argv)
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--budgets", default=None, help="training positions of each budget, comma-separated, K/M "
                        "allowed (each rounded to whole token-level steps); the gpu preset: 1310720,2621440,5242880 "
                        "(40, 80, 160 steps), the cpu preset: 128,256,512")
    parser.add_argument("--recipes", default=DEFAULT_RECIPES, help="comma-separated among token, token-wsd, paper, "
                        f"paper-k<K>, tst-k<K> (default {DEFAULT_RECIPES})")
    parser.add_argument("--seeds", default=DEFAULT_SEEDS, help=f"comma-separated (default {DEFAULT_SEEDS})")
    parser.add_argument("--step_fraction", type=float, default=0.3, help="r of the tst recipes: the fraction of the "
                        "optimizer steps at patch level (default 0.3, Token Superposition Training's)")
    parser.add_argument("--decay_fraction", type=float, default=0.2, help="the warmup-stable-decay schedule's decay, "
                        "a fraction of the job's optimizer steps (default 0.2)")
    parser.add_argument("--jobs", type=int, default=None, help="runs at a time, each in a worker process of its own "
                        "(they share the GPU); 1: in this process (the gpu preset: 2, the cpu preset: 1)")
    sweep.add_study_arguments(parser, "compare", "compare.md/.json/.png, switch.png, runs/; default "
                              "<output_root>/report")
    parser.add_argument("--dry_run", action="store_true", help="print the plan (and for the gpu preset its "
                        "estimated time) and stop: nothing is tokenised or trained")
    args = parser.parse_args(argv)
    replicate.refuse_non_finite_options(parser, args)
    if sweep.prepare_if_asked(parser, args):
        return {}
    preset = PRESETS[args.preset]
    budgets = parse_counts(args.budgets or preset["budgets"], 1)
    if budgets is None:
        parser.error(f"--budgets takes distinct whole numbers of positions >= 1 (K and M allowed), got {args.budgets!r}")
    seeds = parse_counts(args.seeds, 0)
    if seeds is None or max(seeds) > 2**32 - 1:
        parser.error(f"--seeds takes distinct whole numbers in [0, 2**32 - 1], got {args.seeds!r}")
    if not 0 < args.step_fraction < 1:
        parser.error(f"--step_fraction (r) must lie in (0, 1), got {args.step_fraction}")
    if not 0 < args.decay_fraction <= 1:
        parser.error(f"--decay_fraction must lie in (0, 1], got {args.decay_fraction}")
    recipes = parse_recipes(args.recipes, args.step_fraction)
    if recipes is None:
        parser.error(f"--recipes takes distinct names among token, token-wsd, paper, paper-k<K>, tst-k<K> (K >= 2), "
                     f"got {args.recipes!r}")
    jobs = preset["jobs"] if args.jobs is None else args.jobs
    if jobs < 1:
        parser.error(f"--jobs must be >= 1, got {jobs}")
    settings = dict(preset["settings"])
    if args.train_file:
        settings["train_file"] = args.train_file
    settings = replicate.settings_given_after(settings, extra)  # `-- --config_name X`: X's parameters
    if not settings["train_file"] and not args.dry_run:  # a plan needs no data
        parser.error(f"no training files: the gpu preset reads {os.path.relpath(sweep.GPU_DATA, REPO_ROOT)}/train-*.jsonl.xz, "
                     "which `python scripts/compare.py --preset gpu --prepare` fills; or pass --train_file")
    problem = None if args.dry_run else replicate.missing_files(settings, args.validation_file)
    if problem:
        parser.error(problem)
    output_root, report_dir, cache_dir = sweep.study_folders(parser, args, "compare", "report")
    try:
        params, non_embedding = sweep.count_parameters(settings["config_name"])
    except UsageError as error:
        parser.error(str(error))
    step_keys = ("per_device_train_batch_size", "gradient_accumulation_steps", "block_size")
    try:  # the flags after `--` arrive as text (replicate.settings_given_after)
        step_shape = [int(settings[key]) for key in step_keys]
    except ValueError:
        step_shape = [0]
    if min(step_shape) < 1:
        parser.error(f"--{', --'.join(step_keys)} take whole numbers >= 1, got "
                     + ", ".join(str(settings[key]) for key in step_keys))
    positions_per_step = math.prod(step_shape)
    plans = plan_runs(budgets, recipes, seeds, positions_per_step, args.decay_fraction)
    steps = sorted({p.steps for p in plans})
    if len(steps) != len(budgets):
        parser.error(f"--budgets {args.budgets or preset['budgets']} round to the same number of steps of "
                     f"{positions_per_step:,} positions: {', '.join(map(str, steps))}")
    print_plan(plans, recipes, positions_per_step, preset["speed"], jobs)
    if args.dry_run:
        return {"plans": [asdict(p) for p in plans]}

    replicate.make_folder(parser, "--report_dir", report_dir)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the runs' data loaders fork after tokenising
    start, pool, report = time.time(), None, None
    if jobs > 1:
        pool = make_pool(jobs)
        for _ in range(jobs):
            pool.submit(warm_up)
    try:
        try:
            dataset_tokens, tokenise_s = tokenise(settings, args.validation_file, cache_dir)
        except UsageError as error:  # unreadable or empty data: run_clm.py's words
            parser.error(usage_message(error))
        if dataset_tokens == 0:
            parser.error(f"--train_file {settings['train_file']} holds no text")
        largest = max(plans, key=lambda p: p.tokens)
        margin = 2 * max(r.patch_size for r in recipes) * int(settings["block_size"])  # whole blocks left at each stage's end
        if largest.tokens + margin > dataset_tokens:
            parser.error(f"the {largest.recipe.name} run at {largest.positions:,} positions reads {largest.tokens:,} "
                         f"tokens, more than the training data's {dataset_tokens:,} (less a margin of {margin:,} for "
                         "whole blocks): no token is read twice within a run here; lower --budgets or give more data")
        device, versions = replicate.environment()
        model = f"{params / 1e6:.1f}M-parameter Llama"
        report = {"preset": args.preset, "settings": settings, "recipes": [asdict(r) for r in recipes],
                  "budgets": sorted(budgets), "seeds": seeds, "decay_fraction": args.decay_fraction,
                  "positions_per_step": positions_per_step, "parameters": params, "non_embedding_parameters": non_embedding,
                  "model": model, "dataset_tokens": dataset_tokens, "device": device, "versions": versions,
                  "command": command, "jobs": jobs, "planned_runs": len(plans), "tokenise_s": tokenise_s,
                  "estimated_s": estimate_total(plans, positions_per_step, preset["speed"]), "total_wall_time_s": 0.0,
                  "runs": []}
        failure = execute(plans, settings, output_root, args.validation_file, cache_dir, extra, pool, report,
                          recipes, report_dir, start)
    except KeyboardInterrupt:  # Ctrl-C, or a time limit's SIGINT (scripts/compare_gpu.sh)
        if pool is not None:
            stop_workers(pool)
        if report is not None:
            write_report(report, recipes, report_dir)
        print(f"{PROG}: interrupted; the runs that finished are in the report, and the same command goes on from them",
              file=sys.stderr)
        sys.exit(130)
    if pool is not None:
        pool.shutdown(wait=True)
    write_report(report, recipes, report_dir)
    summary = summarise(report["runs"], recipes)
    print(markdown_table(summary, recipes))
    print(f"{PROG}: {report['answer']}")
    print(f"{PROG}: {len(report['runs'])} runs in {report['total_wall_time_s']:.0f} s; report in {report_dir}")
    if failure:
        sys.exit(f"{PROG}: error: {failure}. Runs already finished are kept: the same command goes on from there")
    return report


def execute(plans, settings, output_root, validation_file, cache_dir, extra, pool, report, recipes, report_dir,
            start) -> str | None:
    """Train `plans` (in this process, or on `pool`), adding each finished run's row to `report` and rewriting
    compare.json and compare.md after each (and the figures too when the runs are on `pool`, while this process
    only waits); the first failure stops new runs (those running finish) and is returned as one line."""
    logs = os.path.join(output_root, "logs") if pool is not None else None
    if logs:
        os.makedirs(logs, exist_ok=True)
    failure = None

    def finished(plan, outcome, log_path):
        nonlocal failure
        if outcome["error"] is not None:
            where = f" (its log: {log_path})" if log_path else ""
            failure = failure or f"the {plan.label} run failed: {outcome['error']}{where}"
            return
        row = run_row(plan, outcome)
        report["runs"].append(row)
        copy_run_files(row, report_dir, log_path)
        report["total_wall_time_s"] = time.time() - start
        write_report(report, recipes, report_dir, figures=pool is not None)
        print(f"[compare] {plan.label}: perplexity {row['perplexity']:.2f}, {row['positions']:,} positions, "
              f"{row['tokens']:,} tokens ({len(report['runs'])}/{len(plans)} runs, {report['total_wall_time_s']:.0f} s)",
              flush=True)

    report["total_wall_time_s"] = time.time() - start
    if pool is None:
        for plan in plans:
            argv = run_argv(settings, plan, output_root, validation_file, cache_dir, extra)
            print(f"[compare] {plan.label}: run_clm.py {' '.join(argv)}", flush=True)
            finished(plan, train_one(argv), None)
            if failure:
                break
    else:
        import concurrent.futures

        futures = {}
        for plan in plans:
            argv = run_argv(settings, plan, output_root, validation_file, cache_dir, extra)
            log_path = os.path.join(logs, plan.label.replace("/", "-") + ".log")
            futures[pool.submit(train_one, argv, log_path, True)] = (plan, log_path)
        for future in concurrent.futures.as_completed(futures):
            plan, log_path = futures[future]
            try:
                outcome = future.result()
            except concurrent.futures.CancelledError:
                continue
            except Exception as error:  # noqa: BLE001  (the worker process died: out of memory, a signal)
                outcome = {"error": f"its worker process ended: {type(error).__name__}: {error}"}
            finished(plan, outcome, log_path)
            if failure:
                for other in futures:
                    other.cancel()
    return failure


def estimate_total(plans: list[RunPlan], positions_per_step: int, speed: dict | None) -> float | None:
    """Seconds for all of `plans` one after another on `speed`'s GPU, tokenising included; None without `speed`."""
    if speed is None:
        return None
    return speed["tokenise_s"] + sum(estimate_seconds(p, positions_per_step, speed) for p in plans)


def print_plan(plans: list[RunPlan], recipes: list[Recipe], positions_per_step: int, speed: dict | None, jobs: int) -> None:
    print(f"[compare] {len(plans)} runs: {len(recipes)} recipes x {len({p.steps for p in plans})} budgets x "
          f"{len({p.seed for p in plans})} seeds, {positions_per_step:,} positions a step, {jobs} at a time")
    print("[compare] | budget (positions) | recipe | run_clm.py --max_steps (the token budget) | tokens read | "
          + ("estimated s |" if speed else ""))
    for plan in plans:
        if plan.seed != plans[0].seed:
            break
        estimate = f" {estimate_seconds(plan, positions_per_step, speed):.0f} |" if speed else ""
        print(f"[compare] | {plan.positions:,} | {plan.recipe.name} | {plan.max_steps} | {plan.tokens:,} |{estimate}")
    total = estimate_total(plans, positions_per_step, speed)
    if total is not None:
        print(f"[compare] estimated {total:.0f} s for all runs one after another, tokenising included, on "
              f"{speed['device']} (the step times of this model's shape measured there: see GPU_SPEED); runs "
              "sharing the GPU overlap their starts and evaluations")


if __name__ == "__main__":
    main()
