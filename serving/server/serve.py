"""Run one deployment in this process: load the engine, serve HTTP, stop cleanly on SIGTERM/SIGINT.

Order: bind the port (a taken port fails at once, before seconds of model loading) -> load model (a
stop signal during loading ends the process with 0 once loading returns) -> engine.start() -> listen:
uvicorn serves (it takes over SIGTERM/SIGINT and shuts down gracefully, letting
in-flight requests finish for up to GRACEFUL_SHUTDOWN_S) -> engine.shutdown() -> exit code 0.

An engine that can no longer serve (its step loop died, a rank or replica exited) turns /health to 503;
DEAD_GRACE_S later the server shuts down and exits with EXIT_ENGINE_DEAD, in every layout, so a
supervisor restarts it instead of keeping a server that only answers 503.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import sys
from types import FrameType

import uvicorn

from serving.api_key import resolve_api_key
from serving.config import ConfigError, DeploymentConfig
from serving.engine.client import EngineClient
from serving.engine.distributed.process import EXIT_RANK_DIED
from serving.server.app import build_app

GRACEFUL_SHUTDOWN_S = 5
"""How long uvicorn waits for open responses before cancelling them (each cancel aborts its request)."""

DEAD_GRACE_S = 1.0
"""How long a dead engine's server keeps answering 503 (health probes see it, streams get their error
event) before it exits."""
HEALTH_WATCH_S = 0.1
EXIT_ENGINE_DEAD = EXIT_RANK_DIED
"""Exit code of a server whose engine can no longer serve (the one a dead rank's watchdog uses)."""

log = logging.getLogger("serving")


class _StopSignal:
    """Remembers a stop request and forwards it to uvicorn once it runs.

    uvicorn re-raises the signal it caught after its graceful shutdown; with this handler installed
    that re-raise is harmless, so the process exits with 0 instead of dying by the signal.
    """

    def __init__(self) -> None:
        self.requested = False
        self.server: uvicorn.Server | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if self.server is not None:
            self.server.should_exit = True

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self)


def configure_logging(level: str) -> None:
    """Our startup lines at INFO on stderr; uvicorn at the configured level."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).setLevel(level.upper())


def serve(config: DeploymentConfig) -> int:
    """Serve `config` until a stop signal; returns the process exit code."""
    stop = _StopSignal()
    stop.install()
    configure_logging(config.server.log_level)
    api_key = resolve_api_key(config)  # a redacted key without $SERVING_API_KEY fails before loading
    with bind_socket(config.server.host, config.server.port) as sock:
        engine = _load_engine(config)
        if stop.requested:
            log.info("stop requested during loading; exiting")
            return 0
        code = _run(engine, config, stop, sock, api_key)
    # The interpreter's final garbage collection walks every torch/transformers object (2-3 s on
    # this machine); freezing them skips that walk, so a stopped server exits at once.
    gc.freeze()
    return code


def _load_engine(config: DeploymentConfig) -> EngineClient:
    from serving.engine.factory import build_client  # torch import: only when really serving

    log.info("loading model %s (backend builtin, device %s)", config.model.path, config.device)
    return build_client(config)


def bind_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound but not yet listening (clients are refused until the engine is up)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError(
            f"server.host={host!r} server.port={port}: cannot listen there ({err.strerror}); "
            "choose another port (0 picks a free one)"
        ) from None
    return sock


def _run(
    engine: EngineClient,
    config: DeploymentConfig,
    stop: _StopSignal,
    sock: socket.socket,
    api_key: str | None,
) -> int:
    uv_config = uvicorn.Config(
        build_app(engine, config, api_key),
        host=config.server.host,
        port=config.server.port,
        log_level=config.server.log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        lifespan="off",
        access_log=False,
    )
    server = uvicorn.Server(uv_config)
    stop.server = server
    loop_factory = uv_config.get_loop_factory()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        died = runner.run(_serve(engine, server, stop, sock))
    return EXIT_ENGINE_DEAD if died else 0


async def _serve(
    engine: EngineClient, server: uvicorn.Server, stop: _StopSignal, sock: socket.socket
) -> bool:
    """Serve until a stop signal or the engine's death; True when the engine died."""
    await engine.start()
    try:
        if stop.requested:
            return False
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started:
            _announce(server, engine.model_name)
        watch = asyncio.create_task(_watch_health(engine, server))
        await task
        died = watch.done() and watch.result()
        watch.cancel()
        return died
    finally:
        await engine.shutdown()
        log.info("engine shut down")


async def _watch_health(engine: EngineClient, server: uvicorn.Server) -> bool:
    """Ends the server DEAD_GRACE_S after the engine stopped being healthy; True if it did."""
    while not server.should_exit:
        if not engine.is_healthy():
            log.error("the engine can no longer serve: exiting with code %d", EXIT_ENGINE_DEAD)
            await asyncio.sleep(DEAD_GRACE_S)
            server.should_exit = True
            return True
        await asyncio.sleep(HEALTH_WATCH_S)
    return False


def _announce(server: uvicorn.Server, model_name: str) -> None:
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    url = f"http://{host}:{port}"
    log.info("ready: serving %s at %s", model_name, url)
    print(f"serving {model_name} at {url}", flush=True)
