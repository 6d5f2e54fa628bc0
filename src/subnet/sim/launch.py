"""Start a swarm's nodes as OS processes on one local chain, and watch them.

Each node is its own OS process running the node command line,
``sparseloco {miner,validator} --config nodes/<hotkey>.toml --windows N`` (what a user runs
in separate terminals), with its log in ``logs/<hotkey>.log``. The processes are forked
from the launcher itself, which has imported the roles already, or from a ``forkserver`` that
has imported them once (see :class:`NodeProcesses`), so N nodes do not pay N imports of
torch (about 4 s of CPU each). The launcher writes the configs, waits until every node has
committed its locator on the chain, then moves the chain to the first block of window 0
(the nodes' ``start_block``), so window 0 starts when everyone is up, however long the
imports took. After that it only watches: a node that exits with an error ends the run
with :class:`ParticipantError`. A fault-injection harness may :meth:`~NodeProcesses.kill`
a node and :meth:`~NodeProcesses.restart` it from its state folder
(``benchmarks/reliability_faults.py``).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gauntlet import SqliteSubnet
from sparseloco.errors import SparseLoCoError
from subnet.config import NodeConfig, dump_config

#: the nodes' ``window.start_block``: far ahead of the wall-clock block at launch, so no
#: window opens until :meth:`NodeProcesses.open_window` moves the chain there.
START_BLOCK = 1_000_000


#: how often the launcher sums the nodes' proportional set sizes. The kernel walks every
#: page of a process to answer (14–95 ms per node process on a loaded 2-core machine), so
#: sampling five nodes every 0.25 s took a third of a core; the nodes' memory plateaus once
#: they have loaded their data and model, which a few samples catch.
PSS_EVERY_S = 5.0


class ParticipantError(SparseLoCoError):
    """A node process failed (its exit code and the last line of its log say why)."""


@dataclass(frozen=True)
class NodeSpec:
    """One node of a run: its hotkey, kind (``honest``, an adversary kind, ``validator``)
    and configuration."""

    hotkey: str
    kind: str
    config: NodeConfig


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def node_main(
    argv: list[str], log_path: str, threads: int, environ: dict[str, str], append: bool = False
) -> None:
    """A node process: the launcher's environment as of now (the forkserver's is that of
    its start), its output to ``log_path`` (appended to when ``append``), then the node
    command line's ``main``."""
    import torch

    from subnet.roles_cli import main

    os.environ.clear()
    os.environ.update(environ)
    mode = os.O_APPEND if append else os.O_TRUNC
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | mode, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    torch.set_num_threads(threads)
    sys.exit(main(argv, prog="sparseloco"))


def _pss_bytes(pid: int) -> int | None:
    """The process's proportional set size (Linux ``smaps_rollup``), if readable."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    for line in rollup.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return None


def _peak_rss_bytes(pid: int) -> int | None:
    """The process's resident-memory high-water mark (Linux ``VmHWM``), if readable."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


