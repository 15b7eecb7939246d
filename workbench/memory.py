"""A process's resident memory, read one way for the analyzer and every benchmark.

On Linux the figures come from ``/proc/<pid>/status``: ``VmRSS`` (resident now) and
``VmHWM`` (the process's own peak). ``ru_maxrss`` is only the fallback elsewhere: it
survives fork + exec, so a child started by a large parent would report the parent's peak.
"""

from __future__ import annotations

import sys

__all__ = ["peak_rss_mb", "status_kib"]


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
