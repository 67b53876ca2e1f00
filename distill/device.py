"""Pick the torch device a job runs on: ``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda:N``."""

from __future__ import annotations

import torch

from .errors import DistillError

__all__ = ["resolve_device", "DeviceUnavailable"]


class DeviceUnavailable(DistillError):
    code = "device_unavailable"


def resolve_device(name: str = "auto") -> torch.device:
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceUnavailable(f"unknown device {name!r}; use auto, cpu or cuda:N", param="device") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"device {name!r} was asked for but this worker has no CUDA", param="device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceUnavailable(
                f"device {name!r} was asked for but this worker has {torch.cuda.device_count()} GPU(s)", param="device"
            )
    elif device.type != "cpu":
        raise DeviceUnavailable(f"device type {device.type!r} is not supported; use auto, cpu or cuda:N", param="device")
    return device
