"""What reaches the experiment trackers (`--report_to`): one job is one experiment, on the paper's axes.

transformers' tracker callbacks (TensorBoard, W&B, MLflow, ...) see one Trainer at a time, and a job runs two:
left alone they would make two runs (TensorBoard: `<stage dir>/runs/<date>` each) whose steps both start at 0,
so the token stage's curve lands on top of the patch stage's. Here each tracker callback of a stage's Trainer is
wrapped (`OnJobAxis`) so that

- its points are logged at the *job* step: the patch stage's steps, then patch steps + the token stage's step
  (the Trainer's own `state.global_step`, checkpoints and resume are untouched: only the tracker sees the job
  step, and only in `on_log`; its other events, e.g. a checkpoint upload that names `checkpoint-<step>`, get
  the stage's state);
- every logged point carries the paper's axes: `tokens`, the training tokens read so far, `positions`, the
  compute so far in token-level equivalents (a patch-stage token counts 1/K), and `patch_size`, the stage's K
  (1 in the token stage), so a chart can be split by stage. They are the numbers of `all_results.json`
  (`results.tokens_seen`) and of `scripts/plot_curves.py`; trackers that prefix keys show `train/tokens` etc.;
- it writes to one run: TensorBoard to one folder for the job, `<output_dir>/runs/<run name>` (`JobTensorBoardCallback`),
  W&B to one run (its id kept in that folder's `run.json`, resumed with `resume="allow"`), every tracker under
  one name, the output folder's name unless `--run_name` is given;
- a resumed stage, which logs again the steps between its checkpoint and the kill, leaves no duplicated points:
  TensorBoard's writer starts with `purge_step` at the first step it will log, and TensorBoard's reader drops
  the points the killed attempt logged from there on; the other trackers, which cannot drop points, are not
  given the steps up to the last one logged before (`logged_step` in `run.json`): the resumed computation
  repeats them (resume ends with the uninterrupted run's weights).

`check_report_to` refuses, before any work, a tracker that is not installed (one line naming the package).
"""

from __future__ import annotations

import copy
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback
from transformers.integrations import integration_utils as hf
from transformers.integrations import TensorBoardCallback, WandbCallback

from .cli import UsageError, write_json_atomic
from .results import tokens_seen
from .stages import global_batch_size

RUNS_DIR = "runs"
RUN_RECORD = "run.json"

# Every tracker transformers accepts in --report_to: (is it usable here, what to do when it is not).
TRACKER_REQUIREMENTS = {
    "azure_ml": (hf.is_azureml_available, "pip install azureml-core"),
    "clearml": (hf.is_clearml_available, "pip install clearml"),
    "codecarbon": (hf.is_codecarbon_available, "pip install codecarbon"),
    "comet_ml": (hf.is_comet_available, "pip install 'comet-ml>=3.43.2' and set COMET_API_KEY"),
    "dagshub": (hf.is_dagshub_available, "pip install dagshub mlflow"),
    "dvclive": (hf.is_dvclive_available, "pip install dvclive"),
    "flyte": (hf.is_flyte_deck_standard_available, "pip install flytekit flytekitplugins-deck-standard"),
    "kubeflow": (hf.is_kubeflow_available, "it runs only inside a Kubeflow Trainer job (KUBEFLOW_TRAINER_SERVER_URL unset)"),
    "mlflow": (hf.is_mlflow_available, "pip install mlflow (and unset DISABLE_MLFLOW_INTEGRATION)"),
    "neptune": (hf.is_neptune_available, "pip install neptune"),
    "swanlab": (hf.is_swanlab_available, "pip install swanlab"),
    "tensorboard": (hf.is_tensorboard_available, "pip install tensorboard"),
    "trackio": (hf.is_trackio_available, "pip install trackio"),
    "wandb": (hf.is_wandb_available, "pip install wandb"),
}


def check_report_to(report_to: list[str] | None) -> None:
    """UsageError (one line) for a `--report_to` name that transformers does not know, or whose package is not
    installed (transformers would raise a RuntimeError traceback when the first stage's Trainer is built).
    `report_to`: TrainingArguments.report_to after its __post_init__ ("all" already expanded, "none" = [])."""
    for name in report_to or []:
        if name not in hf.INTEGRATION_TO_CALLBACK:
            raise UsageError(
                f"--report_to {name!r} is not a tracker transformers knows ({', '.join(sorted(hf.INTEGRATION_TO_CALLBACK))}); "
                "several are separated by commas (--report_to tensorboard,wandb)"
            )
        requirement = TRACKER_REQUIREMENTS.get(name)
        if requirement is not None and not requirement[0]():
            raise UsageError(f"--report_to {name}: {name} is not available here: {requirement[1]}")


