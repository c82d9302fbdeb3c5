#!/usr/bin/env python
"""Data-scaling sweep: where does patch-level training start to pay?

The paper's Table 4 (370M model) has the patch run (K = 4, λ = 2/3, cost 0.5) behind the token-level run at
45B tokens and ahead from 180B on: the method suits abundant data. This sweep measures the same trend at small
scale: one Llama, several data sizes (E passes over the training files, E may exceed 1: the paper's §3.3
schedule, patch level for the first λ·E epochs), and at each size a token-level run (cost 1.0) and a patch
run (cost 0.5) through run_clm.py with the same recipe (scripts/replicate.py's, whose code it reuses).
Both are evaluated on WikiText-103 test, which no training file contains.

    python scripts/sweep.py --preset cpu                # the plumbing at toy scale: tiny model, bundled sample
    python scripts/sweep.py --preset gpu --prepare      # here, once: copy the corpus into .gpu_data/ (git-ignored)
    bash scripts/sweep_gpu.sh                           # on one H100/H200: the whole sweep, tokenisation included

Writes to --report_dir (default --output_root): sweep.json, sweep.md (data size, tokens per parameter,
epochs, perplexity of each run, their ratio, costs, wall times) and sweep.png (ratio patch/token against
tokens per parameter, the paper's Table 4 beside it), all rewritten after every size, so a sweep cut short
keeps what it finished. Extra arguments after `--` go to every run_clm.py call.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import replicate  # noqa: E402  (the run_clm.py command, one run, the environment, the checks of the options)
from patch_training.cli import UsageError, folder_problem, loads_json_object  # noqa: E402  (on the path through replicate)

REPO_ROOT = replicate.REPO_ROOT
PROG = "sweep.py"  # in its messages, also when main() is called from Python
GPU_DATA = os.path.join(REPO_ROOT, ".gpu_data", "corpus")  # git-ignored; travels to the GPU machine
SHARED_CORPUS = os.path.join(REPO_ROOT, "..", "shared", "data", "corpus")

# The paper's Table 4: 370M model, K = 4, λ = 2/3, WikiText-103 perplexity at each data size. The 45B and
# 360B ratios come from the perplexities (12.84 / 12.50, 10.68 / 10.94); 90B and 180B as the paper gives them.
PAPER_PARAMS = 370e6
PAPER_TABLE4 = [(45e9, 12.84 / 12.50), (90e9, 1.008), (180e9, 0.990), (360e9, 10.68 / 10.94)]

PATCH = ("patch", 2 / 3, 4)  # name, λ, K
TOKEN = ("token", 0.0, 4)

PRESETS = {
    # One H200 in 442 s (measured 2026-11-30), tokenisation included (sized from the 58M replication's timings; see
    # the README): a 19.5M-parameter Llama (256 hidden, 4 layers) so the largest size reaches 3.8 tokens per
    # parameter; 0.18, 0.5 and 1.44 passes over the 51.1M-token corpus (9.2M to 74M tokens, 8x).
    "gpu": {
        **replicate.PRESETS["gpu"],
        "config_name": "configs/model/llama-20m.json",
        "train_file": ",".join(sorted(glob.glob(os.path.join(GPU_DATA, "train-*.jsonl.xz")))),
        "preprocessing_num_workers": 7,
        "sizes": "0.18,0.5,1.44",
    },
    # The plumbing (not the science) in about a minute on a CPU: the tiny model, 16 blocks of 16 tokens a step,
    # 0.002 to 0.016 passes over the bundled sample (380 to 3K tokens); mostly the six runs' start-up. No warmup:
    # the smallest patch stage has one optimizer step, which a warmup would make learn nothing (refused).
    "cpu": {**replicate.PRESETS["cpu"], "block_size": 16, "per_device_train_batch_size": 16, "max_eval_blocks": 8,
            "logging_steps": 1, "warmup_steps": 0, "sizes": "0.002,0.006,0.016"},
}


def parse_sizes(text: str) -> list[float] | None:
    try:
        sizes = [float(item) for item in text.split(",")]
    except ValueError:
        return None
    if len(sizes) < 2 or len(set(sizes)) != len(sizes) or not all(0 < size < float("inf") for size in sizes):
        return None
    return sorted(sizes)


def count_parameters(config_name: str) -> tuple[int, int]:
    """All parameters of a Llama config (untied embeddings, as in configs/model), and those outside the input
    and output embeddings; from the JSON alone, so the sweep need not build the model. UsageError for a key given
    twice (JSON would keep the last one)."""
    with open(os.path.join(REPO_ROOT, config_name), encoding="utf-8") as handle:
        c = loads_json_object(handle.read(), f"model config {config_name}")
    d, layers, heads = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]
    kv = c.get("num_key_value_heads", heads) * c.get("head_dim", d // heads)
    per_layer = 2 * d * heads * c.get("head_dim", d // heads) + 2 * d * kv + 3 * d * c["intermediate_size"] + 2 * d
    non_embedding = layers * per_layer + d  # + the final norm
    embeddings = c["vocab_size"] * d * (1 if c.get("tie_word_embeddings") else 2)
    return non_embedding + embeddings, non_embedding


def human(count: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g}{unit}"
    return f"{count:.0f}"


def cache_records(cache_dir: str) -> set[str]:
    """The meta.json files of the token caches in `cache_dir` (one per tokenised data set)."""
    return set(glob.glob(os.path.join(cache_dir, "*", "meta.json")))


def tokenisation_seconds(cache_dir: str, existing: set[str]) -> float | None:
    """Seconds run_clm.py spent tokenising during this sweep (training files and WikiText): the caches in
    `cache_dir` that are not among `existing` (`cache_records` before the sweep); None where it made none.
    Counting every cache in the folder would report, for a shared --data_cache_dir or a second sweep reading the
    first one's cache, time that no run of this sweep spent."""
    made = sorted(cache_records(cache_dir) - existing)
    if not made:
        return None
    return sum(json.load(open(path, encoding="utf-8")).get("tokenize_seconds", 0.0) for path in made)


