"""PRECISION=auto picks what the GPU computes natively. The GPU is a fake (none here): torch's own
is_bf16_supported runs against faked device properties, with bf16 emulation reported as working, as it is
on a T4 or V100."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from entrypoint.worker import resolve_precision


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch):
    def with_capability(major: int, minor: int) -> None:
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device: SimpleNamespace(major=major, minor=minor))
        monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # emulation works

    return with_capability


@pytest.mark.parametrize(("gpu", "capability", "expected"), [
    ("V100", (7, 0), "fp16"),
    ("T4", (7, 5), "fp16"),
    ("A100", (8, 0), "bf16"),
    ("L4", (8, 9), "bf16"),
    ("H100", (9, 0), "bf16"),
])
def test_auto_is_bf16_only_where_the_gpu_computes_it(fake_gpu, gpu: str, capability: tuple[int, int],
                                                      expected: str):
    fake_gpu(*capability)
    args = resolve_precision({"precision": "auto", "lora_rank": 8})
    assert args == {expected: True, "lora_rank": 8}, gpu


def test_auto_is_fp32_without_a_gpu(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision({"precision": "auto"}) == {}


def test_an_explicit_precision_is_kept(fake_gpu):
    fake_gpu(7, 5)
    assert resolve_precision({"precision": "bf16"}) == {"bf16": True}
    assert resolve_precision({"precision": "fp32"}) == {}
