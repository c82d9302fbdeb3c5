"""The model card (`README.md`) written beside every model a job saves: the final model in the output folder and the
patch stage's model in `<output_dir>/patch_stage/`, as transformers' run_clm.py writes one.

A `huggingface_hub.ModelCard`: a metadata header the Hub reads (library, pipeline, tags, the paper, the base model
and datasets where they are Hub names) and a text that says how the model was trained (the method and paper, K and
λ, the recipe, each stage's steps, tokens and learning rate, the data and token counts, the relative cost, the
evaluation, the versions) and how to load it (stock `AutoModelForCausalLM`, no `trust_remote_code`).

It holds only what the user passed (paths as given on the command line or in the config file) and what the run
measured: no token (`--hub_token`), no cache folder, no absolute path the user did not write, no environment.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from .results import add_job_totals, relative_cost_nominal
from .run_dir import MODEL_CARD_FILE

PAPER = "https://arxiv.org/abs/2407.12665"
CITATION = """@inproceedings{shao2025beyond,
  title     = {Beyond Next Token Prediction: Patch-Level Training for Large Language Models},
  author    = {Shao, Chenze and Meng, Fandong and Zhou, Jie},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2025},
  url       = {https://arxiv.org/abs/2407.12665}
}"""


def hub_name(name: str | None) -> str | None:
    """`name` when it reads as a Hub repository id (`org/name` or `name`, not an existing local path), else None."""
    if not name or os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return None
    return name


def versions(deepspeed: bool) -> dict[str, str]:
    """The versions of what trained the model: this project, transformers, torch, accelerate, Python (and
    DeepSpeed when the run used it)."""
    import accelerate
    import torch
    import transformers

    found = {"patch-level-training": project_version(), "transformers": transformers.__version__,
             "torch": torch.__version__, "accelerate": accelerate.__version__}
    if deepspeed:
        import deepspeed as ds

        found["deepspeed"] = ds.__version__
    found["python"] = sys.version.split()[0]
    return found


def project_version() -> str:
    """This project's version: the installed package's (`pip install -e .`), else its pyproject.toml's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("patch-level-training")
    except PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        for line in pyproject.read_text().splitlines() if pyproject.is_file() else []:
            if line.startswith("version"):
                return line.split("=", 1)[1].strip().strip('"')
        return "unknown"


