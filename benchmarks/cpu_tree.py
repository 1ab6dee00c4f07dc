"""CPU seconds of a command and every process it starts (Linux /proc), grouped by what each process is.

On a loaded machine a command's wall time measures the load; its CPU seconds much less so. A `--ray`
run's CPU is spread over Ray's daemons and workers, which leave the command's process tree in sessions
of their own and may outlive a sample, so the tree is polled: every process seen below the command
is kept (by pid and start time) with its latest utime + stime and its latest title (a Ray worker's
title changes from ray::IDLE to its actor's name).
"""
from __future__ import annotations

import os
import re
import subprocess
import time
from typing import Dict, List, Optional, Tuple

TICK = os.sysconf("SC_CLK_TCK")

# (group, pattern over the process title / command line), first match wins
GROUPS: List[Tuple[str, str]] = [
    ("model actor", r"ray::(_?MapWorker|EverythingWorker|EmbedWorker)|MapBatches|ray::Map"),
    ("Ray Data actors", r"ray::_?(StatsActor|AutoscalingCoordinator|ActorLocationTracker|.*Coordinator|.*Tracker)"),
    ("idle workers", r"ray::IDLE|default_worker\.py"),
    ("dashboard head", r"dashboard/dashboard\.py|dashboard\.py"),
    ("dashboard agent", r"ray::DashboardAgent|dashboard/agent\.py"),
    ("runtime env agent", r"ray::RuntimeEnvAgent|runtime_env/agent|runtime_env_agent"),
    ("log monitor", r"log_monitor\.py"),
    ("autoscaler monitor", r"monitor\.py"),
]


def _stat(pid: str) -> Optional[Tuple[int, int, float]]:
    """(ppid, start time in ticks, utime + stime in seconds) of a process, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            text = handle.read().decode(errors="replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    return int(fields[1]), int(fields[19]), (int(fields[11]) + int(fields[12])) / TICK


def _title(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def group_of(title: str, root: bool) -> str:
    if root:
        return "driver (the command)"
    program = os.path.basename(title.split(" ", 1)[0]) if title else ""
    if program in ("raylet", "gcs_server"):  # C++ daemons, whose arguments name the other processes
        return program
    for name, pattern in GROUPS:
        if re.search(pattern, title):
            return name
    return "other: " + " ".join(os.path.basename(t) for t in title.split()[:2])


def run(cmd: List[str], poll: float = 0.5, **popen) -> Tuple[float, Dict[str, float], int]:
    """Run `cmd`; its wall time, CPU seconds per group (its whole process tree) and exit code.

    Polled every `poll` seconds: a process living less than that is missed, and a process's CPU after its
    last sample is lost (Ray's daemons at shutdown: a fraction of a second)."""
    start = time.time()
    proc = subprocess.Popen(cmd, **popen)
    root = str(proc.pid)
    seen: Dict[Tuple[str, int], Tuple[float, str]] = {}  # (pid, start ticks) -> (cpu s, title)
    tracked = {root}
    while True:
        parents = {}
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                stat = _stat(pid)
                if stat is not None:
                    parents[pid] = stat
        # descendants of the command, plus any process once seen below it (Ray reparents its daemons)
        changed = True
        while changed:
            changed = False
            for pid, (ppid, _, _) in parents.items():
                if pid not in tracked and str(ppid) in tracked:
                    tracked.add(pid)
                    changed = True
        for pid in tracked:
            if pid in parents:
                _, started, cpu = parents[pid]
                key = (pid, started)
                title = _title(pid) or (seen.get(key, (0.0, ""))[1])
                seen[key] = (cpu, title)
        if proc.poll() is not None:
            break
        time.sleep(poll)
    wall = time.time() - start
    groups: Dict[str, float] = {}
    for (pid, _), (cpu, title) in seen.items():
        name = group_of(title, pid == root)
        groups[name] = groups.get(name, 0.0) + cpu
    # the command's own CPU after its last sample: its children's rusage is not the command's
    return wall, groups, proc.returncode
