"""Measuring on a board through TVM RPC, with real servers and a real tracker on 127.0.0.1: the
loopback bench from the CLI, outputs equal to a local run, aarch64 libraries (NEON and the sdot
kernel) computing the right numbers under qemu, and every fault (closed port, silent
listener, unknown or busy tracker key, a server killed mid-run, a library for another
architecture) ending in one line with exit code 3 within the timeout, never a hang."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import EXAMPLE
from qpasses.errors import EngineError, InputError
from qpasses.targets.lower.tvm import Runner, compile_model
from qpasses.targets.lower.tvm_rpc import Endpoint, bounded, open_device
from test_cli import assert_one_line_error, qpass
from test_lower_onnxruntime import int8_model
from test_lower_tvm import reference
from test_tvm_dot import ARM_DOTPROD, CASES, conv_module, reference as dot_reference

tvm = pytest.importorskip("tvm", reason="apache-tvm is a test dependency; pip install -e '.[test]'")
from tvm import relax  # noqa: E402
from tvm.support import cc  # noqa: E402

from qpasses.targets.lower.tvm_schedule import schedule_cpu  # noqa: E402

START_TIMEOUT = 180  # seconds for a server to come up on a loaded 2-core CI machine
ARM_PYTHON = Path(os.environ.get("QPASS_ARM_ROOT", Path.home() / ".cache" / "qpass" / "aarch64")) / "python"


class Process:
    """A subprocess in its own process group (a TVM server forks workers: kill them all)."""

    def __init__(self, *argv: str):
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put("")

    def wait_for(self, text: str, timeout: float = START_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if text in line:
                return line
            assert line, f"{self.proc.args} exited before printing {text!r}"
        raise AssertionError(f"{self.proc.args} did not print {text!r} within {timeout} s")

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"nothing listens on {port} after {timeout} s")


def start_server(*extra: str) -> tuple[Process, int]:
    server = Process(sys.executable, "-m", "qpasses.cli", "rpc-server", "--host", "127.0.0.1",
                     "--port", str(free_port()), *extra)
    line = server.wait_for("serving on")
    return server, int(line.split()[2].rstrip(",").rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def libraries(tmp_path_factory) -> dict[str, Path]:
    """The example as int8 and float x86 libraries, and the int8 one for aarch64."""
    root = tmp_path_factory.mktemp("rpc")
    qdq = int8_model(root, EXAMPLE / "model.onnx", target="tvm-x86")
    compile_model(qdq, root / "q.so")
    compile_model(EXAMPLE / "model.onnx", root / "f.so")
    arm_qdq = int8_model(root, EXAMPLE / "model.onnx", target="tvm-arm")
    compile_model(arm_qdq, root / "arm.so", target="tvm-arm")
    assert compile_model(arm_qdq, root / "arm-dot.so", target="tvm-arm", mattr="+neon,+dotprod").int_kernel == "sdot"
    return {"int8": root / "q.so", "float": root / "f.so", "arm": root / "arm.so", "arm_dot": root / "arm-dot.so",
            "arm_qdq": arm_qdq}


@pytest.fixture(scope="module")
def server():
    """`qpass rpc-server` on loopback: (process, port)."""
    process, port = start_server()
    yield process, port
    process.kill()


@pytest.fixture(scope="module")
def tracker():
    """TVM's tracker with a plain TVM server (not qpass's) registered under key 'board': the tracker's port."""
    port = free_port()
    tracker = Process(sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
                      "--port-end", str(port + 1))
    wait_listening(port)
    board_port = free_port()
    board = Process(sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(board_port),
                    "--port-end", str(board_port + 1), "--tracker", f"127.0.0.1:{port}", "--key", "board")
    from tvm import rpc

    deadline = time.monotonic() + START_TIMEOUT
    while not rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"].get("board", {}).get("free"):
        assert time.monotonic() < deadline, "the server did not register with the tracker"
        time.sleep(0.5)
    yield port
    board.kill()
    tracker.kill()


@pytest.fixture(scope="module")
def arm_board():
    """An aarch64 TVM RPC server under qemu-user (set up by tools/setup_arm.sh): its port."""
    if not ARM_PYTHON.exists():
        pytest.fail(f"{ARM_PYTHON} is missing: run bash tools/setup_arm.sh (.ci/run does)")
    port = free_port()
    board = Process(str(ARM_PYTHON), "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
                    "--port-end", str(port + 1))
    board.wait_for("bind to")
    wait_listening(port)  # TVM logs the bind just before it listens
    yield port
    board.kill()


def test_cli_bench_through_loopback_rpc(tmp_path, libraries, server):
    _, port = server
    result = qpass("bench", str(libraries["int8"]), "--engine", "tvm", "--rpc", f"127.0.0.1:{port}",
                   "--compare", str(libraries["float"]), "--warmup", "2", "--runs", "7", "--number", "3",
                   "--threads", "2", "--report", str(tmp_path / "b.json"), "-q")
    assert result.returncode == 0, result.stderr
    bench = json.loads((tmp_path / "b.json").read_text())
    assert bench["device"].startswith("x86_64: ") and bench["device"].endswith(f"at RPC server 127.0.0.1:{port}")
    assert bench["settings"]["rpc"] == f"RPC server 127.0.0.1:{port}" and bench["settings"]["number"] == 3
    assert bench["settings"]["threads"] == 2
    assert {k: m["latency"]["runs"] for k, m in bench["models"].items()} == {"model": 7, "compare": 7}
    assert bench["speedup"] > 0 and bench["error"] is None


