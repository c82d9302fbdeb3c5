"""The README's throughput table from the JSON reports of `benchmarks/throughput.py`, checked against issue 15's
targets. `gpu_suite.sh` runs it at the end; by hand:

    python benchmarks/summarize.py runs/throughput/*.json [--configs_dir DIR]

Each report becomes one row per stage (variant = the file's name without `.json`). Then the targets, each
marked met / NOT met / not measured (a GPU-only number on a CPU report):
  - patch/token tokens-per-second ratio >= 3.9 at K = 4 (through our driver: the `token` and `patch` rows),
  - token-stage MFU >= 45% (the best `token` row over the variants; its micro-batch named),
  - data wait < 2% of the step in every stage that reads real data,
  - K-way loss peak memory <= stock transformers' causal-LM loss (reports that measured it),
  - fused head + loss peak memory <= 1/4 of the chunked path at vocab 32,000 and <= 1/8 of stock at 128,256.
With --configs_dir, the paper's 370M train configs are written there for each card size (80gb: H100/A100 80 GB,
141gb: H200), at the variant whose token stage had the best MFU among those that fit the card (every stage's peak
memory within 90% of the card's): the same 2M tokens per optimizer step on 8 GPUs, torch.compile on, compiled by
regions and with the unfused loss where that variant was (e.g. llama-370m-patch-k4-lambda0.67-80gb.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RATIO_TARGET = 3.9
MFU_TARGET = 0.45
DATA_WAIT_TARGET = 0.02
FUSED_OVER_CHUNKED_TARGET = 1 / 4  # at vocab 32,000
FUSED_OVER_STOCK_TARGET = 1 / 8  # at vocab 128,256
PAPER_GPUS, PAPER_TOKENS_PER_STEP, PAPER_BLOCK = 8, 2048 * 1024, 2048
# Card sizes the GPU configs are written for: name -> the memory torch reports (GiB; `total_memory`, what its
# out-of-memory message calls "total capacity": 139.80 measured on an H200; 79.11 for 80 GB cards, as that message
# reads in public bug reports, not measured here).
CARDS = {"80gb": 79.11, "141gb": 139.80}
CARD_FIT = 0.9  # a variant fits a card if every stage's peak allocated memory is within this share of it


def stage_label(stage: dict) -> str:
    name = stage["stage"]
    return f"{name} K={stage['patch_size']}" if stage["patch_size"] > 1 else name


def table_rows(reports: dict[str, dict]) -> list[str]:
    """Markdown rows, README order: variant | stage | tokens/s | positions/s | step ms | peak GiB | MFU | data wait |
    warm-up s (the untimed steps, torch.compile's compilation included; "-" in reports older than the column).
    A report cut short (`"complete": false`) is named "<variant> (cut short)"."""
    rows = ["| variant | stage | loss | tokens/s | positions/s | step ms | peak GiB | MFU | data wait | warm-up s |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for variant, report in reports.items():
        name = variant if report.get("complete", True) else f"{variant} (cut short)"
        for stage in report.get("stages", []):
            peak = f"{stage['peak_memory_gib']:.2f}" if stage.get("peak_memory_gib") is not None else "-"
            mfu = f"{100 * stage['mfu']:.1f}%" if stage.get("mfu") is not None else "-"
            wait = f"{100 * stage['data_wait_share']:.2f}%" if stage.get("data_wait_share") is not None else "-"
            warmup = f"{stage['warmup_s']:.0f}" if stage.get("warmup_s") is not None else "-"
            rows.append(f"| {name} | {stage_label(stage)} | {stage_loss_path(report, stage)} "
                        f"| {stage['tokens_per_s']:,.0f} | {stage['positions_per_s']:,.0f} "
                        f"| {1000 * stage['step_time_s']:.1f} | {peak} | {mfu} | {wait} | {warmup} |")
    return rows


def stage_loss_path(report: dict, stage: dict) -> str:
    """The training loss a stage computed: "fused" (the fused LM-head + K-way loss) or "unfused" (the stock head,
    then the chunked K-way loss), as throughput.py records it (`loss_path`); in reports older than that record,
    "unfused" for --loss_implementation unfused, else the --loss_implementation asked for ("auto", "fused"), or "-"."""
    if "loss_path" in stage:
        return stage["loss_path"]
    implementation = report.get("settings", {}).get("loss_implementation")
    return implementation or "-"


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "NOT met")


def target_lines(reports: dict[str, dict]) -> list[str]:
    """One line per target of issue 5, with the measured value and where it comes from."""
    lines = []
    ratios = {variant: report["patch_token_tokens_per_s_ratio"] for variant, report in reports.items()
              if "patch_token_tokens_per_s_ratio" in report}
    best_ratio = max(ratios.items(), key=lambda item: item[1]) if ratios else None
    if best_ratio:
        listed = ", ".join(f"{variant} {ratio:.2f}" for variant, ratio in ratios.items())
        lines.append(f"- patch/token tokens-per-second ratio >= {RATIO_TARGET}: {verdict(best_ratio[1] >= RATIO_TARGET)} ({listed})")

    token_mfu = [(stage["mfu"], variant) for variant, report in reports.items() for stage in report.get("stages", [])
                 if stage["stage"] == "token" and stage.get("mfu") is not None]
    best = max(token_mfu) if token_mfu else None
    lines.append(f"- token-stage MFU >= {MFU_TARGET:.0%}: {verdict(None if best is None else best[0] >= MFU_TARGET)}"
                 + (f" (best {100 * best[0]:.1f}%, {best[1]})" if best else " (no GPU report)"))

    waits = [(stage["data_wait_share"], f"{variant} {stage_label(stage)}") for variant, report in reports.items()
             for stage in report.get("stages", []) if stage.get("data_wait_share") is not None and stage.get("data", "cache") != "synthetic"]
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
    for variant, report in reports.items():
        for row in report.get("head_loss_memory", []):
            k = row["patch_size"]
            where = f"{variant}: {row['positions']:,} x {row['vocab']:,}, H {row['hidden_size']:,}"
            if row["vocab"] == 32000:
                lines.append(f"- fused head + loss <= 1/4 of the chunked path at 32,000: "
                             f"{verdict(row['fused_over_chunked'] <= FUSED_OVER_CHUNKED_TARGET)} ({where}: "
                             f"{row[f'fused_head_loss_k{k}_gib']:.2f} vs {row[f'chunked_head_loss_k{k}_gib']:.2f} GiB)")
            if row["vocab"] == 128256:
                lines.append(f"- fused head + loss <= 1/8 of stock at 128,256: "
                             f"{verdict(row['fused_over_stock'] <= FUSED_OVER_STOCK_TARGET)} ({where}: "
                             f"{row[f'fused_head_loss_k{k}_gib']:.2f} vs {row['stock_head_loss_gib']:.2f} GiB)")
    return lines


def fits(report: dict, card_gib: float) -> bool:
    """Whether every stage of `report` peaked within `CARD_FIT` of a card of `card_gib` GiB; a report without
    peak memory fits only a card of its own device's size (it ran there)."""
    peaks = [stage.get("peak_memory_gib") for stage in report.get("stages", [])]
    if not peaks:
        return False
    if any(peak is None for peak in peaks):
        return abs(report["device_memory_gib"] - card_gib) <= 0.05 * card_gib
    return max(peaks) <= CARD_FIT * card_gib


def best_variant_for_card(reports: dict[str, dict], card_gib: float) -> str | None:
    """The GPU report (variant) whose token stage has the best MFU among those that fit a card of `card_gib` GiB
    and whose micro-batch divides the 128 sequences per GPU of a paper step and is a multiple of K = 4; or None."""
    per_gpu = PAPER_TOKENS_PER_STEP // (PAPER_GPUS * PAPER_BLOCK)  # 128 sequences of 2,048 per GPU per step
    measured = [(stage["mfu"], variant) for variant, report in reports.items() for stage in report.get("stages", [])
                if stage["stage"] == "token" and stage.get("mfu") is not None and report.get("device_memory_gib")
                and per_gpu % report["settings"]["micro_batch"] == 0 and report["settings"]["micro_batch"] % 4 == 0
                and fits(report, card_gib)]
    return max(measured)[1] if measured else None


def write_gpu_configs(reports: dict[str, dict], folder: Path, paper_configs: Path) -> list[Path]:
    """The paper's 370M train configs (token and patch K=4 λ=2/3) for each card of `CARDS`, at the variant
    `best_variant_for_card` picks: per-device batch = its micro-batch, accumulation keeping 2M tokens per optimizer
    step on 8 GPUs, torch.compile on (by regions, `torch_compile_regions`, if that variant compiled so), and
    `loss_implementation` "unfused" if that variant's token stage trained unfused. None written for a card no
    GPU report fits."""
    per_gpu = PAPER_TOKENS_PER_STEP // (PAPER_GPUS * PAPER_BLOCK)
    written = []
    for card, card_gib in CARDS.items():
        variant = best_variant_for_card(reports, card_gib)
        if variant is None:
            continue
        report = reports[variant]
        micro_batch = report["settings"]["micro_batch"]
        token_stage = next(stage for stage in report["stages"] if stage["stage"] == "token")
        for name in ("llama-370m-token", "llama-370m-patch-k4-lambda0.67"):
            config = json.loads((paper_configs / f"{name}.json").read_text(encoding="utf-8"))
            config.update(per_device_train_batch_size=micro_batch, gradient_accumulation_steps=per_gpu // micro_batch,
                          torch_compile=True, output_dir=f"runs/{name}-{card}")
            if report["settings"].get("compile_regions"):
                config["torch_compile_regions"] = True
            if stage_loss_path(report, token_stage) == "unfused":
                config["loss_implementation"] = "unfused"
            path = folder / f"{name}-{card}.json"
            path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            written.append(path)
    return written


def summarize(paths: list[str]) -> str:
    reports = {Path(path).stem: json.loads(Path(path).read_text(encoding="utf-8")) for path in paths}
    first = next(iter(reports.values()))
    versions = ", ".join(f"{name} {version}" for name, version in first["versions"].items())
    header = [f"Device: {first['device']}; {versions}.", ""]
    return "\n".join(header + table_rows(reports) + [""] + target_lines(reports))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", help="JSON files written by throughput.py --output_json")
    parser.add_argument("--configs_dir", default=None,
                        help="write the GPU-sized 370M train configs (80gb, 141gb) of the best variant that fits each card here")
    args = parser.parse_args(argv)
    missing = [path for path in args.reports if not Path(path).is_file()]
    if missing:
        parser.error(f"no such report: {', '.join(missing)}")
    text = summarize(args.reports)
    if args.configs_dir:
        reports = {Path(path).stem: json.loads(Path(path).read_text(encoding="utf-8")) for path in args.reports}
        configs_root = Path(__file__).resolve().parents[1] / "configs" / "train"
        written = write_gpu_configs(reports, Path(args.configs_dir), configs_root)
        text += "\n\nGPU-sized train configs: " + (", ".join(str(p) for p in written) or "none (no GPU report)")
        for card, card_gib in CARDS.items():
            variant = best_variant_for_card(reports, card_gib)
            if variant:
                text += f"\n- {card}: {variant} (micro-batch {reports[variant]['settings']['micro_batch']})"
    print(text)
    return text


if __name__ == "__main__":
    main()
