"""Patch-level training (Shao, Meng, Zhou, ICLR 2025, arXiv:2407.12665) as a small library under `run_clm.py`.

Each module has one reason to change; none imports `run_clm.py`, so a script of your own can use any of them:

- `readers`: files of every format, folders, patterns (and hub datasets) -> documents, read whole or in parts (`DataSource`);
- `token_cache`: documents -> the on-disk token cache, tokenised once (in parallel, once across nodes);
- `blocks`: token stream -> training and validation blocks of T or K*T tokens;
- `stages`: the λ split of the token budget (`plan_stages`) and each stage's batch and TrainingArguments;
- `resume`: the output folder, the run identity, and which checkpoint a re-run resumes from;
- `models`: the model config, tokenizer and patch model of a stage;
- `trainer`: `PatchTrainer`, training one stage, saving its model (DeepSpeed's fp32 masters included), the stage loop;
- `training_args`: `RunTrainingArguments`, transformers' TrainingArguments with this project's defaults;
- `liger`: Liger-Kernel's switches per stage;
- `results`: the accounting in all_results.json;
- `tracking`: what reaches the `--report_to` trackers (one run per job, on the token and compute axes);
- `cli`: one-line errors (`UsageError`), JSON config files, the command-line wrapper.

The model itself is `modeling_llama_patch.py`, beside this package.
"""
