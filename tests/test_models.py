"""`patch_training.models` and run_clm.py on architectures other than Llama: two-stage jobs from scratch (Qwen3 with
tied embeddings, Gemma-2 with logit soft-capping, both on the fused loss) and continued pre-training of an MoE
checkpoint (Qwen3-MoE, its router loss on the stock head), each ending in a stock checkpoint that stock transformers
loads and generates with; configs that are not decoder-only causal LMs are refused in one line."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, TOKENIZER_DIR
from test_run_clm import VALID_FILE, job_args

import run_clm
from patch_training.cli import UsageError
from patch_training.models import build_model, check_tokenizer_fits_model, load_model_config, vocabulary_conflicts

MODEL_CONFIGS = REPO_ROOT / "configs" / "model"

LOAD_AND_GENERATE = """
import json, sys, transformers
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
assert type(m).__name__ == sys.argv[2], type(m)
p = transformers.pipeline("text-generation", model=sys.argv[1])
out = p("The king said", max_new_tokens=4, do_sample=False)[0]["generated_text"]
assert out.startswith("The king said") and len(out) > len("The king said"), out
import os, torch
if os.path.isfile("training_args.bin"):  # the Trainer's pickled arguments load without this project too
    args = torch.load("training_args.bin", weights_only=False)
    assert type(args) is transformers.TrainingArguments and args.learning_rate > 0, type(args)
assert "modeling_llama_patch" not in sys.modules and "patch_training" not in sys.modules
print("OK")
"""


def assert_stock_checkpoint(folder, stock_name: str) -> None:
    """`folder` names the stock class and loads and generates with stock transformers alone, in a fresh process."""
    assert json.loads((folder / "config.json").read_text())["architectures"] == [stock_name]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, str(folder), stock_name], cwd=folder,
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-2000:]


def two_stage(workdir, output_dir, **overrides) -> dict:
    return run_clm.main(job_args(workdir, output_dir, **{"max_steps": 8, "save_steps": 100, **overrides}))


@pytest.mark.parametrize("family, stock_name", [("qwen3", "Qwen3ForCausalLM"), ("gemma2", "Gemma2ForCausalLM")])
def test_two_stage_job_from_scratch(workdir, tmp_path, family, stock_name):
    """Both stages train a non-Llama model from its config; the final model is a stock checkpoint."""
    output_dir = tmp_path / family
    results = two_stage(workdir, output_dir, config_name=str(MODEL_CONFIGS / f"{family}-tiny.json"))
    assert results["patch_stage"]["steps"] > 0 and results["token_stage"]["steps"] > 0
    assert results["relative_cost_measured"] == pytest.approx(0.625)  # λ/K + 1 - λ at K=4, λ=1/2
    patch_config = json.loads((output_dir / "patch_stage" / "config.json").read_text())
    assert patch_config["model_type"] == family and patch_config["patch_size"] == 4
    assert_stock_checkpoint(output_dir, stock_name)


def test_continued_pretraining_of_an_moe_checkpoint(workdir, tmp_path):
    """--model_name_or_path: a stock Qwen3-MoE checkpoint (tokenizer saved beside it, so none is given) is trained
    at patch level then token level; the patch stage starts from its weights, not from random ones."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    checkpoint = tmp_path / "qwen3_moe"
    torch.manual_seed(3)
    stock = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(MODEL_CONFIGS / "qwen3_moe-tiny.json"))
    stock.save_pretrained(checkpoint)
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(checkpoint)
    output_dir = tmp_path / "continued"
    results = two_stage(workdir, output_dir, config_name=None, tokenizer_name=None, model_name_or_path=str(checkpoint),
                        patch_max_steps=1, save_steps=1, warmup_steps=0)
    assert results["patch_stage"]["steps"] == 1 and results["token_stage"]["steps"] > 0
    # the first patch-stage checkpoint is one step away from the stock weights, not a fresh initialisation
    first = AutoModelForCausalLM.from_pretrained(output_dir / "patch_stage" / "checkpoint-1")
    moved = max((a - b).abs().max().item() for a, b in zip(first.state_dict().values(), stock.state_dict().values()))
    assert 0 < moved < 0.01  # one AdamW step of lr 3e-3 moves a weight by at most about 3e-3
    assert_stock_checkpoint(output_dir, "Qwen3MoeForCausalLM")
    # The perplexity is the language model's, as eval_perplexity.py computes it from the logits: before, the
    # evaluation loss held router_aux_loss_coef x the load-balancing loss (8,643 where the model's was 8,470).
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import eval_perplexity

    for folder, stage in ((output_dir, "token_stage"), (output_dir / "patch_stage", "patch_stage")):
        independent = eval_perplexity.main(["--model", str(folder), "--data", VALID_FILE, "--block_size", "32",
                                            "--max_blocks", "4", "--device", "cpu", "--no_progress"])
        assert results[stage]["eval_perplexity"] == pytest.approx(independent["perplexity"], rel=1e-4), stage
    # The checkpoint's own settings are kept: its stop tokens (transformers' rule: the tokenizer's EOS first) and
    # use_cache, which every run wrote as false.
    config = json.loads((output_dir / "config.json").read_text())
    assert config["use_cache"] is True and config["eos_token_id"] == 2


