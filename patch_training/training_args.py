"""`RunTrainingArguments`: transformers' `TrainingArguments` with this project's defaults and checks."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from .cli import UsageError, first_line, loads_json_object, refuse_below, refuse_non_finite
from .launch import launched_on_cpu
from .liger import check_liger_kernel_config


# accelerate's switch for regional compilation (TorchDynamoPlugin.use_regional_compilation), set by
# --torch_compile_regions or by `accelerate launch` with use_regional_compilation in its config.
REGIONAL_COMPILATION_ENV = "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"


# Whether this process set REGIONAL_COMPILATION_ENV itself (for --torch_compile_regions), as opposed to the launcher.
_REGIONAL_SWITCH_SET_HERE = False


def regional_compilation_env() -> bool:
    """Whether REGIONAL_COMPILATION_ENV asks for regional compilation, read as accelerate reads it (the launcher's
    switch once `take_back_regional_compilation_switch` has run). UsageError for a value accelerate would fail on
    later with a traceback."""
    from accelerate.utils import str_to_bool

    value = os.environ.get(REGIONAL_COMPILATION_ENV, "false")
    try:
        return bool(str_to_bool(value))
    except ValueError:
        raise UsageError(f"{REGIONAL_COMPILATION_ENV}={value!r} is not a truth value (accelerate reads y, yes, t, true, "
                         "on, 1 or n, no, f, false, off, 0)") from None


def take_back_regional_compilation_switch() -> None:
    """Remove REGIONAL_COMPILATION_ENV if this process set it (`set_regional_compilation_switch`) and nobody has set
    it since, so that only the launcher's switch stays."""
    global _REGIONAL_SWITCH_SET_HERE
    if _REGIONAL_SWITCH_SET_HERE and os.environ.get(REGIONAL_COMPILATION_ENV) == "true":  # not set again since
        del os.environ[REGIONAL_COMPILATION_ENV]
    _REGIONAL_SWITCH_SET_HERE = False


def set_regional_compilation_switch() -> None:
    """Set REGIONAL_COMPILATION_ENV to "true" for accelerate, remembering that this process set it."""
    global _REGIONAL_SWITCH_SET_HERE
    os.environ[REGIONAL_COMPILATION_ENV] = "true"
    _REGIONAL_SWITCH_SET_HERE = True


