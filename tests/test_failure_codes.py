"""Failures with a known cause get their own reason line, and a GPU out of memory its own exit code, which the
Jobs do not retry (the same configuration runs out again, each time after loading the model).

The out-of-memory itself is a fake (tests/trainer_faults: no GPU here): torch's real OutOfMemoryError with the
message torch's CUDA allocator writes, raised inside LLaMA-Factory's training loop of the real entrypoint, in
this process and on one rank of two under torchrun.
"""

from __future__ import annotations

import pytest
import torch
from helpers import REPO, Storage, run_entrypoint

from entrypoint.errors import ExitCode, GpuOutOfMemory, PeersLost, classify, describe

FAULTS = REPO / "tests" / "trainer_faults"
KNOBS = ("BATCH_SIZE", "GRADIENT_ACCUMULATION", "CUTOFF_LEN", "FINETUNING_TYPE=qlora", "DEEPSPEED=zero3")
TORCH_FIGURES = ("Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 22.05 GiB of which 1.06 GiB is free. "
                 "Including non-PyTorch memory, this process has 20.98 GiB memory in use. Of the allocated memory "
                 "19.80 GiB is allocated by PyTorch, and 754.00 MiB is reserved by PyTorch but unallocated")


def _oom_message() -> str:
    import importlib.util

    spec = importlib.util.spec_from_file_location("trainer_faults", FAULTS / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MESSAGE


def test_out_of_memory_names_the_figures_and_the_knobs():
    code, reason = describe(torch.OutOfMemoryError(_oom_message()))
    assert code == ExitCode.GPU_OUT_OF_MEMORY == 79
    assert reason.startswith(f"out of GPU memory (CUDA out of memory. {TORCH_FIGURES}). The same configuration "
                             "runs out again, so the Job is not retried: lower BATCH_SIZE")
    assert all(knob in reason for knob in KNOBS), reason
    assert "\n" not in reason and "PYTORCH_CUDA_ALLOC_CONF" not in reason


@pytest.mark.parametrize("error", [
    RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
])
def test_other_cuda_allocation_failures_are_out_of_memory(error: Exception):
    assert describe(error)[0] == ExitCode.GPU_OUT_OF_MEMORY


def test_a_wrapped_out_of_memory_is_found():
    try:
        try:
            raise torch.OutOfMemoryError(_oom_message())
        except RuntimeError as inner:
            raise RuntimeError("error in the training step") from inner
    except RuntimeError as outer:
        assert isinstance(classify(outer), GpuOutOfMemory)


@pytest.mark.parametrize("error", [
    torch.distributed.DistBackendError(
        "[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=1234, OpType=ALLREDUCE, "
        "NumelIn=1, NumelOut=1, Timeout(ms)=1800000) ran for 1800087 milliseconds before timing out."),
    RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                 "[127.0.0.1]:41234"),
    torch.distributed.DistStoreError("Timed out after 1801 seconds waiting for clients. 1/2 clients joined."),
])
def test_lost_peers_get_a_reason_and_are_retried(error: Exception):
    code, reason = describe(error)
    assert code == ExitCode.INTERNAL and isinstance(classify(error), PeersLost)
    assert reason.startswith(f"the training processes lost each other ({str(error).splitlines()[0]}")
    assert "DDP_TIMEOUT" in reason and "NCCL_SOCKET_IFNAME" in reason and "resumes" in reason


def test_unknown_failures_keep_their_type_and_text():
    assert describe(ValueError("boom")) == (ExitCode.INTERNAL, "ValueError: boom")
    assert describe(ConnectionResetError(104, "Connection reset by peer"))[0] == ExitCode.INTERNAL
    assert not isinstance(classify(ConnectionResetError(104, "Connection reset by peer")), PeersLost)


def _fake_oom_env(storage: Storage, rank_step: str, **overrides: str) -> dict[str, str]:
    env = storage.env(**overrides)
    env["PYTHONPATH"] = f"{env['PYTHONPATH']}:{FAULTS}"
    env["FAKE_CUDA_OOM"] = rank_step
    return env


def _assert_out_of_memory(storage: Storage, result) -> None:
    assert result.returncode == ExitCode.GPU_OUT_OF_MEMORY, result.stderr[-3000:]
    log = storage.termination_log()
    assert log.startswith(f"exit 79: out of GPU memory (CUDA out of memory. {TORCH_FIGURES}). "), log
    assert all(knob in log for knob in KNOBS), log
    assert storage.marker() is None, "a failed run must never look complete"
    assert not (storage.output.parent / f".{storage.output.name}.lock").exists(), "the lock was kept"


def test_out_of_memory_inside_training_exits_with_its_code(storage: Storage):
    result = run_entrypoint("train", _fake_oom_env(storage, "0:3"))
    _assert_out_of_memory(storage, result)


def test_out_of_memory_on_another_rank_is_the_reason_under_torchrun(storage: Storage):
    """Rank 1 runs out; rank 0 loses its peer and is stopped by torchrun: the launcher reports the cause."""
    result = run_entrypoint("train", _fake_oom_env(storage, "1:3", NPROC_PER_NODE="2", BATCH_SIZE="2",
                                                   OMP_NUM_THREADS="1"))
    assert "launching 2 processes" in result.stderr
    _assert_out_of_memory(storage, result)
