"""DeepSpeed is imported only by a run that uses it.

accelerate 1.16's `extract_model_from_parallel` (called by `Accelerator.unwrap_model`, which transformers'
Trainer calls from its constructor on) imports DeepSpeed whenever the package is installed, to test whether the
model is a `DeepSpeedEngine`. Importing DeepSpeed costs seconds and, on a machine without a GPU, prints
"Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it." in every run.
A model can only be a `DeepSpeedEngine` once DeepSpeed has been imported (a DeepSpeed run imports it when its
TrainingArguments read `--deepspeed`), so `install` makes that test ask whether DeepSpeed is imported rather
than installed: the same answer for every model, without the import.
"""

from __future__ import annotations

import sys


def deepspeed_imported() -> bool:
    """Whether DeepSpeed has been imported in this process (only then can a model be a DeepSpeedEngine)."""
    return "deepspeed" in sys.modules


def install() -> None:
    """Make accelerate's model unwrapping test for a DeepSpeedEngine only once DeepSpeed is imported. Idempotent;
    a no-op where accelerate's module has no such test."""
    from accelerate.utils import other

    if hasattr(other, "is_deepspeed_available"):
        other.is_deepspeed_available = deepspeed_imported
