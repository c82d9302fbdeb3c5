"""Patch-level training (Shao, Meng, Zhou, ICLR 2025, arXiv:2407.12665) as a small library under `run_clm.py`.

Each module has one reason to change; none imports `run_clm.py`, so a script of your own can use any of them.
From the bottom up:

- `cli`: one-line errors (`UsageError`), JSON config files, atomic JSON writes, the command-line wrapper;
- `arguments_help`: `--help` in groups, with what transformers' flags mean in a two-stage job;
- `launch`: what the launcher says about the device (a launch config's CPU processes form one job);
- `loss`: next-patch targets and the K-way cross-entropy (the paper's Eq. 3), offset weights;
- `fused_loss`: the LM head fused with the K-way loss (the logits never held);
- `readers`: files of every format, folders, patterns (and hub datasets) -> documents (`DataSource`);
- `token_cache`: documents -> the on-disk token cache, tokenised once (in parallel, once across nodes);
- `blocks`: token stream -> training and validation blocks of T or K*T tokens;
- `stages`: the λ split of the token budget (`plan_stages`) and each stage's batch and TrainingArguments;
- `training_args`: `RunTrainingArguments`, transformers' TrainingArguments with this project's defaults;
- `flops`: model FLOPs of a training position and the devices' peaks (the MFU's one formula);
- `liger`, `offset_weights`, `compat`: Liger-Kernel's switches per stage; `--patch_offset_weights`;
  work-arounds for the oldest supported transformers;
- `models`: the model config, tokenizer and patch model of a stage;
- `results`: the accounting in all_results.json;
- `console`: what a run prints: the job's plan line, each stage's start and end lines, the closing table;
- `model_card`: the README.md model card written beside every model a job saves;
- `identity`: what defines a run (every setting but a documented allow-list, and the inputs' contents);
- `run_dir`: a run's life on disk: the output folder's rules, the lock, which checkpoint a stage resumes from,
  what marks a stage or the job complete;
- `job`: a job's inputs loaded and checked once, its data tokenised and its stages planned;
- `tracking`: what reaches the `--report_to` trackers (one run per job, on the token and compute axes);
- `throughput`: tokens/s, positions/s and MFU in every training log;
- `lazy_deepspeed`: DeepSpeed imported only by a run that uses it;
- `trainer`: `PatchTrainer`, transformers' Trainer for the patch model;
- `stage_loop`: training the stages in order, the handover of the weights, saving each stage's model.

The model itself is `modeling_llama_patch.py`, beside this package.
"""
