"""Which hardware a call runs on: one enum and cheap probes that never start a device context."""
from __future__ import annotations

import enum
import importlib.util

from . import envs


class Platform(str, enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"
    ROCM = "rocm"
    XPU = "xpu"
    TPU = "tpu"


def _override() -> Platform | None:
    value = envs.PORTABLE_ATTN_PLATFORM
    if not value:
        return None
    try:
        return Platform(value.lower())
    except ValueError:
        valid = ", ".join(p.value for p in Platform)
        raise ValueError(f"PORTABLE_ATTN_PLATFORM={value!r} is not a platform; expected one of {valid}") from None


def platform_of(x) -> Platform:
    """Platform of an array (torch tensor or jax array), after the env override."""
    forced = _override()
    if forced is not None:
        return forced
    device = getattr(x, "device", None)
    kind = getattr(device, "type", None)
    if kind is not None:  # torch
        if kind == "cuda":
            import torch

            return Platform.ROCM if getattr(torch.version, "hip", None) else Platform.CUDA
        if kind == "xpu":
            return Platform.XPU
        if kind == "cpu":
            return Platform.CPU
        raise ValueError(f"tensors on device type {kind!r} are not served by any platform")
    devices = getattr(x, "devices", None)  # jax
    if callable(devices):
        name = next(iter(devices())).platform
        return {"tpu": Platform.TPU, "cpu": Platform.CPU, "gpu": Platform.CUDA, "cuda": Platform.CUDA,
                "rocm": Platform.ROCM}.get(name, Platform.CPU)
    raise TypeError(f"expected a torch tensor or jax array, got {type(x).__name__}")


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def machine_platforms() -> list[Platform]:
    """Accelerators present on this machine (CPU always last), without creating device contexts."""
    forced = _override()
    if forced is not None:
        return [forced]
    found: list[Platform] = []
    if _has_module("torch"):
        import torch

        if torch.cuda.is_available():  # device count via NVML/HIP, no context
            found.append(Platform.ROCM if getattr(torch.version, "hip", None) else Platform.CUDA)
        xpu = getattr(torch, "xpu", None)
        if xpu is not None and xpu.is_available():
            found.append(Platform.XPU)
    if _has_module("libtpu"):  # jax.devices() would grab GPU memory on a CUDA box
        found.append(Platform.TPU)
    found.append(Platform.CPU)
    return found


def xpu_summary() -> str | None:
    """The Intel GPUs torch sees, for `portable-attn info`: device name, driver, 2D block IO, and whether
    Triton's XPU backend is importable (PyTorch's XPU wheels bring it); None when there is none. Creates
    the XPU device context (info only)."""
    import torch

    xpu = getattr(torch, "xpu", None)
    if xpu is None or not xpu.is_available():
        return None
    props = xpu.get_device_properties(0)
    block_io = getattr(props, "has_subgroup_2d_block_io", None)
    return (f"{xpu.device_count()} x {props.name}, driver {getattr(props, 'driver_version', 'unknown')}; "
            f"2D block IO: {'unknown' if block_io is None else 'yes' if block_io else 'no'}; Triton XPU backend: "
            f"{'importable' if triton_xpu() else 'missing (install torch from the XPU index, ci/install.sh xpu)'}")


def triton_xpu() -> bool:
    """Whether Triton's Intel GPU backend is installed (imports triton's package, no kernel)."""
    return _has_module("triton.backends.intel")