def job_run_name(output_dir: str, run_name: str | None) -> str:
    """The job's name in every tracker: `--run_name`, else the output folder's name."""
    return run_name or Path(os.path.abspath(output_dir)).name


@dataclass(frozen=True)
class JobAxis:
    """Where one stage lies on the job's axes: the job step and the paper's token and compute axes.

    step_offset, tokens_before, positions_before: the optimizer steps, tokens and positions (tokens / K) of the
    stages before this one (the patch stage's, for the token stage). `plan`: the stage's `StagePlan`;
    `global_batch`: its sequences per optimizer step over all ranks."""

    output_dir: str
    run_name: str
    plan: object
    global_batch: int
    step_offset: int = 0
    tokens_before: int = 0
    positions_before: int = 0

    @classmethod
    def for_stage(cls, output_dir: str, run_name: str | None, plan, stage_args, previous: dict | None = None) -> JobAxis:
        """The axis of the stage `plan` trained with TrainingArguments `stage_args`, after the stage whose
        all_results.json record (steps, tokens, positions) is `previous` (None for the first stage)."""
        global_batch = global_batch_size(stage_args)
        before = previous or {}
        return cls(output_dir, job_run_name(output_dir, run_name), plan, global_batch, int(before.get("steps", 0)),
                   int(before.get("tokens", 0)), int(before.get("positions", 0)))

    @property
    def logging_dir(self) -> Path:
        """The job's one TensorBoard folder, `<output_dir>/runs/<run name>`, shared by both stages and all resumes;
        it also holds the tracking record `run.json`."""
        return Path(self.output_dir) / RUNS_DIR / self.run_name

    def job_step(self, stage_step: int) -> int:
        return self.step_offset + stage_step

    def at(self, stage_step: int) -> dict[str, int]:
        """The axes after `stage_step` optimizer steps of this stage: cumulative `tokens`, `positions` (compute in
        token-level equivalents) and the stage's `patch_size`, as `results.tokens_seen` counts them."""
        tokens, positions = tokens_seen(self.plan, stage_step, self.global_batch)
        return {"tokens": self.tokens_before + tokens, "positions": self.positions_before + positions,
                "patch_size": self.plan.patch_size}

    def run_record(self) -> dict:
        """The job's tracking record, `<logging_dir>/run.json`: `run_name`, `run_id` (the W&B run id, made on first
        use and kept, so that both stages and every resume log to one run) and `logged_step` (the last job step
        handed to the trackers). `--overwrite_output_dir` deletes it with the run."""
        record = self.logging_dir / RUN_RECORD
        if record.is_file():
            return json.loads(record.read_text())
        return {"run_name": self.run_name, "run_id": uuid.uuid4().hex[:16], "logged_step": 0}

    def update_run_record(self, **changes) -> dict:
        record = {**self.run_record(), **changes}
        self.logging_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.logging_dir / RUN_RECORD, record)
        return record

    def attach(self, trainer) -> None:
        """Put every tracker callback of `trainer` (those transformers made from `--report_to`) on this axis, under
        the job's run name; TensorBoard's writes to the job's folder."""
        trackers = tuple(hf.INTEGRATION_TO_CALLBACK.values())
        callbacks = trainer.callback_handler.callbacks
        for index, callback in enumerate(callbacks):
            if isinstance(callback, TensorBoardCallback):
                callback = JobTensorBoardCallback(self.logging_dir)
            if isinstance(callback, trackers):
                callbacks[index] = OnJobAxis(callback, self)
        if any(isinstance(c, OnJobAxis) for c in callbacks):
            trainer.args.run_name = self.run_name


