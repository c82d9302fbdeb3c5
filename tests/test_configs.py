"""Every file in configs/ and scripts/ is accepted by what reads it, and says what the paper says.

Model configs by LlamaConfig (and their sizes), training configs by run_clm.parse_arguments, DeepSpeed
configs by DeepSpeed's own config class once the Trainer has filled their "auto" values, accelerate configs
by `accelerate launch`'s own parsing, shell scripts by `bash -n` and shellcheck. Nothing here trains.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from conftest import IN_THE_WAY, REPO_ROOT, path_in_the_way, refused_as_in_the_way

CONFIGS = REPO_ROOT / "configs"
SCRIPTS = REPO_ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))

import config_args  # noqa: E402
import prepare_pile  # noqa: E402

MODEL_SIZES = {"370m": 370e6, "780m": 780e6, "1.3b": 1.3e9, "2.7b": 2.7e9}
# Llama configs with a tied head: the equal-compute comparison's model (scripts/compare.py), tied so that most of its
# parameters lie outside the embeddings at the LLaMA-2 vocabulary. Every other llama-* config is untied, as the paper's.
TIED_LLAMA_CONFIGS = {"llama-42m.json"}
# Table 1 of the paper: the token-level baseline of each size, and K = 4 with these λ.
PAPER_RUNS = {"370m": (0.5, 2 / 3, 0.8), "780m": (2 / 3,), "1.3b": (2 / 3,), "2.7b": (2 / 3,)}
PAPER_GPUS = 8
PAPER_TOKENS_PER_STEP = 2048 * 1024  # 2M tokens per optimizer step
TRAIN_CONFIGS = sorted((CONFIGS / "train").glob("*.json"))
# The paper's runs; llama-*-tst-* apply Token Superposition Training's recipe to a paper setting (issue 17).
PAPER_CONFIGS = [path for path in TRAIN_CONFIGS if path.name.startswith("llama-") and "-tst-" not in path.name]
VARIANT_CONFIGS = [path for path in TRAIN_CONFIGS if "-tst-" in path.name]


def paper_config_name(size: str, fraction: float | None) -> str:
    return f"llama-{size}-token.json" if fraction is None else f"llama-{size}-patch-k4-lambda{fraction:.2g}.json"


@pytest.fixture
def bf16_gpu(monkeypatch):
    """Parse the paper's configs (bf16: true) as on the A100s they are for: TrainingArguments refuses bf16
    where no bf16 GPU is found."""
    monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda *args, **kwargs: True)


def parse(argv):
    import run_clm

    return run_clm.parse_arguments(argv)


# ---------------------------------------------------------------------------------------------------------
# configs/model
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((CONFIGS / "model").glob("*.json")), ids=lambda p: p.name)
def test_model_config_is_a_stock_config(path):
    """Every model config is a stock transformers config of its family (named in the file name), for the bundled
    LLaMA-2 tokenizer; the paper's (llama-*) are untied multi-head Llamas, TIED_LLAMA_CONFIGS tied ones."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads(path.read_text())
    config = AutoConfig.from_pretrained(str(path))
    assert raw["model_type"] == path.stem.rsplit("-", 1)[0], "the file is named <model_type>-<size>.json"
    assert raw["architectures"] == [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    assert config.vocab_size == 32000, "the LLaMA-2 tokenizer's vocabulary"
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    assert "patch_size" not in raw, "K belongs to the training config, not to the model"
    if raw["model_type"] == "llama":
        assert config.tie_word_embeddings is (path.name in TIED_LLAMA_CONFIGS)
        assert config.hidden_size % config.num_attention_heads == 0


def test_qwen3_0_6b_is_qwen3_0_6b_with_the_llama2_vocabulary():
    """configs/model/qwen3-0.6b.json: Qwen3-0.6B's decoder (28 layers, hidden 1024, 16 query / 8 key-value heads of
    128, MLP 3072, tied embeddings) with the LLaMA-2 vocabulary: 0.44B parameters without the embeddings, as Qwen3-0.6B."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(CONFIGS / "model" / "qwen3-0.6b.json"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embedding = model.get_input_embeddings().weight.numel()
    non_embedding = sum(p.numel() for p in model.parameters()) - embedding
    assert abs(non_embedding / 0.44e9 - 1) < 0.01, non_embedding
    assert config.tie_word_embeddings and model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("size", MODEL_SIZES)
def test_model_sizes_match_the_paper(size):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(str(CONFIGS / "model" / f"llama-{size}.json"))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    parameters = sum(p.numel() for p in model.parameters())
    assert abs(parameters / MODEL_SIZES[size] - 1) < 0.10, f"{size}: {parameters / 1e6:.0f}M parameters"
    assert config.max_position_embeddings == 2048
    assert config.num_key_value_heads == config.num_attention_heads, "the paper's models use full multi-head attention"
    sizes = [json.loads((CONFIGS / "model" / f"llama-{s}.json").read_text())["rms_norm_eps"] for s in MODEL_SIZES]
    assert len(set(sizes)) == 1, "one rms_norm_eps for all sizes"


# ---------------------------------------------------------------------------------------------------------
# configs/train
# ---------------------------------------------------------------------------------------------------------


def test_the_paper_runs_all_have_a_config():
    expected = {paper_config_name(size, None) for size in PAPER_RUNS}
    expected |= {paper_config_name(size, f) for size, fractions in PAPER_RUNS.items() for f in fractions}
    assert expected <= {path.name for path in PAPER_CONFIGS}
    assert {"tiny-patch.json", "tiny-token.json"} <= {path.name for path in TRAIN_CONFIGS}


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_train_config_is_accepted_by_run_clm(path, bf16_gpu, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # the configs' paths are relative to the repository root
    model_args, data_args, patch_args, training_args = parse([str(path.relative_to(REPO_ROOT))])
    for existing in (model_args.config_name, model_args.tokenizer_name, data_args.validation_file):
        assert (REPO_ROOT / existing).exists(), f"{path.name}: {existing} does not exist"
    assert training_args.output_dir.startswith("runs/"), "runs/ is ignored by git"
    assert training_args.output_dir == f"runs/{path.stem}", "one output folder per config, named after it"
    if path.name.startswith("tiny-"):
        assert (REPO_ROOT / data_args.train_file).is_file()
        assert data_args.block_size == 128 and not training_args.bf16


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.name)
def test_paper_config_has_the_paper_settings(path, bf16_gpu, monkeypatch):
    from patch_training.stages import plan_stages, stage_batch_settings

    monkeypatch.chdir(REPO_ROOT)
    model_args, data_args, patch_args, args = parse([str(path.relative_to(REPO_ROOT))])
    assert data_args.block_size == 2048
    assert (args.learning_rate, args.lr_scheduler_type.value, args.warmup_steps) == (3e-4, "cosine", 2000)
    assert (args.weight_decay, args.max_grad_norm) == (0.1, 1.0)
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (0.9, 0.95, 1e-8)
    assert args.bf16 and args.eval_strategy.value == "steps" and args.save_total_limit
    assert data_args.validation_file == "data/wikitext-103-test.jsonl", "the paper's perplexity set"
    # The data that scripts/prepare_pile.py writes and tokenises into this very cache.
    shards = [prepare_pile.shard_path("data/pile", index) for index in range(prepare_pile.HUB_SHARDS)]
    assert data_args.train_file == ",".join(shards)
    assert data_args.data_cache_dir == "data/pile/tokens"

    size = path.stem.split("-")[1]
    assert model_args.config_name == f"configs/model/llama-{size}.json"
    fraction, k = patch_args.patch_data_fraction, patch_args.patch_size
    name = GPU_CARD_SUFFIX.sub(".json", path.name)  # a GPU-sized config: the paper config it sizes
    if fraction == 0:
        assert name == paper_config_name(size, None)
    else:
        assert k == 4 and name == paper_config_name(size, fraction)
        assert any(abs(fraction - f) < 1e-12 for f in PAPER_RUNS[size]), "λ = 2/3 is 0.666..., not 0.67"

    # 2M tokens per step on 8 GPUs, in both stages (the patch stage: K*T-token sequences, K times fewer).
    token_tokens = args.per_device_train_batch_size * args.gradient_accumulation_steps * PAPER_GPUS * 2048
    assert token_tokens == PAPER_TOKENS_PER_STEP
    if fraction > 0:
        batch, accumulation = stage_batch_settings(patch_args, args)
        assert batch * accumulation * PAPER_GPUS * k * 2048 == PAPER_TOKENS_PER_STEP

    # max_steps is the whole token-level budget; λ of it goes to the patch stage at 1/K of the cost.
    total = args.max_steps * PAPER_TOKENS_PER_STEP
    plans = plan_stages(total, fraction, k, 2048)
    steps = {plan.name: plan.num_blocks * plan.block_len / PAPER_TOKENS_PER_STEP for plan in plans}
    assert steps.get("patch", 0) == pytest.approx(fraction * args.max_steps, abs=1)
    assert steps["token"] == pytest.approx((1 - fraction) * args.max_steps, abs=1)
    cost = sum(plan.positions for plan in plans) / sum(plan.tokens for plan in plans)
    assert cost == pytest.approx(fraction / k + 1 - fraction if fraction else 1.0, abs=1e-6)


def test_paper_configs_differ_only_in_model_batch_patch_and_output():
    """One recipe: the runs of Table 1 differ only where the paper's runs do."""
    allowed = {"config_name", "per_device_train_batch_size", "gradient_accumulation_steps", "patch_size",
               "patch_data_fraction", "output_dir"}
    reference = json.loads(PAPER_CONFIGS[0].read_text())
    for path in [p for p in PAPER_CONFIGS[1:] if not GPU_CARD_SUFFIX.search(p.name)]:  # those: their own test
        values = json.loads(path.read_text())
        assert set(values) == set(reference), path.name
        assert {key for key in values if values[key] != reference[key]} <= allowed, path.name


def test_variant_config_is_the_paper_370m_setting_with_the_variant_recipe(bf16_gpu, monkeypatch):
    """configs/train/llama-370m-tst-k4-r0.33.json: the paper's 370M run of λ = 2/3 in every setting but the three
    recipe choices (README, "Recipes beyond the paper"): a step fraction r = 1/3 that, with the patch stage's K = 4
    times the tokens per step, is the same token split λ = 2/3; the same positions per step; one schedule and
    AdamW state across the switch. Same data, same compute (relative cost 1/2), half the optimizer steps."""
    from patch_training.stages import plan_stages, split_fractions, stage_batch_settings

    assert [p.name for p in VARIANT_CONFIGS] == ["llama-370m-tst-k4-r0.33.json"]
    variant = json.loads(VARIANT_CONFIGS[0].read_text())
    paper = json.loads((CONFIGS / "train" / paper_config_name("370m", 2 / 3)).read_text())
    recipe = {"patch_step_fraction", "patch_batch_mode", "patch_switch"}
    assert set(variant) - recipe == set(paper) - {"patch_data_fraction"}
    assert {k for k in set(variant) - recipe if variant[k] != paper[k]} == {"output_dir"}
    monkeypatch.chdir(REPO_ROOT)
    _, data_args, patch_args, args = parse([str(VARIANT_CONFIGS[0].relative_to(REPO_ROOT))])
    assert (patch_args.patch_batch_mode, patch_args.patch_switch) == ("positions", "continue")
    batch, accumulation = stage_batch_settings(patch_args, args)
    assert batch * accumulation * PAPER_GPUS * 2048 == PAPER_TOKENS_PER_STEP  # the token stage's positions per step
    monkeypatch.setattr(type(args), "world_size", property(lambda self: PAPER_GPUS))
    lam, r = split_fractions(patch_args, args, 2048)
    assert float(lam) == pytest.approx(2 / 3, abs=1e-15) and float(r) == pytest.approx(1 / 3)
    plans = plan_stages(args.max_steps * PAPER_TOKENS_PER_STEP, lam, 4, 2048)
    patch_steps = plans[0].tokens / (4 * PAPER_TOKENS_PER_STEP)
    token_steps = plans[1].tokens / PAPER_TOKENS_PER_STEP
    assert patch_steps == pytest.approx(args.max_steps / 6, abs=1) and token_steps == pytest.approx(args.max_steps / 3, abs=1)
    assert patch_steps / (patch_steps + token_steps) == pytest.approx(1 / 3, abs=1e-4)
    cost = sum(plan.positions for plan in plans) / sum(plan.tokens for plan in plans)
    assert cost == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_config_as_flags_parses_to_the_same_arguments(path, bf16_gpu, monkeypatch):
    """The launchers pass a config as flags (scripts/config_args.py): the same arguments as the file."""
    monkeypatch.chdir(REPO_ROOT)
    relative = str(path.relative_to(REPO_ROOT))
    from_file = parse([relative])
    from_flags = parse(config_args.run_clm_args([relative]))
    for a, b in zip(from_file[:3], from_flags[:3]):
        assert a == b
    assert from_file[3].to_dict() == from_flags[3].to_dict()


def test_flags_after_the_config_override_it(bf16_gpu, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    argv = config_args.run_clm_args(
        ["configs/train/llama-370m-token.json", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "32"]
    )
    args = parse(argv)[3]
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 32)
    assert config_args.flag_value(argv, "output_dir") == "runs/llama-370m-token"
    assert config_args.flag_value(argv + ["--output_dir=elsewhere"], "output_dir") == "elsewhere"


# ---------------------------------------------------------------------------------------------------------
# configs/deepspeed
# ---------------------------------------------------------------------------------------------------------

DS_STAGES = {"zero1.json": 1, "zero2.json": 2, "zero3.json": 3, "zero3_offload.json": 3}


def test_every_deepspeed_config_is_known():
    assert {path.name for path in (CONFIGS / "deepspeed").glob("*.json")} == set(DS_STAGES)


@pytest.mark.parametrize("name", DS_STAGES)
def test_deepspeed_config_is_accepted_by_deepspeed(name, bf16_gpu, monkeypatch):
    """Fill the "auto" values as the Trainer does (from the 370M baseline's arguments), then DeepSpeed's own
    config class checks every key and the batch arithmetic."""
    deepspeed = pytest.importorskip("deepspeed")
    import torch
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    monkeypatch.chdir(REPO_ROOT)
    raw = json.loads((CONFIGS / "deepspeed" / name).read_text())
    assert "scheduler" not in raw, "no DeepSpeed scheduler: the Trainer's (lr_scheduler_type cosine) is used"
    argv = config_args.run_clm_args(["configs/train/llama-370m-token.json", "--deepspeed", f"configs/deepspeed/{name}"])
    args = parse(argv)[3]
    try:
        hf_config = args.hf_deepspeed_config
        model_config = LlamaConfig.from_pretrained("configs/model/llama-370m.json")
        with torch.device("meta"):
            model = LlamaForCausalLM(model_config)
        hf_config.trainer_config_finalize(args, model, num_training_steps=args.max_steps)
        filled = hf_config.config
        assert "auto" not in json.dumps(filled), "every auto value is filled"
        checked = DeepSpeedConfig(filled)
    finally:
        unset_hf_deepspeed_config()  # or later tests in this process would build models as ZeRO-3 would
    assert checked.zero_optimization_stage == DS_STAGES[name]
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    assert filled["train_micro_batch_size_per_gpu"] == args.per_device_train_batch_size
    assert filled["gradient_accumulation_steps"] == args.gradient_accumulation_steps
    assert filled["gradient_clipping"] == 1.0
    params = dict(filled["optimizer"]["params"])
    # torch's AdamW (no kernel to compile at start-up), except with offload: DeepSpeed's CPU Adam.
    assert params.pop("torch_adam", False) is (name != "zero3_offload.json")
    assert params == {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    if DS_STAGES[name] == 3:
        assert checked.zero_config.gather_16bit_weights_on_model_save, "save_model must write the full model"
    offload = name == "zero3_offload.json"
    assert (checked.zero_config.offload_optimizer is not None) == offload
    assert (checked.zero_config.offload_param is not None) == offload
    del deepspeed


# ---------------------------------------------------------------------------------------------------------
# configs/accelerate
# ---------------------------------------------------------------------------------------------------------

ACCELERATE_CONFIGS = ["ddp_8gpu", "deepspeed_zero2", "fsdp_8gpu", "fsdp2_8gpu", "multinode_template", "cpu_ddp_2proc"]


def accelerate_launch_args(name):
    """What `accelerate launch --config_file configs/accelerate/<name>.yaml run_clm.py` makes of the file."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(CONFIGS / "accelerate" / f"{name}.yaml"), "run_clm.py", "x.json"])
    return _validate_launch_command(args)


def test_every_accelerate_config_is_known():
    assert {path.stem for path in (CONFIGS / "accelerate").glob("*.yaml")} == set(ACCELERATE_CONFIGS)


@pytest.mark.parametrize("name", ACCELERATE_CONFIGS)
def test_accelerate_config_is_accepted_by_accelerate(name, monkeypatch):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    monkeypatch.chdir(REPO_ROOT)
    config = load_config_from_file(str(CONFIGS / "accelerate" / f"{name}.yaml"))
    assert isinstance(config, ClusterConfig)
    args, _, _ = accelerate_launch_args(name)
    assert args.num_processes == config.num_processes
    if name == "cpu_ddp_2proc":
        # MULTI_GPU is what starts 2 processes (torchrun); use_cpu puts them on the CPU (with gloo).
        assert (args.num_processes, args.multi_gpu, args.use_cpu) == (2, True, True)
    elif name == "multinode_template":
        assert args.num_machines > 1 and args.num_processes == 8 * args.num_machines
        assert args.main_process_ip and args.main_process_port
    else:
        assert (args.num_processes, args.num_machines, args.use_cpu) == (8, 1, False)
    if name != "cpu_ddp_2proc":
        assert args.mixed_precision == "no", "precision comes from the training config's bf16"


def test_accelerate_deepspeed_config_points_at_zero2(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    monkeypatch.chdir(REPO_ROOT)
    args, defaults, mixed_precision_from_config = accelerate_launch_args("deepspeed_zero2")
    assert args.use_deepspeed and args.deepspeed_config_file == "configs/deepspeed/zero2.json"
    # As `accelerate launch` does before starting the processes, then the plugin each process builds.
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    with mock.patch("accelerate.utils.launch.is_port_in_use", return_value=False):
        _, env = prepare_deepspeed_cmd_env(args)
    with mock.patch.dict(os.environ, env, clear=True):
        plugin = DeepSpeedPlugin()  # raises if the yaml sets what the DeepSpeed file owns
    assert plugin.zero_stage == 2


def test_accelerate_fsdp_config_shards_llama_layers_and_saves_full_weights(monkeypatch):
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp import ShardingStrategy, StateDictType

    args, _, _ = accelerate_launch_args("fsdp_8gpu")
    assert args.use_fsdp
    with mock.patch("accelerate.utils.launch.is_port_in_use", return_value=False):
        env = prepare_multi_gpu_env(args)
    # The plugin each process builds from that environment (sync_module_states asks for a GPU: pretend one,
    # through the probe the installed accelerate uses: is_cuda_available, or get_torch_accelerator_backend in 1.16).
    import accelerate.utils.dataclasses as plugin_module

    probe = (mock.patch.object(plugin_module, "is_cuda_available", return_value=True)
             if hasattr(plugin_module, "is_cuda_available") else
             mock.patch.object(plugin_module, "get_torch_accelerator_backend", return_value=("cuda", torch.cuda)))
    with mock.patch.dict(os.environ, env, clear=True), probe, \
            mock.patch.object(torch.cuda, "current_device", return_value=0):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer  # the class it names exists

    assert LlamaDecoderLayer.__name__ == "LlamaDecoderLayer"


# ---------------------------------------------------------------------------------------------------------
# scripts/
# ---------------------------------------------------------------------------------------------------------

# Every shell script of the repository: CI's entry point, and *.sh at the top or one folder down.
SHELL_SCRIPTS = [REPO_ROOT / ".ci" / "run"] + sorted(
    path for path in [*REPO_ROOT.glob("*.sh"), *REPO_ROOT.glob("*/*.sh")]
    if not path.relative_to(REPO_ROOT).parts[0].startswith(".")
)


def script_id(path):
    return str(path.relative_to(REPO_ROOT))


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=script_id)
def test_shell_script_parses(path):
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert "NCCL_" not in text, "no cluster-specific NCCL settings"
    if path.name != "common.sh":  # common.sh is sourced, not run
        assert os.access(path, os.X_OK), f"{path.name} is not executable"
        assert text.splitlines()[0] == "#!/usr/bin/env bash"
        assert "set -euo pipefail" in text


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=script_id)
def test_shell_script_passes_shellcheck(path):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", "-x", str(path)], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_launchers_are_checked():
    names = {path.name for path in SHELL_SCRIPTS}
    assert {"common.sh", "launch_accelerate.sh", "launch_deepspeed.sh", "launch_torchrun.sh", "run_paper.sh"} <= names


def dry_run(script, *args, **env):
    values = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, **env}
    result = subprocess.run([str(SCRIPTS / script), *args], capture_output=True, text=True, env=values, cwd="/")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_launchers_build_the_commands_for_several_nodes():
    node = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29600"}
    config = "configs/train/llama-370m-patch-k4-lambda0.67.json"
    line = dry_run("launch_accelerate.sh", config, "--seed", "7", **node)
    assert line.startswith("accelerate launch --config_file configs/accelerate/ddp_8gpu.yaml --num_processes 16 ")
    assert "--num_machines 2 --machine_rank 1 --main_process_ip 10.1.2.3 --main_process_port 29600 run_clm.py " in line
    assert line.rstrip().endswith("--output_dir runs/llama-370m-patch-k4-lambda0.67 --seed 7")
    line = dry_run("launch_torchrun.sh", config, **node)
    assert line.startswith("torchrun --nnodes 2 --node_rank 1 --nproc_per_node 8 --master_addr 10.1.2.3 --master_port 29600 ")
    line = dry_run("launch_deepspeed.sh", config, HOSTFILE="/etc/hostfile", DS_CONFIG="configs/deepspeed/zero3.json", **node)
    assert "--hostfile /etc/hostfile --num_nodes 2 --node_rank 1 --no_ssh run_clm.py" in line
    assert line.rstrip().endswith("--deepspeed configs/deepspeed/zero3.json")
    line = dry_run("launch_deepspeed.sh", config)
    assert line.startswith("deepspeed --num_gpus 8 ") and "--hostfile" not in line and "zero2.json" in line


@pytest.mark.parametrize("script", ["launch_accelerate.sh", "launch_torchrun.sh", "launch_deepspeed.sh"])
@pytest.mark.parametrize(
    "env, message",
    [
        ({"NGPU": "0"}, "NGPU must be a positive integer, got '0'"),
        ({"NNODES": "two"}, "NNODES must be a positive integer, got 'two'"),
        ({"NNODES": "2", "NODE_RANK": "2", "HOSTFILE": "/etc/hostfile"}, "NODE_RANK must lie in 0..1 (NNODES=2), got '2'"),
        ({"MASTER_PORT": "70000"}, "MASTER_PORT must be a port number 1..65535, got '70000'"),
        ({"CONFIG": "configs/train/nope.json"}, "config_args.py: error: config file configs/train/nope.json: No such file"),
    ],
)
def test_launchers_refuse_a_bad_layout_before_starting(script, env, message):
    """A rank number beyond the nodes would wait at the rendezvous for ever; the others fail late in torchrun
    or deepspeed. Each is one line naming the variable, exit code 2, nothing started (not even in a dry run)."""
    config = env.get("CONFIG", "configs/train/tiny-patch.json")
    variables = {name: value for name, value in env.items() if name != "CONFIG"}
    result = subprocess.run([str(SCRIPTS / script), config], capture_output=True, text=True, cwd="/",
                            env={**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, **variables})
    assert result.returncode == 2 and result.stdout == ""
    assert message in result.stderr and "Traceback" not in result.stderr


def test_run_paper_runs_the_baseline_then_the_patch_runs_of_a_size():
    lines = dry_run("run_paper.sh", "370m", "--seed", "3").splitlines()
    names = [line.split("--output_dir ")[1].split()[0] for line in lines]
    assert names == ["runs/llama-370m-token"] + [f"runs/llama-370m-patch-k4-lambda{f}" for f in ("0.5", "0.67", "0.8")]
    assert all(line.rstrip().endswith("--seed 3") for line in lines)
    assert dry_run("run_paper.sh", "2.7b", BACKEND="deepspeed").startswith("deepspeed ")
    bad = subprocess.run([str(SCRIPTS / "run_paper.sh"), "370m"], capture_output=True, text=True,
                         env={**os.environ, "BACKEND": "slurm"})
    assert bad.returncode == 2 and "BACKEND" in bad.stderr


TINY_CONFIG = CONFIGS / "train" / "tiny-patch.json"
LAUNCHERS = ["launch_accelerate.sh", "launch_torchrun.sh", "launch_deepspeed.sh"]


def config_with_members(tmp_path, members: str):
    """tiny-patch.json with the raw JSON `members` added at its end (a key it has already: given twice)."""
    text = TINY_CONFIG.read_text().rstrip()
    path = tmp_path / "config.json"
    path.write_text(text[:-1].rstrip() + ",\n  " + members + "\n}\n")
    return path


def launch(script, *args, **env):
    values = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, **env}
    return subprocess.run([str(SCRIPTS / script), *args], capture_output=True, text=True, env=values, cwd="/")


@pytest.mark.parametrize(
    "members, key",
    [
        ('"learning_rate": 0.5', "learning_rate"),  # tiny-patch.json has 0.003
        ('"output_dir": "/tmp/elsewhere"', "output_dir"),  # the launchers' log folder reads it too
        ('"lr_scheduler_kwargs": {"min_lr": 1e-05, "min_lr": 0.1}', "min_lr"),  # inside an object value
    ],
)
def test_a_key_given_twice_is_refused_as_run_clm_refuses_it(tmp_path, capsys, members, key):
    """Regression: config_args.py read the config with json.load, which keeps the last value of a key without a word,
    so every launcher (and run_paper.sh) trained with it where `run_clm.py config.json` refuses the file."""
    from patch_training.cli import UsageError

    path = config_with_members(tmp_path, members)
    with pytest.raises(UsageError) as reference:  # run_clm.py reading the file itself
        parse([str(path)])
    assert f"{key!r} twice" in str(reference.value)
    expected = f"config_args.py: error: {reference.value}"
    for argv in ([str(path)], ["--get", "output_dir", str(path)], ["--find", "deepspeed", str(path), "--seed", "1"]):
        assert config_args.main(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err == expected + "\n"
    for script in LAUNCHERS:
        result = launch(script, str(path), NGPU="1")
        assert result.returncode == 2 and result.stdout == "", (script, result.stderr)
        assert result.stderr.strip().splitlines() == [expected], script


@pytest.mark.parametrize("key, hint", [("output-dir", "output_dir"), ("--seed", "seed"), ("learning-rate", "learning_rate"), ("a b", None)])
def test_a_key_that_is_no_argument_name_is_refused_as_run_clm_refuses_it(tmp_path, capsys, key, hint):
    """As a flag, `--output-dir` is the dashed spelling of --output_dir (argparse takes it); in a config file
    run_clm.py knows only the field names: the launchers refuse such a key too."""
    from patch_training.cli import UsageError

    path = config_with_members(tmp_path, f"{json.dumps(key)}: 3")
    with pytest.raises(UsageError, match="unknown keys"):
        parse([str(path)])
    assert config_args.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"config_args.py: error: config file {path}: the key {key!r} is not an argument name")
    assert (f"write it {hint!r}" in err) == (hint is not None) and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "flags",
    [
        ["--output-dir", "/tmp/other"],
        ["--output-dir=/tmp/other"],
        ["--output_dir=/tmp/other"],
        ["--output-dir", "/tmp/first", "--output_dir", "/tmp/other"],
        ["--output_dir", "/tmp/first", "--output-dir=/tmp/other"],
    ],
    ids=" ".join,
)
def test_get_reads_every_spelling_of_a_flag_as_run_clm_does(flags, monkeypatch, capsys):
    """The launchers put their log in <output_dir>.logs from `config_args.py --get output_dir`, which knew only
    `--output_dir`: with `--output-dir /tmp/other` the run went there and its log beside the config's output_dir."""
    monkeypatch.chdir(REPO_ROOT)
    config = str(TINY_CONFIG.relative_to(REPO_ROOT))
    argv = config_args.run_clm_args([config, *flags])
    assert parse(argv)[3].output_dir == "/tmp/other"  # the reference: run_clm.py's own parser
    assert config_args.flag_value(argv, "output_dir") == "/tmp/other"
    assert config_args.main(["--get", "output_dir", config, *flags]) == 0
    assert capsys.readouterr().out == "/tmp/other\n"
    assert config_args.main(["--get", "output-dir", config, *flags]) == 0  # the name in either spelling
    assert capsys.readouterr().out == "/tmp/other\n"


def test_find_prints_nothing_for_a_flag_not_given(capsys):
    assert config_args.main(["--find", "deepspeed", str(TINY_CONFIG)]) == 0
    assert capsys.readouterr().out == ""
    assert config_args.main(["--get", "deepspeed", str(TINY_CONFIG)]) == 2
    assert capsys.readouterr().err == "config_args.py: error: no --deepspeed in the config or the flags\n"


@pytest.mark.parametrize("script", LAUNCHERS)
@pytest.mark.parametrize("flags", [["--output-dir", "{other}"], ["--output-dir={other}"]], ids=" ".join)
def test_the_launcher_log_goes_beside_the_output_dir_the_run_uses(tmp_path, script, flags):
    """End to end, with a stand-in for torchrun / accelerate / deepspeed that does nothing: the log lands in
    <the flag's output_dir>.logs, not beside the config's output_dir."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("torchrun", "accelerate", "deepspeed"):
        (bin_dir / name).write_text("#!/bin/sh\necho stand-in\n")
        (bin_dir / name).chmod(0o755)
    config = json.loads(TINY_CONFIG.read_text())
    config["output_dir"] = str(tmp_path / "from-config")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    other = tmp_path / "other"
    env = {key: value for key, value in os.environ.items() if key != "LOG_DIR"}
    result = subprocess.run([str(SCRIPTS / script), str(path), *(f.format(other=other) for f in flags)],
                            capture_output=True, text=True, cwd="/",
                            env={**env, "PATH": f"{bin_dir}:{env['PATH']}", "PYTHON": sys.executable, "NGPU": "1"})
    assert result.returncode == 0, result.stderr
    logs = list((tmp_path / "other.logs").glob("node0-*.log"))
    assert len(logs) == 1 and "stand-in" in logs[0].read_text()
    assert not (tmp_path / "from-config.logs").exists()


@pytest.mark.parametrize(
    "env, flags, members, expected",
    [
        ({}, [], None, "configs/deepspeed/zero2.json"),  # the default
        ({}, ["--deepspeed", "configs/deepspeed/zero3.json"], None, "configs/deepspeed/zero3.json"),
        ({}, ["--deepspeed=configs/deepspeed/zero1.json"], None, "configs/deepspeed/zero1.json"),
        ({}, [], '"deepspeed": "configs/deepspeed/zero3.json"', "configs/deepspeed/zero3.json"),
        ({"DS_CONFIG": "configs/deepspeed/zero3.json"}, [], None, "configs/deepspeed/zero3.json"),
        ({"DS_CONFIG": "configs/deepspeed/zero3.json"}, ["--deepspeed", "configs/deepspeed/zero3.json"], None,
         "configs/deepspeed/zero3.json"),
    ],
)
def test_launch_deepspeed_uses_the_deepspeed_config_it_is_given(tmp_path, env, flags, members, expected):
    """Regression: DS_CONFIG (default zero2.json) was put after the flags, so a --deepspeed in the config or the
    flags was replaced without a word. The config the run reads is the last --deepspeed, as run_clm.py's parser
    takes it."""
    import shlex

    config = config_with_members(tmp_path, members) if members else TINY_CONFIG
    result = launch("launch_deepspeed.sh", str(config), *flags, **env)
    assert result.returncode == 0, result.stderr
    command = shlex.split(result.stdout)
    assert config_args.flag_value(command, "deepspeed") == expected
    assert sum(config_args.names_flag(arg.split("=")[0], "deepspeed") for arg in command) == 1  # none replaced


@pytest.mark.parametrize("given", [["--deepspeed", "configs/deepspeed/zero1.json"], ["--deepspeed=configs/deepspeed/zero1.json"]])
def test_launch_deepspeed_refuses_ds_config_and_another_deepspeed(given):
    result = launch("launch_deepspeed.sh", str(TINY_CONFIG), *given, DS_CONFIG="configs/deepspeed/zero3.json")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "launch_deepspeed.sh: error: DS_CONFIG=configs/deepspeed/zero3.json and --deepspeed configs/deepspeed/zero1.json "
        "(config or flags) disagree: give one"
    ]


def test_config_args_imports_no_third_party_module():
    """The launchers call it before any process starts: the standard library and patch_training.cli only."""
    code = ("import sys; sys.path.insert(0, 'scripts'); import config_args; "
            "print(sorted({'torch', 'transformers', 'numpy'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


# ---------------------------------------------------------------------------------------------------------
# scripts/prepare_pile.py, offline (--input_files)
# ---------------------------------------------------------------------------------------------------------


def test_parse_shards():
    assert prepare_pile.parse_shards("0-2,5") == [0, 1, 2, 5]
    assert prepare_pile.shard_path("data/pile", 3) == "data/pile/train/03.jsonl.zst", "the hub's own file, as it ships"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--shards", "abc"], "--shards must name shards 0..29 as in 0-29 or 0,3,5-7, got 'abc'"),
        (["--shards", "5-2"], "--shards must name shards 0..29"),
        (["--shards", "0-30"], "--shards must name shards 0..29"),
        (["--input_files", "/nope.jsonl"], "--input_files: no such file: /nope.jsonl"),
        (["--input_files", "data/sample_train.jsonl", "--tokenizer_name", "/nope"], "--tokenizer_name /nope: no such folder"),
        (["--input_files", "data/sample_train.jsonl", "--validation_file", "/nope.jsonl"], "--validation_file /nope.jsonl: no such file"),
        (["--input_files", "data/sample_train.jsonl", "--num_workers", "0"], "--num_workers must be >= 1, got 0"),
        (["--input_files", "data/sample_train.jsonl", "--tokenize_batch_size", "0"], "--tokenize_batch_size must be >= 1, got 0"),
    ],
)
def test_prepare_refuses_bad_input_before_writing(tmp_path, monkeypatch, capsys, flags, message):
    """One line and exit code 2 before anything is written (before: a ValueError or OSError traceback for a
    bad --shards or tokenizer, and a batch size or worker count of 0 accepted)."""
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(SystemExit) as exit_info:
        prepare_pile.main([*flags, "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", IN_THE_WAY)
@pytest.mark.parametrize("flags, flag", [
    (["--input_files", "data/sample_train.jsonl", "--validation_file", "none"], "--data_cache_dir"),
    (["--shards", "0", "--no_tokenize"], "--output_dir"),
])
def test_prepare_refuses_a_folder_option_that_cannot_be_a_folder(tmp_path, monkeypatch, capsys, kind, flags, flag):
    """Regression: a file as --data_cache_dir ended in a FileExistsError traceback from os.makedirs, after tokenising
    had started; now one line before any work (and the file is kept)."""
    monkeypatch.chdir(REPO_ROOT)
    blocker = path_in_the_way(tmp_path, kind)
    folders = {"--output_dir": str(tmp_path / "out"), "--data_cache_dir": str(tmp_path / "cache"), flag: str(blocker / "sub")}
    argv = [*flags, *(item for pair in folders.items() for item in pair)]
    refused_as_in_the_way(prepare_pile.main, None, argv, flag, blocker / "sub", blocker, kind, capsys)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_prepare_without_the_hub_is_one_line(tmp_path):
    """Offline (HF_HUB_OFFLINE=1, as on a cluster's compute node), the download ended in a 40-line traceback from
    huggingface_hub; now one line naming the shard and the way out (--input_files), exit code 2. A tokenizer
    folder that holds none is one line too."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    runs = {
        "cannot download monology/pile-uncopyrighted:train/03.jsonl.zst (": ["--shards", "3", "--no_tokenize"],  # then
        # "...); without the hub, give local files with --input_files"
        "--tokenizer_name configs: no tokenizer to load": [
            "--input_files", str(REPO_ROOT / "data" / "sample_train.jsonl"), "--tokenizer_name", "configs",
            "--data_cache_dir", str(tmp_path / "cache"),
        ],
    }
    for message, flags in runs.items():
        done = subprocess.run(
            [sys.executable, str(REPO_ROOT / "scripts" / "prepare_pile.py"), *flags, "--output_dir", str(tmp_path / "out")],
            capture_output=True, text=True, env=environment, timeout=300,
        )
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and lines[-1].startswith(f"prepare_pile.py: error: {message}"), done.stderr
        assert not any("Traceback" in line for line in lines), done.stderr
        if message.startswith("cannot download"):
            assert lines[-1].endswith("; without the hub, give local files with --input_files"), lines[-1]
    assert not (tmp_path / "out" / "train" / "03.jsonl.zst").exists()


def test_prepare_then_run_clm_reads_the_cache_without_tokenising(tmp_path, monkeypatch):
    """Offline prepare of two local shards as they are (one .jsonl.zst, as the hub ships the Pile; one .jsonl),
    then run_clm.py (the patch run of the tiny config, two steps) finds both token streams in the cache: it
    never tokenises."""
    import run_clm
    import zstandard
    from patch_training import token_cache

    documents = [json.loads(line) for line in (REPO_ROOT / "data" / "sample_train.jsonl").read_text().splitlines()]
    first, second = tmp_path / "a.jsonl.zst", tmp_path / "b.jsonl"
    first.write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": d["text"], "meta": {"source": d["source"]}}) + "\n" for d in documents[:25]).encode()))
    second.write_text("".join(json.dumps({"text": d["text"]}) + "\n" for d in documents[25:]))
    cache = tmp_path / "cache"
    argv = ["--input_files", str(first), str(second), "--output_dir", str(tmp_path / "unused"),
            "--data_cache_dir", str(cache), "--num_workers", "2"]
    summary = prepare_pile.main(argv)

    assert summary["shards"] == [str(first), str(second)], "the files are read as they are, not rewritten"
    meta = json.loads((Path(summary["train_cache"]) / "meta.json").read_text())
    assert meta["num_tokens"] == summary["train_tokens"] > 100_000
    assert meta["num_documents"] == len(documents)

    # Preparing again changes nothing and finds the same cache.
    mtimes = [os.stat(shard).st_mtime_ns for shard in summary["shards"]]
    assert prepare_pile.main(argv)["train_cache"] == summary["train_cache"]
    assert [os.stat(shard).st_mtime_ns for shard in summary["shards"]] == mtimes

    def no_tokenising(*args, **kwargs):
        raise AssertionError("run_clm.py tokenised again instead of reading the prepared cache")

    monkeypatch.setattr(token_cache, "tokenize_to_cache", no_tokenising)
    monkeypatch.chdir(REPO_ROOT)
    results = run_clm.main([
        "--config_name", "configs/model/llama-tiny.json",
        "--train_file", ",".join(summary["shards"]), "--validation_file", "data/wikitext-103-test.jsonl",
        "--data_cache_dir", str(cache), "--block_size", "32", "--patch_size", "4", "--patch_data_fraction", "0.5",
        "--per_device_train_batch_size", "4", "--max_steps", "2", "--max_eval_blocks", "2", "--report_to", "none",
        "--save_strategy", "no", "--use_cpu", "true", "--output_dir", str(tmp_path / "run"),
    ])
    assert results["dataset_tokens"] == summary["train_tokens"]
    assert results["perplexity"] is not None


GPU_CARD_SUFFIX = re.compile(r"-(80|141)gb\.json$")
GPU_SIZED_SETTINGS = {"per_device_train_batch_size", "gradient_accumulation_steps", "torch_compile",
                      "torch_compile_regions", "loss_implementation", "output_dir"}


@pytest.mark.parametrize("path", [p for p in PAPER_CONFIGS if GPU_CARD_SUFFIX.search(p.name)], ids=lambda p: p.name)
def test_gpu_sized_config_changes_only_the_gpu_settings(path):
    """A GPU-sized config (benchmarks/summarize.py, from measured reports) is its paper config with only the
    micro-batch, the accumulation, compilation and the loss implementation changed, and its own output folder."""
    sized = json.loads(path.read_text())
    paper = json.loads((path.parent / GPU_CARD_SUFFIX.sub(".json", path.name)).read_text())
    changed = {key for key in sized.keys() | paper.keys() if sized.get(key) != paper.get(key)}
    assert changed <= GPU_SIZED_SETTINGS and sized["torch_compile"] is True
