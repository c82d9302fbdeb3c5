#!/usr/bin/env python
"""Small-scale replication of the paper's claim: patch-level training halves the cost at equal quality.

Trains one Llama three ways on the same token budget N (one pass over the training files), through
run_clm.py, and compares WikiText-103 perplexity, cost and wall time:

  1. token      token-level baseline on all N tokens                      (cost 1.0)
  2. patch      patch level K=4 on the first 2/3 of N, token level on the last 1/3   (cost 2/3/4 + 1/3 = 0.5)
  3. tail       token level from scratch on the last 1/3 only              (cost 0.33: what patch init is worth)

    python scripts/replicate.py --preset gpu   # one GPU: 58M model, the offline corpus (../shared/data/corpus)
    python scripts/replicate.py --preset cpu   # minutes on a CPU: tiny model, the bundled sample

Writes <output_root>/replication.json, replication.md (the table) and curves.png / offsets.png
(scripts/plot_curves.py). Extra arguments after `--` go to every run_clm.py call.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import platform
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROG = "replicate.py"  # in its messages, also when main() is called from Python
sys.path.insert(0, REPO_ROOT)
from patch_training.cli import UsageError, folder_problem, refuse_non_finite  # noqa: E402  (standard library only)

PRESETS = {
    # One GPU, each run well under ten minutes: 58M-parameter Llama, T=1024, 64K tokens per step.
    "gpu": {
        "config_name": "configs/model/llama-50m.json",
        "train_file": ",".join(sorted(glob.glob(os.path.join(REPO_ROOT, "..", "shared", "data", "corpus", "train-*.jsonl.xz")))),
        "block_size": 1024,
        "per_device_train_batch_size": 64,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1.5e-3,
        "warmup_steps": 0.03,
        "eval_steps": 200,
        "logging_steps": 10,
        "bf16": True,
        "dataloader_num_workers": 4,
        "max_eval_blocks": None,
    },
    # A CPU in minutes: the tiny model on the bundled public-domain sample.
    "cpu": {
        "config_name": "configs/model/llama-tiny.json",
        "train_file": os.path.join(REPO_ROOT, "data", "sample_train.jsonl"),
        "block_size": 128,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "learning_rate": 3e-3,
        "warmup_steps": 0.05,
        "eval_steps": 100,
        "logging_steps": 10,
        "bf16": False,
        "dataloader_num_workers": 0,
        "max_eval_blocks": 100,
    },
}

RUNS = [
    # name, λ, K, skip_data_fraction
    ("token", 0.0, 4, 0.0),
    ("patch", 2 / 3, 4, 0.0),
    ("tail", 0.0, 4, 2 / 3),
]


def settings_given_after(settings: dict, extra: list[str]) -> dict:
    """`settings` with the values that `extra`, the run_clm.py flags after `--`, gives their keys (in any spelling
    run_clm.py reads: `scripts/config_args.flag_value`): those flags come last in each run's command, so they win,
    and the report (and sweep.py's parameter count) must describe what the runs used."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import config_args

    given = {key: config_args.flag_value(extra, key) for key in settings}
    return {key: value if given[key] is None else given[key] for key, value in settings.items()}


def run_clm_values(settings: dict, output_dir: str, args) -> dict:
    """The run_clm.py flags every run of these scripts shares, as {flag name: value}: the preset's `settings`, the
    tokenizer, the optimizer (AdamW β = (0.9, 0.95), ε = 1e-8, weight decay 0.1, clipping at 1.0), a cosine
    schedule, evaluation on `args.validation_file`, no checkpoints, `args.seed`, `args.data_cache_dir` if set, and
    `output_dir`. A caller sets its recipe's flags on top (a value None drops the flag: `run_clm_flags`)."""
    values = {
        **{k: v for k, v in settings.items() if k != "eval_steps"},
        "tokenizer_name": os.path.join(REPO_ROOT, "data", "llama2_tokenizer"),
        "validation_file": args.validation_file,
        "output_dir": output_dir,
        "lr_scheduler_type": "cosine",
        "weight_decay": 0.1,
        "adam_beta1": 0.9,
        "adam_beta2": 0.95,
        "adam_epsilon": 1e-8,
        "max_grad_norm": 1.0,
        "eval_strategy": "steps",
        "eval_steps": settings["eval_steps"],
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": args.seed,
    }
    if args.data_cache_dir:
        values["data_cache_dir"] = args.data_cache_dir
    return values


def run_clm_flags(values: dict, extra) -> list[str]:
    """`values` as run_clm.py flags (`--key value`; booleans as true/false, None left out), then `extra` (the
    flags after `--`), which come last and so win."""
    flags = []
    for key, value in values.items():
        if value is None:
            continue
        flags += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return flags + list(extra)


def run_clm_command(settings: dict, name: str, fraction: float, patch_size: int, skip: float, args, extra) -> list[str]:
    values = run_clm_values(settings, os.path.join(args.output_root, name), args)
    values.update(patch_size=patch_size if fraction > 0 else 1, patch_data_fraction=fraction,
                  skip_data_fraction=skip, num_train_epochs=args.epochs)
    return [sys.executable, os.path.join(REPO_ROOT, "run_clm.py"), *run_clm_flags(values, extra)]


def result_row(results: dict) -> dict:
    """What the scripts' tables take from a run's all_results.json (`results`): tokens and positions trained,
    the stages' train_runtime (no start-up), the final WikiText-103 perplexity, the token budget."""
    stage_time = sum(results[s]["train_runtime_s"] for s in ("patch_stage", "token_stage") if s in results)
    return {"tokens": results["tokens"], "positions": results["positions"], "train_time_s": stage_time,
            "perplexity": results["perplexity"], "budget_tokens": results["budget_tokens"]}


def train(settings: dict, name: str, fraction: float, patch_size: int, skip: float, args, extra,
          prog: str = "replicate.py") -> dict:
    """One run_clm.py run into <args.output_root>/<name>; its row (tokens, positions, wall time, perplexity).
    A failing run ends the calling script with one line naming it (run_clm.py has printed why)."""
    command = run_clm_command(settings, name, fraction, patch_size, skip, args, extra)
    print(f"[{prog.removesuffix('.py')}]", " ".join(command), flush=True)
    start = time.time()
    finished = subprocess.run(command, cwd=REPO_ROOT)
    if finished.returncode != 0:  # run_clm.py has said why; the runs already finished stay as they are
        sys.exit(f"{prog}: error: the {name} run failed (run_clm.py exit code {finished.returncode}; its "
                 "message is above). Runs already finished are kept: the same command goes on from there")
    wall = time.time() - start
    with open(os.path.join(args.output_root, name, "all_results.json"), encoding="utf-8") as handle:
        results = json.load(handle)
    row = result_row(results)
    return {"name": name, "patch_data_fraction": fraction, "patch_size": patch_size if fraction else 1,
            "skip_data_fraction": skip, "tokens": row["tokens"], "positions": row["positions"],
            "wall_time_s": wall, "train_time_s": row["train_time_s"], "perplexity": row["perplexity"],
            "budget_tokens": row["budget_tokens"]}


def missing_files(settings: dict, validation_file: str) -> str | None:
    """The first of --train_file / --validation_file naming a file that is not there, as an error message."""
    for name, files in (("train_file", settings["train_file"]), ("validation_file", validation_file)):
        missing = [path for path in files.split(",") if not os.path.isfile(os.path.join(REPO_ROOT, path))]
        if missing:
            return f"--{name}: no such file {', '.join(missing)}"
    return None


def refuse_non_finite_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error for NaN, inf or -inf in any float option of `parser` (`--epochs inf` started a run that then
    failed): patch_training.cli.refuse_non_finite's rule and words, applied to those options as a dataclass."""
    names = [action.dest for action in parser._actions if action.type is float]
    values = dataclasses.make_dataclass("FloatOptions", [(name, float) for name in names])
    try:
        refuse_non_finite(values(**{name: getattr(args, name) for name in names}))
    except UsageError as error:
        parser.error(str(error))


def make_folder(parser: argparse.ArgumentParser, flag: str, folder: str) -> None:
    """os.makedirs, with a failure (permissions, a read-only file system) as parser.error naming `flag`."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        parser.error(f"{flag} {folder}: cannot make the folder: {error.strerror or error}")


def environment() -> tuple[str, dict]:
    """The device in words and the versions that matter."""
    import torch
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    return device, {"torch": torch.__version__, "transformers": transformers.__version__}


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| run | λ | K | training tokens | positions | relative cost (positions / baseline tokens) | wall time (s) | WikiText-103 perplexity |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['patch_data_fraction']:.3f} | {row['patch_size']} | {row['tokens']:,} | {row['positions']:,} | "
            f"{row['relative_cost']:.3f} | {row['wall_time_s']:.0f} | {row['perplexity']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--train_file", default=None, help="override the preset's training files (comma-separated)")
    parser.add_argument("--validation_file", default=os.path.join(REPO_ROOT, "data", "wikitext-103-test.jsonl"))
    parser.add_argument("--output_root", default=None, help="default runs/replication-<preset>")
    parser.add_argument("--data_cache_dir", default=None)
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the training files (the budget N)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--runs", default="token,patch,tail", help="which of token,patch,tail to run")
    args = parser.parse_args(argv)
    refuse_non_finite_options(parser, args)
    settings = dict(PRESETS[args.preset])
    if args.train_file:
        settings["train_file"] = args.train_file
    settings = settings_given_after(settings, extra)
    if not settings["train_file"]:
        parser.error("no training files: the gpu preset reads ../shared/data/corpus/train-*.jsonl.xz; pass --train_file")
    problem = missing_files(settings, args.validation_file)
    if problem:
        parser.error(problem)
    if not args.epochs > 0:
        parser.error(f"--epochs must be > 0, got {args.epochs}")
    known = [name for name, *_ in RUNS]
    wanted = args.runs.split(",")
    unknown = sorted(set(wanted) - set(known))
    if unknown or len(set(wanted)) != len(wanted):
        parser.error(f"--runs takes distinct names among {','.join(known)}, got {args.runs!r}")
    # Absolute, as sweep.py makes them: run_clm.py runs in the repository root, this script reads its results here.
    args.output_root = os.path.abspath(args.output_root or os.path.join(REPO_ROOT, "runs", f"replication-{args.preset}"))
    args.data_cache_dir = os.path.abspath(args.data_cache_dir) if args.data_cache_dir else None
    for flag, folder in (("--output_root", args.output_root), ("--data_cache_dir", args.data_cache_dir)):
        problem = folder_problem(flag, folder)
        if problem:
            parser.error(problem)
    make_folder(parser, "--output_root", args.output_root)

    rows = []
    for name, fraction, patch_size, skip in RUNS:
        if name in wanted:
            rows.append(train(settings, name, fraction, patch_size, skip, args, extra))
    baseline_tokens = max(row["budget_tokens"] for row in rows)
    for row in rows:
        row["relative_cost"] = row["positions"] / baseline_tokens

    device, versions = environment()
    report = {"preset": args.preset, "settings": settings, "device": device, "versions": versions,
              "command": "python scripts/replicate.py " + " ".join(sys.argv[1:] if argv is None else argv), "runs": rows}
    table = markdown_table(rows)
    with open(os.path.join(args.output_root, "replication.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    with open(os.path.join(args.output_root, "replication.md"), "w", encoding="utf-8") as handle:
        handle.write(f"Device: {device}; torch {versions['torch']}, transformers {versions['transformers']}\n\n{table}\n")
    print(table)
    plotter = os.path.join(REPO_ROOT, "scripts", "plot_curves.py")
    if os.path.isfile(plotter):
        plot = [sys.executable, plotter, "--output", os.path.join(args.output_root, "curves.png"),
                "--offsets_output", os.path.join(args.output_root, "offsets.png")]
        for row in rows:
            plot += ["--run", f"{row['name']}={os.path.join(args.output_root, row['name'])}"]
        subprocess.run(plot, check=False, cwd=REPO_ROOT)
    return report


if __name__ == "__main__":
    main()