@pytest.mark.parametrize(
    "config, message",
    [
        ({"model_type": "bert", "vocab_size": 32000}, r"bert.*needs a decoder-only causal LM|bert.*encoder"),
        ({"model_type": "t5", "vocab_size": 32000}, r"t5.*has no causal LM|encoder-decoder"),
        ({"model_type": "no_such_model"}, r"its model_type is 'no_such_model', which transformers does not know"),
        # a decoder transformers maps that is not in the supported list (it attends both ways without is_decoder)
        ({"model_type": "bert-generation", "vocab_size": 32000},
         r"'bert-generation' is not in the supported list \(patch_training/architectures\.txt"),
    ],
)
def test_models_that_cannot_be_patched_are_refused_in_one_line(tmp_path, config, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(UsageError, match=message) as error:
        load_model_config(str(path))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("model_type", ["gpt_neox", "gpt_neox_japanese", "llama"])
def test_supported_configs_load_whatever_attributes_they_carry(tmp_path, model_type):
    """--config_name of a supported type loads, its config carrying `is_decoder` or not (GPT-NeoX's declares it):
    run_clm.py's path takes the supported list's answer. (Regression: GPT-NeoX was refused as an encoder.)"""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": model_type, "vocab_size": 32000, "is_decoder": False}))
    assert load_model_config(str(path)).model_type == model_type


def test_build_model_gives_the_stock_class_at_k(tmp_path):
    """build_model: from a config, a subclass of the stock class at K with the requested loss; from weights, the
    same weights in float32 whatever dtype they were saved in."""
    from transformers import Qwen3ForCausalLM

    config = load_model_config(str(MODEL_CONFIGS / "qwen3-tiny.json"))
    model = build_model(config, None, 4, "sdpa", "unfused")
    assert getattr(config, "patch_size", None) is None, "build_model changed the loaded config"
    assert isinstance(model, Qwen3ForCausalLM) and model.config.patch_size == 4 and model.loss_implementation == "unfused"
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    loaded = build_model(None, str(tmp_path / "bf16"), 1, "sdpa")
    assert isinstance(loaded, Qwen3ForCausalLM) and loaded.config.patch_size == 1
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


def test_vocabulary_conflicts_against_a_naive_comparison():
    """The ids two vocabularies give to different tokens, against a loop over every id of either."""
    own = {"a": 0, "b": 1, "c": 2, "d": 3}
    members = {
        "same": dict(own), "extended": {**own, "e": 4}, "prefix": {"a": 0, "b": 1},
        "swapped": {"a": 1, "b": 0, "c": 2, "d": 3}, "other words": {"w": 0, "x": 1, "c": 2},
        "moved": {"a": 0, "b": 1, "c": 2, "d": 7},
    }
    for name, given in members.items():
        given_by_id, own_by_id = ({i: t for t, i in v.items()} for v in (given, own))
        naive = set()
        for i in set(given_by_id) | set(own_by_id):
            g, o = given_by_id.get(i), own_by_id.get(i)
            if (g is not None and o is not None and g != o) or (g in own and own[g] != i) or (o in given and given[o] != i):
                naive.add(i)
        assert [c[0] for c in vocabulary_conflicts(given, own)] == sorted(naive), name
    assert vocabulary_conflicts(members["moved"], own) == [(3, None, "d"), (7, "d", None)]


def test_a_tokenizer_that_is_not_the_models_is_refused(tmp_path, tokenizer, foreign_tokenizer_dir):
    """Regression: run_clm.py and eval_perplexity.py refused only a tokenizer larger than the vocabulary: a smaller one
    of another model (the LLaMA-2 tokenizer, 32,000 tokens, beside a Qwen checkpoint of 151,936) was accepted and the
    model trained, or was evaluated, on text its embedding reads as other words. Members: a foreign tokenizer beside a
    checkpoint with the LLaMA-2 one (and the reverse); the same tokenizer from another folder, one that extends it
    with an added token, and a model with no tokenizer of its own fit; a tokenizer larger than vocab_size does not."""
    from transformers import AutoTokenizer

    def model_folder(name, tokenizer_to_save):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        if tokenizer_to_save is not None:
            tokenizer_to_save.save_pretrained(folder)
        return str(folder)

    foreign = AutoTokenizer.from_pretrained(foreign_tokenizer_dir)
    llama_model, foreign_model = model_folder("llama", tokenizer), model_folder("foreign", foreign)
    bare_model = model_folder("bare", None)
    config = load_model_config(str(MODEL_CONFIGS / "llama-tiny.json"))
    config.vocab_size = 32064  # padded, as many are: room for added tokens
    extended = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    extended.add_tokens(["<my_token>"])
    refused = {
        (foreign_tokenizer_dir, llama_model): r"--tokenizer_name .* is not the tokenizer of --model_name_or_path .*llama: \d+ token ids differ \(id 0 is .<\|endoftext\|>. in the one given, .<unk>. in the model.s; 400 and 32000 tokens\)",
        (str(TOKENIZER_DIR), foreign_model): r"is not the tokenizer of .*foreign: \d+ token ids differ \(id 0 is '<unk>' in the one given, '<\|endoftext\|>'",
    }
    for (given, model), message in refused.items():
        with pytest.raises(UsageError, match=message):
            check_tokenizer_fits_model(AutoTokenizer.from_pretrained(given), f"--tokenizer_name {given}", config, model)
    for given, model in ((tokenizer, llama_model), (extended, llama_model), (foreign, bare_model), (tokenizer, None),
                         (foreign, foreign_model), (tokenizer, "meta-llama/Llama-2-7b-hf")):
        check_tokenizer_fits_model(given, "--tokenizer_name x", config, model)
    config.vocab_size = 32000
    with pytest.raises(UsageError, match=r"--tokenizer_name x has 32001 tokens but the model's vocab_size is 32000"):
        check_tokenizer_fits_model(extended, "--tokenizer_name x", config, llama_model)


def test_run_clm_refuses_another_tokenizer_than_the_checkpoints_before_claiming(workdir, tmp_path, tokenizer, foreign_tokenizer_dir):
    """Continued pre-training from a checkpoint with another model's tokenizer: one line, and no output folder."""
    from transformers import AutoModelForCausalLM

    checkpoint = tmp_path / "checkpoint"
    AutoModelForCausalLM.from_config(load_model_config(str(MODEL_CONFIGS / "llama-tiny.json"))).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    args = job_args(workdir, tmp_path / "job", config_name=None, model_name_or_path=str(checkpoint), tokenizer_name=foreign_tokenizer_dir)
    with pytest.raises(UsageError, match=rf"--tokenizer_name {foreign_tokenizer_dir} is not the tokenizer of --model_name_or_path {checkpoint}"):
        run_clm.main(args)
    assert not (tmp_path / "job").exists()


def test_special_tokens_join_the_checkpoints_own(tokenizer):
    """record_special_tokens with transformers 5.24's rule, whatever the installed version: a list of stop tokens
    (Llama-3, Qwen3) keeps its ids with the tokenizer's EOS first (before, it was collapsed to the tokenizer's one
    id and generate() no longer stopped at <|eot_id|>); a single id is replaced; a pad the tokenizer defines is
    written; ids already aligned are left as they are."""
    from transformers import GenerationConfig

    from patch_training.models import record_special_tokens

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id  # 2 and 0
    members = [  # (config eos, generation eos) -> (config eos, generation eos) after
        (([2, 13], [2, 13]), ([2, 13], [2, 13])),
        (([7, 13], [7, 13]), ([2, 7, 13], [2, 7, 13])),
        ((5, 5), (2, [2, 5])),
        ((2, 2), (2, 2)),
        ((2, [13, 2]), (2, [13, 2])),
        (([13], None), ([2, 13], [2])),
    ]
    for (config_eos, generation_eos), expected in members:
        model = build_model(load_model_config(str(MODEL_CONFIGS / "llama-tiny.json")), None, 1, "sdpa")
        model.config.eos_token_id, model.config.pad_token_id = config_eos, None
        model.generation_config = GenerationConfig(eos_token_id=generation_eos)
        record_special_tokens(model, tokenizer)
        assert (model.config.eos_token_id, model.generation_config.eos_token_id) == expected, (config_eos, generation_eos)
        assert model.config.pad_token_id == model.generation_config.pad_token_id == pad and eos == 2


@pytest.mark.parametrize("case", ["config without weights", "fused loss on an MoE", "flash_attention_2 unavailable"])
def test_model_settings_that_fail_at_the_first_model_are_refused_before_the_claim(workdir, tmp_path, case):
    """Each failed only when the first stage built its model or took its first step: after the output folder was
    claimed (a 30 to 60-line traceback), so the corrected command was then refused as another run."""
    from transformers import AutoConfig

    only_config = tmp_path / "only_config"
    AutoConfig.from_pretrained(MODEL_CONFIGS / "qwen3-tiny.json").save_pretrained(only_config)
    overrides, message = {
        "config without weights": ({"config_name": None, "tokenizer_name": str(TOKENIZER_DIR),
                                    "model_name_or_path": str(only_config)},
                                   rf"--model_name_or_path {only_config} holds no weights .*give it as --config_name"),
        "fused loss on an MoE": ({"config_name": str(MODEL_CONFIGS / "qwen3_moe-tiny.json"), "loss_implementation": "fused"},
                                 r"--loss_implementation fused is not exact for model_type 'qwen3_moe'"),
        "flash_attention_2 unavailable": ({"attn_implementation": "flash_attention_2"},
                                          r"--attn_implementation flash_attention_2 needs (a CUDA GPU|the flash_attn package)"),
    }[case]
    if case == "flash_attention_2 unavailable" and torch.cuda.is_available():
        pytest.importorskip("nonexistent_module_so_this_skips_where_flash_attn_may_work")
    with pytest.raises(UsageError, match=message):
        run_clm.main(job_args(workdir, tmp_path / "job", **overrides))
    assert not (tmp_path / "job" / "run_args.json").exists()


def test_a_tokenizer_folder_without_a_tokenizer_is_refused(workdir, tmp_path):
    """A checkpoint folder with config.json and weights but no tokenizer files: transformers 5.24 made an empty
    tokenizer of one token from the config, every document became one EOS, and the run trained on that without a
    word. Members: that folder as the checkpoint (its tokenizer taken from it) and as --tokenizer_name, a folder of
    other files, and a tokenizer with special tokens only."""
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from patch_training.models import load_tokenizer

    checkpoint = tmp_path / "weights_only"
    AutoModelForCausalLM.from_config(load_model_config(str(MODEL_CONFIGS / "llama-tiny.json"))).save_pretrained(checkpoint)
    empty = tmp_path / "special_only"
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"</s>": 0}, unk_token="</s>")),
                            eos_token="</s>").save_pretrained(empty)
    for folder, message in ((checkpoint, "the folder holds none of tokenizer.json"),
                            (MODEL_CONFIGS, "the folder holds none of tokenizer.json"),
                            (empty, "the tokenizer has no vocabulary, only 1 special token")):
        with pytest.raises(UsageError, match=rf"--tokenizer_name {folder}: .*{message}"):
            load_tokenizer(str(folder))
    for overrides in ({"tokenizer_name": None}, {"tokenizer_name": str(checkpoint)}):
        with pytest.raises(UsageError, match=rf"--tokenizer_name {checkpoint}: no tokenizer to load"):
            run_clm.main(job_args(workdir, tmp_path / "job", config_name=None, model_name_or_path=str(checkpoint), **overrides))
    assert not (tmp_path / "job" / "run_args.json").exists()
