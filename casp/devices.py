"""Compute devices: parse a ``--device`` value and spread independent jobs over several GPUs.

Blocks run one at a time on the first device (true-sequential compression needs block i's outputs before
block i+1). What is independent inside a block is spread over all devices: the sensitivity pass quantizes
every linear with every candidate config (most of the compression time at 7B), one job per linear.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def resolve_devices(spec: str | Sequence[str] | None) -> list[torch.device]:
    """``None`` -> every visible GPU, else the CPU; ``"cuda"`` -> every visible GPU; ``"cuda:0,cuda:1"``,
    ``"cpu"`` or a list of such names -> exactly those. Unavailable devices raise a ValueError naming the fix."""
    if spec is None:
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s) for s in spec]
    if not names or any(not n for n in names):
        raise ValueError(f"--device {spec!r}: give cpu, cuda, or a comma-separated list like cuda:0,cuda:1")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices: list[torch.device] = []
    for name in names:
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise ValueError(f"--device: {name!r} is not a device name (use cpu, cuda or cuda:N)") from None
        if dev.type == "cuda":
            if count == 0:
                raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
            if dev.index is None:
                devices.extend(torch.device("cuda", i) for i in range(count))
                continue
            if dev.index >= count:
                raise ValueError(f"--device {name}: only {count} GPU(s) visible (cuda:0..cuda:{count - 1})")
        elif dev.type != "cpu":
            raise ValueError(f"--device {name}: casp runs on cpu or cuda devices")
        devices.append(dev)
    return devices


def map_on_devices(fn: Callable[[T, torch.device], R], items: Sequence[T], devices: Sequence[torch.device]) -> list[R]:
    """``[fn(item, device) for item in items]`` with one worker thread per device pulling the next item.

    Results keep the order of ``items``. torch releases the GIL inside kernels, so several GPUs work at once;
    with a single device this is a plain loop. The first exception of a worker is raised here.
    """
    if len(devices) <= 1 or len(items) <= 1:
        device = devices[0] if devices else torch.device("cpu")
        return [fn(item, device) for item in items]
    lock = threading.Lock()
    next_item = iter(range(len(items)))
    results: list = [None] * len(items)
    errors: list[BaseException] = []

    def worker(device: torch.device) -> None:
        ctx = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with ctx:
            while not errors:
                with lock:
                    i = next(next_item, None)
                if i is None:
                    return
                try:
                    results[i] = fn(items[i], device)
                except BaseException as e:  # re-raised in the caller's thread below
                    errors.append(e)

    threads = [threading.Thread(target=worker, args=(d,), daemon=True) for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
