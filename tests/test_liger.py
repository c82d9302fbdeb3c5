"""`--use_liger_kernel`: Liger-Kernel's fused linear cross-entropy replaces the model's whole forward with a
token-level one, which in the patch stage would train on the K*T tokens as tokens (no patching, wrong loss)
without any error. run_clm turns Liger's loss kernels off at K > 1 and refuses the flag where it cannot run.

Liger's kernels are Triton GPU code: on CPU the tests check the configuration and apply the real Liger
patching (in a subprocess, as Liger also patches transformers' Llama module globally) without running it;
on a CUDA machine with liger-kernel, a tiny two-stage job with Liger is compared with one without.
"""

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO_ROOT
from test_run_clm import job_args

import run_clm
from patch_training.cli import UsageError
from patch_training.liger import liger_config_for_stage

LIGER_INSTALLED = importlib.util.find_spec("liger_kernel") is not None and importlib.util.find_spec("triton") is not None


def test_liger_loss_kernels_are_off_in_the_patch_stage():
    assert liger_config_for_stage(None, 1) is None  # token stage: Liger's defaults, its fused loss included
    assert liger_config_for_stage({"rope": False}, 1) == {"rope": False}
    assert liger_config_for_stage(None, 4) == {"cross_entropy": False, "fused_linear_cross_entropy": False}
    assert liger_config_for_stage({"rope": False, "fused_linear_cross_entropy": True}, 2) == {
        "rope": False, "cross_entropy": False, "fused_linear_cross_entropy": False}


@pytest.mark.parametrize(
    "config, message",
    [
        ('{"ropes": false}', r"unknown keys for any model: ropes \(known: .*rms_norm.*rope"),
        ('{"rope": 1}', r"rope must be true or false"),
        ('{"cross_entropy": true}', r"cross_entropy and fused_linear_cross_entropy cannot both be true"),
        ('[1]', r"must be a JSON object"),
        ("{bad", r"--liger_kernel_config is not valid JSON"),
    ],
)
def test_bad_liger_kernel_config_is_refused(workdir, tmp_path, config, message):
    argv = job_args(workdir, tmp_path / "job", use_liger_kernel=True, liger_kernel_config=config)
    with pytest.raises(UsageError, match=message):
        run_clm.parse_arguments(argv)


def test_liger_kernel_config_from_the_command_line_and_json(workdir, tmp_path):
    """transformers' own parser rejects any value of this dict field on the command line; ours takes JSON."""
    argv = job_args(workdir, tmp_path / "job", use_liger_kernel=True, liger_kernel_config='{"rope": false}')
    assert run_clm.parse_arguments(argv)[3].liger_kernel_config == {"rope": False}
    config_file = tmp_path / "job.json"
    config_file.write_text(json.dumps({"output_dir": str(tmp_path / "o"), "config_name": "x", "train_file": "t.jsonl",
                                       "use_liger_kernel": True, "liger_kernel_config": {"swiglu": False}}))
    assert run_clm.parse_arguments([str(config_file)])[3].liger_kernel_config == {"swiglu": False}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_use_liger_kernel_without_gpu_is_refused(workdir, tmp_path):
    """Without a GPU, Liger's Triton kernels would fail deep inside Triton at the first step."""
    output_dir = tmp_path / "job"
    done = subprocess.run([sys.executable, str(REPO_ROOT / "run_clm.py"),
                           *job_args(workdir, output_dir, use_liger_kernel=True)],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 2
    assert "--use_liger_kernel needs a CUDA (or ROCm) GPU" in done.stderr and "Traceback" not in done.stderr
    assert not output_dir.exists()


# Builds each stage's TrainingArguments as run_clm.main does, and applies Liger to that stage's model with
# the function Trainer.train() calls. Prints what each model's forward and modules became.
APPLY_LIGER_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {repo!r})
    from transformers.integrations.liger import apply_liger_kernel
    from conftest import tiny_llama_config
    import run_clm
    from patch_training.stages import StagePlan, stage_training_args
    from modeling_llama_patch import PatchLlamaForCausalLM

    _, _, patch_args, training_args = run_clm.parse_arguments({argv!r})

    def patched(patch_size, liger_config):
        config = tiny_llama_config()
        config.patch_size = patch_size
        model = PatchLlamaForCausalLM(config)
        apply_liger_kernel(model, liger_config)
        return {{"our_forward": model.forward.__func__ is PatchLlamaForCausalLM.forward,
                 "mlp": model.model.layers[0].mlp._get_name(),
                 "norm": model.model.norm.forward.__func__.__qualname__}}

    found = {{}}
    for name, patch_size in (("patch", 4), ("token", 1)):
        plan = StagePlan(name, patch_size, 32 * patch_size, 0, 0, 0)
        args = stage_training_args(training_args, patch_args, plan, "unused", -1)
        found[name] = patched(patch_size, args.liger_kernel_config)
    found["patch_stage_with_liger_defaults"] = patched(4, training_args.liger_kernel_config)
    print(json.dumps(found))
""")


@pytest.mark.skipif(not LIGER_INSTALLED, reason="needs liger-kernel (and triton) installed")
def test_patch_stage_keeps_its_forward_and_loss_under_liger(workdir, tmp_path):
    argv = job_args(workdir, tmp_path / "job", use_liger_kernel=True)
    script = APPLY_LIGER_SCRIPT.format(repo=str(REPO_ROOT), argv=argv)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO_ROOT / "tests", check=True)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    # Patch stage: Liger's SwiGLU and RMSNorm kernels, our forward (patching and K-way loss).
    assert found["patch"] == {"our_forward": True, "mlp": "LigerSwiGLUMLP", "norm": "LigerRMSNorm.forward"}
    # Token stage: Liger's fused linear cross-entropy forward too (the token-level loss it computes is ours at K=1).
    assert found["token"] == {"our_forward": False, "mlp": "LigerSwiGLUMLP", "norm": "LigerRMSNorm.forward"}
    # The reference: what transformers' Trainer alone would have done to the patch stage.
    assert found["patch_stage_with_liger_defaults"]["our_forward"] is False


@pytest.mark.skipif(not (torch.cuda.is_available() and LIGER_INSTALLED), reason="needs a CUDA GPU and liger-kernel")
def test_two_stage_job_with_liger_matches_without_on_gpu(workdir, tmp_path):
    """Both stages with Liger give the losses of the job without it (float32, so only kernel rounding differs)."""
    histories = {}
    for name, extra in (("stock", {}), ("liger", {"use_liger_kernel": True})):
        output_dir = tmp_path / name
        subprocess.run([sys.executable, str(REPO_ROOT / "run_clm.py"), *job_args(workdir, output_dir, **extra)],
                       check=True, cwd=REPO_ROOT)
        histories[name] = {
            stage: [entry for entry in json.loads((output_dir / folder / "trainer_state.json").read_text())["log_history"]
                    if "loss" in entry or "patch_loss" in entry]
            for stage, folder in (("patch", "patch_stage"), ("token", "."))
        }
    for stage in ("patch", "token"):
        key = "patch_loss" if stage == "patch" else "loss"
        stock = [entry[key] for entry in histories["stock"][stage]]
        liger = [entry[key] for entry in histories["liger"][stage]]
        assert len(stock) == len(liger) > 0
        assert liger == pytest.approx(stock, rel=2e-3), stage
    assert histories["liger"]["patch"][0]["offset_1_loss"] == pytest.approx(histories["stock"]["patch"][0]["offset_1_loss"], rel=2e-3)