@dataclass
class RunTrainingArguments(TrainingArguments):
    """transformers' TrainingArguments plus the job-level flag transformers 5 dropped, with two defaults
    changed so that the training step never waits on the host (see docs/throughput.md):

    - `logging_nan_inf_filter` is False: transformers' filter reads every micro-batch's loss on the host
      (`torch.isnan(loss)` in an `if`), a device synchronisation per micro-batch that stalls the GPU while
      the CPU runs the optimizer step and fetches the next batch. Without it a NaN or inf loss shows in
      the logged loss instead of being hidden, which is what a pre-training run wants to see anyway.
    - on a CUDA machine with pinned memory, `accelerator_config` defaults to {"non_blocking": true}: the
      host-to-device copy of a batch overlaps the step instead of waiting for it. Without an accelerator,
      memory is not pinned.

    `report_to` also takes several trackers separated by commas (`--report_to tensorboard,wandb`): transformers'
    parser takes one value for it on the command line.

    `liger_kernel_config` also takes a JSON string (transformers' parser takes no value for it on the command
    line), and is checked against Liger's switches when `use_liger_kernel` is set (here against all of
    Liger's architectures; run_clm.py checks them against the model's once its config is read).
    """

    _argument_group_name = "training: transformers' TrainingArguments, applied to each stage"

    do_train: bool = field(
        default=True, metadata={"help": "run_clm.py always trains: false is refused (transformers' default is false)."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start again: delete this script's own outputs in --output_dir (never other files, never the "
            "run's inputs). Otherwise a re-run resumes."
        },
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={
            "help": "Replace NaN/inf losses by the running mean when logging (transformers' default True). False "
            "here: the filter syncs the device every micro-batch, and a pre-training run should see a NaN."
        },
    )

    run_name: str | None = field(
        default=None,
        metadata={
            "help": "The job's name in the --report_to trackers: one run for both stages and every resume (TensorBoard: "
            "<output_dir>/runs/<run_name>). Default: the output folder's name."
        },
    )

    liger_kernel_config: dict | str | None = field(
        default=None,
        metadata={
            "help": "With --use_liger_kernel: Liger-Kernel's switches for the model's architecture as a JSON object, e.g. "
            '\'{"fused_linear_cross_entropy": false}\' (keys for Llama: rope, rms_norm, swiglu, cross_entropy, '
            "fused_linear_cross_entropy; Gemma has geglu for swiglu; liger's defaults when unset). The patch stage always turns the two loss "
            "switches off and keeps its K-way loss."
        },
    )

    torch_compile_regions: bool = field(
        default=False,
        metadata={
            "help": "With --torch_compile: compile by regions (accelerate's regional compilation): one compilation of "
            "the decoder layer serves every layer, the other modules are compiled alone, and the top-level forward "
            "(patch means, loss) runs eagerly. Compiling takes a fraction of the whole model's time (370M on CPU: "
            "25 s instead of 70 for the token stage, 5 s instead of 56 for the patch stage, whose layers reuse the "
            "token stage's compilations; see docs/throughput.md)."
        },
    )

    def __reduce_ex__(self, protocol):
        """Pickled as the stock `TrainingArguments` with the same values: transformers' Trainer saves its arguments
        with torch.save in every checkpoint (`training_args.bin`), which then needed this project to load
        (`No module named 'patch_training'`). copy and deepcopy keep this class (`__copy__`, `__deepcopy__`)."""
        import copyreg

        return copyreg._reconstructor, (TrainingArguments, object, None), dict(self.__dict__)

    def __copy__(self):
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def __deepcopy__(self, memo):
        import copy

        clone = object.__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone

    def __post_init__(self):
        refuse_non_finite(self)  # before transformers' own checks, which fail on some (int(inf) for --save_steps)
        self.use_cpu = self.use_cpu or launched_on_cpu(deepspeed=bool(self.deepspeed))  # a launch config is enough
        if isinstance(self.liger_kernel_config, str):
            try:
                self.liger_kernel_config = loads_json_object(self.liger_kernel_config, "--liger_kernel_config")
            except json.JSONDecodeError as error:
                raise UsageError(f"--liger_kernel_config is not valid JSON: {error}") from None
        if isinstance(self.lr_scheduler_kwargs, str) and self.lr_scheduler_kwargs.strip().startswith("{"):
            try:  # transformers would read it too, keeping the last of a key given twice
                self.lr_scheduler_kwargs = loads_json_object(self.lr_scheduler_kwargs, "--lr_scheduler_kwargs")
            except json.JSONDecodeError as error:
                raise UsageError(f"--lr_scheduler_kwargs is not valid JSON: {error}") from None
        if isinstance(self.report_to, str) and "," in self.report_to:  # one flag for several trackers
            self.report_to = [name.strip() for name in self.report_to.split(",") if name.strip()]
        if not torch.accelerator.is_available():
            self.dataloader_pin_memory = False  # nothing to pin for (torch would warn on every data loader)
        if self.accelerator_config is None and self.dataloader_pin_memory and not self.use_cpu and torch.cuda.is_available():
            self.accelerator_config = {"non_blocking": True}
        if self.use_liger_kernel:
            check_liger_kernel_config(self.liger_kernel_config)
        super().__post_init__()  # also turns torch_compile on for a --torch_compile_backend or --torch_compile_mode
        if self.torch_compile_regions and not self.torch_compile:
            raise UsageError("--torch_compile_regions compiles by regions: it needs --torch_compile true")
        # A switch this process set for an earlier run's --torch_compile_regions is not this run's setting: taken
        # back, so that a later run in the same process (a notebook, a benchmark, tests) is not made regional.
        take_back_regional_compilation_switch()
        from_launcher = self.torch_compile and regional_compilation_env()
        if from_launcher:
            self.torch_compile_regions = True  # accelerate would compile by regions anyway (`accelerate launch` config)
        if self.torch_compile_regions and not from_launcher:  # read by accelerate's TorchDynamoPlugin, as
            set_regional_compilation_switch()                # transformers passes backend and mode
        check_training_numbers(self)
        check_settings_run_clm_does_not_honour(self)


