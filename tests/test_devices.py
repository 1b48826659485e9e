import logging

import torch

from cobra_scale.devices import pick_device, pick_precision


def test_auto_device_is_cpu_without_a_gpu():
    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


def test_bf16_on_a_cpu_without_native_bf16_falls_back_to_fp32(monkeypatch, caplog):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert pick_precision("bf16", "cpu") == "fp32"
    assert "no native bf16" in caplog.text
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert pick_precision("bf16", "cpu") == "bf16"


def test_other_precisions_and_gpus_are_left_alone():
    assert pick_precision("fp32", "cpu") == "fp32"
    assert pick_precision("bf16", "cuda") == "bf16"


def test_trim_host_memory_calls_malloc_trim(monkeypatch):
    import cobra_scale.devices as devices

    calls = []

    class FakeLibc:
        def malloc_trim(self, pad):
            calls.append(pad)

    monkeypatch.setattr(devices, "_LIBC", FakeLibc())
    devices.trim_host_memory()
    assert calls == [0]
    monkeypatch.setattr(devices, "_LIBC", False)  # no glibc: a no-op
    devices.trim_host_memory()
    assert calls == [0]
