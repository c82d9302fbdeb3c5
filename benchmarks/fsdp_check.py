#!/usr/bin/env python
"""The shipped FSDP setups run for real: a tiny two-stage job through `accelerate launch` with each FSDP config
(configs/accelerate/fsdp_8gpu.yaml, FSDP1; fsdp2_8gpu.yaml, FSDP2), on one process.

    python benchmarks/fsdp_check.py OUT_DIR [--work_dir DIR] [--versions 1 2] [--cpu] [--sequential]

For each version, three launches of the same job (tiny Llama, T = 32, K = 4, λ = 1/2, 12 steps, a checkpoint
every 4 steps; on a GPU in bf16, with eager attention so that the GPU's kernels are deterministic):
  1. reference: uninterrupted;
  2. killed: the process kills itself with SIGKILL at step 5 of the token stage (after its checkpoint-4;
     `benchmarks/fsdp_job.py`), so the patch stage, the handover and part of the token stage are done;
  3. resumed: the same command again in the killed run's folder, which resumes from that checkpoint.
Then it checks: the killed launch failed and left no results; the resumed one resumed the token stage (not the
patch stage) and ended; its patch-stage model and final model equal the reference's, tensor by tensor (bitwise
"exact", or the largest difference); the final checkpoint loads with stock `AutoModelForCausalLM` and
`pipeline("text-generation")` in a fresh process that cannot import this project, and generates; and the
backend each stage actually trained with (`fsdp_job.py`'s record: FSDP version, wrapped class, sharded
parameters, process-group backend, device, precision, loss, and all_results.json's `distributed`): FSDP of that
version. accelerate runs an FSDP config as FSDP only on GPUs (on a CPU it would train unsharded DDP), so run_clm.py
refuses FSDP without a GPU before writing anything: --cpu checks that refusal instead, in one launch. The launcher
config is the shipped file with one process (and, with --cpu, `use_cpu` and FSDP1's sync_module_states and
cpu_ram_efficient_loading off, which need a GPU); what changed is recorded. The reference and the killed run go side by side, and the versions too, unless
--sequential.

Writes OUT_DIR/fsdp.json (every check and record) and OUT_DIR/fsdp-v<N>/ (launcher configs, logs, backend
records); the runs themselves (checkpoints, models) go to WORK_DIR/fsdp-v<N>/ (default: OUT_DIR). Prints one line
per check; exit code 0 when every check passed, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {1: REPO_ROOT / "configs" / "accelerate" / "fsdp_8gpu.yaml", 2: REPO_ROOT / "configs" / "accelerate" / "fsdp2_8gpu.yaml"}
KILL_AT = "1:5"  # the token stage (K = 1), optimizer step 5: after checkpoint-4
JOB = [
    "configs/train/tiny-patch.json", "--block_size", "32", "--max_steps", "12", "--patch_data_fraction", "0.5",
    "--per_device_train_batch_size", "4", "--save_steps", "4", "--save_total_limit", "1", "--logging_steps", "1",
    "--warmup_steps", "2", "--eval_strategy", "no", "--max_eval_blocks", "4", "--dataloader_num_workers", "0",
    "--report_to", "none", "--disable_tqdm", "true",
]
# A fresh interpreter that loads a checkpoint with stock transformers only: the project must not be importable.
LOADER = r"""
import json, sys
sys.path = [p for p in sys.path if p not in ("", ".")]
from transformers import AutoModelForCausalLM, pipeline
folder = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(folder)
generator = pipeline("text-generation", model=folder, tokenizer=folder, device=-1)
text = generator("The history of", max_new_tokens=5, do_sample=False)[0]["generated_text"]
try:
    import modeling_llama_patch  # noqa: F401
    project = True
except ImportError:
    project = False
