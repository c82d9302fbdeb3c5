"""Under DeepSpeed with bf16, the token stage starts from the patch stage's fp32 master weights.

DeepSpeed with bf16 trains a bf16 copy of the weights and keeps the fp32 master weights in its ZeRO optimizer.
Two CPU processes run the tiny two-stage job under the `deepspeed` launcher with `--bf16 true`, ZeRO-2 and
ZeRO-3 (DeepSpeed's CPU accelerator runs bf16; tests/deepspeed_on_cpu/ lets transformers accept the flag
without a GPU). The reference is DeepSpeed's own: `zero_to_fp32` rebuilds the fp32 master weights offline
from the optimizer-state files of a DeepSpeed checkpoint, with none of run_clm.py's code.

- The patch stage's last step is its checkpoint-4: `patch_stage/model.safetensors`, the model handed to the
  token stage and the one users load, must be that checkpoint's masters exactly, in float32.
- The token stage runs at learning rate 0, so its master weights never move: its checkpoint's masters must
  be the patch stage's, i.e. DeepSpeed's masters started from the fp32 weights and not from their bf16
  rounding (DeepSpeed builds its masters from the model it has cast to bf16).

Nearly every master weight differs from its bf16 rounding (checked), so a bf16 handover fails both checks.
"""

import json

import pytest
import torch

from test_multiprocess import launch_deepspeed


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("token_cache")


@pytest.mark.parametrize("zero", ["zero2.json", "zero3.json"])
def test_bf16_handover_is_the_fp32_master_weights(tmp_path, data_cache, zero):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint as zero_to_fp32
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    results = launch_deepspeed(out, data_cache, zero, "--bf16", "true", "--learning_rate", "0")
    assert (results["patch_stage"]["steps"], results["token_stage"]["steps"]) == (4, 2)
    patch_step = out / "patch_stage" / "checkpoint-4" / "global_step4"
    assert (patch_step / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file(), "DeepSpeed trained in bf16"

    masters = zero_to_fp32(str(out / "patch_stage" / "checkpoint-4"))
    rounded = sum(not torch.equal(value, value.bfloat16().float()) for value in masters.values())
    assert rounded == len(masters), "every tensor has master weights that bf16 cannot hold"

    handed_over = load_file(str(out / "patch_stage" / "model.safetensors"))
    assert set(handed_over) == set(masters)
    for name, master in masters.items():
        assert handed_over[name].dtype == torch.float32, name
        assert torch.equal(handed_over[name], master), f"{name}: the saved patch model is not DeepSpeed's fp32 master"

    config = json.loads((out / "patch_stage" / "config.json").read_text())
    assert config["dtype"] == "float32" and config["architectures"] == ["LlamaForCausalLM"]
    loaded = AutoModelForCausalLM.from_pretrained(str(out / "patch_stage"))  # dtype "auto": the config's
    assert all(torch.equal(param, masters[name]) for name, param in loaded.named_parameters())

    token_masters = zero_to_fp32(str(out / "checkpoint-2"))
    for name, master in masters.items():
        assert torch.equal(token_masters[name], master), f"{name}: the token stage's masters did not start from the fp32 handover"
