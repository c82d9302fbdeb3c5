"""scripts/sweep.py: the data-scaling sweep's CPU preset end to end (the plumbing, not the science: six
run_clm.py runs, the table, the measured costs, the plot), its parameter count and plot, and its bad input."""

import json
import math
import subprocess
import sys

import pytest
from conftest import IN_THE_WAY, REPO_ROOT, path_in_the_way, refused_as_in_the_way

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import sweep  # noqa: E402

SCRIPT = str(REPO_ROOT / "scripts" / "sweep.py")


def test_cpu_preset_writes_the_table_costs_and_plot(tmp_path):
    runs, report_dir = tmp_path / "runs", tmp_path / "report"
    done = subprocess.run(
        [sys.executable, SCRIPT, "--preset", "cpu", "--output_root", str(runs), "--report_dir", str(report_dir),
         "--", "--eval_strategy", "no"],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((report_dir / "sweep.json").read_text())
    points = report["points"]
    params = sweep.count_parameters("configs/model/llama-tiny.json")[0]
    assert report["parameters"] == params
    assert [p["epochs"] for p in points] == [0.002, 0.006, 0.016]  # 8x from the smallest to the largest
    block = sweep.PRESETS["cpu"]["block_size"]
    for p in points:
        assert p["tokens_per_parameter"] == pytest.approx(p["tokens"] / params)
        assert p["ratio"] == pytest.approx(p["patch_perplexity"] / p["token_perplexity"])
        assert all(math.isfinite(p[key]) and p[key] > 1 for key in ("token_perplexity", "patch_perplexity"))
        # Cost in positions over the token run's budget: 1.0 and λ/K + 1 - λ = 0.5, off by at most the whole
        # blocks each stage leaves out (one patch block = one block of positions, one token block).
        slack = 2 * block / p["tokens"] + 0.005
        assert p["token_cost"] == pytest.approx(1.0, abs=slack)
        assert p["patch_cost"] == pytest.approx(0.5, abs=slack)
        assert abs(p["runs"]["patch"]["tokens"] - p["runs"]["token"]["tokens"]) <= 5 * block  # a patch block + a token block
        for name in ("token", "patch"):
            assert (report_dir / f"epochs-{p['epochs']:g}-{name}-all_results.json").is_file()
    table = (report_dir / "sweep.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 0.0")]
    assert [row.split(" | ")[0] for row in rows] == ["| 0.002", "| 0.006", "| 0.016"]
    assert all(f"**{p['ratio']:.3f}**" in table for p in points)
    assert (report_dir / "sweep.png").stat().st_size > 10_000
    assert not (runs / "sweep.json").exists()  # the report goes to --report_dir only


@pytest.mark.parametrize("config", ["llama-tiny", "llama-20m", "llama-370m"])
def test_parameter_count_matches_the_model(config):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig.from_pretrained(str(REPO_ROOT / "configs" / "model" / f"{config}.json")))
    total = sum(p.numel() for p in model.parameters())
    embeddings = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    assert sweep.count_parameters(f"configs/model/{config}.json") == (total, total - embeddings)


def test_paper_reference_points():
    """Table 4 (370M): 45B to 360B tokens, 122 to 973 tokens per parameter, the ratio falling below 1."""
    per_param = [tokens / sweep.PAPER_PARAMS for tokens, _ in sweep.PAPER_TABLE4]
    assert [round(x) for x in per_param] == [122, 243, 486, 973]
    assert [round(r, 3) for _, r in sweep.PAPER_TABLE4] == [1.027, 1.008, 0.990, 0.976]


