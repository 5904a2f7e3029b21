"""The platform probe with the hardware faked: no GPU or TPU is here."""
import types

import pytest
import torch

from portable_attn import platforms
from portable_attn.platforms import Platform, machine_platforms, platform_of


class FakeTensor:
    def __init__(self, kind):
        self.device = types.SimpleNamespace(type=kind)


class FakeJaxArray:
    def __init__(self, platform):
        self._platform = platform

    def devices(self):
        return [types.SimpleNamespace(platform=self._platform)]  # jax returns a set of Device objects


def test_cpu_tensor():
    assert platform_of(torch.zeros(1)) == Platform.CPU


def test_cuda_tensor_is_cuda_on_a_cuda_build(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None)
    assert platform_of(FakeTensor("cuda")) == Platform.CUDA


def test_cuda_tensor_is_rocm_on_a_hip_build(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.4.0")
    assert platform_of(FakeTensor("cuda")) == Platform.ROCM


def test_xpu_tensor():
    assert platform_of(FakeTensor("xpu")) == Platform.XPU


def test_unknown_device_type():
    with pytest.raises(ValueError, match="device type 'mps' are not served"):
        platform_of(FakeTensor("mps"))


@pytest.mark.parametrize("name,expected", [("tpu", Platform.TPU), ("cpu", Platform.CPU), ("gpu", Platform.CUDA)])
def test_jax_arrays(name, expected):
    assert platform_of(FakeJaxArray(name)) == expected


def test_not_an_array():
    with pytest.raises(TypeError, match="expected a torch tensor or jax array, got list"):
        platform_of([1, 2])


def test_env_override(monkeypatch):
    monkeypatch.setenv("PORTABLE_ATTN_PLATFORM", "TPU")
    assert platform_of(torch.zeros(1)) == Platform.TPU
    assert machine_platforms() == [Platform.TPU]


def test_env_override_rejects_unknown(monkeypatch):
    monkeypatch.setenv("PORTABLE_ATTN_PLATFORM", "quantum")
    with pytest.raises(ValueError, match="'quantum' is not a platform; expected one of cpu, cuda, rocm, xpu, tpu"):
        platform_of(torch.zeros(1))


def test_machine_is_cpu_only_here():
    assert machine_platforms() == [Platform.CPU]


def test_machine_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    assert machine_platforms() == [Platform.CUDA, Platform.CPU]


def test_machine_with_rocm(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", "6.4.0")
    assert machine_platforms() == [Platform.ROCM, Platform.CPU]


def test_machine_with_xpu(monkeypatch):
    monkeypatch.setattr(torch, "xpu", types.SimpleNamespace(is_available=lambda: True), raising=False)
    assert machine_platforms() == [Platform.XPU, Platform.CPU]


def test_tpu_found_from_libtpu_without_starting_jax(monkeypatch):
    real = platforms._has_module
    monkeypatch.setattr(platforms, "_has_module", lambda name: name == "libtpu" or real(name))
    assert machine_platforms() == [Platform.TPU, Platform.CPU]
