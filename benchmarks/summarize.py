"""The README's throughput table from the JSON reports of `benchmarks/throughput.py`, checked against issue 5's
targets. `gpu_suite.sh` runs it at the end; by hand:

    python benchmarks/summarize.py runs/throughput/*.json

Each report becomes one row per stage (variant = the file's name without `.json`). Then the targets, each
marked met / NOT met / not measured (a GPU-only number on a CPU report):
  - patch/token tokens-per-second ratio >= 3.85 (through our driver: the `token` and `patch` rows),
  - token-stage MFU >= 40% (the best `token` row over the variants),
  - data wait < 3% of the step in every stage that reads real data,
  - K-way loss peak memory <= stock transformers' causal-LM loss (reports that measured it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RATIO_TARGET = 3.85
MFU_TARGET = 0.40
DATA_WAIT_TARGET = 0.03


def stage_label(stage: dict) -> str:
    name = stage["stage"]
    return f"{name} K={stage['patch_size']}" if stage["patch_size"] > 1 else name


def table_rows(reports: dict[str, dict]) -> list[str]:
    """Markdown rows, README order: variant | stage | tokens/s | positions/s | step ms | peak GiB | MFU | data wait."""
    rows = ["| variant | stage | tokens/s | positions/s | step ms | peak GiB | MFU | data wait |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for variant, report in reports.items():
        for stage in report["stages"]:
            peak = f"{stage['peak_memory_gib']:.2f}" if stage.get("peak_memory_gib") is not None else "-"
            mfu = f"{100 * stage['mfu']:.1f}%" if stage.get("mfu") is not None else "-"
            wait = f"{100 * stage['data_wait_share']:.2f}%" if stage.get("data_wait_share") is not None else "-"
            rows.append(f"| {variant} | {stage_label(stage)} | {stage['tokens_per_s']:,.0f} | {stage['positions_per_s']:,.0f} "
                        f"| {1000 * stage['step_time_s']:.1f} | {peak} | {mfu} | {wait} |")
    return rows


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "NOT met")


def target_lines(reports: dict[str, dict]) -> list[str]:
    """One line per target of issue 5, with the measured value and where it comes from."""
    lines = []
    ratios = {variant: report["patch_token_tokens_per_s_ratio"] for variant, report in reports.items()}
    best_ratio = max(ratios.items(), key=lambda item: item[1]) if ratios else None
    if best_ratio:
        listed = ", ".join(f"{variant} {ratio:.2f}" for variant, ratio in ratios.items())
        lines.append(f"- patch/token tokens-per-second ratio >= {RATIO_TARGET}: {verdict(best_ratio[1] >= RATIO_TARGET)} ({listed})")

    token_mfu = [(stage["mfu"], variant) for variant, report in reports.items() for stage in report["stages"]
                 if stage["stage"] == "token" and stage.get("mfu") is not None]
    best = max(token_mfu) if token_mfu else None
    lines.append(f"- token-stage MFU >= {MFU_TARGET:.0%}: {verdict(None if best is None else best[0] >= MFU_TARGET)}"
                 + (f" (best {100 * best[0]:.1f}%, {best[1]})" if best else " (no GPU report)"))

    waits = [(stage["data_wait_share"], f"{variant} {stage_label(stage)}") for variant, report in reports.items()
             for stage in report["stages"] if stage.get("data_wait_share") is not None and stage.get("data", "cache") != "synthetic"]
    worst = max(waits) if waits else None
    lines.append(f"- data wait < {DATA_WAIT_TARGET:.0%} of the step: {verdict(None if worst is None else worst[0] < DATA_WAIT_TARGET)}"
                 + (f" (worst {100 * worst[0]:.2f}%, {worst[1]})" if worst else ""))

    for variant, report in reports.items():
        memory = report.get("loss_memory")
        if memory:
            ours = max(value for key, value in memory.items() if key.startswith("kway_loss_"))
            stock = memory["stock_causal_lm_loss_gib"]
            lines.append(f"- K-way loss peak memory <= stock's: {verdict(ours <= stock)} ({variant}: {ours:.2f} vs "
                         f"{stock:.2f} GiB at {memory['positions']:,} positions x {memory['vocab']:,}, {memory['dtype']})")
    return lines


def summarize(paths: list[str]) -> str:
    reports = {Path(path).stem: json.loads(Path(path).read_text(encoding="utf-8")) for path in paths}
    first = next(iter(reports.values()))
    versions = ", ".join(f"{name} {version}" for name, version in first["versions"].items())
    header = [f"Device: {first['device']}; {versions}.", ""]
    return "\n".join(header + table_rows(reports) + [""] + target_lines(reports))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", help="JSON files written by throughput.py --output_json")
    args = parser.parse_args(argv)
    missing = [path for path in args.reports if not Path(path).is_file()]
    if missing:
        parser.error(f"no such report: {', '.join(missing)}")
    text = summarize(args.reports)
    print(text)
    return text


if __name__ == "__main__":
    main()
