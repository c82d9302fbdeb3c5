"""Shared fixtures: paths to the bundled data and a tiny Llama config (hidden 32, 2 layers) for CPU tests."""

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"
TOKENIZER_DIR = DATA_DIR / "llama2_tokenizer"
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"

sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


def tiny_llama_config(**overrides):
    """A tiny LlamaConfig with the LLaMA-2 vocabulary (32000): hidden 32, 2 layers, 4 heads (2 KV heads)."""
    from transformers import LlamaConfig

    values = dict(
        vocab_size=32000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


@pytest.fixture
def tokenizer_dir():
    return str(TOKENIZER_DIR)


@pytest.fixture
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with a tiny model config (hidden 32, 2 layers, vocab 32000, 256 positions) and a token cache
    shared by the run_clm jobs of one test module (`test_run_clm.job_args`)."""
    root = tmp_path_factory.mktemp("run_clm")
    config = tiny_llama_config(max_position_embeddings=256)
    config.save_pretrained(root / "model_config")
    return root


@pytest.fixture(scope="module")
def finished_job(workdir):
    """One complete two-stage job (`test_run_clm.job_args`), shared by a module's tests that compare with it or
    only read its outputs: (its output folder, its results)."""
    import run_clm
    from test_run_clm import job_args

    output_dir = workdir / "finished"
    results = run_clm.main(job_args(workdir, output_dir))
    return output_dir, results


@pytest.fixture(scope="session")
def foreign_tokenizer_dir(tmp_path_factory):
    """A tokenizer other than the LLaMA-2 one, made offline: byte-level BPE with 400 tokens learnt from the bundled
    sample, saved as transformers saves one (its ids name other tokens than LLaMA-2's do)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in (DATA_DIR / "sample_train.jsonl").read_text().splitlines()[:20]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"]))
    folder = tmp_path_factory.mktemp("foreign_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>").save_pretrained(folder)
    return str(folder)


IN_THE_WAY = ["file", "link to nothing"]  # what stops a path from becoming a folder (os.makedirs fails on both)


def path_in_the_way(folder, kind: str):
    """A path in `folder` that os.makedirs fails on: a file holding "keep" (`kind` "file"), or a link to nothing."""
    blocker = folder / "in-the-way"
    if kind == "file":
        blocker.write_text("keep")
    else:
        blocker.symlink_to(folder / "gone")
    return blocker


def refused_as_in_the_way(main, program: str | None, argv: list[str], flag: str, folder, blocker, kind: str, capsys) -> None:
    """`main(argv)` (a script's entry point, `flag` naming `folder` in `argv`) exits 2 with the one line naming the
    path in the way (`path_in_the_way`), and leaves that path as it was. `program`: the name the line starts with
    (None for a parser named after sys.argv[0])."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    line = f"{program + ': ' if program else ''}error: {flag} {folder}: {blocker} is a {kind}, not a folder"
    assert exit_info.value.code == 2 and line in err
    assert blocker.read_text() == "keep" if kind == "file" else blocker.is_symlink()


@pytest.fixture(autouse=True)
def _accelerate_dynamo_switches_restored():
    """accelerate reads torch.compile's settings from ACCELERATE_DYNAMO_* variables, which transformers'
    TrainingArguments and our --torch_compile_regions set in the process: each test leaves them as it found
    them, so that a job a later test launches does not inherit an earlier test's compilation."""
    from patch_training import training_args

    before = {key: value for key, value in os.environ.items() if key.startswith("ACCELERATE_DYNAMO_")}
    yield
    for key in [key for key in os.environ if key.startswith("ACCELERATE_DYNAMO_")]:
        del os.environ[key]
    os.environ.update(before)
    training_args._REGIONAL_SWITCH_SET_HERE = False


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """{name: path} of the documents `data_formats.TEXTS` written in each format and compression the readers
    accept (`data_formats.write_all_formats`), once per test module."""
    from data_formats import write_all_formats

    return write_all_formats(tmp_path_factory.mktemp("formats"))
