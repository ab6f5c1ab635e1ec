"""What a unit of work cost (peak memory) and where it ran (provenance)."""
from __future__ import annotations

import functools
import os
import platform
import resource
import socket
import subprocess
import threading
from importlib import metadata
from pathlib import Path
from typing import Optional

import torch

PACKAGES = ("personalize", "torch", "diffusers", "transformers", "peft", "accelerate", "open_clip_torch", "timm")


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: the lifetime peak is the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory while the block runs: CUDA allocated bytes on a GPU, resident set size on the CPU."""

    def __init__(self, device: str, interval: float = 0.02):
        self.cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        self.interval = interval
        self.peak: Optional[int] = None
        self.kind = "cuda_allocated" if self.cuda else "rss"

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self._max = _rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._max = max(self._max, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.peak = int(torch.cuda.max_memory_allocated())
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, _rss_bytes())


@functools.lru_cache(maxsize=1)
def git_sha() -> Optional[str]:
    """The commit of the package's source checkout (with '-dirty' for local changes), None outside git."""
    src = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine(device: str) -> dict:
    info = {"host": socket.gethostname(), "device": str(device), "cpu_threads": torch.get_num_threads()}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


__all__ = ["PeakMemory", "git_sha", "machine", "versions"]
