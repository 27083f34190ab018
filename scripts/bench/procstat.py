"""CPU accounting for the benchmarks, from /proc: a process's ticks and the machine's busy ticks."""

import os
import pathlib
import sys

CLK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1


def log(msg):
    print(f"== {msg}", file=sys.stderr, flush=True)


def ticks(pid):
    """User + system ticks of one process (0 once it is gone)."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0


def machine_busy():
    """User, nice and system ticks of the whole machine (interrupt time is no process's)."""
    values = [int(v) for v in pathlib.Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return values[0] + values[1] + values[2]


def children_ticks():
    """CPU ticks of the children this script has waited for (the load generators)."""
    t = os.times()
    return (t.children_user + t.children_system) * CLK