class NodeProcesses:
    """The node processes of one run (a context manager that stops them all on exit).

    Args:
        specs: the nodes.
        out: the run folder (``nodes/``, ``logs/`` go there).
        windows: windows each node runs before it exits.
        threads: torch intra-op threads per process.

    :meth:`start` forks the nodes from this process, which has imported the roles already,
    when it runs no other thread and each node uses one torch thread (a launcher before its
    nodes run; it must hold no open database connection then); otherwise, and for every
    :meth:`restart`, they fork from a ``forkserver`` that imports the roles once (the first
    such start pays that import). Either way no node imports torch again.
    """

    def __init__(self, specs: Sequence[NodeSpec], out: Path, windows: int, threads: int) -> None:
        self.specs = list(specs)
        self.out = out
        self.windows = windows
        self.threads = threads
        self.procs: dict[str, multiprocessing.process.BaseProcess] = {}
        self.peak_rss: dict[str, int] = {}
        self.peak_pss = 0
        self._pss_due = 0.0
        self._server = multiprocessing.get_context("forkserver")
        # torch._dynamo: torch.optim imports it at the first optimizer (about 2 s).
        self._server.set_forkserver_preload(["subnet.roles_cli", "torch._dynamo"])

    def log_path(self, hotkey: str) -> Path:
        return self.out / "logs" / f"{hotkey}.log"

    def config_path(self, hotkey: str) -> Path:
        return self.out / "nodes" / f"{hotkey}.toml"

    def start(self) -> None:
        """Write every node's TOML and start its process."""
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        (self.out / "nodes").mkdir(parents=True, exist_ok=True)
        ctx: multiprocessing.context.BaseContext = self._server
        # A forked child runs on copies of this process's locks and thread pools: safe while
        # no other thread runs here and each node keeps to one torch thread (a forked GNU
        # OpenMP pool waits forever for workers that did not come along).
        if threading.active_count() == 1 and self.threads == 1:
            import torch._dynamo  # noqa: F401  (imported here once for every forked node)

            ctx = multiprocessing.get_context("fork")
        for spec in self.specs:
            self.config_path(spec.hotkey).write_text(dump_config(spec.config))
            self._spawn(ctx, spec.hotkey, ["--windows", str(self.windows)], append=False)

    def _spawn(
        self,
        ctx: multiprocessing.context.BaseContext,
        hotkey: str,
        stop_args: list[str],
        *,
        append: bool,
    ) -> None:
        role = next(s.config.role for s in self.specs if s.hotkey == hotkey)
        argv = [role, "--config", str(self.config_path(hotkey)), *stop_args]
        proc = ctx.Process(  # type: ignore[attr-defined]
            target=node_main,
            args=(argv, str(self.log_path(hotkey)), self.threads, dict(os.environ), append),
            name=hotkey,
        )
        proc.start()
        self.procs[hotkey] = proc

    def kill(self, hotkey: str) -> None:
        """SIGKILL ``hotkey``'s process and reap it: a crash, for fault injection."""
        proc = self.procs[hotkey]
        proc.kill()
        proc.join()

    def restart(self, hotkey: str, until_window: int) -> None:
        """Start ``hotkey``'s node again after its process ended, as a process manager would:
        from its own state folder, through window ``until_window``, its log appended to."""
        if self.procs[hotkey].is_alive():
            raise ParticipantError(f"node {hotkey} is still running; kill it first")
        self._spawn(self._server, hotkey, ["--until-window", str(until_window)], append=True)

    def check(self) -> None:
        """Record memory high-water marks; raise :class:`ParticipantError` for a node that
        exited with an error."""
        self._sample_pss()
        for hotkey, proc in self.procs.items():
            rss = _peak_rss_bytes(proc.pid)
            if rss is not None:
                self.peak_rss[hotkey] = max(rss, self.peak_rss.get(hotkey, 0))
            code = proc.exitcode
            if code not in (None, 0):
                log = self.log_path(hotkey)
                raise ParticipantError(
                    f"node {hotkey} exited with code {code}: {_last_line(log) or 'no output'} "
                    f"(full log: {log})"
                )

    def _sample_pss(self) -> None:
        """Track the peak of the nodes' summed proportional set size (shared pages counted
        once), sampled every :data:`PSS_EVERY_S`."""
        now = time.monotonic()
        if now < self._pss_due:
            return
        self._pss_due = now + PSS_EVERY_S
        total = sum(_pss_bytes(p.pid) or 0 for p in self.procs.values() if p.is_alive())
        self.peak_pss = max(self.peak_pss, total)

    def wait_ready(self, chain: SqliteSubnet, timeout_s: float) -> None:
        """Wait until every node has committed its locator (it is then waiting for window 0)."""
        end = time.monotonic() + timeout_s
        want = {s.hotkey for s in self.specs}
        while not want <= set(chain.commitments()):
            self.check()
            if time.monotonic() > end:
                missing = ", ".join(sorted(want - set(chain.commitments())))
                raise ParticipantError(f"nodes {missing} did not start within {timeout_s:.0f} s")
            time.sleep(0.05)

    def open_window(self, chain: SqliteSubnet, window: int, blocks_per_window: int) -> None:
        """Move the chain to the first block of ``window`` (counted from :data:`START_BLOCK`):
        that window starts now for every node."""
        chain.advance(START_BLOCK + window * blocks_per_window - chain.block())

    def wait_exit(self, timeout_s: float) -> None:
        """Wait for every node to finish its windows."""
        end = time.monotonic() + timeout_s
        while any(p.is_alive() for p in self.procs.values()):
            self.check()
            if time.monotonic() > end:
                running = ", ".join(h for h, p in self.procs.items() if p.is_alive())
                raise ParticipantError(f"nodes {running} did not finish within {timeout_s:.0f} s")
            time.sleep(0.05)
        self.check()

    def stop(self) -> None:
        """Terminate the nodes still running (SIGTERM, then SIGKILL after 5 s)."""
        running = [p for p in self.procs.values() if p.is_alive()]
        for proc in running:
            proc.terminate()
        for proc in running:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()

    def __enter__(self) -> NodeProcesses:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
