"""What defines a run: the settings and input contents that a re-run must share to resume it.

Default-deny: every field of the argument dataclasses is part of the identity except those on the documented
allow-list `MAY_CHANGE`, so an argument added later (by run_clm.py or by transformers) is compared on resume
unless it is listed there with its reason. Beside the arguments, the identity holds what they resolve to and
what the input paths hold: the global batch of each stage, the files that data patterns expand to, the model
config's values, the tokenizer's fingerprint, the starting weights' files and each data file's content stamp.

`run_dir.RunDir` records the identity in the output folder and compares a re-run's with it; this module only
computes identities and describes their differences.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os

from .cli import describe_change
from .models import weight_files
from .readers import READING_RULE_VERSION, content_stamp, expand_data_files
from .stages import global_batch_size, patch_sequences_per_step
from .token_cache import TOKENIZATION_RULE_VERSION, tokenizer_fingerprint

# Settings that may change between attempts of one run: they change how the run is launched, logged, saved or
# evaluated, or how the same numbers are computed, never the numbers.
MAY_CHANGE = {
    # Where the run lives and how it is launched on this machine.
    "output_dir": "the folder may be moved",
    "overwrite_output_dir": "decides whether to start again, not what is computed",
    "resume_from_checkpoint": "refused anyway: run_clm resumes by itself",
    "local_rank": "differs from rank to rank",
    "use_cpu": "the same computation on another device",
    "do_train": "always true (false is refused)", "do_eval": "unused by run_clm (--eval_strategy decides)",
    "do_predict": "always false (true is refused)",
    # The split of an unchanged global batch: sequences per optimizer step over all ranks
    # (`sequences_per_step`, `patch_sequences_per_step`) are compared instead.
    "per_device_train_batch_size": "compared as sequences_per_step",
    "gradient_accumulation_steps": "compared as sequences_per_step",
    "patch_per_device_train_batch_size": "compared as patch_sequences_per_step",
    "patch_gradient_accumulation_steps": "compared as patch_sequences_per_step",
    # How the same data is read and cached.
    "data_cache_dir": "where the token cache lives (its key holds what determines its tokens)",
    "tokenize_batch_size": "documents per tokenizer call: the same tokens",
    "preprocessing_num_workers": "processes that tokenise: the same tokens",
    "dataloader_num_workers": "loader processes", "dataloader_pin_memory": "loader memory",
    "dataloader_persistent_workers": "loader processes", "dataloader_prefetch_factor": "loader queue",
    "dataloader_multiprocessing_context": "loader processes",
    # Memory and speed only: the same values computed another way.
    "attn_implementation": "the attention kernel (eager, SDPA, FlashAttention-2) of the same function",
    "gradient_checkpointing": "recomputes the same activations", "gradient_checkpointing_kwargs": "idem",
    "activation_checkpointing": "recomputes the same activations", "activation_checkpointing_kwargs": "idem",
    "torch_empty_cache_steps": "frees cached memory",
    "ddp_timeout": "a timeout", "ddp_backend": "the transport", "ddp_bucket_cap_mb": "communication buckets",
    "ddp_find_unused_parameters": "a DDP check", "ddp_static_graph": "a DDP optimisation",
    "skip_memory_metrics": "reporting",
    # Logging and progress.
    "logging_strategy": "logging cadence", "logging_steps": "logging cadence", "logging_first_step": "logging",
    "log_on_each_node": "logging", "log_level": "logging", "log_level_replica": "logging", "disable_tqdm": "progress bar",
    "include_num_input_tokens_seen": "logging", "report_to": "where logs go",
    "project": "a label", "trackio_space_id": "where logs go", "trackio_bucket_id": "where logs go",
    "trackio_static_space_id": "where logs go",
    # Saving and pushing.
    "save_strategy": "saving cadence", "save_steps": "saving cadence", "save_total_limit": "checkpoints kept",
    "save_on_each_node": "saving", "save_only_model": "what a checkpoint holds (a model-only checkpoint is refused on resume)",
    "push_to_hub": "publishing", "hub_token": "a secret: never recorded", "hub_private_repo": "publishing",
    "hub_model_id": "publishing", "hub_strategy": "publishing", "hub_always_push": "publishing",
    "hub_revision": "publishing",
    # Evaluation cadence (what is evaluated, --validation_file and --max_eval_blocks, is compared).
    "eval_strategy": "evaluation cadence", "eval_steps": "evaluation cadence", "eval_delay": "evaluation cadence",
    "eval_on_start": "evaluation cadence", "per_device_eval_batch_size": "evaluation batching: the same mean loss",
    "eval_accumulation_steps": "evaluation memory", "eval_do_concat_batches": "evaluation memory",
    "eval_use_gather_object": "evaluation gathering",
}


def identity_value(value):
    """A setting as JSON: enums by their value, dataclasses and dicts as sorted dicts, sequences as lists,
    other objects by their str."""
    if isinstance(value, enum.Enum):
        return identity_value(value.value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): identity_value(v) for k, v in sorted(value.items(), key=lambda item: str(item[0]))}
    if isinstance(value, (list, tuple)):
        return [identity_value(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def run_identity(arguments, derived: dict | None = None) -> dict:
    """Every init field of the argument dataclass instances `arguments`, JSON-normalised, except those on
    `MAY_CHANGE`, plus the `derived` entries (e.g. `batch_identity`)."""
    identity = {}
    for obj in arguments:
        for f in dataclasses.fields(obj):
            if f.init and f.name not in MAY_CHANGE:
                identity[f.name] = identity_value(getattr(obj, f.name))
    identity.update(derived or {})
    return identity


def batch_identity(patch_args, training_args) -> dict:
    """The global batches, which per-device batch, accumulation and world size may split differently between
    attempts: sequences per optimizer step over all ranks, of each stage (None without a patch stage).
    UsageError (from `stages.stage_batch_settings`) when the patch stage's batch cannot be derived. Under
    DeepSpeed the world size is part of it too (`deepspeed_world_size`, None otherwise): ZeRO partitions the
    optimizer state over the ranks and cannot load a checkpoint written by another number of them."""
    return {
        "deepspeed_world_size": training_args.world_size if training_args.deepspeed else None,
        "sequences_per_step": global_batch_size(training_args),
        "patch_sequences_per_step": (
            patch_sequences_per_step(patch_args, training_args) if patch_args.has_patch_stage else None
        ),
    }


def data_files_identity(data_args) -> dict:
    """The files that the folders and glob patterns of --train_file and --validation_file expand to, in order
    (`readers.expand_data_files`): a new shard matched by the same pattern is another run."""
    def files(spec, argument):
        return expand_data_files(spec, argument) if spec else None

    return {"train_files": files(data_args.train_file, "train_file"),
            "validation_files": files(data_args.validation_file, "validation_file")}


def init_weights_identity(model_name_or_path: str | None) -> dict | None:
    """{file: `readers.content_stamp`} of the files a local --model_name_or_path folder's weights load from
    (`models.weight_files`), None for a hub name or no checkpoint. Only those: the
    folder may also hold a run's checkpoints and logs, or this run's own output folder, which change while the
    weights do not."""
    if not (model_name_or_path and os.path.isdir(model_name_or_path)):
        return None
    return {name: content_stamp(os.path.join(model_name_or_path, name)) for name in weight_files(model_name_or_path)}


def content_identity(model_name_or_path: str | None, config, tokenizer, train_source, eval_source) -> dict:
    """What the run's input paths hold: a file rewritten in place between attempts (another shard under the same
    name, an edited model config, another tokenizer) is another run, refused on resume like a changed flag.
    Data files are identified as the token cache identifies them, without reading them (`readers.content_stamp`),
    with the versions of the rules that make documents of files and tokens of documents
    (`readers.READING_RULE_VERSION`, `token_cache.TOKENIZATION_RULE_VERSION`); the starting weights by their
    files (`init_weights_identity`); the model config by its values; the tokenizer by
    `token_cache.tokenizer_fingerprint`."""
    def data(source):
        return None if source is None else {name: content_stamp(name) for name in source.names}

    values = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    return {
        "model_config": json.loads(json.dumps(values, sort_keys=True, default=str)),
        "init_weight_files": init_weights_identity(model_name_or_path),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "train_data": data(train_source),
        "validation_data": data(eval_source),
        "reading_rule_version": READING_RULE_VERSION,
        "tokenization_rule_version": TOKENIZATION_RULE_VERSION,
    }


def job_identity(args, inputs) -> dict:
    """The whole identity of the job of `args` (run_clm.py's JobArguments: model, data, patch, training) with
    the loaded `inputs` (`job.JobInputs`): every argument but `MAY_CHANGE`, the global batches, the data files,
    and the contents of the inputs."""
    derived = {**batch_identity(args.patch, args.training), **data_files_identity(args.data)}
    identity = run_identity((args.model, args.data, args.patch, args.training), derived)
    identity.update(content_identity(args.model.model_name_or_path, inputs.config, inputs.tokenizer,
                                     inputs.train_source, inputs.eval_source))
    return identity


SHOWN_CHANGES = 5  # changed settings named in a message, then a count


def identity_changes(recorded: dict, identity: dict) -> str | None:
    """The entries in which `identity` differs from the `recorded` one, each as `cli.describe_change` says it, in
    the identity's order, joined by "; " (the first SHOWN_CHANGES, then "and N more"); None where none differs.
    An entry that only one of them holds differs too (default-deny: "(absent)" on the side that lacks it)."""
    changed = []
    for key in [*identity, *(key for key in recorded if key not in identity)]:
        old, new = recorded.get(key, "(absent)"), identity.get(key, "(absent)")
        if old != new:
            changed.append(describe_change(key, old, new))
    if len(changed) > SHOWN_CHANGES:
        changed = [*changed[:SHOWN_CHANGES], f"and {len(changed) - SHOWN_CHANGES} more"]
    return "; ".join(changed) or None