def check_training_numbers(args: TrainingArguments) -> None:
    """Refuse the numbers that transformers lets through but that would fail deep inside torch once training
    starts (a batch of 0, Adam's betas outside [0, 1)) or silently do something else than asked (a negative
    weight decay grows the weights, a negative clipping norm turns clipping off, --save_steps 0 saves no
    checkpoint until the end, a negative epoch count, logging or evaluation interval)."""
    refuse_below(args, ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"), 1)
    refuse_below(args, ("learning_rate", "weight_decay", "adam_epsilon"), 0)
    # Negative counts and fractions: an epoch budget below zero, logging or evaluating every -1 steps.
    refuse_below(args, ("num_train_epochs", "logging_steps", "eval_steps", "eval_delay"), 0)
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise UsageError(f"--{name} must lie in [0, 1), got {getattr(args, name)}")
    if args.max_grad_norm is not None and args.max_grad_norm < 0:
        raise UsageError(f"--max_grad_norm must be >= 0 (0 turns gradient clipping off), got {args.max_grad_norm}")
    if args.save_strategy == "steps" and args.save_steps <= 0:
        raise UsageError(
            f"--save_steps must be > 0 (steps, or a fraction of the run below 1), got {args.save_steps}: with "
            "--save_strategy steps, 0 would save no checkpoint before the end of each stage"
        )
    if not 0 <= args.seed <= 2**32 - 1:  # numpy's seed range: set_seed would fail once the folder is claimed
        raise UsageError(f"--seed must lie in [0, 2**32 - 1] (numpy's seed range), got {args.seed}")
    if not 0.0 <= args.label_smoothing_factor < 1.0:
        raise UsageError(f"--label_smoothing_factor must lie in [0, 1), got {args.label_smoothing_factor}")
    check_lr_scheduler_kwargs(args)


# What the Trainer passes to transformers.get_scheduler itself: not for --lr_scheduler_kwargs.
SCHEDULER_OWN_ARGUMENTS = {"optimizer", "num_warmup_steps", "num_training_steps", "last_epoch"}


def check_lr_scheduler_kwargs(args: TrainingArguments) -> None:
    """Refuse --lr_scheduler_kwargs that the Trainer's scheduler would fail on only after the data is tokenised
    (a key the --lr_scheduler_type's schedule does not take, e.g. min_lr for cosine; cosine_with_min_lr without
    min_lr; lr_end above the learning rate for polynomial) or silently ignore (any key for constant and
    constant_with_warmup, whose schedules get_scheduler builds without them), or a key the schedule needs and
    lacks (num_decay_steps for warmup_stable_decay). The scheduler is built the way the
    Trainer builds it, on a throwaway one-parameter optimizer."""
    import inspect

    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType, get_scheduler

    kwargs = args.lr_scheduler_kwargs or {}  # also checked when empty: cosine_with_min_lr needs min_lr or min_lr_rate
    name = SchedulerType(args.lr_scheduler_type)
    flag = f"--lr_scheduler_kwargs for --lr_scheduler_type {name.value}"
    if not isinstance(kwargs, dict):
        raise UsageError(f"{flag} must be a JSON object, got {kwargs!r}")
    parameters = inspect.signature(TYPE_TO_SCHEDULER_FUNCTION[name]).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())  # reduce_lr_on_plateau, greedy
    if not takes_any:
        accepted = [] if name in (SchedulerType.CONSTANT, SchedulerType.CONSTANT_WITH_WARMUP) else [
            p for p in parameters if p not in SCHEDULER_OWN_ARGUMENTS]
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            takes = f"takes only {', '.join(accepted)}" if accepted else "takes none"
            raise UsageError(f"{flag}: unknown key(s) {', '.join(unknown)} ({name.value} {takes})")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    try:
        get_scheduler(name, optimizer, num_warmup_steps=0, num_training_steps=10**6, scheduler_specific_kwargs=dict(kwargs))
    except (TypeError, ValueError) as error:
        raise UsageError(f"{flag}: {first_line(error)}") from None


def check_patch_stage_settings(training_args: TrainingArguments, has_patch_stage: bool) -> None:
    """Refuse the TrainingArguments that make transformers' Trainer compute the loss itself from the logits
    instead of taking the model's: the patch stage's K-way next-patch loss is the model's own (its logits are
    per patch, not per token), so such a loss fails at the first step ("Size does not match at dimension 1"),
    after the output folder is claimed. The token stage (K = 1) is not affected.

    - `--label_smoothing_factor` > 0: Trainer.compute_loss pops the labels and calls its LabelSmoother on the
      logits (transformers 5.24)."""
    if has_patch_stage and training_args.label_smoothing_factor != 0:
        raise UsageError(
            f"--label_smoothing_factor {training_args.label_smoothing_factor} does not work with the patch stage: "
            "transformers' label smoothing replaces the model's K-way patch loss by a token loss on the logits; "
            "use --label_smoothing_factor 0, or --patch_data_fraction 0 (token-level only)"
        )