print("RESULT " + json.dumps({"class": type(model).__name__, "text": text, "project_importable": project}))
"""


def launch_config(version: int, cpu: bool, folder: Path) -> tuple[Path, list[str]]:
    """The shipped config of FSDP `version` for one process (and the CPU), written into `folder`; returns its
    path and the changes made, as "key: old -> new"."""
    import yaml

    config = yaml.safe_load(CONFIGS[version].read_text(encoding="utf-8"))
    changes = {"num_processes": 1}
    if cpu:
        changes["use_cpu"] = True
    fsdp_changes = {}
    if cpu:  # both gather or broadcast on the GPU: FSDP refuses them on the CPU
        fsdp_changes = {key: False for key in ("fsdp_sync_module_states", "fsdp_cpu_ram_efficient_loading")
                        if config["fsdp_config"].get(key)}
    described = [f"{key}: {config.get(key)} -> {value}" for key, value in changes.items() if config.get(key) != value]
    described += [f"fsdp_config.{key}: {config['fsdp_config'][key]} -> {value}" for key, value in fsdp_changes.items()]
    config.update(changes)
    config["fsdp_config"].update(fsdp_changes)
    path = folder / f"accelerate-fsdp{version}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path, described


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(config: Path, output_dir: Path, cache: Path, cpu: bool, log: Path, record: Path, kill: str | None) -> dict:
    """One `accelerate launch` of the job into `output_dir`; returns its exit code, wall time and log file."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--main_process_port", str(free_port()), str(REPO_ROOT / "benchmarks" / "fsdp_job.py"), *JOB,
               "--output_dir", str(output_dir), "--data_cache_dir", str(cache)]
    command += ["--use_cpu", "true"] if cpu else ["--bf16", "true", "--attn_implementation", "eager"]
    env = {**os.environ, "FSDP_CHECK_RECORD": str(record), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("FSDP_CHECK_KILL", None)
    if kill:
        env["FSDP_CHECK_KILL"] = kill
    if cpu:
        env.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False)
    return {"exit_code": done.returncode, "seconds": round(time.perf_counter() - start, 1), "log": str(log)}


def weights_difference(a: Path, b: Path) -> dict:
    """Tensor by tensor comparison of two `model.safetensors`: same names, bitwise equal, largest difference."""
    from safetensors.torch import load_file

    first, second = load_file(str(a)), load_file(str(b))
    if first.keys() != second.keys():
        return {"same_tensors": False, "bitwise_equal": False, "max_abs_diff": None}
    largest = max(float((first[name].double() - second[name].double()).abs().max()) for name in first)
    return {"same_tensors": True, "bitwise_equal": all(first[n].equal(second[n]) for n in first),
            "max_abs_diff": largest}


