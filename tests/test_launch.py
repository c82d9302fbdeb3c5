"""What the launcher says, read by run_clm.py (patch_training/launch.py), and DeepSpeed imported only by a run that
uses it (patch_training/lazy_deepspeed.py). The 2-process launches themselves are in tests/test_multiprocess.py
(test_the_cpu_launch_config_is_enough_by_itself)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

from patch_training import launch


@pytest.mark.parametrize("value, expected", [("true", True), ("True", True), ("1", True), ("yes", True),
                                             ("false", False), ("0", False), ("", False)])
def test_accelerate_s_cpu_switch_is_read(monkeypatch, value, expected):
    """ACCELERATE_USE_CPU, which `accelerate launch --cpu` and a one-process config's use_cpu set, read as accelerate
    reads it."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", value)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launch.launched_on_cpu() is expected


@pytest.mark.parametrize("world_size", ["2", "8"])
def test_several_processes_without_an_accelerator_are_a_cpu_job(monkeypatch, world_size):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setenv("WORLD_SIZE", world_size)
    assert launch.launched_on_cpu() is (not torch.accelerator.is_available())


def test_a_deepspeed_run_is_left_to_deepspeed(monkeypatch):
    """DeepSpeed joins its processes itself (its CPU accelerator on a CPU machine): use_cpu would take the run off
    DeepSpeed's process group (ZeRO-3's partitioned init then saw one rank: tests/test_multiprocess.py)."""
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch.launched_on_cpu(deepspeed=True) is False


@pytest.mark.parametrize("world_size", ["1", "x", None])
def test_one_process_keeps_its_setting(monkeypatch, world_size):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    assert launch.launched_on_cpu() is False


def test_the_training_arguments_take_the_launcher_s_cpu_switch(monkeypatch, tmp_path):
    from patch_training.training_args import RunTrainingArguments

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert RunTrainingArguments(output_dir=str(tmp_path), report_to="none").use_cpu is True
    monkeypatch.setenv("ACCELERATE_USE_CPU", "false")
    assert RunTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True).use_cpu is True


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_a_trainer_without_deepspeed_does_not_import_it():
    """A PatchTrainer built, trained a step and saved, with DeepSpeed installed: DeepSpeed is never imported (accelerate
    1.16 imported it whenever it unwrapped a model, and it printed its accelerator line on a CPU machine)."""
    pytest.importorskip("deepspeed")
    code = """
import sys, tempfile, torch
from transformers import LlamaConfig, default_data_collator
from modeling_llama_patch import PatchLlamaForCausalLM
from patch_training.trainer import PatchTrainer
from patch_training.training_args import RunTrainingArguments
config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
data = [{"input_ids": torch.arange(8) % 64, "labels": torch.arange(8) % 64} for _ in range(4)]
folder = tempfile.mkdtemp()
args = RunTrainingArguments(output_dir=folder, max_steps=1, per_device_train_batch_size=2, report_to="none",
                            use_cpu=True, save_strategy="no", disable_tqdm=True)
trainer = PatchTrainer(model=PatchLlamaForCausalLM(config), args=args, train_dataset=data,
                       data_collator=default_data_collator)
trainer.train()
trainer.save_model(folder)
print("deepspeed imported:", "deepspeed" in sys.modules)
"""
    output = run_python(code)
    assert "deepspeed imported: False" in output
    assert "accelerator to CPU" not in output


def test_a_deepspeed_engine_is_still_unwrapped():
    """Once DeepSpeed is imported (a DeepSpeed run imports it), accelerate's unwrapping tests for its engine again."""
    pytest.importorskip("deepspeed")
    code = """
from patch_training import lazy_deepspeed
lazy_deepspeed.install()
from accelerate.utils import other
before = other.is_deepspeed_available()
import deepspeed
print(before, other.is_deepspeed_available(), other.extract_model_from_parallel.__module__)
"""
    assert run_python(code).split()[-3:] == ["False", "True", "accelerate.utils.other"]
