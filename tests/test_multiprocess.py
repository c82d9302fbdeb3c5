"""Two processes on CPU through the launchers in scripts/: the tiny two-stage job under DDP (accelerate,
gloo), DeepSpeed ZeRO-2 (eager and with --torch_compile) and DeepSpeed ZeRO-3 (the `deepspeed` launcher).

Each run trains K = 4, λ = 2/3 for 6 steps of budget (4 patch steps, then 2 token steps) and must:
finish; train with exactly 2 ranks; change the weights in the patch stage and again in the token stage,
which starts from the patch stage's saved model; save a final model that stock transformers loads and
generates with. The patch stage learns at 3e-3 and the token stage at 1e-5, so "the token stage starts from
the patch-stage model" shows as: final weights within 1e-3 of the patch stage's, yet not equal to them.
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

STEPS, BATCH, WORLD, BLOCK, K = 6, 4, 2, 32, 4
TINY_RUN = [
    "configs/train/tiny-patch.json",
    "--block_size", str(BLOCK), "--max_steps", str(STEPS), "--per_device_train_batch_size", str(BATCH),
    "--max_eval_blocks", "4", "--eval_strategy", "no", "--save_steps", "2", "--logging_steps", "1",
    "--warmup_steps", "0", "--patch_learning_rate", "3e-3", "--learning_rate", "1e-5",
    "--dataloader_num_workers", "0",
]
SHIM = REPO_ROOT / "tests" / "deepspeed_on_cpu"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    """One token cache for the module's runs (the first run tokenises, the others read it)."""
    return tmp_path_factory.mktemp("token_cache")