# Every TrainingArguments setting falls in one of three groups, and tests/test_long_runs.py fails on a setting of
# the installed transformers that is in none, so that a new upstream option cannot slip through unexamined:
# - `identity.MAY_CHANGE`: how a run is launched, logged, saved or evaluated, never what it computes;
# - HONOURED: what it computes, exact in both stages and across resumes, and compared on a resume;
# - REFUSED (and REFUSED_ACCELERATOR_CONFIG): what would change which blocks a step sees, the real global batch,
#   or what a checkpoint or a stage's model holds: any value but the allowed ones is refused in one line.
HONOURED = {
    "num_train_epochs": "the token budget in epochs of the data (without --max_steps), split by λ",
    "max_steps": "the token budget: max_steps x sequences per step x block_size, split by λ",
    "learning_rate": "each stage's peak learning rate (--patch_learning_rate for the patch stage)",
    "lr_scheduler_type": "each stage's schedule, or one over both with --patch_switch continue",
    "lr_scheduler_kwargs": "checked against the schedule (check_lr_scheduler_kwargs)",
    "warmup_steps": "each stage's warmup (--patch_warmup_steps for the patch stage); a stage not longer than it is refused",
    "optim": "the optimizer", "optim_args": "the optimizer's arguments", "optim_target_modules": "GaLore/APOLLO targets",
    "weight_decay": "AdamW's", "adam_beta1": "AdamW's", "adam_beta2": "AdamW's", "adam_epsilon": "AdamW's",
    "average_tokens_across_devices": "how the loss is normalised over ranks",
    "max_grad_norm": "gradient clipping",
    "label_smoothing_factor": "token stage only: refused with a patch stage (check_patch_stage_settings)",
    "bf16": "precision", "fp16": "precision (refused on a CPU)", "bf16_full_eval": "precision",
    "fp16_full_eval": "precision (refused on a CPU)", "tf32": "precision",
    "torch_compile": "compilation, afresh in each stage", "torch_compile_backend": "compilation",
    "torch_compile_mode": "compilation",
    "use_liger_kernel": "Liger's kernels, its loss switches off in the patch stage", "liger_kernel_config": "idem",
    "use_cache": "the model's cache during training (off)",
    "neftune_noise_alpha": "noise on the token embeddings, before the patch means",
    "logging_nan_inf_filter": "what the logged loss shows (the divergence watch reads the gradient norm too)",
    "run_name": "the trackers' name for the job",
    "prediction_loss_only": "evaluation", "include_for_metrics": "evaluation", "batch_eval_metrics": "evaluation",
    "metric_for_best_model": "which checkpoint is the best (kept by rotation, not handed over)",
    "greater_is_better": "idem",
    "restore_callback_states_from_checkpoint": "callbacks' own state on a resume",
    "full_determinism": "deterministic kernels", "seed": "weights and data order", "data_seed": "data order",
    "accelerator_config": "checked field by field (REFUSED_ACCELERATOR_CONFIG)",
    "remove_unused_columns": "the blocks hold only input_ids and labels",
    "length_column_name": "used only by a length-grouped sampler, which is refused",
    "ddp_broadcast_buffers": "DDP's buffers",
    "fsdp": "the backend, checked against the launch", "fsdp_config": "idem", "deepspeed": "idem",
    "debug": "detection only",
}

