#!/usr/bin/env python
"""Training curves of run_clm.py runs, as in the paper's Figure 2, and the patch stage's per-offset losses.

    python scripts/plot_curves.py --run baseline=runs/tiny-token --run patch=runs/tiny-patch \
        --output outputs/plots/curves.png --offsets_output outputs/plots/offsets.png

curves.png, left: training loss against training tokens; middle: against compute, counted in token-level
equivalents (a patch-stage token costs 1/K of a token-stage one, so the patch stage of λ of the data costs
λ/K); right: against optimizer steps of the job (patch steps, then token steps: where `--patch_step_fraction r`
puts the switch at r, and the axis of the one schedule of `--patch_switch continue`). Token-stage loss is solid. Patch-stage loss is dashed and lighter and labelled "patch loss": it is the
K-way next-patch loss, not comparable with token-level loss. A dotted vertical line marks the switch from
patch to token level. Circles are validation loss (ln perplexity), which is token-level in both stages.
offsets.png: the patch stage's loss at each offset k = 1..K of the next patch (`offset_k_loss`, unweighted) by
step, and the patch loss (their mean, or their weighted mean under `--patch_offset_weights`).
Each run's label carries its recipe where it is not the paper's (README, "Recipes beyond the paper"): the step
fraction r, the positions batch mode, the continued switch, the offset weights.

Outputs (`--output`, `--offsets_output`): the format is the file's extension, any that matplotlib writes (png, pdf,
svg, ...; another one is refused in one line naming them); a name without an extension gets matplotlib's default
one, `.png`; an existing folder, or a path ending in `/`, gets `curves.png` / `offsets.png` inside it. The path
printed is the one written. Refused in one line, before anything is written: the same file for both outputs, an
output that is a file the plot reads (a run's all_results.json or trainer_state.json, through a link too), two
runs with the same label (name them with LABEL=DIR).

What a run directory must hold (all written by run_clm.py):
- `all_results.json`: per stage (`patch_stage`, `token_stage`) its tokens, steps, batch and block tokens;
- the Trainer's `log_history` of each stage: `<stage dir>/trainer_state.json` if present, otherwise that of
  the stage's last `checkpoint-*` (stage dirs: `<run>/patch_stage` and `<run>`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from patch_training.cli import UsageError, loads_json_object, write_error_message  # noqa: E402  (standard library only)

STAGES = (("patch_stage", "patch_stage"), ("token_stage", "."))  # (all_results key, folder in the run)
RESULTS_FILE = "all_results.json"
STATE_FILE = "trainer_state.json"


# ---------------------------------------------------------------------------------------------------------
# Reading a run
# ---------------------------------------------------------------------------------------------------------


def read_json(path: Path, sources: list[Path] | None = None):
    """The JSON in `path` (appended to `sources`, the files a plot reads); UsageError for a file that is not
    JSON or holds a key twice (json would keep the last one without a word)."""
    if sources is not None:
        sources.append(path)
    try:
        return loads_json_object(path.read_text(encoding="utf-8"), str(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{path} is not valid JSON: {error}") from None


def read_log_history(stage_dir: Path, sources: list[Path] | None = None) -> list[dict]:
    """The Trainer's log_history of one stage: `<stage_dir>/trainer_state.json`, else the last checkpoint's."""
    final = stage_dir / STATE_FILE
    if final.is_file():
        return read_json(final, sources)["log_history"]
    checkpoints = [p for p in stage_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    checkpoints = [p for p in checkpoints if (p / STATE_FILE).is_file()]
    if not checkpoints:
        return []
    last = max(checkpoints, key=lambda p: int(p.name.split("-")[1]))
    return read_json(last / STATE_FILE, sources)["log_history"]


def tokens_per_step(stage: dict) -> int:
    """Training tokens per optimizer step of a stage (an all_results.json entry): micro-batch x accumulation
    x world size x block tokens. The world size is read if recorded, else recovered from the tokens seen
    (tokens = min(blocks, steps x global batch) x block tokens, the last step possibly partial)."""
    if stage.get("tokens_per_step"):
        return int(stage["tokens_per_step"])
    per_rank = stage["per_device_train_batch_size"] * stage["gradient_accumulation_steps"] * stage["block_tokens"]
    world_size = stage.get("world_size")
    if not world_size:
        steps = max(int(stage["steps"]), 1)
        world_size = max(1, math.ceil(stage["tokens"] / (steps * per_rank) - 1e-9))
    return per_rank * int(world_size)


@dataclass
class RunCurve:
    """A run's curves on a common axis. Arrays are parallel; `stage` is "patch" or "token".

    tokens: training tokens read so far (patch stage first); cost: compute in token-level equivalents
    (patch-stage tokens count 1/K)."""

    label: str
    patch_size: int  # K of the patch stage; 1 for a token-level baseline
    train: dict[str, np.ndarray] = field(default_factory=dict)  # stage, step, tokens, cost, loss, job_step
    eval: dict[str, np.ndarray] = field(default_factory=dict)  # stage, step, tokens, cost, loss, job_step, perplexity
    offsets: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # k -> (steps, losses)
    patch_loss: tuple[np.ndarray, np.ndarray] | None = None  # (steps, losses) of the patch stage
    switch_tokens: float | None = None  # where the token stage starts (None: no patch stage or no token stage)
    switch_cost: float | None = None
    switch_step: int | None = None  # the job's optimizer steps before the token stage
    recipe: str = ""  # the choices beyond the paper, for labels ("" for the paper's recipe)
    offset_weights: list[float] | None = None  # the patch loss's normalised weights (None: the mean)
    total_tokens: int = 0
    total_cost: float = 0.0
    final_perplexity: float | None = None
    sources: list[Path] = field(default_factory=list)  # the files read: never written over


def extract_curve(run_dir: str | Path, label: str | None = None) -> RunCurve:
    """Training and validation curves of a run directory of run_clm.py (see the module docstring)."""
    run_dir = Path(run_dir)
    results_path = run_dir / RESULTS_FILE
    if not results_path.is_file():
        raise FileNotFoundError(f"{results_path} not found: plot a finished run of run_clm.py")
    sources: list[Path] = []
    results = read_json(results_path, sources)
    curve = RunCurve(label=label or run_dir.name, patch_size=1, recipe=recipe_label(results),
                     offset_weights=results.get("patch_offset_weights"), sources=sources)
    train_rows, eval_rows = [], []
    tokens_before = cost_before = 0.0
    steps_before = 0
    for key, folder in STAGES:
        stage = results.get(key)
        if stage is None:
            continue
        name = key.split("_")[0]
        k = int(stage.get("patch_size", 1))
        if name == "patch":
            curve.patch_size = k
        if name == "token" and "patch_stage" in results:
            curve.switch_tokens, curve.switch_cost, curve.switch_step = tokens_before, cost_before, steps_before
        per_step, stage_tokens = tokens_per_step(stage), int(stage["tokens"])

        def position(step, per_step=per_step, stage_tokens=stage_tokens, k=k, base=(tokens_before, cost_before)):
            seen = min(step * per_step, stage_tokens)
            return base[0] + seen, base[1] + seen / k
        step_base = steps_before

        history = read_log_history(run_dir / folder, sources)
        loss_key = "patch_loss" if name == "patch" else "loss"
        evals: dict[int, float] = {}
        offsets: dict[int, list[tuple[int, float]]] = {}
        for entry in history:
            step = entry.get("step")
            if step is None:
                continue
            if loss_key in entry:
                train_rows.append((name, step, *position(step), entry[loss_key], step_base + step))
            if "eval_loss" in entry:
                evals[step] = entry["eval_loss"]
            elif "eval_perplexity" in entry and step not in evals:
                evals[step] = math.log(entry["eval_perplexity"])
            for entry_key, value in entry.items():
                match = re.fullmatch(r"offset_(\d+)_loss", entry_key)
                if match:
                    offsets.setdefault(int(match.group(1)), []).append((step, value))
        if stage.get("eval_loss") is not None:  # the evaluation at the end of the stage
            evals.setdefault(int(stage["steps"]), stage["eval_loss"])
        for step, loss in sorted(evals.items()):
            eval_rows.append((name, step, *position(step), loss, step_base + step))
        if name == "patch":
            curve.offsets = {o: tuple(np.array(v) for v in zip(*sorted(rows))) for o, rows in sorted(offsets.items())}
            patch_rows = sorted((r[1], r[4]) for r in train_rows if r[0] == "patch")
            curve.patch_loss = tuple(np.array(v) for v in zip(*patch_rows)) if patch_rows else None
        tokens_before += stage_tokens
        cost_before += stage_tokens / k
        steps_before += int(stage["steps"])

    columns = ("stage", "step", "tokens", "cost", "loss", "job_step")
    curve.train = {c: np.array([r[i] for r in train_rows]) for i, c in enumerate(columns)}
    curve.eval = {c: np.array([r[i] for r in eval_rows]) for i, c in enumerate(columns)}
    curve.eval["perplexity"] = np.exp(curve.eval["loss"]) if len(eval_rows) else np.array([])
    curve.total_tokens, curve.total_cost = int(tokens_before), cost_before
    final = results.get("perplexity")
    curve.final_perplexity = float(final) if final is not None else None
    return curve


# ---------------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------------


def recipe_label(results: dict) -> str:
    """The run's choices beyond the paper, from its all_results.json (older runs have none: ""), e.g.
    "r=0.2, positions/step, continued schedule, weighted offsets"."""
    parts = []
    if results.get("patch_split_by") == "patch_step_fraction":
        parts.append(f"r={results['patch_step_fraction']:g} (λ={results['patch_data_fraction']:.3g})")
    if results.get("patch_batch_mode", "tokens") != "tokens":
        parts.append("positions/step")
    if results.get("patch_switch", "restart") != "restart":
        parts.append("continued schedule")
    if results.get("patch_offset_weights"):
        parts.append("weighted offsets")
    return ", ".join(parts)


def _format_count(value: float, _position=None) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def plot_curves(curves: list[RunCurve], output: str | Path, dpi: int = 120) -> None:
    """Figure 2: training loss against tokens (left) and against compute (middle), one colour per run; and
    against the job's optimizer steps (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(1, 3, figsize=(19, 5), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, axis, xlabel in (
        (axes[0], "tokens", "training tokens"),
        (axes[1], "cost", "compute (token-level equivalent tokens; a patch-stage token costs 1/K)"),
        (axes[2], "job_step", "optimizer steps (patch stage, then token stage)"),
    ):
        switch_labelled = False
        for index, curve in enumerate(curves):
            color = colors[index % len(colors)]
            name = f"{curve.label} [{curve.recipe}]" if curve.recipe else curve.label
            stage, x, loss = curve.train.get("stage", []), curve.train.get(axis), curve.train.get("loss")
            if x is not None and len(x):
                patch, token = stage == "patch", stage == "token"
                if patch.any():
                    ax.plot(x[patch], loss[patch], "--", color=color, alpha=0.5, linewidth=1.5,
                            label=f"{name}: patch loss (K={curve.patch_size}, not token-level)")
                if token.any():
                    ax.plot(x[token], loss[token], "-", color=color, linewidth=2, label=f"{name}: loss")
            ex = curve.eval.get(axis)
            if ex is not None and len(ex):
                ppl = f", final ppl {curve.final_perplexity:.4g}" if curve.final_perplexity else ""
                ax.plot(ex, curve.eval["loss"], "o", color=color, markersize=6, markeredgecolor="black",
                        markeredgewidth=0.6, label=f"{name}: validation ln(ppl){ppl}")
            switch = {"tokens": curve.switch_tokens, "cost": curve.switch_cost, "job_step": curve.switch_step}[axis]
            if switch is not None:
                ax.axvline(switch, color=color, linestyle=":", linewidth=1.5,
                           label=None if switch_labelled else "switch: patch → token level")
                switch_labelled = True
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_formatter(FuncFormatter(_format_count))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (nats per token)")
    axes[0].set_title("loss vs training tokens")
    axes[1].set_title("loss vs training compute")
    axes[2].set_title("loss vs optimizer steps")
    axes[2].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(output, dpi=dpi)
    plt.close(fig)