class JobTensorBoardCallback(TensorBoardCallback):
    """transformers' TensorBoardCallback writing to the job's folder (`TENSORBOARD_LOGGING_DIR` if set, as in
    transformers); the first writer of a stage starts with `purge_step` (torch's SummaryWriter): TensorBoard then
    drops the points that an earlier, killed attempt logged from that step on, which the resumed stage logs again."""

    def __init__(self, logging_dir: Path):
        super().__init__()  # reads TENSORBOARD_LOGGING_DIR into self.logging_dir
        self.logging_dir = self.logging_dir or str(logging_dir)
        self.purge_step: int | None = None

    def _init_summary_writer(self, args):
        self.tb_writer = self._SummaryWriter(log_dir=self.logging_dir, purge_step=self.purge_step)
        self.purge_step = None  # a writer made later in the stage (the evaluation after training) purges nothing


class OnJobAxis(TrainerCallback):
    """A tracker callback on the job's axis: `on_log` gets a copy of the state whose `global_step` is the job
    step, and logs extended with the axes (`JobAxis.at`), less the keys already logged at that step (the
    Trainer repeats `epoch` in every log of a step, and the final evaluation repeats the last one); every other
    event is passed on unchanged."""

    def __init__(self, tracker: TrainerCallback, axis: JobAxis):
        self.tracker = tracker
        self.axis = axis
        self._logged_step: int | None = None  # the Trainer logs several times a step (loss, evaluation, summary):
        self._logged_keys: set[str] = set()  # each key goes to the tracker once a step (epoch, the axes, ...)
        self._logged_before: int | None = None  # job steps up to this one are not logged again (see on_log)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            # Before any log of this attempt: the steps up to the last one an earlier (killed) attempt logged are
            # logged again by a resumed stage. TensorBoard drops the earlier points past the checkpoint instead.
            self._logged_before = self.axis.run_record()["logged_step"]
            if isinstance(self.tracker, JobTensorBoardCallback):
                self._logged_before = self.axis.job_step(state.global_step)
                self.tracker.purge_step = self._logged_before + 1
            if isinstance(self.tracker, WandbCallback):
                self._start_wandb_run()
        result = self.tracker.on_train_begin(args, state, control, **kwargs)
        if state.is_world_process_zero and isinstance(self.tracker, WandbCallback):
            import wandb

            for axis in ("train/tokens", "train/positions"):
                wandb.define_metric(axis)
            wandb.define_metric("*", step_metric="train/tokens", step_sync=True)  # charts against training tokens
        return result

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and isinstance(self.tracker, WandbCallback) and not self.tracker._initialized:
            self._start_wandb_run()  # a Trainer that only evaluates (λ = 1, the final evaluation) had no train begin
        job_state = copy.copy(state)
        job_state.global_step = self.axis.job_step(state.global_step)
        if self._logged_before is None:  # a Trainer that only evaluates (no train begin)
            self._logged_before = self.axis.run_record()["logged_step"] if state.is_world_process_zero else 0
        if job_state.global_step <= self._logged_before:
            return control  # logged already, by a killed attempt or the stage's own last evaluation
        if self._logged_step != job_state.global_step:
            self._logged_step, self._logged_keys = job_state.global_step, set()
        logs = {key: value for key, value in {**(logs or {}), **self.axis.at(state.global_step)}.items()
                if key not in self._logged_keys}
        if not logs:
            return control
        self._logged_keys.update(logs)
        result = self.tracker.on_log(args, job_state, control, logs=logs, **kwargs)
        if state.is_world_process_zero and job_state.global_step > self.axis.run_record()["logged_step"]:
            self.axis.update_run_record(logged_step=job_state.global_step)
        return result

    def _start_wandb_run(self):
        """Open (or resume) the job's one W&B run before transformers' WandbCallback would open an anonymous one
        per process: a run left open by another job in this process is finished first."""
        import wandb

        run_id = self.axis.update_run_record()["run_id"]  # kept from the first attempt on
        if wandb.run is not None and wandb.run.id != run_id:
            wandb.finish()
        if wandb.run is None:
            wandb.init(project=os.getenv("WANDB_PROJECT", "huggingface"), id=run_id, name=self.axis.run_name, resume="allow")


def _pass_on(event: str):
    def method(self, args, state, control, **kwargs):
        return getattr(self.tracker, event)(args, state, control, **kwargs)

    method.__name__ = event
    return method


for _event in [name for name in vars(TrainerCallback) if name.startswith("on_") and name not in vars(OnJobAxis)]:
    setattr(OnJobAxis, _event, _pass_on(_event))
