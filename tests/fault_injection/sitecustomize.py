"""A fake GPU out-of-memory for tests/test_failure_codes.py: there is no GPU here to run out of.

Put this directory on PYTHONPATH with FAKE_CUDA_OOM="<rank>:<step>" and Python imports it at start-up, in
the entrypoint and in every process torchrun starts. Once transformers' Trainer is imported, the training
step <step> of global rank <rank> raises torch.OutOfMemoryError with the message torch's CUDA caching
allocator writes, from inside LLaMA-Factory's training loop, where a real one would come from.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

# The message of torch 2.13's CUDACachingAllocator, figures of a 24 GB L4.
MESSAGE = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 22.05 GiB of which 1.06 GiB "
    "is free. Including non-PyTorch memory, this process has 20.98 GiB memory in use. Of the allocated memory "
    "19.80 GiB is allocated by PyTorch, and 754.00 MiB is reserved by PyTorch but unallocated. If reserved but "
    "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid "
    "fragmentation.  See documentation for Memory Management  "
    "(https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)


def _patch(trainer_class: type) -> None:
    rank, step = (int(x) for x in os.environ["FAKE_CUDA_OOM"].split(":"))
    training_step = trainer_class.training_step

    def failing_training_step(self, *args, **kwargs):
        if int(os.environ.get("RANK", "0")) == rank and self.state.global_step + 1 >= step:
            import torch

            raise torch.OutOfMemoryError(MESSAGE)
        return training_step(self, *args, **kwargs)

    trainer_class.training_step = failing_training_step


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


if os.environ.get("FAKE_CUDA_OOM"):
    sys.meta_path.insert(0, _PatchTrainerOnImport())