def parameter_count(model) -> int:
    """The model's parameters (a DeepSpeed ZeRO-3 partitioned parameter counts whole: `ds_numel`)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}g}" if abs(value) < 1e4 else f"{value:,.1f}"


def stage_rows(stages: dict[str, dict]) -> list[str]:
    """The Markdown table of the stages' records (all_results.json's `patch_stage`, `token_stage`)."""
    names = [name for name in ("patch", "token") if stages.get(name)]
    records = [stages[name] for name in names]

    def row(label, values):
        return f"| {label} | " + " | ".join(values) + " |"

    lines = [row("", [f"{name} stage" for name in names]), "|---|" + "---|" * len(names)]
    lines.append(row("K (tokens per patch)", [str(r["patch_size"]) for r in records]))
    lines.append(row("sequence", [f"{r['block_tokens']:,} tokens" + (f" ({r['block_tokens'] // r['patch_size']:,} patches)"
                                                                       if r["patch_size"] > 1 else "") for r in records]))
    lines.append(row("optimizer steps", [fmt(r["steps"]) for r in records]))
    lines.append(row("tokens trained on", [fmt(r["tokens"]) for r in records]))
    lines.append(row("positions (compute, token-level equivalents)", [fmt(r["positions"]) for r in records]))
    lines.append(row("global batch", [f"{r['tokens_per_step'] // r['block_tokens']:,} sequences, {r['tokens_per_step']:,} tokens"
                                      for r in records]))
    lines.append(row("peak learning rate", [f"{r['learning_rate']:g}" for r in records]))
    lines.append(row("processes", [str(r["world_size"]) for r in records]))
    lines.append(row("wall time", [f"{r.get('train_runtime_s') or 0:,.0f} s" for r in records]))
    lines.append(row("final training loss", [fmt(r.get("train_loss")) + (" (K-way patch loss)" if r["patch_size"] > 1 else "")
                                             for r in records]))
    lines.append(row("validation loss (token level)", [fmt(r.get("eval_loss")) for r in records]))
    lines.append(row("validation perplexity", [fmt(r.get("eval_perplexity")) for r in records]))
    return lines


def recipe_lines(args, header: dict) -> list[str]:
    """The recipe: how the split was set, the batch mode, the switch, the offset weights, the schedule and the
    optimizer, as bullet points."""
    patch, training = args.patch, args.training
    lam = header["patch_data_fraction"]
    if header.get("patch_split_by") == "patch_step_fraction":
        split = (f"set by r = {header['patch_step_fraction']:.4g}, the patch stage's share of the optimizer steps "
                 f"(λ = {lam:.4g} of the tokens)")
    else:
        split = f"λ = {lam:.4g} of the training tokens" + (f" (r = {header['patch_step_fraction']:.4g} of the optimizer steps)"
                                                          if 0 < lam < 1 else "")
    weights = header.get("patch_offset_weights")
    schedule = getattr(training.lr_scheduler_type, "value", training.lr_scheduler_type)
    optimizer = getattr(training.optim, "value", training.optim)
    precision = "bf16 mixed precision" if training.bf16 else "fp16 mixed precision" if training.fp16 else "float32"
    held = "positions" if patch.patch_batch_mode == "positions" else "tokens"
    switch = ("only the weights are kept; a fresh optimizer, warmup and schedule (the paper's)"
              if patch.patch_switch == "restart" else "the AdamW state and one learning-rate schedule carry over")
    loss = ("the mean over the K next tokens (the paper's Eq. 3)" if weights is None
            else f"the K next tokens weighted {', '.join(f'{w:.4g}' for w in weights)}")
    warmup = f"{training.warmup_steps:g}"
    if patch.patch_warmup_steps is not None:
        warmup += f" (patch stage {patch.patch_warmup_steps:g})"
    optimizer_line = (f"- Optimizer {optimizer} (β1 {training.adam_beta1:g}, β2 {training.adam_beta2:g}, "
                      f"ε {training.adam_epsilon:g}, weight decay {training.weight_decay:g}), gradient clipping "
                      f"{training.max_grad_norm:g}; {schedule} schedule, warmup {warmup} steps (below 1: a fraction of "
                      f"the stage's steps); {precision}; seed {training.seed}.")
    return [
        f"- Patch size K = {patch.patch_size}; patch-level share {split}.",
        f"- A patch-stage step holds the same {held} as a token-stage step (`--patch_batch_mode {patch.patch_batch_mode}`).",
        f"- At the switch: {switch}.",
        f"- Patch loss: {loss}.",
        optimizer_line,
    ]


def data_lines(args, header: dict) -> list[str]:
    """The data as the user named it, with the token counts."""
    data, model = args.data, args.model
    if data.dataset_name:
        config = f"{data.dataset_config_name}, " if data.dataset_config_name else ""
        source = f"`{data.dataset_name}` ({config}split {data.dataset_split})"
    else:
        from .readers import split_file_list

        source = ", ".join(f"`{part}`" for part in split_file_list(data.train_file))
    budget = (f"`--max_steps {args.training.max_steps}` (tokens of that many token-level steps)"
              if args.training.max_steps > 0 else f"`--num_train_epochs {args.training.num_train_epochs:g}`")
    dataset = (f"{header['dataset_tokens']:,} tokens" if header.get("dataset_tokens") else "read as a stream")
    lines = [
        f"- Training data: {source} (text column `{data.text_column_name}`; {dataset}), tokenizer `{model.tokenizer_name}`.",
        f"- Budget: {header['budget_tokens']:,} tokens, set by {budget}; sequences of T = {data.block_size} positions.",
    ]
    if data.skip_data_fraction:
        lines.append(f"- The first {data.skip_data_fraction:g} of the budget was skipped.")
    return lines


def evaluation_lines(args, evaluation: dict) -> list[str]:
    """The token-level validation result, or a line saying there was none."""
    if evaluation.get("eval_loss") is None:
        return ["No validation set was given (`--validation_file`)."]
    data = args.data
    blocks = f"its first {data.max_eval_blocks} blocks" if data.max_eval_blocks else "all its blocks"
    line = (f"Token-level perplexity on `{data.validation_file}` ({blocks} of {data.block_size} tokens): "
            f"**{evaluation['eval_perplexity']:,.2f}** (loss {evaluation['eval_loss']:.4f} nats per token).")
    return [line]


def usage(repo: str, stock_class: str, patch_size: int, patch_stage: bool) -> str:
    """How to load the model: stock transformers, and for the patch-stage model also at patch level."""
    text = f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo}")  # a stock {stock_class}: no trust_remote_code
tokenizer = AutoTokenizer.from_pretrained("{repo}")
inputs = tokenizer("The king said", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0], skip_special_tokens=True))
```"""
    if patch_stage:
        text += f"""

Loaded this way the weights run at token level, as the token stage started from them. To run them at patch level
(K = {patch_size}, as trained here), load them with the patch model of the training code (`modeling_llama_patch.py`):
`AutoPatchModelForCausalLM.from_pretrained("{repo}")` reads the config's `patch_size`."""
    return text


