"""The throughput table of docs/throughput.md from the JSON reports of `benchmarks/gpu_suite.sh` (throughput.py's,
fsdp_check.py's, the GPU tests'), checked against the targets. `gpu_suite.sh` runs it at the end; by hand:

    python benchmarks/summarize.py runs/throughput/*.json [--configs_dir DIR]

Each throughput report becomes one row per stage (variant = the file's name without `.json`; the loss column
says "fused (compiled)", "fused (eager)" or "unfused", as the stage trained). Then the targets, each marked
met / NOT met / not measured (a GPU-only number on a CPU report):
  - patch/token tokens-per-second ratio >= 3.9 at K = 4 (through our driver: the `token` and `patch` rows),
  - token-stage MFU >= 45% (the best `token` row over the variants), and >= 50% with the fused loss at 370M and
    vocabulary 32,000 (the best such row),
  - data wait < 2% of the step in every stage that reads real data,
  - the fused loss no slower than the stock head + chunked loss at the same micro-batch (step time within 1%) at
    vocabulary 32,000, and faster at 128,256: every pair of variants that differ only in the loss (the `-unfused`
    variant against the same name without it),
  - K-way loss peak memory <= stock transformers' causal-LM loss (reports that measured it),
  - fused head + loss peak memory <= 1/4 of the chunked path at vocab 32,000 and <= 1/8 of stock at 128,256,
    and, where timed (`headloss`), each path's milliseconds,
  - FSDP (fsdp.json): each version's two-stage job, kill and exact resume, and loading, with the backend used,
  - the GPU tests (gputests.json).
With --configs_dir, the paper's 370M train configs are written there for each card size (80gb: H100/A100 80 GB,
141gb: H200), at the variant whose token stage had the best MFU among those that fit the card (every stage's peak
memory within 90% of the card's) and whose settings a run_clm.py config can express (the 370M model at its own
vocabulary, SDPA's default backend, no Liger, the fused loss's default kernel): the same 2M tokens per optimizer
step on 8 GPUs, torch.compile on, compiled by regions and with the unfused loss where that variant was
(e.g. llama-370m-patch-k4-lambda0.67-80gb.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RATIO_TARGET = 3.9
MFU_TARGET = 0.45
FUSED_MFU_TARGET = 0.50  # token stage, the fused loss, 370M, vocabulary 32,000
FUSED_STEP_TOLERANCE = 1.01  # "no slower within noise": fused step time <= 1.01 x unfused at 32,000
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
            rows.append(f"| {name} | {stage_label(stage)} | {loss_label(report, stage)} "
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


def loss_label(report: dict, stage: dict) -> str:
    """`stage_loss_path`, with the fused loss's chunk kernel in brackets where the report records it."""
    path = stage_loss_path(report, stage)
    return f"{path} ({stage['fused_kernel']})" if path == "fused" and stage.get("fused_kernel") else path


def model_label(report: dict) -> str:
    """The model of a throughput report: "370M", "1.3B", ... from its config's file name, with the vocabulary where
    --vocab_size changed it (e.g. "370M, vocabulary 128,256")."""
    settings = report.get("settings", {})
    config = Path(settings.get("model_config", "")).stem
    name = config.removeprefix("llama-").upper() if config.startswith("llama-") else config or "?"
    vocab = settings.get("vocab_size")
    return f"{name}, vocabulary {vocab:,}" if vocab else name


def vocabulary(report: dict) -> int:
    """The vocabulary a throughput report's model had (--vocab_size, else the config's; 32,000 for the configs
    here, which all have LLaMA-2's)."""
    settings = report.get("settings", {})
    if settings.get("vocab_size"):
        return settings["vocab_size"]
    try:
        config_file = Path(settings.get("model_config", ""))
        if not config_file.is_absolute():
            config_file = Path(__file__).resolve().parents[1] / config_file
        return json.loads(config_file.read_text(encoding="utf-8"))["vocab_size"]
    except (OSError, KeyError, ValueError):
        return 32000