def launch(script: str, out: Path, cache: Path, *flags: str, run: list[str] = TINY_RUN, **env: str) -> dict:
    """Run scripts/<script> with 2 processes (the job `run`, then `flags`); return all_results.json (the log is in
    the failure message)."""
    values = {
        **os.environ, "NGPU": str(WORLD), "MASTER_PORT": str(free_port()), "PYTHON": sys.executable,
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env,
    }
    values["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{values.get('PATH', '')}"  # accelerate, deepspeed
    command = [str(REPO_ROOT / "scripts" / script), *run, "--output_dir", str(out), "--data_cache_dir", str(cache), *flags]
    result = subprocess.run(command, capture_output=True, text=True, env=values, cwd=REPO_ROOT, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert "[run_clm] done" in launcher_log(out), "the launcher keeps the log beside the run"
    return json.loads((out / "all_results.json").read_text())


def launcher_log(out: Path) -> str:
    """The launcher's log of the run in `out`: exactly one, beside the run folder."""
    logs = list(Path(f"{out}.logs").glob("node0-*.log"))
    assert len(logs) == 1, logs
    return logs[0].read_text()


def check_two_ranks_and_both_stages(results: dict, out: Path) -> None:
    assert results["budget_tokens"] == STEPS * BATCH * WORLD * BLOCK, "run_clm.py saw a world size of 2"
    assert (results["patch_stage"]["steps"], results["token_stage"]["steps"]) == (4, 2)
    for stage in ("patch_stage", "token_stage"):
        assert results[stage]["world_size"] == WORLD
        assert results[stage]["tokens_per_step"] == BATCH * WORLD * BLOCK, "the same tokens per step in both stages"
    for stage in (out / "patch_stage", out):
        checkpoints = sorted(stage.glob("checkpoint-*"))
        assert checkpoints, f"no checkpoint in {stage}"
        rng_states = sorted(path.name for path in checkpoints[-1].glob("rng_state*.pth"))
        assert rng_states == ["rng_state_0.pth", "rng_state_1.pth"], "exactly 2 processes saved their state"


def check_weights(out: Path) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    config = LlamaConfig.from_pretrained(str(REPO_ROOT / "configs" / "model" / "llama-tiny.json"))
    patch = load_file(str(out / "patch_stage" / "model.safetensors"))
    final = load_file(str(out / "model.safetensors"))
    assert set(patch) == set(final)
    # Full, consolidated tensors (ZeRO-3 keeps only a shard per rank: a partitioned save would show it).
    assert patch["model.embed_tokens.weight"].shape == (config.vocab_size, config.hidden_size)
    assert patch["lm_head.weight"].shape == (config.vocab_size, config.hidden_size)
    assert patch["model.layers.1.mlp.down_proj.weight"].shape == (config.hidden_size, config.intermediate_size)
    assert sum(1 for name in patch if name.startswith("model.layers.")) == 9 * config.num_hidden_layers
    # The patch stage trained: RMSNorm weights start at exactly 1.
    norms = [name for name in patch if name.endswith("norm.weight")]
    assert all(not torch.equal(patch[name], torch.ones_like(patch[name])) for name in norms)
    # The token stage trained, from the patch-stage model.
    changed = [name for name in patch if not torch.equal(patch[name], final[name])]
    assert len(changed) > len(patch) // 2, f"the token stage changed only {changed}"
    largest = max((patch[name].float() - final[name].float()).abs().max().item() for name in patch)
    assert largest < 1e-3, f"the token stage did not start from the patch-stage model (max change {largest})"


def check_stock_model(out: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM, pipeline

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config.get("patch_size", 1) == 1
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(model) is LlamaForCausalLM
    generator = pipeline("text-generation", model=str(out), device="cpu")
    text = generator("The meaning of life is", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("The meaning of life is") and len(text) > len("The meaning of life is")


def test_ddp_two_processes_with_accelerate(tmp_path, data_cache):
    # cpu_ddp_2proc.yaml starts 2 processes; an explicit --use_cpu true still works (the config alone: below).
    out = tmp_path / "ddp"
    results = launch(
        "launch_accelerate.sh", out, data_cache, "--use_cpu", "true", "--max_eval_blocks", "5",
        "--per_device_eval_batch_size", "2", ACCELERATE_CONFIG="configs/accelerate/cpu_ddp_2proc.yaml",
    )
    check_two_ranks_and_both_stages(results, out)
    check_weights(out)
    check_stock_model(out)
    # 5 validation blocks on 2 ranks x 2: the perplexity is the model's over each block once, as eval_perplexity.py
    # computes it in one process (before, accelerate's repeated blocks were scored: 8,724.8 against 8,804.1).
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import eval_perplexity

    for folder, stage in ((out, "token_stage"), (out / "patch_stage", "patch_stage")):
        independent = eval_perplexity.main(["--model", str(folder), "--tokenizer", str(REPO_ROOT / "data" / "llama2_tokenizer"),
                                            "--block_size", str(BLOCK), "--max_blocks", "5", "--device", "cpu", "--no_progress"])
        assert results[stage]["eval_perplexity"] == pytest.approx(independent["perplexity"], rel=1e-5), stage
    # The logged per-offset losses are the mean over both ranks, as patch_loss is: they average to it (before,
    # rank 0's alone: 10.2056 against 10.1588).
    logged = [e for e in json.loads((out / "patch_stage" / "trainer_state.json").read_text())["log_history"]
              if "offset_1_loss" in e]
    assert logged
    for entry in logged:
        offsets = [entry[f"offset_{k}_loss"] for k in range(1, K + 1)]
        assert sum(offsets) / K == pytest.approx(entry["patch_loss"], abs=2e-4), entry
    assert "fused LM-head loss" not in launcher_log(out), "DDP trains with the fused LM-head loss (no fallback said)"


def test_ddp_continued_switch_carries_the_optimizer_state(tmp_path, data_cache):
    """--patch_switch continue under 2-process DDP: the token stage's checkpoint holds AdamW steps counted over
    both stages (4 patch + 2 token), and the learning rates of both stages are one cosine schedule over 6 steps."""
    import math

    import torch

    out = tmp_path / "ddp-continue"
    run = [value for index, value in enumerate(TINY_RUN)
           if "--patch_learning_rate" not in TINY_RUN[max(index - 1, 0): index + 1]]  # one schedule: one rate
    results = launch("launch_accelerate.sh", out, data_cache, "--use_cpu", "true", "--patch_switch", "continue",
                     "--learning_rate", "3e-3", run=run, ACCELERATE_CONFIG="configs/accelerate/cpu_ddp_2proc.yaml")
    check_two_ranks_and_both_stages(results, out)
    assert results["schedule_steps"] == STEPS
    optimizer = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=False)
    assert {float(state["step"]) for state in optimizer["state"].values()} == {6.0}
    rates = []
    for folder in (out / "patch_stage", out):
        history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
        rates += [entry["learning_rate"] for entry in history if "learning_rate" in entry]
    expected = [3e-3 * 0.5 * (1 + math.cos(math.pi * j / STEPS)) for j in range(STEPS)]
    assert rates == pytest.approx(expected, rel=1e-6)


def launch_deepspeed(out: Path, cache: Path, zero_config: str, *flags: str, **env: str) -> dict:
    """launch() through launch_deepspeed.sh with configs/deepspeed/<zero_config>, on CPU (the shim)."""
    pytest.importorskip("deepspeed")
    return launch("launch_deepspeed.sh", out, cache, *flags,
                  DS_CONFIG=f"configs/deepspeed/{zero_config}", PYTHONPATH=str(SHIM), **env)


def test_deepspeed_zero2_two_processes(tmp_path, data_cache):
    out = tmp_path / "zero2"
    results = launch_deepspeed(out, data_cache, "zero2.json")
    check_two_ranks_and_both_stages(results, out)
    step = next((out / "checkpoint-2").glob("global_step*"))
    names = sorted(path.name for path in step.iterdir())
    assert names == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                     "zero_pp_rank_1_mp_rank_00_optim_states.pt"], "ZeRO-2: the optimizer state sharded over 2 ranks"
    check_weights(out)
    check_stock_model(out)
    assert "fused LM-head loss" not in launcher_log(out), "ZeRO-2 trains with the fused LM-head loss (no fallback said)"


@pytest.mark.parametrize("regions", [False, True], ids=["whole_model", "regions"])
def test_deepspeed_zero2_with_torch_compile(tmp_path, data_cache, regions):
    """--torch_compile under DeepSpeed (accelerate hands the model to DeepSpeed's engine.compile; by regions,
    `compile_regions_deepspeed` compiles each layer in place): both stages train, the handover and the stage saves
    see the compiled module's parameters, the model is stock. The backend is aot_eager: dynamo's graphs and AOT
    autograd as with Inductor, without Inductor's C++ code generation (a minute on 2 cores; tests/test_run_clm.py
    and tests/test_compile.py train with Inductor itself)."""
    out = tmp_path / "zero2_compiled"
    flags = ("--torch_compile", "true", "--torch_compile_backend", "aot_eager") + (
        ("--torch_compile_regions", "true") if regions else ())
    results = launch_deepspeed(out, data_cache, "zero2.json", *flags, TORCH_LOGS="dynamo")
    log = launcher_log(out)
    assert "torchdynamo start tracing forward" in log and "done compiler function aot_eager" in log, "nothing compiled"
    # by regions, dynamo starts at a decoder layer's forward, never at the whole model's (modeling_llama_patch.py)
    assert ("modeling_llama_patch.py" in log.split("torchdynamo start tracing forward", 1)[1].splitlines()[0]) is not regions
    assert "recompile_limit" not in log, "dynamo gave up and ran part of the model eagerly"
    check_two_ranks_and_both_stages(results, out)
    check_weights(out)
    check_stock_model(out)


def test_deepspeed_zero3_saves_a_consolidated_patch_model(tmp_path, data_cache):
    out = tmp_path / "zero3"
    results = launch_deepspeed(out, data_cache, "zero3.json")
    check_two_ranks_and_both_stages(results, out)
    step = next((out / "patch_stage" / "checkpoint-4").glob("global_step*"))
    names = {path.name for path in step.iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"} <= names, (
        "ZeRO-3: the parameters themselves sharded over 2 ranks"
    )
    check_weights(out)  # yet patch_stage/model.safetensors holds every tensor whole, and the token stage read it
    check_stock_model(out)
    # ZeRO-3 gathers the head's weight only inside the head's own forward: the stock head, said in one line
    assert "fused LM-head loss: the head's weight is partitioned (DeepSpeed ZeRO-3)" in launcher_log(out)


def test_a_finished_run_ends_its_process_group(tmp_path):
    """run_cli destroys the process group once its entry point has finished (all ranks wait first). Left to
    interpreter exit, gloo's threads sometimes aborted rank 1 of test_ddp_two_processes_with_accelerate under
    torch 2.11 ("terminate called without an active exception", 1 run in 8 on a loaded 2-core machine)."""
    import torch.distributed as dist

    from patch_training.cli import run_cli

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        run_cli(lambda: None, "test")
        assert not dist.is_initialized()
        run_cli(lambda: None, "test")  # no process group: nothing to end
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def processes_naming(text: str) -> list[int]:
    """The PIDs of the processes whose command line holds `text` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")
def test_a_signal_to_the_launcher_stops_the_job(tmp_path, data_cache):
    """SIGTERM to the launcher's PID (`kill PID`, a scheduler's stop) killed only the launcher's shell: torchrun,
    tee and both ranks were re-parented and trained on to the end, holding the output folder. The launcher now
    becomes torchrun (exec), which stops its ranks."""
    import signal
    import time

    out = tmp_path / "signalled"
    values = {**os.environ, "NGPU": str(WORLD), "MASTER_PORT": str(free_port()), "PYTHON": sys.executable,
              "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    values["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{values.get('PATH', '')}"
    command = [str(REPO_ROOT / "scripts" / "launch_torchrun.sh"), *TINY_RUN, "--max_steps", "100000", "--save_steps", "1",
               "--use_cpu", "true", "--output_dir", str(out), "--data_cache_dir", str(data_cache)]
    launcher = subprocess.Popen(command, env=values, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not list((out / "patch_stage").glob("checkpoint-*/trainer_state.json")):
            assert launcher.poll() is None and time.time() < deadline, "the job ended or never saved a checkpoint"
            time.sleep(0.5)
        launcher.send_signal(signal.SIGTERM)  # the launcher's PID only, not its process group
        launcher.wait(timeout=120)
        deadline = time.time() + 60
        while processes_naming(str(out)) and time.time() < deadline:
            time.sleep(0.5)
        assert not processes_naming(str(out)), "ranks of the job still run after the launcher was stopped"
    finally:
        for pid in processes_naming(str(out)):
            os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()


def accelerate_launch(out: Path, cache: Path, *flags: str) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/cpu_ddp_2proc.yaml run_clm.py configs/train/tiny-patch.json`
    as a user types it (no --use_cpu), with the tiny run's overrides, then `flags`."""
    values = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    values.pop("ACCELERATE_USE_CPU", None)
    values["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{values.get('PATH', '')}"
    command = ["accelerate", "launch", "--config_file", "configs/accelerate/cpu_ddp_2proc.yaml",
               "--main_process_port", str(free_port()), "run_clm.py", *TINY_RUN, "--output_dir", str(out),
               "--data_cache_dir", str(cache), "--disable_tqdm", "true", *flags]
    return subprocess.run(command, capture_output=True, text=True, env=values, cwd=REPO_ROOT, timeout=600, check=False)


OUR_FRAMES = re.compile(r'File "[^"]*(run_clm\.py|patch_training/|modeling_llama_patch\.py)"')


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU launch config on a machine without a GPU")
def test_the_cpu_launch_config_is_enough_by_itself(tmp_path, data_cache):
    """cpu_ddp_2proc.yaml says use_cpu: true, but accelerate passes it on only to launches it runs itself, not to the
    torchrun it starts for 2 processes, where each process would train alone (world size 1) unless --use_cpu true
    were given too (patch_training/launch.py). With the config alone the two processes form one job on the CPU:
    world size 2 in both stages, each line printed once (rank 0)."""
    out = tmp_path / "config_alone"
    done = accelerate_launch(out, data_cache)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    results = json.loads((out / "all_results.json").read_text())
    check_two_ranks_and_both_stages(results, out)
    for line in ("patch stage (1 of 2, K = 4) starts:", "token stage (2 of 2, K = 1) done:", "[run_clm] done"):
        assert log.count(line) == 1, line
    assert not OUR_FRAMES.search(log) and "accelerator to CPU" not in log


@pytest.mark.parametrize("flags, message", [
    (("--learning_rate", "-1"), "run_clm.py: error: --learning_rate must be >= 0, got -1.0"),  # refused while parsing
    (("--train_file", "missing.jsonl"), "run_clm.py: error: --train_file"),  # refused once the processes are a group
])
def test_a_refusal_under_the_launcher_is_one_line_from_rank_0(tmp_path, data_cache, flags, message):
    """Bad input under `accelerate launch` with 2 processes: a non-zero exit, the one line printed once (both ranks
    meet the error; rank 0 says it), no traceback from this project's code (the launcher's own report of a failed
    child is torchrun's), and no output folder."""
    out = tmp_path / "refused"
    done = accelerate_launch(out, data_cache, *flags)
    log = done.stdout + done.stderr
    assert done.returncode != 0
    assert len([line for line in log.splitlines() if line.startswith(message)]) == 1, log[-4000:]
    assert not OUR_FRAMES.search(log), log[-4000:]
    assert not out.exists()


def rank_of(pid: int) -> int | None:
    """The RANK a launcher gave the process `pid` (from its environment in /proc), or None."""
    try:
        variables = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [v.split(b"=", 1)[1] for v in variables if v.startswith(b"RANK=")]
    return int(ranks[0]) if ranks else None


def test_a_preemption_signal_to_one_rank_stops_every_rank_at_one_step(tmp_path, data_cache):
    """SIGTERM to rank 1 alone (a node's processes signalled before the others): both ranks stop at the same step
    boundary, each saves its part of one complete checkpoint, rank 0 says so in one line, the stage is not marked
    complete, and the same command run again ends with the uninterrupted run's weights."""
    import signal
    import time

    from safetensors.torch import load_file

    run = [*TINY_RUN, "--max_steps", "24", "--use_cpu", "true"]  # 16 patch steps, then 8 token steps
    reference = tmp_path / "reference"
    launch("launch_torchrun.sh", reference, data_cache, run=run)
    out = tmp_path / "preempted"
    values = {**os.environ, "NGPU": str(WORLD), "MASTER_PORT": str(free_port()), "PYTHON": sys.executable,
              "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "LOG_DIR": str(tmp_path / "first-attempt.logs")}
    values["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{values.get('PATH', '')}"
    command = [str(REPO_ROOT / "scripts" / "launch_torchrun.sh"), *run, "--output_dir", str(out),
               "--data_cache_dir", str(data_cache)]
    launcher = subprocess.Popen(command, env=values, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    try:
        deadline = time.time() + 300
        while not list((out / "patch_stage").glob("checkpoint-*/trainer_state.json")):
            assert launcher.poll() is None and time.time() < deadline, "the job ended or never saved a checkpoint"
            time.sleep(0.1)
        (rank_1,) = [pid for pid in processes_naming(str(out)) if rank_of(pid) == 1 and "run_clm.py" in
                     (Path("/proc") / str(pid) / "cmdline").read_text(errors="replace")]
        os.kill(rank_1, signal.SIGTERM)
        log = launcher.communicate(timeout=300)[0]
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0, log[-3000:]
    assert "run_clm.py: preempted (a preemption signal to another rank): its state is saved (the patch stage at step" in log
    assert log.count("run_clm.py: preempted") == 1, "only rank 0 prints the line"
    assert not (out / "patch_stage" / "stage_complete.json").exists()
    newest = max((out / "patch_stage").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert int(newest.name.split("-")[1]) < 16 and (newest / "trainer_state.json").is_file()
    assert sorted(p.name for p in newest.glob("rng_state*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    launch("launch_torchrun.sh", out, data_cache, run=run)
    final, expected = load_file(str(out / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert max((final[k] - expected[k]).abs().max().item() for k in expected) < 1e-5
