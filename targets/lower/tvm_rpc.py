"""Reaching a board through TVM RPC, directly or through a tracker, without ever hanging.

TVM's RPC client has no connect timeout: a listener that never answers, or a tracker key whose
servers are all busy, blocks forever. So every step that talks to the network (connect, tracker
request, upload, load, each timed run) runs here in a daemon thread joined with a deadline, and a
missed deadline, a refused connection or a dropped session becomes a one-line `EngineError`
(exit code 3). `serve` is `qpass rpc-server`: TVM's server plus a function that describes the
board's CPU to the client.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from qpasses.errors import EngineError, InputError

DESCRIBE = "qpass.describe_device"  # registered by `qpass rpc-server`; other servers lack these
SET_THREADS = "qpass.set_threads"


@dataclass(frozen=True)
class Endpoint:
    """An RPC server's address, or with `key`, a tracker's address and the device key to request."""

    host: str
    port: int
    key: str | None = None
    timeout: float = 10.0  # seconds any one network step may take

    def __str__(self) -> str:
        where = f"{self.host}:{self.port}"
        return f"tracker {where} key {self.key}" if self.key is not None else f"RPC server {where}"

    @classmethod
    def parse(cls, address: str, key: str | None = None, timeout: float = 10.0) -> "Endpoint":
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InputError(f"'{address}' is not HOST:PORT")
        return cls(host, int(port), key, timeout)


def bounded(call: Callable[[], Any], timeout: float, what: str) -> Any:
    """`call()` in a daemon thread; an error or no answer within `timeout` s is an EngineError about `what`."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name=f"qpass-rpc: {what}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise EngineError(f"{what}: no answer within {timeout:g} s")
    if "error" in result:
        raise EngineError(f"{what}: {last_line(result['error'])}") from None
    return result.get("value")


def last_line(exc: BaseException) -> str:
    """The informative end of a (possibly multi-line, remote-traceback) TVM error."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def connect(endpoint: Endpoint):
    """An RPC session on the endpoint's device."""
    _probe(endpoint)
    from tvm import rpc

    if endpoint.key is None:
        return bounded(lambda: rpc.connect(endpoint.host, endpoint.port, session_timeout=0), endpoint.timeout,
                       f"{endpoint} accepted the connection but did not answer the RPC handshake")
    tracker = bounded(lambda: rpc.connect_tracker(endpoint.host, endpoint.port), endpoint.timeout,
                      f"{endpoint}: not a TVM RPC tracker")
    summary = bounded(tracker.summary, endpoint.timeout, f"{endpoint}: tracker summary")
    keys = {s.get("key", "").removeprefix("server:") for s in summary["server_info"]}
    if endpoint.key not in keys:
        raise EngineError(f"{endpoint}: no server is registered under this key "
                          f"(keys with servers: {', '.join(sorted(keys)) or 'none'})")
    return bounded(lambda: tracker.request(endpoint.key, priority=1, session_timeout=0), endpoint.timeout,
                   f"{endpoint}: no free server (all busy)")


@dataclass
class RemoteDevice:
    """A connected board: the session both artifacts of a comparison share, and what it is."""

    endpoint: Endpoint
    session: Any
    description: str
    machine: str | None  # e.g. "aarch64"; None when the server does not say (not `qpass rpc-server`)

    def set_threads(self, count: int) -> None:
        try:
            function = self.session.get_function(SET_THREADS)
        except Exception:  # noqa: BLE001 - a plain TVM server
            raise InputError(f"--threads on a board needs `qpass rpc-server` there: {self.endpoint} is a plain "
                             "TVM server, which keeps its default (all cores of an ARM board)") from None
        self.step(lambda: function(count), "setting the thread count")

    def step(self, call: Callable[[], Any], what: str) -> Any:
        return bounded(call, self.endpoint.timeout, f"{self.endpoint}: {what}")