def plot_offsets(curves: list[RunCurve], output: str | Path, dpi: int = 120) -> bool:
    """The patch stage's per-offset losses by step, one panel per patch run. False if no run has any."""
    runs = [c for c in curves if c.offsets]
    if not runs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6.5 * len(runs), 4.5), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, curve in zip(axes[0], runs):
        k = max(curve.offsets)
        for offset, (steps, losses) in curve.offsets.items():
            ax.plot(steps, losses, "-", color=cmap((offset - 1) / max(k - 1, 1)), linewidth=1.5,
                    label=f"offset {offset} (token {offset} of the next patch)")
        if curve.patch_loss is not None:
            weights = curve.offset_weights
            what = "mean" if not weights else "weighted mean, w = " + ", ".join(f"{w:.3g}" for w in weights)
            ax.plot(*curve.patch_loss, "--", color="black", linewidth=1, label=f"patch loss ({what})")
        ax.set_title(f"{curve.label}: patch-stage loss per offset (K={curve.patch_size})")
        ax.set_xlabel("patch-stage optimizer step")
        ax.set_ylabel("loss (nats per token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=dpi)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def parse_run(spec: str) -> tuple[str, str]:
    """'label=dir' -> (label, dir); a bare 'dir' is labelled by its folder name."""
    label, sep, path = spec.partition("=")
    if not sep:
        return Path(spec).name, spec
    if not label or not path:
        raise argparse.ArgumentTypeError(f"--run wants LABEL=DIR, got {spec!r}")
    return label, path


def output_path(flag: str, given: str, default_name: str) -> Path:
    """The file an output option names (see the module docstring); UsageError for one that cannot be written."""
    from matplotlib.figure import Figure

    canvas = Figure().canvas
    if not given:
        raise UsageError(f"{flag} must name a file")
    path = Path(given)
    if given.endswith(("/", os.sep)) or path.is_dir():  # a folder: the default name inside it
        path = path / default_name
    elif not os.path.splitext(path.name)[1][1:]:  # no extension: matplotlib's default one, as savefig adds it
        path = path.with_name(path.name.rstrip(".") + "." + canvas.get_default_filetype())
    supported = canvas.get_supported_filetypes()
    extension = path.suffix[1:].lower()
    if extension not in supported:
        names = ", ".join(f".{name}" for name in sorted(supported))
        raise UsageError(f"{flag} {given}: matplotlib cannot write .{extension} files; give one of {names}")
    if path.is_dir():
        raise UsageError(f"{flag} {given}: {path} is a folder")
    nearest = next((p for p in path.parents if p.exists()), None)  # the folder it goes in, made if missing
    if nearest is not None and not nearest.is_dir():
        raise UsageError(f"{flag} {given}: {nearest} is a file, not a folder")
    return path


def same_file(a: Path, b: Path) -> bool:
    """Whether writing `a` writes `b`: the same path once links are followed, or a hard link of it."""
    if a.resolve() == b.resolve():
        return True
    return a.exists() and b.exists() and os.path.samefile(a, b)


def check_outputs(outputs: dict[str, Path], curves: list[RunCurve]) -> None:
    """UsageError for two outputs that are one file, or an output that is a file the plot reads."""
    flags = list(outputs)
    for index, flag in enumerate(flags):
        for other in flags[index + 1:]:
            if same_file(outputs[flag], outputs[other]):
                raise UsageError(f"{flag} and {other} are the same file {outputs[flag]}: the second plot would "
                                 "replace the first; give two files")
        for curve in curves:
            for source in curve.sources:
                if same_file(outputs[flag], source):
                    raise UsageError(f"{flag} {outputs[flag]} is {source}, which the plot reads (run "
                                     f"{curve.label!r}): choose another file")


def duplicate_label(runs: list[tuple[str, str]]) -> str | None:
    """The error message for two runs given one label, or None."""
    label, count = next(iter(Counter(label for label, _ in runs).most_common(1)), ("", 0))
    if count < 2:
        return None
    folders = ", ".join(path for name, path in runs if name == label)
    return (f"--run: {count} runs have the label {label!r} ({folders}): the legend could not tell them apart; "
            "give each its own with LABEL=DIR")


def save(plot, curves: list[RunCurve], path: Path, dpi: int):
    """`plot(curves, path, dpi)` into `path`, its folder made as run_clm.py makes its --output_dir; a failure to
    write (permissions, a full disk) as one line and exit code 1."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return plot(curves, path, dpi)
    except OSError as error:
        message = write_error_message(error) or f"cannot write {path}: {error.strerror or error}"
        sys.exit(f"plot_curves.py: error: {message}")


def main(argv=None) -> list[RunCurve]:
    parser = argparse.ArgumentParser(prog="plot_curves.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", type=parse_run, required=True, metavar="LABEL=DIR",
                        help="A run directory of run_clm.py and its label (repeat for several runs).")
    parser.add_argument("--output", default="outputs/plots/curves.png",
                        help="The loss-curves plot (Figure 2): any format matplotlib writes, by extension (default "
                        ".png); a folder: curves.png in it.")
    parser.add_argument("--offsets_output", default=None,
                        help="The per-offset patch-loss plot (optional); a folder: offsets.png in it.")
    parser.add_argument("--dpi", type=int, default=120)
    args = parser.parse_args(argv)
    if args.dpi < 1:
        parser.error(f"--dpi must be >= 1, got {args.dpi}")
    problem = duplicate_label(args.run)
    if problem:
        parser.error(problem)
    try:
        outputs = {"--output": output_path("--output", args.output, "curves.png")}
        if args.offsets_output is not None:
            outputs["--offsets_output"] = output_path("--offsets_output", args.offsets_output, "offsets.png")
    except UsageError as error:
        parser.error(str(error))

    try:
        curves = [extract_curve(path, label) for label, path in args.run]
        check_outputs(outputs, curves)
    except (FileNotFoundError, UsageError) as error:
        parser.exit(2, f"plot_curves.py: error: {error}\n")
    for curve in curves:
        ppl = f"{curve.final_perplexity:.4g}" if curve.final_perplexity is not None else "n/a"
        relative = curve.total_cost / curve.total_tokens if curve.total_tokens else float("nan")
        recipe = f" [{curve.recipe}]" if curve.recipe else ""
        print(f"[plot_curves] {curve.label}{recipe}: K={curve.patch_size}, {_format_count(curve.total_tokens)} tokens, "
              f"compute {_format_count(curve.total_cost)} token-equivalents (relative {relative:.3f}), "
              f"{len(curve.train.get('loss', []))} loss points, validation perplexity {ppl}")
    save(plot_curves, curves, outputs["--output"], args.dpi)
    print(f"[plot_curves] wrote {outputs['--output']}")
    if "--offsets_output" in outputs:
        if any(curve.offsets for curve in curves):  # else plot_offsets draws nothing: no folder made either
            save(plot_offsets, curves, outputs["--offsets_output"], args.dpi)
            print(f"[plot_curves] wrote {outputs['--offsets_output']}")
        else:
            print("[plot_curves] no run has a patch stage with per-offset losses: no offsets plot", file=sys.stderr)
    return curves


if __name__ == "__main__":
    main()
