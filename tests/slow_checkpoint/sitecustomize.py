"""A slow checkpoint save for tests/test_preemption_soak.py: the tiny model's checkpoint is written in
milliseconds, a real model's on NFS in seconds to minutes, and a preemption can come in the middle of it.

Put this directory on PYTHONPATH with SLOW_CHECKPOINT_SECONDS=<s> and Python imports it at start-up. Once
transformers' Trainer is imported, each checkpoint pauses for that long after the weights are written and
before the optimizer state, the trainer state and the completion record: a signal sent while a checkpoint
directory has no completion record lands in the middle of a save.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time


def _patch(trainer_class: type) -> None:
    pause = float(os.environ["SLOW_CHECKPOINT_SECONDS"])
    save_optimizer = trainer_class._save_optimizer_and_scheduler

    def slow_save_optimizer(self, *args, **kwargs):
        time.sleep(pause)
        return save_optimizer(self, *args, **kwargs)

    trainer_class._save_optimizer_and_scheduler = slow_save_optimizer


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


if os.environ.get("SLOW_CHECKPOINT_SECONDS"):
    sys.meta_path.insert(0, _PatchTrainerOnImport())
