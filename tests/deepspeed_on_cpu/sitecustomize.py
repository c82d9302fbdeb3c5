"""Lets the tests run DeepSpeed on CPU: put this folder on PYTHONPATH of a `deepspeed` launch (tests only).

Python imports `sitecustomize` at start-up, so each rank (LOCAL_RANK set) gets three changes before run_clm.py
runs, none of which touches run_clm.py or the configs:

1. accelerate (1.15) finds no backend for a DeepSpeed launch on a machine without an accelerator and
   reports 1 process, while DeepSpeed itself runs gloo over all of them; the Trainer then fills DeepSpeed's
   train_batch_size for 1 process and DeepSpeed rejects it. Here accelerate is given the gloo backend.
   (`--use_cpu true` is no way out: with it accelerate leaves DeepSpeed out altogether.)
2. DeepSpeed's shared-memory allreduce for CPU is compiled on first use (a minute on 2 cores): it is turned
   off, and gloo does the allreduce.
3. transformers refuses `--bf16` without a GPU unless `--use_cpu` (which leaves DeepSpeed out, see 1.), yet
   DeepSpeed's CPU accelerator runs bf16 (its BF16 ZeRO optimizers, fp32 master weights): transformers'
   check is told that bf16 is available, so that a test can run DeepSpeed with `--bf16 true`.
"""

import os

if os.environ.get("LOCAL_RANK") is not None:
    import deepspeed.ops
    import transformers.training_args
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    _prepare_backend = PartialState._prepare_backend

    def _prepare_backend_for_deepspeed_on_cpu(self, cpu=False, sagemaker_dp=False, backend=None):
        found, distributed_type = _prepare_backend(self, cpu, sagemaker_dp, backend)
        if found is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            return "gloo", DistributedType.MULTI_CPU
        return found, distributed_type

    PartialState._prepare_backend = _prepare_backend_for_deepspeed_on_cpu
    transformers.training_args.is_torch_bf16_gpu_available = lambda: True