def size_label(epochs: float) -> str:
    return f"epochs-{epochs:g}"


def markdown_table(points: list[dict], params: int) -> str:
    lines = [
        f"| epochs | data size (tokens) | tokens per parameter ({human(params)}) | token-level perplexity | "
        "patch perplexity | ratio patch / token | cost token | cost patch | wall time token (s) | "
        "wall time patch (s) | training time patch / token |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        lines.append(
            f"| {p['epochs']:g} | {p['tokens']:,} | {p['tokens_per_parameter']:.3g} | {p['token_perplexity']:.2f} | "
            f"{p['patch_perplexity']:.2f} | **{p['ratio']:.3f}** | {p['token_cost']:.3f} | {p['patch_cost']:.3f} | "
            f"{p['token_wall_time_s']:.0f} | {p['patch_wall_time_s']:.0f} | {p['train_time_ratio']:.2f} |"
        )
    return "\n".join(lines)


def plot(points: list[dict], params: int, path: str) -> None:
    """Ratio patch/token against tokens per parameter (log x); the paper's Table 4 beside it, on its own axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, (ours, paper) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    x = [p["tokens_per_parameter"] for p in points]
    y = [p["ratio"] for p in points]
    ours.plot(x, y, "o-", color="tab:blue", label=f"this sweep ({human(params)} Llama, K=4, λ=2/3)")
    for p in points:
        ours.annotate(f"{human(p['tokens'])} tokens\n{p['epochs']:g} epochs", (p["tokens_per_parameter"], p["ratio"]),
                      textcoords="offset points", xytext=(6, 6), fontsize=8)
    ours.set_xlabel(f"training tokens per parameter (this sweep, {human(params)} parameters)")
    ours.set_ylabel("WikiText-103 perplexity ratio, patch / token")
    ours.set_title("this sweep")
    px = [tokens / PAPER_PARAMS for tokens, _ in PAPER_TABLE4]
    py = [ratio for _, ratio in PAPER_TABLE4]
    paper.plot(px, py, "s--", color="tab:orange", label="paper, Table 4 (370M)")
    for (tokens, ratio), xi in zip(PAPER_TABLE4, px):
        paper.annotate(f"{tokens / 1e9:.0f}B", (xi, ratio), textcoords="offset points", xytext=(6, 6), fontsize=8)
    paper.set_xlabel("training tokens per parameter (the paper's 370M model)")
    paper.set_title("paper, Table 4 (for reference)")
    for axis in (ours, paper):
        axis.set_xscale("log")
        axis.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(loc="upper right", fontsize=8)
    low, high = min(y + py + [1.0]), max(y + py + [1.0])
    pad = 0.1 * (high - low) + 0.01
    ours.set_ylim(low - pad, high + 2 * pad)
    figure.suptitle("Patch-level training (cost 0.5) vs token-level (cost 1.0): below 1 the patch run is better")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def prepare(shards: list[str]) -> None:
    os.makedirs(GPU_DATA, exist_ok=True)
    for shard in shards:
        shutil.copy2(shard, GPU_DATA)
    size = sum(os.path.getsize(path) for path in glob.glob(os.path.join(GPU_DATA, "*")))
    print(f"sweep.py: copied {len(shards)} shards into {os.path.relpath(GPU_DATA, REPO_ROOT)} ({size / 2**20:.1f} MiB)")


def split_at_double_dash(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this script's arguments, the run_clm.py flags after `--`, given to every run)."""
    if "--" not in argv:
        return argv, []
    return argv[: argv.index("--")], argv[argv.index("--") + 1 :]