def test_remote_outputs_equal_a_local_run(libraries, server):
    _, port = server
    remote = Runner(libraries["int8"], remote=open_device(Endpoint("127.0.0.1", port)))
    local = Runner(libraries["int8"])
    for got, want in zip(remote.outputs(), local.outputs()):
        np.testing.assert_array_equal(got, want)
    assert remote() > 0


def test_arm_library_runs_under_qemu_through_rpc(tmp_path, libraries, arm_board):
    """Correctness on a real aarch64 runtime (qemu's default CPU has dot products): the NEON build and
    the sdot build both match ORT running the Q/DQ model (latency under emulation means nothing, so
    only that the CLI measures through it)."""
    device = open_device(Endpoint("127.0.0.1", arm_board, timeout=120))
    for library in ("arm", "arm_dot"):
        runner = Runner(libraries[library], remote=device)
        for got, want in zip(runner.outputs(), reference(libraries["arm_qdq"], runner.feeds)):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, float(np.abs(want).max())),
                                       err_msg=library)
        del runner
    del device
    result = qpass("bench", str(libraries["arm"]), "--engine", "tvm", "--rpc", f"127.0.0.1:{arm_board}",
                   "--warmup", "1", "--runs", "2", "--rpc-timeout", "120", "--report", str(tmp_path / "b.json"), "-q")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "b.json").read_text())["models"]["model"]["latency"]["runs"] == 2


def test_sdot_conv_sums_equal_an_int64_reference_under_qemu(tmp_path, arm_board):
    """Every int8 shape test_tvm_dot checks for vpmaddwd, on the sdot kernel run by a real aarch64 runtime."""
    target = tvm.target.Target(ARM_DOTPROD)
    rng = np.random.default_rng(5)
    session = open_device(Endpoint("127.0.0.1", arm_board, timeout=120)).session  # one session: the server has one slot
    for number, (case, (shape, dtype, channels, k, strides, padding)) in enumerate(CASES.items()):
        if dtype != "int8":
            continue
        x = rng.integers(-128, 128, size=shape).astype(dtype)
        w = rng.integers(-127, 128, size=(channels, shape[1], k, k)).astype(dtype)
        x.flat[:50], w[0] = -128, -127
        library = tmp_path / f"conv{number}.so"
        tvm.compile(schedule_cpu(conv_module(w, shape, dtype, strides, padding), target, "sdot"), target=target) \
            .export_library(str(library), fcompile=cc.cross_compiler("aarch64-linux-gnu-gcc"))
        session.upload(str(library), target=library.name)
        vm = relax.VirtualMachine(session.load_module(library.name), session.cpu(0))
        got = vm["main"](tvm.runtime.tensor(x, session.cpu(0))).numpy()
        np.testing.assert_array_equal(got, dot_reference(x, w, strides, padding), err_msg=case)


def test_tracker_request_and_its_faults(tmp_path, libraries, tracker):
    result = qpass("bench", str(libraries["int8"]), "--engine", "tvm", "--tracker", f"127.0.0.1:{tracker}",
                   "--key", "board", "--runs", "3", "--report", str(tmp_path / "b.json"), "-q")
    assert result.returncode == 0, result.stderr
    # a plain TVM server cannot describe its CPU: the address stands in
    assert json.loads((tmp_path / "b.json").read_text())["device"].startswith("remote device at tracker")

    assert_one_line_error(qpass("bench", str(libraries["int8"]), "--engine", "tvm", "--tracker", f"127.0.0.1:{tracker}",
                                "--key", "phone"), 3, "no server is registered under this key (keys with servers: board)")
    assert_one_line_error(qpass("bench", str(libraries["int8"]), "--engine", "tvm", "--tracker", f"127.0.0.1:{tracker}",
                                "--key", "board", "--threads", "1"), 2, "--threads on a board needs `qpass rpc-server`")

    held = open_device(Endpoint("127.0.0.1", tracker, "board"))  # the only board is now busy
    start = time.monotonic()
    assert_one_line_error(qpass("bench", str(libraries["int8"]), "--engine", "tvm", "--tracker", f"127.0.0.1:{tracker}",
                                "--key", "board", "--rpc-timeout", "2"), 3, "key board: no free server (all busy)")
    assert time.monotonic() - start < 60
    del held


def test_wrong_architecture(libraries, server, tracker):
    _, port = server
    # qpass rpc-server says what it is: refused before the upload
    assert_one_line_error(qpass("bench", str(libraries["arm"]), "--engine", "tvm", "--rpc", f"127.0.0.1:{port}"), 3,
                          f"arm.so is built for aarch64; the board at RPC server 127.0.0.1:{port} is x86_64")
    # a plain TVM server does not: its loader refuses the library
    assert_one_line_error(qpass("bench", str(libraries["arm"]), "--engine", "tvm", "--tracker",
                                f"127.0.0.1:{tracker}", "--key", "board"), 3, "arm.so (built for aarch64) does not load")