def open_device(endpoint: Endpoint) -> RemoteDevice:
    session = connect(endpoint)
    try:
        function = session.get_function(DESCRIBE)
    except Exception:  # noqa: BLE001 - a plain TVM server: only the address describes it
        return RemoteDevice(endpoint, session, f"remote device at {endpoint} (`qpass rpc-server` would describe it)",
                            None)
    facts = json.loads(bounded(function, endpoint.timeout, f"{endpoint}: device description"))
    return RemoteDevice(endpoint, session, f"{facts['machine']}: {facts['cpu']} at {endpoint}", facts["machine"])


def _probe(endpoint: Endpoint) -> None:
    """Fail fast when nothing listens: TVM's own connect retries a closed tracker port for a minute."""
    try:
        socket.create_connection((endpoint.host, endpoint.port), timeout=endpoint.timeout).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError):
            reason = f"no answer within {endpoint.timeout:g} s"
        raise EngineError(f"cannot reach {endpoint}: {reason}") from None


def set_threads(count: int) -> None:
    """Run TVM kernels on `count` threads in this process (here, or in a `qpass rpc-server` session).

    TVM reads TVM_NUM_THREADS at each parallel launch (unset: half the logical cores on x86), and
    config_threadpool rebuilds the pool, which never grows past the size it was first built with:
    so the first call builds it with every core, then each call sets the count to use."""
    import tvm

    global _pool_built
    configure = tvm.get_global_func("runtime.config_threadpool")
    if not _pool_built:
        os.environ["TVM_NUM_THREADS"] = str(max(count, os.cpu_count() or 1))
        configure(1, 0)  # 1: the big cores of a big.LITTLE CPU; 0: as many as TVM_NUM_THREADS
        _pool_built = True
    os.environ["TVM_NUM_THREADS"] = str(count)
    configure(1, count)


_pool_built = False  # whether set_threads has built this process's pool at full size


def _register_functions() -> None:
    """Runs in the server process before it forks a session: what sessions will answer."""
    import tvm_ffi

    from qpasses.bench import cpu_description

    facts = json.dumps({"machine": platform.machine(), "cpu": cpu_description()})
    tvm_ffi.register_global_func(DESCRIBE, lambda: facts, override=True)
    tvm_ffi.register_global_func(SET_THREADS, set_threads, override=True)


def serve(host: str, port: int, port_end: int, tracker: str | None, key: str, timeout: float = 10.0):
    """Start TVM's RPC server on the first free port in [port, port_end), registered with `tracker`
    under `key` if given: a `tvm.rpc.Server`, returned once it listens (and the tracker lists it)."""
    from tvm import rpc

    at = Endpoint.parse(tracker, key, timeout) if tracker else None
    if at is not None:  # TVM's server would retry an unreachable tracker forever, silently
        _probe(at)
        bounded(lambda: rpc.connect_tracker(at.host, at.port).summary(), timeout, f"{at}: not a TVM RPC tracker")
    try:
        server = rpc.Server(host, port, port_end, key=key, tracker_addr=(at.host, at.port) if at else None,
                            server_init_callback=_register_functions)
    except Exception as exc:
        if "cannot bind" not in str(exc):
            raise EngineError(f"cannot start the RPC server on {host}:{port}-{port_end}: {last_line(exc)}") from None
        taken = f"port {port} is in use" if port_end == port + 1 else f"ports {port}..{port_end - 1} are all in use"
        raise InputError(f"{taken} on {host} (give another --port, or --port-end to search a range)") from None
    if at is not None:
        try:
            _await_registration(at, server.port)
        except EngineError:
            server.terminate()
            raise
    return server


def _await_registration(at: Endpoint, port: int) -> None:
    """Until the tracker lists a server under `at.key` on `port`: only then is it registered."""
    from tvm import rpc

    deadline = time.monotonic() + at.timeout
    while True:
        summary = bounded(lambda: rpc.connect_tracker(at.host, at.port).summary(), at.timeout, f"{at}: tracker summary")
        if any(s.get("key") == f"server:{at.key}" and list(s.get("addr", []))[-1:] == [port]
               for s in summary.get("server_info", [])):
            return
        if time.monotonic() > deadline:
            raise EngineError(f"{at} does not list this server within {at.timeout:g} s: not registered")
        time.sleep(0.2)
