"""Child processes of a parallel deployment: spawned with a pipe, tied to their parent, watched.

Every rank and replica is a child of the server process, in the server's process group (so the
launcher's killpg reaches it) and with PR_SET_PDEATHSIG, so it dies with its parent even on SIGKILL.
Children ignore SIGTERM/SIGINT: the parent stops them in order (a stop message), which lets the server
exit 0 on SIGTERM. A watchdog in the parent ends the whole deployment with EXIT_RANK_DIED when any
child exits unexpectedly, instead of hanging in a collective that will never complete: it marks the
deployment dead (so /health answers 503), kills the other children, and gives the server DEATH_GRACE_S
to exit by itself with that code before it ends the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import Connection, Pipe

import yaml

from serving.config import DeploymentConfig
from serving.paths import pythonpath_with_package

log = logging.getLogger("serving")

EXIT_RANK_DIED = 70
"""Exit code of a server whose worker rank or replica died."""
WATCH_INTERVAL_S = 0.1
DEATH_GRACE_S = 5.0
"""How long a dead deployment's server may take to answer 503 and exit by itself (serve's health watch
exits within about a second) before the watchdog ends the process."""
STOP_TIMEOUT_S = 10.0
CONN_FD_ENV = "SERVING_PARALLEL_FD"
"""File descriptor of the child's end of its pipe to the parent."""
CONFIG_ENV = "SERVING_PARALLEL_CONFIG"
"""The child's DeploymentConfig as YAML."""
CPUS_ENV = "SERVING_PARALLEL_CPUS"
"""The cores the child pins itself to (comma-separated): its share of its parent's."""

_PR_SET_PDEATHSIG = 1


class Child:
    """One spawned child: its Popen and the parent's end of its pipe."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], conn: Connection) -> None:
        self.name = name
        self.proc = proc
        self.conn = conn
        self.send_lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, obj: object) -> None:
        with self.send_lock:
            self.conn.send(obj)

    def send_bytes(self, data: bytes) -> None:
        with self.send_lock:
            self.conn.send_bytes(data)


def spawn(name: str, module: str, env: Mapping[str, str]) -> Child:
    """Start `python -m module` with env added and a duplex pipe on fd CONN_FD_ENV."""
    parent_conn, child_conn = Pipe(duplex=True)
    fd = child_conn.fileno()
    full_env = {**os.environ, **env, CONN_FD_ENV: str(fd), "PYTHONPATH": pythonpath_with_package()}
    proc = subprocess.Popen(
        [sys.executable, "-m", module],
        env=full_env,
        pass_fds=(fd,),
        stdin=subprocess.DEVNULL,
        start_new_session=False,
    )
    child_conn.close()
    return Child(name, proc, parent_conn)


def child_setup() -> Connection:
    """Call first in a child: die with the parent, leave SIGTERM/SIGINT to it; returns the pipe."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(EXIT_RANK_DIED)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return Connection(int(os.environ[CONN_FD_ENV]))


def child_config() -> DeploymentConfig:
    """In a child: the DeploymentConfig its parent sent, after pinning this process to its cores."""
    from serving.engine.distributed.placement import pin_this_process

    data = yaml.safe_load(os.environ[CONFIG_ENV])
    if not isinstance(data, dict):
        raise ValueError(f"{CONFIG_ENV} is not a YAML mapping")
    cpus = os.environ.get(CPUS_ENV)
    if cpus:
        pin_this_process([int(c) for c in cpus.split(",")])
    return DeploymentConfig.from_dict(data)


def run_child(serve: Callable[[Connection], int]) -> int:
    """A child process's main: set up, serve the pipe, and print any crash before exiting 1."""
    conn = child_setup()
    try:
        return serve(conn)
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        return 1


class Watchdog:
    """Polls children; when one exits while the deployment is not stopping: on_death(child), kill the
    rest and end this process with EXIT_RANK_DIED."""

    def __init__(self, children: Sequence[Child], on_death: Callable[[Child], None] | None = None) -> None:
        self.children = list(children)
        self.on_death = on_death
        self.stopping = False
        self.dead: str | None = None
        """Which child died and how, once one has: the deployment can no longer serve."""
        self._thread = threading.Thread(target=self._run, name="parallel-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self.stopping:
            for child in self.children:
                code = child.proc.poll()
                if code is not None and not self.stopping:
                    self._die(child, code)
            time.sleep(WATCH_INTERVAL_S)

    def _die(self, child: Child, code: int) -> None:
        log.error("%s (pid %d) exited with code %s: stopping the deployment", child.name, child.pid, code)
        self.dead = f"{child.name} (pid {child.pid}) exited with code {code}"
        if self.on_death is not None:
            with contextlib.suppress(Exception):
                self.on_death(child)
        kill_all(self.children)
        time.sleep(DEATH_GRACE_S)  # the process normally ends during this sleep, with EXIT_RANK_DIED
        sys.stderr.flush()
        os._exit(EXIT_RANK_DIED)


def kill_all(children: Sequence[Child]) -> None:
    for child in children:
        if child.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.kill()
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(timeout=5)


def stop_children(children: Sequence[Child], watchdog: Watchdog | None, message: object = ("stop",)) -> None:
    """Orderly stop: tell each child, wait, kill what is left."""
    if watchdog is not None:
        watchdog.stopping = True
    for child in children:
        with contextlib.suppress(OSError, ValueError):
            child.send(message)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    kill_all(children)
    for child in children:
        with contextlib.suppress(OSError):
            child.conn.close()