# setting: (the values that work, why others are refused)
REFUSED = {
    "ignore_data_skip": ((False,), "a resumed stage would start its block order again: some blocks trained twice, "
                         "others never"),
    "auto_find_batch_size": ((False,), "it shrinks the micro-batch after an out-of-memory error without keeping the "
                             "global batch that the λ split and the accounting rely on"),
    "load_best_model_at_end": ((False,), "each stage hands its last weights on (the paper's handover), not its best "
                               "checkpoint's"),
    "enable_jit_checkpoint": ((False,), "run_clm.py saves and stops on SIGTERM and SIGUSR1 itself, every rank at one "
                              "step (docs/long-runs.md)"),
    "dataloader_in_order": ((True,), "batches out of order would make the block order depend on the loader workers' "
                            "timing: a resume would not read the same blocks"),
    "dataloader_drop_last": ((False,), "it would drop the last validation blocks (the perplexity over fewer than "
                             "--max_eval_blocks) and the last partial training batch, which the accounting counts "
                             "(run_clm.py cuts whole blocks itself)"),
    "train_sampling_strategy": (("random", "sequential"), "the blocks all have one length: grouping or rebalancing "
                                "them by length only reorders them in a way a resume does not reproduce"),
    "parallelism_config": ((None,), "tensor or context parallelism makes the data-parallel ranks fewer than the "
                           "processes, which the global batch and the λ split count"),
    "label_names": ((None, ["labels"]), "the blocks hold their targets as labels"),
}
REFUSED_ACCELERATOR_CONFIG = {
    "split_batches": ((False,), "--per_device_train_batch_size would become the batch of all ranks together, not "
                      "the per-device one the global batch is counted from"),
    "even_batches": ((True,), "the last batches of the ranks would differ in size from what the accounting counts"),
    "use_seedable_sampler": ((True,), "the shuffled block order would not be reproduced on a resume"),
}