def is_paper_370m(report: dict) -> bool:
    """A throughput report of the paper's 370M model at its own vocabulary."""
    settings = report.get("settings", {})
    return settings.get("model_config", "").endswith("llama-370m.json") and not settings.get("vocab_size")


def expressible_in_run_clm(report: dict) -> bool:
    """Whether a run_clm.py train config can reproduce the report's settings: SDPA's default backend, no Liger,
    the fused loss's default kernel (run_clm.py has no switch for the others)."""
    settings = report.get("settings", {})
    return (settings.get("sdpa_backend", "default") == "default" and not settings.get("liger")
            and not settings.get("liger_layers") and settings.get("fused_loss_kernel", "auto") == "auto")


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "NOT met")


def target_lines(reports: dict[str, dict]) -> list[str]:
    """One line per target (module docstring), with the measured value and where it comes from."""
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
    fused_mfu = [(stage["mfu"], variant) for variant, report in reports.items() if is_paper_370m(report)
                 for stage in report.get("stages", [])
                 if stage["stage"] == "token" and stage.get("mfu") is not None and stage_loss_path(report, stage) == "fused"]
    if fused_mfu or token_mfu:
        best_fused = max(fused_mfu) if fused_mfu else None
        lines.append(f"- token-stage MFU >= {FUSED_MFU_TARGET:.0%} with the fused loss (370M, vocabulary 32,000): "
                     f"{verdict(None if best_fused is None else best_fused[0] >= FUSED_MFU_TARGET)}"
                     + (f" (best {100 * best_fused[0]:.1f}%, {best_fused[1]})" if best_fused else ""))

    waits = [(stage["data_wait_share"], f"{variant} {stage_label(stage)}") for variant, report in reports.items()
             for stage in report.get("stages", []) if stage.get("data_wait_share") is not None and stage.get("data", "cache") != "synthetic"]
    worst = max(waits) if waits else None
    lines.append(f"- data wait < {DATA_WAIT_TARGET:.0%} of the step: {verdict(None if worst is None else worst[0] < DATA_WAIT_TARGET)}"
                 + (f" (worst {100 * worst[0]:.2f}%, {worst[1]})" if worst else ""))

    lines += fused_against_unfused_lines(reports)
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
            if row.get("repeats") and any(ms is not None for ms in row.get("timings_ms", {}).values()):
                timed = ", ".join(f"{name} {ms:.1f} ms / {row['peaks_gib'][name]:.2f} GiB"
                                  for name, ms in row["timings_ms"].items())
                dtypes = "float32 weights, bf16 autocast" if row.get("autocast") else row["dtype"]
                lines.append(f"- head + loss forward + backward ({where}, {dtypes}, fused kernel "
                             f"{row.get('fused_kernel', '?')}, mean of {row['repeats']}): {timed}")
    for variant, report in reports.items():
        for version in report.get("fsdp", []):
            record = version["backend"][0] if version.get("backend") else {}
            failed = [name for name, ok in version["checks"].items() if not ok]
            weights = version.get("weights", {}).get("final_model") or {}
            lines.append(f"- FSDP{version['version']} ({version['config']}, one process on {report.get('device', '?')}): "
                         f"{verdict(version['passed'])}: trained with {record.get('wrapped_class', '?')} "
                         f"({record.get('process_group_backend', '?')}, loss {record.get('loss_path', '?')}); "
                         f"kill and resume: final weights {'bitwise equal' if weights.get('bitwise_equal') else 'differ'}"
                         + (f" (max difference {weights['max_abs_diff']:.3g})" if weights.get("max_abs_diff") else "")
                         + "; " + (f"failed checks: {', '.join(failed)}" if failed else "every check passed"))
        if "gputests" in report:
            tests = report["gputests"]
            ran = " passed" in tests["summary"] or " failed" in tests["summary"] or tests["exit_code"] not in (0, 5)
            lines.append(f"- GPU tests of the fused loss ({variant}): "
                         f"{verdict(tests['exit_code'] == 0 if ran else None)} ({tests['summary'].strip('= ')})")
    return lines


