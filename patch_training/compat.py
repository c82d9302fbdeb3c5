"""Work-arounds for the oldest transformers this project supports (5.17, the version on the GPU image), each
for a bug that a later release fixed; each is a no-op on the releases that have the fix."""

from __future__ import annotations

import functools
import re

import torch
import transformers
from packaging.version import Version

# transformers 5.17's Trainer loads a checkpoint's optimizer state with map_location=args.device when
# world_size > 1, which is the indexed device "cpu:0" on a multi-process CPU run; torch.load cannot restore
# "cpu:0" ("don't know how to restore data location of torch.storage.UntypedStorage (tagged with cpu:0)"), so a
# resume or `--patch_switch continue` failed there. 5.18 maps to plain "cpu" (Trainer._load_optimizer_and_scheduler).
CPU_MAP_LOCATION_FIXED_IN = "5.18"
_INDEXED_CPU = re.compile(r"cpu:\d+")


def _restore_indexed_cpu(storage, location: str):
    """torch.serialization deserializer: a storage mapped to "cpu:N" stays where it was read, on the CPU (the
    only CPU device). Returns None for every other location, which the next registered deserializer handles."""
    return storage if _INDEXED_CPU.fullmatch(location) else None


def transformers_at_least(version: str) -> bool:
    """Whether the installed transformers is `version` or newer, by release numbers alone (a "5.18.0.dev0"
    counts as 5.18)."""
    return Version(transformers.__version__).release >= Version(version).release


@functools.cache  # registered once
def register_indexed_cpu() -> None:
    """Let torch.load restore storages mapped to "cpu:N" (on the CPU). Idempotent."""
    # Priority 11: just after torch's own "cpu" (10); the tagger never claims a storage at save time.
    torch.serialization.register_package(11, lambda storage: None, _restore_indexed_cpu)


def install() -> bool:
    """Install the work-arounds the running transformers needs; returns whether any was. Idempotent."""
    if transformers_at_least(CPU_MAP_LOCATION_FIXED_IN):
        return False
    register_indexed_cpu()
    return True