def flag_value(value) -> str:
    """A setting's value as it is written on the command line (booleans in lower case)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_settings_run_clm_does_not_honour(args: TrainingArguments) -> None:
    """Refuse TrainingArguments that transformers accepts but that would do nothing here, or something else than
    asked, without a word: the REFUSED settings and accelerator_config fields at any value but theirs;
    run_clm.py always trains (`--do_train false`) and never predicts (`--do_predict`); `--fp16` /
    `--fp16_full_eval` on a CPU are ignored by transformers (the run is fp32; --bf16 with --use_cpu autocasts)."""
    if not args.do_train:
        raise UsageError("--do_train false: run_clm.py always trains (to evaluate a model, use scripts/eval_perplexity.py)")
    if args.do_predict:
        raise UsageError("--do_predict: run_clm.py has no prediction step (it evaluates perplexity on --validation_file)")
    for name, (allowed, why) in REFUSED.items():
        value = getattr(args, name, allowed[0])
        value = getattr(value, "value", value)  # an enum by its value
        if value not in allowed:
            raise UsageError(f"--{name} {flag_value(value)}: not supported by run_clm.py: {why}")
    accelerator_config = args.accelerator_config
    for name, (allowed, why) in REFUSED_ACCELERATOR_CONFIG.items():
        value = getattr(accelerator_config, name, allowed[0]) if accelerator_config is not None else allowed[0]
        if value not in allowed:
            raise UsageError(f"--accelerator_config {name}={flag_value(value)}: not supported by run_clm.py: {why}")
    on_cpu = args.use_cpu or not torch.accelerator.is_available()
    for name in ("fp16", "fp16_full_eval"):
        if getattr(args, name) and on_cpu:
            raise UsageError(f"--{name} needs a GPU: on a CPU transformers runs in fp32 without a word (use --bf16 "
                             "true --use_cpu true for bf16 autocast on a CPU, or drop the flag)")


def requested_backend(args: TrainingArguments) -> str | None:
    """The sharding backend a launch asks for: "fsdp" (--fsdp, or an `accelerate launch` FSDP config, which sets
    ACCELERATE_USE_FSDP), "deepspeed" (--deepspeed, or ACCELERATE_USE_DEEPSPEED), or None (DDP or one process)."""
    from accelerate.utils import str_to_bool

    def from_launcher(name: str) -> bool:
        try:
            return bool(str_to_bool(os.environ.get(name, "false")))
        except ValueError:
            return False

    if args.fsdp or from_launcher("ACCELERATE_USE_FSDP"):
        return "fsdp"
    if args.deepspeed or from_launcher("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    return None


def check_backend_available(args: TrainingArguments) -> None:
    """UsageError, before anything is written, for a requested backend that cannot run here: FSDP without a GPU
    (accelerate runs an FSDP config on a CPU as plain DDP without a word, or fails after the output folder is
    claimed when the config syncs module states)."""
    if requested_backend(args) == "fsdp" and (args.use_cpu or not torch.cuda.is_available()):
        raise UsageError("FSDP needs CUDA GPUs: on a CPU accelerate would run the job as plain DDP, unsharded; use "
                         "DDP (configs/accelerate/cpu_ddp_2proc.yaml) or DeepSpeed ZeRO on a CPU, or run on GPUs")


def backend_in_use(trainer) -> dict:
    """What a Trainer actually trains with: {"backend": "FSDP" / "DEEPSPEED" / "MULTI_GPU" / "MULTI_CPU" / "NO"
    (accelerate's distributed type), "world_size", and for FSDP its "fsdp_version" and "sharding", for DeepSpeed
    its "zero_stage"}. UsageError when a requested FSDP or DeepSpeed did not take (`requested_backend`)."""
    state = trainer.accelerator.state
    used = {"backend": str(getattr(state.distributed_type, "value", state.distributed_type)),
            "world_size": trainer.args.world_size}
    plugin = getattr(state, "fsdp_plugin", None)
    if plugin is not None:
        strategy = getattr(plugin, "sharding_strategy", None) or getattr(plugin, "reshard_after_forward", None)
        used.update(fsdp_version=getattr(plugin, "fsdp_version", 1), sharding=str(getattr(strategy, "name", strategy)))
    deepspeed_plugin = getattr(state, "deepspeed_plugin", None)
    if deepspeed_plugin is not None:
        used["zero_stage"] = deepspeed_plugin.zero_stage
    requested = requested_backend(trainer.args)
    if requested is not None and used["backend"].lower() != requested:
        raise UsageError(f"{requested} was asked for, but accelerate set up {used['backend']}: check the launch config")
    return used


# torch.compile's modes (torch.compile's docstring); None is its default.
TORCH_COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_trainer_settings(args: TrainingArguments) -> None:
    """Refuse the settings the Trainer would fail on only once it is built, after the output folder is claimed
    (and, with --overwrite_output_dir, the earlier run's outputs deleted): an optimizer whose package is missing
    or whose --optim_args do not parse (resolved by transformers' own `Trainer.get_optimizer_cls_and_kwargs`;
    those that need the model, GaLore, APOLLO, LOMO, are resolved only when their package is there), an unknown
    --torch_compile_backend or --torch_compile_mode, --push_to_hub without access to the Hub (offline, no login:
    the Trainer creates the repository first)."""
    from transformers import Trainer

    optim = getattr(args.optim, "value", args.optim)
    try:
        Trainer.get_optimizer_cls_and_kwargs(args)
    except ImportError as error:
        raise UsageError(f"--optim {optim}: {first_line(error)}") from None
    except (ValueError, TypeError) as error:
        if "model" not in str(error):  # not "needs the model", which only the Trainer has
            raise UsageError(f"--optim {optim} with --optim_args {args.optim_args!r}: {first_line(error)}") from None
    if args.torch_compile:
        from accelerate.utils import DynamoBackend

        backend = args.torch_compile_backend or "inductor"
        if backend.upper() not in DynamoBackend.__members__:
            names = ", ".join(b.lower() for b in DynamoBackend.__members__ if b != "NO")
            raise UsageError(f"--torch_compile_backend {backend!r} is not a backend accelerate knows ({names})")
        if args.torch_compile_mode not in TORCH_COMPILE_MODES:
            raise UsageError(f"--torch_compile_mode {args.torch_compile_mode!r} is not one of torch.compile's modes "
                             f"({', '.join(m for m in TORCH_COMPILE_MODES if m)})")
    if args.push_to_hub:
        from huggingface_hub import HfApi, constants

        if constants.HF_HUB_OFFLINE:
            raise UsageError("--push_to_hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set: drop --push_to_hub")
        try:
            HfApi().whoami(token=args.hub_token)
        except Exception as error:  # not logged in, no network, a bad token: huggingface_hub's and httpx's errors
            raise UsageError(f"--push_to_hub cannot reach the Hugging Face Hub as a logged-in user ({first_line(error)}): "
                             "log in (hf auth login) or drop --push_to_hub") from None


def torch_compile_caveat(training_args: TrainingArguments) -> str | None:
    """A warning for `--torch_compile` under DeepSpeed ZeRO-3, whose per-module parameter hooks dynamo traces
    and recompiles for every module until its recompile limit, then runs eagerly (None otherwise)."""
    config = getattr(training_args, "hf_deepspeed_config", None)
    stage = config.config.get("zero_optimization", {}).get("stage") if config is not None else None
    if not training_args.torch_compile or stage != 3:
        return None
    return ("--torch_compile under DeepSpeed ZeRO-3: torch.compile traces ZeRO-3's per-module parameter hooks, "
            "recompiles them module by module and, past its recompile limit (8), runs them eagerly: the job is "
            "correct but only partly compiled (deepspeed 0.19.8, torch 2.13). ZeRO-2 or DDP compile fully.")
