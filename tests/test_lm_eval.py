"""The offline lm-evaluation-harness task `wikitext_local` (scripts/lm_eval_tasks/): lm_eval's Python API
scores a tiny saved model on a few bundled WikiText documents. Skipped where lm_eval is not installed
(requirements-eval.txt)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, TOKENIZER_DIR, tiny_llama_config

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -r requirements-eval.txt")

TASKS_DIR = REPO_ROOT / "scripts" / "lm_eval_tasks"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random tiny Llama and the LLaMA-2 tokenizer, saved as a stock Hugging Face folder."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(tiny_llama_config(max_position_embeddings=256)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(TOKENIZER_DIR)).save_pretrained(folder)
    return folder


def test_local_task_loads_the_bundled_documents():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR))
    assert "wikitext_local" in manager.all_tasks
    task = manager.load("wikitext_local")["tasks"]["wikitext_local"]
    docs = list(task.test_docs())
    assert len(docs) == 62
    assert docs[0]["page"].startswith(" = Robert Boulter = ")
    assert "@-@" not in task.doc_to_target(docs[0])  # lm-eval's wikitext detokeniser is applied


def test_simple_evaluate_gives_finite_perplexities(tiny_model_dir):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = HFLM(pretrained=str(tiny_model_dir), device="cpu", batch_size=4, dtype="float32")
    output = simple_evaluate(
        model=model,
        tasks=["wikitext_local"],
        task_manager=TaskManager(include_path=str(TASKS_DIR)),
        limit=2,
        log_samples=False,
    )
    metrics = output["results"]["wikitext_local"]
    for name in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        value = metrics[f"{name},none"]
        assert math.isfinite(value) and value > 0, (name, value)
    # a random model over a 32000-token vocabulary: close to uniform, far from a trained model's ~10-30
    assert metrics["byte_perplexity,none"] > 1.5
    assert output["n-samples"]["wikitext_local"] == {"original": 62, "effective": 2}


def test_harness_script_passes_arguments_through(tiny_model_dir, tmp_path):
    """scripts/eval_lm_harness.sh, offline (TASKS=wikitext_local), with `--limit 1` passed through to lm_eval."""
    env = {
        **os.environ,
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}",
        "TASKS": "wikitext_local", "DEVICE": "cpu", "DTYPE": "float32", "BATCH_SIZE": "2",
        "OUTPUT_PATH": str(tmp_path / "results"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
    }
    script = REPO_ROOT / "scripts" / "eval_lm_harness.sh"
    done = subprocess.run(["bash", str(script), str(tiny_model_dir), "--limit", "1"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (results_file,) = (tmp_path / "results").rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["config"]["limit"] == 1
    assert math.isfinite(results["results"]["wikitext_local"]["word_perplexity,none"])

    usage = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr
