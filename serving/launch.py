"""ServerProcess: one serving backend as a child process the tuner and the tests can trust to go away.

The server runs in its own process group (start_new_session), pinned with taskset when CPUs are
given, its stdout and stderr in a log file. wait_healthy() polls the backend's health path and turns
an early exit into ServerStartError carrying the log's tail. poll() sees an exit while it runs. stop()
sends SIGTERM to the whole group (and SIGCONT, so a stopped process can act on it), SIGKILL after a
timeout, and checks that no process of the group is left. A sampler thread records the peak RSS of the
process tree while it runs.

    with ServerProcess(config, log_path=run_dir / "server.log", cpus=[0, 1]) as server:
        server.wait_healthy(timeout_s=120)
        ... traffic against server.url ...
    # leaving the block stops the server; server.returncode, server.peak_rss_bytes stay readable
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx
import psutil

from serving.api_key import resolve_api_key
from serving.backends import get_backend
from serving.config import DeploymentConfig

LOG_TAIL_LINES = 40
RSS_SAMPLE_INTERVAL_S = 0.2
HEALTH_POLL_INTERVAL_S = 0.25
PORT_RETRIES = 3
"""A free port picked here can be taken before the child binds it; start again on another port."""


class ServerStartError(RuntimeError):
    """The server exited or did not answer in time; the message holds the end of its log.

    `transient` is True when the deployment itself is not to blame and a later launch may well succeed: a
    start-up slower than the time-out (a busy machine) or ports taken by others on every attempt. An exit
    of the server's own (bad model path, out of memory at load, an engine error) is not transient.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class ServerProcess:
    """A serving backend's server in its own process group (a context manager: exit stops it)."""

    def __init__(
        self,
        config: DeploymentConfig,
        *,
        log_path: Path,
        cpus: Sequence[int] | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.backend = get_backend(config.backend)
        self.backend.validate(config)
        self.log_path = Path(log_path)
        self.config_path = self.log_path.with_name(self.log_path.stem + ".deploy.yaml")
        self.cpus = list(cpus) if cpus is not None else None
        self.extra_env = dict(extra_env or {})
        self.port = config.server.port
        self.returncode: int | None = None
        self.peak_rss_bytes = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._sampler: threading.Thread | None = None
        self._stop_sampling = threading.Event()
        self._attempts = 0

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Where to reach the server from this machine (loopback when it binds every interface)."""
        host = self.config.server.host
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1"
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def poll(self) -> int | None:
        """The leader's exit code once it has exited (then also in `returncode`), else None; never blocks.

        A watch calls this while traffic runs, so a crash is seen when it happens rather than at stop().
        """
        code = self._proc.poll() if self._proc else None
        if code is not None:
            self.returncode = code
        return code

    def start(self) -> None:
        """Start the server (not waiting for it); a free port is picked when config.server.port is 0."""
        if self._proc is not None:
            raise RuntimeError("ServerProcess.start() called twice; make a new ServerProcess")
        if self.config.server.port == 0:
            self.port = free_port()
        command = self.backend.command(self.config, self.port, config_path=self.config_path)
        if self.cpus:
            command = _pin(command, self.cpus)
        # exactly the config's key (null: none, even if this process has $SERVING_API_KEY): the tuner's
        # traffic must reach its trial servers
        key = None if self.config.server.api_key is None else resolve_api_key(self.config)
        env = {**self.backend.process_env(self.config, self.cpus, os.environ, key), **self.extra_env}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self._attempts += 1
        self._stop_sampling.clear()
        self._sampler = threading.Thread(
            target=self._sample_rss, args=(self._proc,), name="rss-sampler", daemon=True
        )
        self._sampler.start()

    def wait_healthy(self, timeout_s: float, cancel: threading.Event | None = None) -> None:
        """Block until GET health_path answers 200; on exit, time-out or `cancel`: stop the server, raise."""
        if self._proc is None:
            raise RuntimeError("ServerProcess.wait_healthy() before start()")
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while True:
                health = self.url + self.backend.health_path  # a restart moves it to another port
                code = self._proc.poll()
                if code is not None:
                    self.stop()
                    port_taken = self._port_was_taken()
                    if port_taken and self._restart_on_new_port():
                        deadline = time.monotonic() + timeout_s
                        continue
                    taken = f" (its port was taken on all {self._attempts} attempts)" if port_taken else ""
                    raise ServerStartError(
                        f"server exited with code {code} before it was healthy{taken}; log {self.log_path}:\n"
                        f"{self.log_tail()}",
                        transient=port_taken,
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(health).status_code == 200:
                        return
                if cancel is not None and cancel.is_set():
                    self.stop()
                    raise ServerStartError("start-up cancelled")
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServerStartError(
                        f"server was not healthy at {health} within {timeout_s:g} s; log {self.log_path}:\n"
                        f"{self.log_tail()}",
                        transient=True,
                    )
                time.sleep(HEALTH_POLL_INTERVAL_S)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM to the process group, SIGKILL after timeout_s; the exit code (None if never started).

        Negative codes are deaths by signal (-9: it had to be killed). Raises RuntimeError if a process of
        the group survives even SIGKILL.
        """
        proc = self._proc
        if proc is None:
            return None
        stop_group(proc, timeout_s)
        self._stop_sampling.set()
        if self._sampler is not None:
            self._sampler.join(timeout=2)
        self.returncode = proc.returncode
        return self.returncode

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- helpers --------------------------------------------------------------------------------

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _port_was_taken(self) -> bool:
        return self.config.server.port == 0 and "address already in use" in self.log_tail().lower()

    def _restart_on_new_port(self) -> bool:
        if self._attempts >= PORT_RETRIES:
            return False
        self._proc = None
        self.returncode = None
        self.start()
        return True

    def _sample_rss(self, proc: subprocess.Popen[bytes]) -> None:
        while proc.poll() is None:
            self.peak_rss_bytes = max(self.peak_rss_bytes, tree_rss_bytes(proc.pid))
            if self._stop_sampling.wait(RSS_SAMPLE_INTERVAL_S):
                return


def stop_group(proc: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    """SIGTERM to the process group `proc` leads (started with start_new_session), SIGKILL after
    timeout_s; its exit code. Raises RuntimeError if a process of the group survives even SIGKILL.

    SIGCONT follows SIGTERM: a stopped (SIGSTOP'd) process only acts on SIGTERM once continued, and would
    otherwise wait out the whole timeout."""
    if proc.poll() is None or _group_alive(proc.pid):
        _signal_group(proc.pid, signal.SIGTERM)
        _signal_group(proc.pid, signal.SIGCONT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout_s)
        if not _wait_group_gone(proc.pid, deadline=time.monotonic() + max(0.5, timeout_s / 4)):
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout_s)
            if not _wait_group_gone(proc.pid, deadline=time.monotonic() + timeout_s):
                raise RuntimeError(f"processes of group {proc.pid} survived SIGKILL: {_group_pids(proc.pid)}")
    return proc.returncode


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (0 once it is gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


def _pin(command: list[str], cpus: Sequence[int]) -> list[str]:
    taskset = shutil.which("taskset")
    if taskset is None:
        raise RuntimeError("cpus were given but `taskset` (util-linux) is not installed")
    return [taskset, "--cpu-list", ",".join(map(str, cpus)), *command]


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is pgid."""
    pids = []
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                pids.append(proc.pid)
    return pids


def _group_alive(pgid: int) -> bool:
    return bool(_group_pids(pgid))


def _wait_group_gone(pgid: int, deadline: float) -> bool:
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