def load_with_stock_transformers(folder: Path) -> dict:
    """`LOADER` on `folder` in a fresh interpreter started outside the repository."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, "-c", LOADER, str(folder)], cwd=folder.parent, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0 or "RESULT " not in done.stdout:
        return {"loaded": False, "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return {"loaded": True, **json.loads(done.stdout.split("RESULT ", 1)[1])}


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []


def check_version(version: int, out: Path, work: Path, cpu: bool, parallel: bool) -> dict:
    """The three launches of one FSDP version and their checks (module docstring)."""
    folder = out / f"fsdp-v{version}"
    folder.mkdir(parents=True, exist_ok=True)
    config, changes = launch_config(version, cpu, folder)
    cache = work / "token_cache"
    runs = {name: work / f"fsdp-v{version}" / name for name in ("reference", "resumed")}

    def run(name: str, output: Path, kill: str | None = None) -> dict:
        return launch(config, output, cache, cpu, folder / f"{name}.log", folder / f"{name}.backend.jsonl", kill)

    if cpu:  # FSDP is refused without a GPU (accelerate would run it as unsharded DDP): check the refusal
        refused = run("refused", runs["reference"])
        log = Path(refused["log"]).read_text(encoding="utf-8", errors="replace")
        checks = {"refused_without_a_gpu": refused["exit_code"] != 0 and "run_clm.py: error: FSDP needs CUDA GPUs" in log
                  and log.count("run_clm.py: error:") == 1, "nothing_written": not runs["reference"].exists()}
        return {"version": version, "config": str(CONFIGS[version].relative_to(REPO_ROOT)), "config_changes": changes,
                "launches": {"refused": refused}, "checks": checks, "passed": all(checks.values()), "weights": {},
                "loading": {}, "backend": [], "results": {}}

    with ThreadPoolExecutor(max_workers=2 if parallel else 1) as pool:
        reference = pool.submit(run, "reference", runs["reference"])
        killed = pool.submit(run, "killed", runs["resumed"], KILL_AT)
        launches = {"reference": reference.result(), "killed": killed.result()}
    killed_left_results = (runs["resumed"] / "all_results.json").exists()
    launches["resumed"] = run("resumed", runs["resumed"])

    results = {}
    for name, path in runs.items():
        results_file = path / "all_results.json"
        results[name] = json.loads(results_file.read_text(encoding="utf-8")) if results_file.is_file() else None
    killed_log = Path(launches["killed"]["log"]).read_text(encoding="utf-8", errors="replace")
    checks = {
        "reference_finished": launches["reference"]["exit_code"] == 0 and results["reference"] is not None,
        "killed_by_sigkill": launches["killed"]["exit_code"] != 0 and "fsdp_job: killing this process" in killed_log,
        "killed_left_no_results": not killed_left_results,
        "resumed_finished": launches["resumed"]["exit_code"] == 0 and results["resumed"] is not None,
    }
    resumed = results["resumed"] or {}
    token_stage, patch_stage = resumed.get("token_stage") or {}, resumed.get("patch_stage") or {}
    checks["resumed_the_token_stage"] = str(token_stage.get("resumed_from") or "").endswith("checkpoint-4")
    checks["patch_stage_not_rerun"] = patch_stage.get("resumed_from") is None and bool(patch_stage)
    comparisons = {}
    if checks["reference_finished"] and checks["resumed_finished"]:
        for part, relative in (("patch_stage_model", "patch_stage/model.safetensors"), ("final_model", "model.safetensors")):
            comparisons[part] = weights_difference(runs["reference"] / relative, runs["resumed"] / relative)
        checks["exact_resume"] = all(c["bitwise_equal"] for c in comparisons.values())
        checks["same_train_loss"] = all(
            (results["reference"].get(stage) or {}).get("train_loss") == (resumed.get(stage) or {}).get("train_loss")
            for stage in ("patch_stage", "token_stage"))
        loading = load_with_stock_transformers(runs["resumed"])
        checks["loads_with_stock_transformers"] = loading.get("loaded", False) and not loading.get("project_importable")
    else:
        loading = {"loaded": False, "error": "no finished run to load"}
        checks.update(exact_resume=False, same_train_loss=False, loads_with_stock_transformers=False)
    records = read_records(folder / "reference.backend.jsonl")
    checks["backend_recorded_for_both_stages"] = [r["stage_patch_size"] for r in records] == [4, 1]
    sharded = "fsdp1_modules" if version == 1 else "dtensor_parameters"
    checks[f"trained_with_fsdp{version}"] = bool(records) and all(
        r["is_fsdp_enabled"] and r["fsdp_version"] == version and r[sharded] > 0 and r["world_size"] == 1
        for r in records)
    distributed = (resumed.get("token_stage") or {}).get("distributed") or {}
    checks["results_record_fsdp"] = distributed.get("backend") == "FSDP" and distributed.get("fsdp_version") == version
    return {"version": version, "config": str(CONFIGS[version].relative_to(REPO_ROOT)), "config_changes": changes,
            "launches": launches, "checks": checks, "passed": all(checks.values()), "weights": comparisons,
            "loading": loading, "backend": records,
            "results": {name: {stage: {key: (value or {}).get(key) for key in ("steps", "train_loss", "resumed_from")}
                               for stage, value in ((s, (r or {}).get(s)) for s in ("patch_stage", "token_stage"))}
                        for name, r in results.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder for fsdp.json, the launcher configs and the logs")
    parser.add_argument("--work_dir", default=None, help="folder for the runs (checkpoints, models); default: out_dir")
    parser.add_argument("--versions", type=int, nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS))
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (gloo), the tests' setting")
    parser.add_argument("--sequential", action="store_true", help="one launch at a time (default: side by side)")
    args = parser.parse_args(argv)
    import torch

    cpu = args.cpu or not torch.cuda.is_available()
    out = Path(args.out_dir)
    work = Path(args.work_dir) if args.work_dir else out
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    parallel = not args.sequential
    with ThreadPoolExecutor(max_workers=len(args.versions) if parallel else 1) as pool:
        futures = [pool.submit(check_version, version, out, work, cpu, parallel) for version in args.versions]
        versions = [future.result() for future in futures]
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from throughput import versions as environment

    report = {"device": torch.cuda.get_device_name() if not cpu else "cpu", "versions": environment(),
              "seconds": round(time.perf_counter() - start, 1), "passed": all(v["passed"] for v in versions),
              "fsdp": versions}
    (out / "fsdp.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for version in versions:
        backend = version["backend"][0] if version["backend"] else {}
        print(f"fsdp_check: FSDP{version['version']} ({version['config']}, {', '.join(version['config_changes'])}): "
              f"{'passed' if version['passed'] else 'FAILED'}; trained with {backend.get('wrapped_class', '?')} on "
              f"{backend.get('device', '?')} ({backend.get('process_group_backend', '?')}), loss "
              f"{backend.get('loss_path', '?')}")
        for name, ok in version["checks"].items():
            print(f"  {name}: {'yes' if ok else 'NO'}")
    print(f"fsdp_check: {report['seconds']} s; {out / 'fsdp.json'}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
