"""Faults injected into the real training loop, for tests that cannot get them otherwise. Put this directory on
PYTHONPATH and Python imports it at start-up, in the entrypoint and in every process torchrun starts. Once
transformers' Trainer is imported, it is patched as the environment asks:

- FAKE_CUDA_OOM="<rank>:<step>" (tests/test_failure_codes.py; there is no GPU here to run out of): the training
  step <step> of global rank <rank> raises torch.OutOfMemoryError with the message torch's CUDA caching
  allocator writes, from inside LLaMA-Factory's training loop, where a real one would come from.
- SLOW_CHECKPOINT_SECONDS=<s> (tests/test_preemption_soak.py): the tiny model's checkpoint is written in
  milliseconds, a real model's on NFS in seconds to minutes, and a preemption can come in the middle of it.
  Each checkpoint pauses for that long after the weights are written and before the optimizer state, the
  trainer state and the completion record: a signal sent while a checkpoint directory has no completion
  record lands in the middle of a save.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time

# The message of torch 2.13's CUDACachingAllocator, figures of a 24 GB L4.
MESSAGE = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 22.05 GiB of which 1.06 GiB "
    "is free. Including non-PyTorch memory, this process has 20.98 GiB memory in use. Of the allocated memory "
    "19.80 GiB is allocated by PyTorch, and 754.00 MiB is reserved by PyTorch but unallocated. If reserved but "
    "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid "
    "fragmentation.  See documentation for Memory Management  "
    "(https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)


def _fail_with_oom(trainer_class: type, rank: int, step: int) -> None:
    training_step = trainer_class.training_step

    def failing_training_step(self, *args, **kwargs):
        if int(os.environ.get("RANK", "0")) == rank and self.state.global_step + 1 >= step:
            import torch

            raise torch.OutOfMemoryError(MESSAGE)
        return training_step(self, *args, **kwargs)

    trainer_class.training_step = failing_training_step


def _slow_checkpoints(trainer_class: type, pause: float) -> None:
    save_optimizer = trainer_class._save_optimizer_and_scheduler

    def slow_save_optimizer(self, *args, **kwargs):
        time.sleep(pause)
        return save_optimizer(self, *args, **kwargs)

    trainer_class._save_optimizer_and_scheduler = slow_save_optimizer


def _patch(trainer_class: type) -> None:
    if os.environ.get("FAKE_CUDA_OOM"):
        rank, step = (int(x) for x in os.environ["FAKE_CUDA_OOM"].split(":"))
        _fail_with_oom(trainer_class, rank, step)
    if os.environ.get("SLOW_CHECKPOINT_SECONDS"):
        _slow_checkpoints(trainer_class, float(os.environ["SLOW_CHECKPOINT_SECONDS"]))


class _PatchTrainerOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "transformers.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module.Trainer)

        spec.loader.exec_module = exec_and_patch
        return spec


if os.environ.get("FAKE_CUDA_OOM") or os.environ.get("SLOW_CHECKPOINT_SECONDS"):
    sys.meta_path.insert(0, _PatchTrainerOnImport())
