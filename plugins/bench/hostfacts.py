"""What the host gives one worker of ``fluxkiln bench --gpus N --profile``: threads, CPUs, CPU time, clocks.

* :func:`thread_facts`: the intra- and inter-op thread counts torch uses in this process, what
  ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` say, how many CPUs this process may run on (its affinity)
  and the machine's count, and the load average.
* :class:`Usage`: CPU time (``time.process_time``, all threads of the process) and voluntary /
  involuntary context switches over one call, beside its wall time.  CPU time above the wall time
  means several busy threads (intra-op pools spinning); many involuntary switches mean the process
  was preempted (more runnable threads than CPUs).
* :class:`SmClock`: the GPU's SM clock sampled while a call runs, through ``torch.cuda.clock_rate``
  (pynvml) or ``nvidia-smi``; ``None`` where neither works (a CPU run, no driver tools).
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any


def thread_facts() -> dict[str, Any]:
    """This process's thread settings and the CPUs it may use."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
            "affinity_cpus": cpus, "cpu_count": os.cpu_count(),
            "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


@dataclass
class Usage:
    """CPU time and context switches of this process between :meth:`start` and :meth:`stop`."""

    cpu_s: float = 0.0
    voluntary: int = 0
    involuntary: int = 0

    def start(self) -> Usage:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu_s, self.voluntary, self.involuntary = time.process_time(), ru.ru_nvcsw, ru.ru_nivcsw
        return self

    def stop(self, wall_s: float) -> dict[str, Any]:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        cpu = time.process_time() - self.cpu_s
        return {"cpu_ms": round(cpu * 1000, 2), "cpu_per_wall": round(cpu / wall_s, 3) if wall_s > 0 else None,
                "voluntary_switches": ru.ru_nvcsw - self.voluntary,
                "involuntary_switches": ru.ru_nivcsw - self.involuntary}


def _smi(uuid: str, query: str) -> float | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, f"--id={uuid}", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5, check=True).stdout
        return float(out.strip().splitlines()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


@dataclass
class SmClock:
    """The current CUDA device's SM clock (MHz), sampled every ``every_s`` by a thread while a call runs."""

    every_s: float = 0.05
    samples: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _read: Any = None
    _max: float | None = None

    def start(self) -> SmClock:
        self._read, self._max = _clock_reader()
        if self._read is not None:
            self._thread = threading.Thread(target=self._poll, name="fluxkiln-sm-clock", daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while True:
            value = self._read()
            if value is not None:
                self.samples.append(value)
            if self._stop.wait(self.every_s):
                return

    def stop(self) -> dict[str, Any] | None:
        """min / mean / max of the samples and the device's maximum SM clock; None when none could be read."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if not self.samples:
            return None
        s = self.samples
        return {"min": min(s), "mean": round(sum(s) / len(s), 1), "max": max(s), "samples": len(s),
                "device_max": self._max}


def _clock_reader() -> tuple[Any, float | None]:
    """A function reading the current CUDA device's SM clock, and its maximum; (None, None) without a GPU or
    without pynvml and nvidia-smi."""
    import torch

    if not torch.cuda.is_available():
        return None, None
    device = torch.cuda.current_device()
    try:
        torch.cuda.clock_rate(device)  # pynvml behind it; raises when pynvml is missing
        return (lambda: float(torch.cuda.clock_rate(device))), _smi_max(device)
    except Exception:  # noqa: BLE001 - ModuleNotFoundError, pynvml's NVMLError...: fall back to nvidia-smi
        pass
    uuid = _uuid(device)
    if uuid is None or _smi(uuid, "clocks.sm") is None:
        return None, None
    return (lambda: _smi(uuid, "clocks.sm")), _smi(uuid, "clocks.max.sm")


def _uuid(device: int) -> str | None:
    import torch

    raw = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    if raw is None:
        return None
    text = str(raw)
    return text if text.startswith("GPU-") else f"GPU-{text}"


def _smi_max(device: int) -> float | None:
    uuid = _uuid(device)
    return _smi(uuid, "clocks.max.sm") if uuid else None