def add_study_arguments(parser: argparse.ArgumentParser, study: str, report_help: str) -> None:
    """The arguments a study of several run_clm.py runs shares (this sweep, scripts/compare.py): its data, its
    folders (`study`: the name in runs/<study>-<preset>) and --prepare."""
    parser.add_argument("--train_file", default=None, help="override the preset's training files (comma-separated)")
    parser.add_argument("--validation_file", default=os.path.join(REPO_ROOT, "data", "wikitext-103-test.jsonl"))
    parser.add_argument("--output_root", default=None, help=f"the runs; default runs/{study}-<preset>")
    parser.add_argument("--report_dir", default=None, help=report_help)
    parser.add_argument("--data_cache_dir", default=None, help="tokenised data, shared by all runs; default "
                        "<output_root>/token-cache")
    parser.add_argument("--prepare", action="store_true", help="copy --corpus's train-*.jsonl.xz into .gpu_data/corpus "
                        "(git-ignored) for the gpu preset on a machine without ../shared, then stop")
    parser.add_argument("--corpus", default=SHARED_CORPUS, help="where --prepare copies from")


def prepare_if_asked(parser: argparse.ArgumentParser, args) -> bool:
    """With --prepare: copy the corpus shards into .gpu_data (`prepare`) and return True (the command stops)."""
    if not args.prepare:
        return False
    shards = sorted(glob.glob(os.path.join(args.corpus, "train-*.jsonl.xz")))
    if not shards:
        parser.error(f"--corpus: no train-*.jsonl.xz in {args.corpus}")
    prepare(shards)
    return True


