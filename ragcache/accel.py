"""The few calls that differ on a CUDA device, in one place: pinned memory, copies, memory sizes.

A CPU machine never reaches a CUDA call: each is behind a device check.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable

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


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` on the CPU; from a GPU through pinned memory, several times faster than pageable."""
    return tensor if tensor.device.type == "cpu" else copy_to(tensor, torch.device("cpu"), pin=True)


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def free_device_bytes(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    return free


class LayerReady:
    """Set when a layer's cached prefix is in place. On a GPU it also carries a CUDA event recorded on
    the copy stream, which the compute stream waits on, so the host never blocks on the copy itself."""

    def __init__(self, device: torch.device):
        self.done = threading.Event()  # the loader has finished (on a GPU: queued) this layer
        self.cuda_event = torch.cuda.Event() if torch.device(device).type == "cuda" else None
        self.error: BaseException | None = None

    def set(self) -> None:
        """Called by the loader, inside its stream on a GPU."""
        if self.cuda_event is not None:
            self.cuda_event.record()
        self.done.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()

    def wait(self) -> None:
        self.done.wait()
        if self.error is not None:
            raise self.error
        if self.cuda_event is not None:
            torch.cuda.current_stream().wait_event(self.cuda_event)


class Loader:
    """Runs `fill(layer)` for every layer in order on a thread (on a GPU: inside a side CUDA stream),
    marking each layer ready as it is done; `join` waits for all of it."""

    def __init__(self, fill: Callable[[int], None], ready: list[LayerReady], device: torch.device):
        self.fill, self.ready, self.device = fill, ready, torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.thread = threading.Thread(target=self._run, name="ragcache-kv-loader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for i, ready in enumerate(self.ready):
            try:
                with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
                    self.fill(i)
                    ready.set()
            except BaseException as e:  # every waiting layer raises it, never computes on half a cache
                for later in self.ready[i:]:
                    later.fail(e)
                return

    def join(self) -> None:
        self.thread.join()
        if self.stream is not None:
            self.stream.synchronize()


class StepGraph:
    """Runs `step` (which reads and writes only fixed tensors) eagerly; on a GPU, after one eager run,
    captures it in a CUDA graph and replays that: one launch instead of hundreds of kernels a step.
    A step that cannot be captured keeps running eagerly."""

    def __init__(self, step: Callable[[], None], device: torch.device):
        self.step, self.cuda = step, torch.device(device).type == "cuda"
        self.runs, self.graph = 0, None

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        elif self.cuda and self.runs >= 1:
            self.graph = self._capture()
            if self.graph is None:
                self.step()
            else:
                self.graph.replay()  # capturing records the step without running it
        else:
            self.step()
        self.runs += 1

    def _capture(self):
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.step()
        except RuntimeError:  # something in the step synchronises with the host: stay eager
            self.cuda = False
            return None
        return graph