def test_closed_port_and_silent_listener(libraries):
    closed = free_port()
    assert_one_line_error(qpass("bench", str(libraries["int8"]), "--engine", "tvm", "--rpc", f"127.0.0.1:{closed}"), 3,
                          f"cannot reach RPC server 127.0.0.1:{closed}: Connection refused")
    with socket.socket() as silent:  # accepts (the kernel completes the handshake) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        start = time.monotonic()
        for address in (["--rpc", f"127.0.0.1:{port}"], ["--tracker", f"127.0.0.1:{port}", "--key", "board"]):
            assert_one_line_error(qpass("bench", str(libraries["int8"]), "--engine", "tvm", *address,
                                        "--rpc-timeout", "1.5"), 3, "no answer within 1.5 s")
        assert time.monotonic() - start < 60


def test_server_killed_mid_run_keeps_the_runs_made(tmp_path, libraries):
    server, port = start_server()
    bench = Process(sys.executable, "-m", "qpasses.cli", "bench", str(libraries["int8"]), "--engine", "tvm",
                    "--rpc", f"127.0.0.1:{port}", "--warmup", "0", "--runs", "1000000", "--min-repeat-ms", "5",
                    "--rpc-timeout", "20", "--report", str(tmp_path / "b.json"))
    try:
        server.wait_for("load_module")  # the server's log: the library is loaded, timed runs follow
        time.sleep(3.0)
        server.kill()
        assert bench.proc.wait(timeout=60) == 3
    finally:
        bench.kill()
        server.kill()
    last = [line for line in iter(bench.lines.get, "")][-1]
    assert last.startswith("qpass: error: measurement stopped: RPC server") and str(tmp_path / "b.json") in last
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["error"] and report["models"]["model"]["latency"]["runs"] >= 1
    assert report["speedup"] is None


def test_bounded_call_and_address_parsing():
    start = time.monotonic()
    with pytest.raises(EngineError, match="sleeping: no answer within 0.2 s"):
        bounded(lambda: time.sleep(5), 0.2, "sleeping")
    assert time.monotonic() - start < 2
    def fail():
        raise RuntimeError("remote traceback\n  ...\nboom")

    with pytest.raises(EngineError, match="failing: boom$"):
        bounded(fail, 1, "failing")
    assert Endpoint.parse("10.0.0.5:9190", "rk3588") == Endpoint("10.0.0.5", 9190, "rk3588")
    for bad in ("board", "board:", ":9090", "board:99999"):
        with pytest.raises(InputError, match="is not HOST:PORT"):
            Endpoint.parse(bad)


def test_cli_option_errors(libraries):
    lib = str(libraries["int8"])
    assert_one_line_error(qpass("bench", lib, "--engine", "tvm", "--tracker", "127.0.0.1:9190"), 2, "--tracker needs --key")
    assert_one_line_error(qpass("bench", lib, "--engine", "tvm", "--rpc", "h:1", "--tracker", "h:2", "--key", "k"), 2,
                          "not both")
    assert_one_line_error(qpass("bench", lib, "--engine", "tvm", "--rpc", "nowhere"), 2, "'nowhere' is not HOST:PORT")
    assert_one_line_error(qpass("rpc-server", "--tracker", "127.0.0.1:9190"), 2, "--tracker needs --key")
    assert_one_line_error(qpass("rpc-server", "--port", "9300", "--port-end", "9200"), 2, "must be above --port")


def test_rpc_server_says_where_it_serves_and_only_what_is_true(tracker):
    """A port in use is an error unless a range is given; "registered" only once the tracker lists it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line_error(qpass("rpc-server", "--host", "127.0.0.1", "--port", str(port)), 2,
                              f"port {port} is in use on 127.0.0.1 (give another --port, or --port-end to search a range)")
        server = Process(sys.executable, "-m", "qpasses.cli", "rpc-server", "--host", "127.0.0.1", "--port", str(port),
                         "--port-end", str(port + 50), "--tracker", f"127.0.0.1:{tracker}", "--key", "qboard")
        try:
            line = server.wait_for("serving on")
            served = int(line.split()[2].rstrip(",").rsplit(":", 1)[1])
            assert port < served < port + 50 and f"registered at 127.0.0.1:{tracker} as qboard" in line
            from tvm import rpc

            listed = rpc.connect_tracker("127.0.0.1", tracker).summary()["server_info"]
            assert any(s["key"] == "server:qboard" and s["addr"][-1] == served for s in listed)
        finally:
            server.kill()
    closed = free_port()
    assert_one_line_error(qpass("rpc-server", "--host", "127.0.0.1", "--port", str(free_port()), "--tracker",
                                f"127.0.0.1:{closed}", "--key", "k"), 3,
                          f"cannot reach tracker 127.0.0.1:{closed} key k: Connection refused")