def study_folders(parser: argparse.ArgumentParser, args, study: str, report_default: str) -> tuple[str, str, str]:
    """(output root, report folder, token cache), absolute; a folder that cannot be one is a parser error.
    `report_default`: the report folder's path inside the output root ("" for the root itself)."""
    output_root = os.path.abspath(args.output_root or os.path.join(REPO_ROOT, "runs", f"{study}-{args.preset}"))
    report_dir = os.path.abspath(args.report_dir or os.path.join(output_root, report_default))
    cache_dir = os.path.abspath(args.data_cache_dir or os.path.join(output_root, "token-cache"))
    for flag, folder in (("--output_root", output_root), ("--report_dir", report_dir), ("--data_cache_dir", cache_dir)):
        problem = folder_problem(flag, folder)
        if problem:
            parser.error(problem)
    return output_root, report_dir, cache_dir


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python scripts/sweep.py", *argv])
    argv, extra = split_at_double_dash(argv)
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--sizes", default=None, help="data sizes in passes over the training files, comma-separated "
                        "(at least two; the gpu preset: 0.18,0.5,1.44, the cpu preset: 0.002,0.006,0.016)")
    add_study_arguments(parser, "sweep", "sweep.json/.md/.png and each run's all_results.json; default --output_root")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    replicate.refuse_non_finite_options(parser, args)
    if prepare_if_asked(parser, args):
        return {}
    settings = {key: value for key, value in PRESETS[args.preset].items() if key != "sizes"}
    sizes = parse_sizes(args.sizes or PRESETS[args.preset]["sizes"])
    if sizes is None:
        parser.error(f"--sizes takes at least two distinct positive numbers (finite: passes over the training files), "
                     f"got {args.sizes!r}")
    if args.train_file:
        settings["train_file"] = args.train_file
    settings = replicate.settings_given_after(settings, extra)  # `-- --config_name X`: X's parameters
    if not settings["train_file"]:
        parser.error(f"no training files: the gpu preset reads {os.path.relpath(GPU_DATA, REPO_ROOT)}/train-*.jsonl.xz, "
                     "which `python scripts/sweep.py --preset gpu --prepare` fills; or pass --train_file")
    problem = replicate.missing_files(settings, args.validation_file)
    if problem:
        parser.error(problem)
    output_root, report_dir, cache_dir = study_folders(parser, args, "sweep", "")
    try:
        params, non_embedding = count_parameters(settings["config_name"])
    except UsageError as error:
        parser.error(str(error))
    replicate.make_folder(parser, "--report_dir", report_dir)

    device, versions = replicate.environment()
    report = {"preset": args.preset, "settings": settings, "sizes": sizes, "parameters": params,
              "non_embedding_parameters": non_embedding, "device": device, "versions": versions, "command": command,
              "paper_table4": [{"tokens": t, "tokens_per_parameter": t / PAPER_PARAMS, "ratio": r} for t, r in PAPER_TABLE4],
              "points": []}
    start, existing_caches = time.time(), cache_records(cache_dir)
    for epochs in sizes:
        run_args = SimpleNamespace(validation_file=args.validation_file, data_cache_dir=cache_dir, seed=args.seed,
                                   epochs=epochs, output_root=os.path.join(output_root, size_label(epochs)))
        rows = {}
        for name, fraction, patch_size in (TOKEN, PATCH):
            rows[name] = replicate.train(settings, name, fraction, patch_size, 0.0, run_args, extra, prog="sweep.py")
            results = os.path.join(run_args.output_root, name, "all_results.json")
            if report_dir != output_root:
                shutil.copy2(results, os.path.join(report_dir, f"{size_label(epochs)}-{name}-all_results.json"))
        budget = rows["token"]["budget_tokens"]
        token, patch = rows["token"], rows["patch"]
        report["points"].append({
            "epochs": epochs, "tokens": budget, "tokens_per_parameter": budget / params,
            "token_perplexity": token["perplexity"], "patch_perplexity": patch["perplexity"],
            "ratio": patch["perplexity"] / token["perplexity"],
            "token_cost": token["positions"] / budget, "patch_cost": patch["positions"] / budget,
            "token_wall_time_s": token["wall_time_s"], "patch_wall_time_s": patch["wall_time_s"],
            "train_time_ratio": patch["train_time_s"] / token["train_time_s"], "runs": rows,
        })
        report["tokenize_s"] = tokenisation_seconds(cache_dir, existing_caches)
        report["total_wall_time_s"] = time.time() - start
        write_report(report, report_dir)
    print(markdown_table(report["points"], params))
    print(f"sweep.py: {len(sizes)} sizes in {report['total_wall_time_s']:.0f} s; report in {report_dir}")
    return report


def write_report(report: dict, report_dir: str) -> None:
    params = report["parameters"]
    tokenize = report.get("tokenize_s")
    notes = [
        f"Device: {report['device']}; torch {report['versions']['torch']}, transformers {report['versions']['transformers']}",
        f"Model: {report['settings']['config_name']}, {params:,} parameters ({report['non_embedding_parameters']:,} "
        "outside the embeddings); patch run K = 4, λ = 2/3; ratio < 1: the patch run is better.",
        f"Command: `{report['command']}`; the runs took {report['total_wall_time_s']:.0f} s in all"
        + (f" (tokenising: {tokenize:.0f} s, inside the first token-level run's wall time)" if tokenize else ""),
        "Cost: positions over the token-level run's budget. Training time: the stages' train_runtime, no start-up.",
    ]
    with open(os.path.join(report_dir, "sweep.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    with open(os.path.join(report_dir, "sweep.md"), "w", encoding="utf-8") as handle:
        handle.write("\n\n".join(notes) + "\n\n" + markdown_table(report["points"], params) + "\n")
    plot(report["points"], params, os.path.join(report_dir, "sweep.png"))


if __name__ == "__main__":
    main()
