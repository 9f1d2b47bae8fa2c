"""CPU time of a server's processes, from /proc: one process, a whole tree, and per kind.

Shared by every section of the benchmark that reports CPU per message (bench.run's SMTP,
journal and STARTTLS sections, bench.outbound) and by bench.handoff.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable

from bench.servers import Server, proc_cmdline, proc_tree

CPU_POLL = 0.2  # seconds between /proc samples

Classify = Callable[[int, list[str]], str]


def _stat_fields(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        # The fields after the ")" that closes the command name (which may hold spaces).
        return f.read().rsplit(b")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (not its children)."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reaped_seconds(pid: int) -> float:
    """cutime + cstime: the CPU of the children this process has waited for, when they ended
    (cpu_seconds gives its own)."""
    fields = _stat_fields(pid)
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def tree_cpu(roots: list[int]) -> float:
    """utime + stime summed over the live processes of the tree (not the reaped ones)."""
    total = 0.0
    for pid in proc_tree(roots):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += cpu_seconds(pid)
    return total


def settle(server: Server, timeout: float = 8.0) -> None:
    """Until the server's processes are quiet (under 5% of a CPU over 0.3 s): jobs (or smtpd
    processes) started by a warm-up have finished starting and do not skew the timings."""
    deadline = time.monotonic() + timeout
    last = tree_cpu(server.root_pids())
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = tree_cpu(server.root_pids())
        if now - last < 0.015:
            return
        last = now


class CpuPoller:
    """utime + stime of every process in a server's tree, sampled from /proc in a thread.

    Each pid keeps its latest sample; mark() takes the baseline (a pid born later counts
    from zero: all its life is the run's work). Per kind this under-counts processes that
    exit: whatever one used since its last sample (up to CPU_POLL s) is lost, and one that
    lives and dies between two samples is not seen at all. The tree's total does not lose
    them: it also sums each process's reaped children (cutime + cstime), where an ended
    child's whole CPU lands once its parent (master, the supervisor) has waited for it.
    The difference is reported as the kind "exited (KINDS)", KINDS those of the pids seen
    to go (`exited`). One poller measures one run: start(), mark(), the run, stop().
    """

    def __init__(self, roots: list[int], classify: Classify) -> None:
        self.roots = roots
        self.classify = classify
        self.kinds: dict[int, str] = {}
        self.latest: dict[int, float] = {}
        self.base: dict[int, float] = {}
        self.tree_total = self.base_total = 0.0  # own + reaped children, over the live tree
        self.exited: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cpu-poller", daemon=True)

    def sample(self) -> None:
        with self._lock:
            alive = set(proc_tree(self.roots))
            total = 0.0
            for pid in alive:
                if pid not in self.kinds:
                    argv = proc_cmdline(pid)
                    if argv is None:
                        continue
                    self.kinds[pid] = self.classify(pid, argv)
                with contextlib.suppress(OSError, ValueError, IndexError):
                    own, reaped = cpu_seconds(pid), reaped_seconds(pid)
                    self.latest[pid] = own
                    total += own + reaped
            self.tree_total = total
            self.exited |= self.latest.keys() - alive

    def _loop(self) -> None:
        while not self._stop.wait(CPU_POLL):
            self.sample()

    def start(self) -> None:
        self.sample()
        self._thread.start()

    def mark(self) -> None:
        self.sample()
        with self._lock:
            self.base = dict(self.latest)
            self.base_total = self.tree_total
            self.exited.clear()

    def stop(self) -> None:
        """The last sample (at the end of the run), then no more."""
        self.sample()
        self._stop.set()
        self._thread.join(5)

    def exited_by_kind(self) -> dict[str, int]:
        with self._lock:
            kinds = [self.kinds.get(pid, "?") for pid in self.exited]
        return {k: kinds.count(k) for k in sorted(set(kinds))}

    def by_kind(self) -> tuple[dict[str, float], dict[str, int], dict[str, int]]:
        """Per kind: CPU seconds since mark(), processes, and how many of those started
        after mark() (a pool growing under the load: their start-up is in their CPU)."""
        cpu: dict[str, float] = {}
        procs: dict[str, int] = {}
        started: dict[str, int] = {}
        with self._lock:
            for pid, now in self.latest.items():
                kind = self.kinds.get(pid, "?")
                cpu[kind] = cpu.get(kind, 0.0) + max(now - self.base.get(pid, 0.0), 0.0)
                procs[kind] = procs.get(kind, 0) + 1
                if pid not in self.base:
                    started[kind] = started.get(kind, 0) + 1
            missing = self.tree_total - self.base_total - sum(cpu.values())
            gone = "+".join(sorted({self.kinds.get(pid, "?") for pid in self.exited}))
        # Clock ticks and the not quite simultaneous reads make a few ms either way.
        if missing > 0.01:
            cpu[f"exited ({gone or 'unseen'})"] = missing
        return cpu, procs, started


def mailpool_kind(supervisor: int) -> Classify:
    """The supervisor, or a job's role (smtp-server, framework, ...), from its argv."""
    def kind(pid: int, argv: list[str]) -> str:
        if pid == supervisor:
            return "supervisor"
        if "mailpool.jobs.main" in argv:  # python -m mailpool.jobs.main ROLE JOB_ID ...
            at = argv.index("mailpool.jobs.main") + 1
            return argv[at] if at < len(argv) else "job"
        return os.path.basename(argv[0]) if argv else "?"
    return kind


def program_kind(pid: int, argv: list[str]) -> str:
    """The program name: Postfix's master starts each daemon with argv[0] = its name (smtp,
    qmgr...); any other peer is its executable."""
    return os.path.basename(argv[0]) if argv else "?"


postfix_kind = program_kind


def server_kind(server: Server) -> Classify:
    """How to name the processes of server: mailpool's by role, anyone else's by program."""
    if server.kind == "mailpool" and server.proc is not None:
        return mailpool_kind(server.proc.pid)
    return program_kind
