"""The few calls that differ on a CUDA device, in one place: pinned memory, copies, memory sizes.

A CPU machine never reaches a CUDA call: each is behind a device check.
"""

from __future__ import annotations

import os

import torch


def can_pin() -> bool:
    """Pinned host memory needs a CUDA driver; it makes host-to-device copies several times faster."""
    return torch.cuda.is_available()


def copy_to(tensor: torch.Tensor, device: torch.device, pin: bool = False) -> torch.Tensor:
    """A copy of `tensor` that owns its memory, on `device` (pinned when asked and possible)."""
    if device.type == "cpu":
        out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin and can_pin())
        return out.copy_(tensor)
    return tensor.to(device, copy=True)


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def free_device_bytes(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    return free