def test_plot_of_a_single_point(tmp_path):
    point = {"epochs": 1.0, "tokens": 51_000_000, "tokens_per_parameter": 2.6, "ratio": 1.4}
    sweep.plot([point], 19_548_416, str(tmp_path / "sweep.png"))
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sizes", "0.1"], "--sizes takes at least two distinct positive numbers"),
        (["--sizes", "0.1,x"], "--sizes takes at least two distinct positive numbers"),
        (["--sizes", "0,0.1"], "--sizes takes at least two distinct positive numbers"),
        (["--sizes", "0.1,0.1"], "--sizes takes at least two distinct positive numbers"),
        (["--sizes", "0.1,inf"], "--sizes takes at least two distinct positive numbers"),
        (["--train_file", "/nope.jsonl"], "--train_file: no such file /nope.jsonl"),
        (["--validation_file", "/nope.jsonl"], "--validation_file: no such file /nope.jsonl"),
    ],
)
def test_bad_input_is_refused_before_any_run(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--preset", "cpu", "--output_root", str(tmp_path / "r"), *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_gpu_preset_without_the_prepared_corpus(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sweep.PRESETS, "gpu", {**sweep.PRESETS["gpu"], "train_file": ""})
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--preset", "gpu", "--output_root", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    assert "python scripts/sweep.py --preset gpu --prepare" in capsys.readouterr().err


def test_prepare_without_shards(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--prepare", "--corpus", str(tmp_path)])
    assert exit_info.value.code == 2 and "--corpus: no train-*.jsonl.xz in" in capsys.readouterr().err


@pytest.fixture
def no_run(monkeypatch):
    """replicate.train (each run of the sweep) fails the test: bad input must be refused before any run."""
    def train(*args, **kwargs):
        raise AssertionError("a run was started")

    monkeypatch.setattr(sweep.replicate, "train", train)


@pytest.mark.parametrize("sizes", ["nan,0.1", "0.1,-inf", "0.1,1e400", "0.1,Infinity"])
def test_non_finite_sizes_are_refused(tmp_path, capsys, no_run, sizes):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--preset", "cpu", "--output_root", str(tmp_path / "r"), f"--sizes={sizes}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"distinct positive numbers (finite: passes over the training files), got {sizes!r}" in err
    assert not (tmp_path / "r").exists()


def test_every_float_option_of_the_sweep_is_checked(monkeypatch):
    """sweep.py applies replicate.py's check of every float option to its own parser (none today)."""
    checked = []
    monkeypatch.setattr(sweep.replicate, "refuse_non_finite_options", lambda parser, args: checked.append(parser.prog))
    with pytest.raises(SystemExit):
        sweep.main(["--preset", "cpu", "--sizes", "x"])
    assert len(checked) == 1


@pytest.mark.parametrize("flag", ["--output_root", "--report_dir", "--data_cache_dir"])
@pytest.mark.parametrize("below", [False, True])
@pytest.mark.parametrize("kind", IN_THE_WAY)
def test_a_folder_option_that_is_a_file_is_one_line(tmp_path, capsys, no_run, flag, below, kind):
    """Regression: --output_root or --report_dir naming a file ended in a FileExistsError traceback."""
    blocker = path_in_the_way(tmp_path, kind)
    folder = blocker / "sub" if below else blocker
    argv = ["--preset", "cpu", "--output_root", str(tmp_path / "r"), flag, str(folder)]
    refused_as_in_the_way(sweep.main, "sweep.py", argv, flag, folder, blocker, kind, capsys)
    assert not (tmp_path / "r").exists()


def test_a_model_config_with_a_key_twice_is_refused(tmp_path, capsys, monkeypatch, no_run):
    config = tmp_path / "model.json"
    text = (REPO_ROOT / "configs" / "model" / "llama-tiny.json").read_text().rstrip()
    config.write_text(text[:-1].rstrip() + ', "hidden_size": 4096}')
    monkeypatch.setitem(sweep.PRESETS, "cpu", {**sweep.PRESETS["cpu"], "config_name": str(config)})
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--preset", "cpu", "--output_root", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"sweep.py: error: model config {config} has the key 'hidden_size' twice" in err
    assert not (tmp_path / "r").exists()


def test_tokenising_time_counts_only_the_caches_the_sweep_made(tmp_path):
    """Regression: every cache in --data_cache_dir counted: a sweep that read a shared or earlier cache reported a
    tokenising time no run of it had spent."""
    def cache(name, seconds):
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text(json.dumps({"tokenize_seconds": seconds}))

    cache("earlier", 10.0)
    existing = sweep.cache_records(str(tmp_path))
    assert sweep.tokenisation_seconds(str(tmp_path), existing) is None  # read from the cache: nothing tokenised
    cache("train", 2.5)
    cache("wikitext", 0.5)
    assert sweep.tokenisation_seconds(str(tmp_path), existing) == 3.0
