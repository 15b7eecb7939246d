"""Memory and time of a long analysis: a process's resident memory (read one way for the
analyzer and every benchmark), the stage timer that records where a probe's time and peak
memory go, and the allocator setting that keeps the lens pass's large temporaries from
fragmenting the heap.

On Linux the figures come from ``/proc/<pid>/status``: ``VmRSS`` (resident now) and
``VmHWM`` (the process's own peak). ``ru_maxrss`` is only the fallback elsewhere: it
survives fork + exec, so a child started by a large parent would report the parent's peak.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

__all__ = ["StageSeconds", "fix_malloc_threshold", "peak_rss_mb", "status_kib"]


def status_kib(field: str, pid: int | str = "self") -> int | None:
    """``field`` (``"VmRSS"``, ``"VmHWM"``, ...) of ``/proc/<pid>/status`` in KiB; None where
    the file or the field is missing."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mb(pid: int | str = "self") -> float:
    """The peak resident memory of process ``pid`` so far, MiB: its ``VmHWM``; for this
    process where /proc is missing, ``ru_maxrss``; 0 where nothing says."""
    hwm = status_kib("VmHWM", pid)
    if hwm is not None:
        return hwm / 1024
    if pid != "self":
        return 0.0
    try:
        import resource
    except ImportError:  # not on this platform
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


_MMAP_THRESHOLD = 1 << 20
_malloc_fixed = False


def fix_malloc_threshold() -> bool:
    """Serve every allocation of 1 MiB or more from its own mapping, returned to the system
    when freed (glibc ``mallopt(M_MMAP_THRESHOLD, 1 MiB)``); once per process, glibc only.

    glibc raises that threshold as large blocks are freed (up to 32 MiB), after which the
    lens pass's ``(chunk, V)`` temporaries (16 MiB each at a 151,936 vocabulary) come from
    the heap, which fragments and is not given back: at Qwen3-0.6B's shape the lens stage
    raised the peak resident memory by 4.9 GB (7.2-9.1 GB in all, run to run). With the
    threshold fixed the stages after boot raise it by nothing (3.9 GB: the weights and the
    boot transient), for about 7% more time (``benchmarks/README.md``).

    Returns:
        Whether the threshold is (now) fixed.
    """
    global _malloc_fixed
    if _malloc_fixed:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3  # <malloc.h>
        _malloc_fixed = bool(libc.mallopt(m_mmap_threshold, _MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc: nothing to fix
        _malloc_fixed = False
    return _malloc_fixed


class StageSeconds(dict):
    """Seconds per stage of probing one checkpoint (``boot``, ``decode``, ``capture``,
    ``lens``, ``attention``, ``drift``, ``write``), recorded in the analysis
    files' provenance as ``stage_seconds``: where the time of a probe goes.

    ``peak_growth_mb``: by how much each stage raised the process's peak resident memory
    (summed over its calls): the stages that set the peak are the ones with a large value.
    """

    def __init__(self) -> None:
        super().__init__()
        self.peak_growth_mb: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start, peak = time.perf_counter(), peak_rss_mb()
        try:
            yield
        finally:
            self[stage] = self.get(stage, 0.0) + time.perf_counter() - start
            self.peak_growth_mb[stage] = self.peak_growth_mb.get(stage, 0.0) + peak_rss_mb() - peak