def stage_settings(report: dict) -> dict:
    """A throughput report's settings that define its measurement, without the loss's (for pairing variants)."""
    ignored = {"loss_implementation", "fused_loss_kernel", "output_json", "data_cache_dir"}
    return {key: value for key, value in report.get("settings", {}).items() if key not in ignored}


def fused_against_unfused_lines(reports: dict[str, dict]) -> list[str]:
    """One line per pair of reports that differ only in the loss (the fused one, with the default kernel, against
    --loss_implementation unfused): each stage's step time and peak memory, and the target, "no slower within 1%"
    at vocabulary 32,000 and "faster" at 128,256 (other vocabularies: no target)."""
    lines = []
    unfused = {variant: report for variant, report in reports.items()
               if report.get("settings", {}).get("loss_implementation") == "unfused" and report.get("stages")}
    for variant, report in reports.items():
        settings = report.get("settings", {})
        if (settings.get("loss_implementation", "auto") == "unfused" or not report.get("stages")
                or settings.get("fused_loss_kernel", "auto") != "auto"):
            continue
        partner = next((name for name, other in unfused.items() if stage_settings(other) == stage_settings(report)), None)
        if partner is None:
            continue
        vocab = vocabulary(report)
        other_stages = {stage["stage"]: stage for stage in reports[partner]["stages"]}
        for stage in report["stages"]:
            other = other_stages.get(stage["stage"])
            if other is None or stage_loss_path(report, stage) != "fused":
                continue
            ratio = stage["step_time_s"] / other["step_time_s"]
            ok = ratio <= FUSED_STEP_TOLERANCE if vocab == 32000 else ratio < 1 if vocab == 128256 else None
            goal = {32000: "no slower (<= 1% more)", 128256: "faster"}.get(vocab, "no target")
            memory = ""
            if stage.get("peak_memory_gib") is not None and other.get("peak_memory_gib") is not None:
                memory = f"; peak {stage['peak_memory_gib']:.1f} vs {other['peak_memory_gib']:.1f} GiB"
            if stage.get("final_loss") is not None and other.get("final_loss") is not None:  # same data and seed
                memory += f"; train loss {stage['final_loss']:.4f} vs {other['final_loss']:.4f}"
            lines.append(f"- fused loss {goal} than the stock head + chunked loss ({model_label(report)}, "
                         f"micro-batch {settings.get('micro_batch')}, {stage_label(stage)}): {verdict(ok)} "
                         f"({variant} {1000 * stage['step_time_s']:.1f} ms vs {partner} "
                         f"{1000 * other['step_time_s']:.1f} ms a step, {ratio:.3f}x{memory})")
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
                and fits(report, card_gib) and eligible_for_configs(report)]
    return max(measured)[1] if measured else None


def eligible_for_configs(report: dict) -> bool:
    """A report the 370M train configs may be written from: the 370M model at its own vocabulary (older reports
    name no other), both stages measured, settings a run_clm.py config can express."""
    settings = report.get("settings", {})
    stages = {stage["stage"] for stage in report.get("stages", [])}
    return ((not settings.get("model_config") or is_paper_370m(report)) and expressible_in_run_clm(report)
            and {"token", "patch"} <= stages)


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
    first = next((report for report in reports.values() if "versions" in report), {"device": "?", "versions": {}})
    versions = ", ".join(f"{name} {version}" for name, version in first["versions"].items())
    header = [f"Device: {first['device']}; {versions}.", ""]
    timed = {variant: report for variant, report in reports.items() if report.get("stages")}
    table = table_rows(timed) + [""] if timed else []
    return "\n".join(header + table + target_lines(reports))


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
        Path(args.configs_dir).mkdir(parents=True, exist_ok=True)
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