def model_card(job, model, stages: dict[str, dict], evaluation: dict, location: str, patch_stage: bool):
    """The `huggingface_hub.ModelCard` of a model the job `job` (a `job.JobPlan`) saves at `location` (the folder as
    the user named it, or `--hub_model_id`).

    model: the saved model (its class, config and parameter count); stages: the all_results.json records of the
    stages trained so far ({"patch": ..., "token": ...}); evaluation: the model's own token-level evaluation
    (eval_loss, eval_perplexity; {} for none); patch_stage: the card of the patch stage's model, not the job's
    (the job's card also gives its relative cost as measured, `results.add_job_totals` over `stages`)."""
    from huggingface_hub import ModelCard, ModelCardData

    args, header = job.args, job.results
    config = model.config
    stock_class = getattr(model, "_stock_class", type(model)).__name__
    lam, k = header["patch_data_fraction"], header["patch_size"]
    nominal = relative_cost_nominal(lam, k)
    base = hub_name(args.model.model_name_or_path)
    data = ModelCardData(
        library_name="transformers", pipeline_tag="text-generation",
        tags=["patch-level-training", "arxiv:2407.12665", config.model_type],
        base_model=base, datasets=[args.data.dataset_name] if hub_name(args.data.dataset_name) else None,
    )
    start = f"continued from `{args.model.model_name_or_path}`" if args.model.model_name_or_path else (
        f"trained from scratch (config `{args.model.config_name}`)")
    if patch_stage:  # (--push_to_hub sends both stages to --hub_model_id, the final model last)
        name, repo = f"{Path(location).parent.name} (patch stage)", location
    else:
        name, repo = args.training.hub_model_id or Path(location).name, args.training.hub_model_id or location
    if lam > 0:
        share = "all the training tokens were" if lam >= 1 else f"the first λ = {lam:.4g} of the training tokens were"
        method = (f"with **patch-level training** ([Shao, Meng, Zhou, ICLR 2025]({PAPER})): {share} read in patches "
                  f"of K = {k} tokens (a patch's embedding is the mean of its "
                  f"tokens' embeddings, and the model predicts all K tokens of the next patch), "
                  + ("then token-level training continued on the rest, " if lam < 1 else "")
                  + f"at a nominal λ/K + 1 - λ = {nominal:.3f} of the compute of token-level training on the same tokens")
    else:
        method = (f"at token level only: the λ = 0 baseline of patch-level training ([Shao, Meng, Zhou, ICLR 2025]({PAPER}))")
    role = ("This is the **patch-stage model** of that job: the weights the token stage started from. "
            if patch_stage else "")
    cost = ""
    if not patch_stage:
        totals = add_job_totals({}, [s for s in stages.values() if s], lam, k, evaluation)
        cost = (f"\n\nRelative cost: {totals['relative_cost_nominal']:.3f} nominal (λ/K + 1 - λ), "
                f"{totals['relative_cost_measured']:.3f} measured (positions / tokens: {totals['positions']:,} / "
                f"{totals['tokens']:,}).")
    version_lines = "\n".join(f"- {package} {version}" for package, version in
                              versions(bool(args.training.deepspeed)).items())
    text = f"""---
{data.to_yaml()}
---

# {name}

A {config.model_type} causal language model ({parameter_count(model):,} parameters, `{stock_class}`), {start}, {method}.
{role}It is a stock transformers checkpoint.

## How to use

{usage(repo, stock_class, k, patch_stage)}

## Training

{chr(10).join(data_lines(args, header))}
{chr(10).join(recipe_lines(args, header))}

{chr(10).join(stage_rows(stages))}{cost}

## Evaluation

{chr(10).join(evaluation_lines(args, evaluation))}

## Versions

{version_lines}

## Citation

```bibtex
{CITATION}
```
"""
    return ModelCard(text)


def write_model_card(card, folder: str | Path) -> None:
    """Write `card` as `<folder>/README.md`."""
    card.save(Path(folder) / MODEL_CARD_FILE)
