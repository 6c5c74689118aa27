"""Fixtures for the integration tests: they start the real executables on loopback and talk to
them as clients would (grpcio, curl, h2load, the h2 library over raw sockets)."""
import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("TALKMESH_BIN", os.path.join(ROOT, ".build", "debug"))


def pytest_collection_modifyitems(config, items):
    """TALKMESH_TEST_ORDER=reverse runs every test in the opposite order: a test that needs what
    another made fails then (each test creates what it uses)."""
    if os.environ.get("TALKMESH_TEST_ORDER") == "reverse":
        items.reverse()


def pytest_configure(config):
    config.addinivalue_line("markers", "memory_bound: asserts a process's RSS stays under a bound; deselected in sanitizer runs "
                            "(scripts/sanitize), whose shadow memory and quarantine of freed blocks are not the service's")


# What lives as long as the session (the stubs, every service's log, kept for failure messages),
# removed when it ends: by pytest, or at exit when a benchmark imports this module.
LEFT_FOR_THE_END = []


def _remove_leftovers():
    for path in LEFT_FOR_THE_END:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.unlink(path)


atexit.register(_remove_leftovers)


def pytest_sessionfinish(session, exitstatus):
    _remove_leftovers()


def _generate_stubs():
    """Python gRPC stubs for the test and health protos, made with grpcio-tools (not committed)."""
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="talkmesh-stubs-")
    src = os.path.join(out, "protos")
    # The health proto is copied under another folder name: a Python package called `grpc`
    # would shadow grpcio itself. The proto package (what the wire sees) is unchanged.
    os.makedirs(os.path.join(src, "tmhealth"))
    os.makedirs(os.path.join(src, "tmecho"))
    os.makedirs(os.path.join(src, "tmaudio"))
    os.makedirs(os.path.join(src, "tmmedia"))
    os.makedirs(os.path.join(src, "tmdispatcher"))
    shutil.copy(os.path.join(ROOT, "proto/talkmesh/v1/dispatcher.proto"), os.path.join(src, "tmdispatcher/dispatcher.proto"))
    shutil.copy(os.path.join(ROOT, "proto/talkmesh/v1/media.proto"), os.path.join(src, "tmmedia/media.proto"))
    shutil.copy(os.path.join(ROOT, "proto/talkmesh/v1/audio.proto"), os.path.join(src, "tmaudio/audio.proto"))
    shutil.copy(os.path.join(ROOT, "proto/grpc/health/v1/health.proto"), os.path.join(src, "tmhealth/health.proto"))
    shutil.copy(os.path.join(ROOT, "proto/talkmesh/testing/v1/echo.proto"), os.path.join(src, "tmecho/echo.proto"))
    for name in ("tmhealth/health.proto", "tmecho/echo.proto", "tmaudio/audio.proto", "tmmedia/media.proto",
                 "tmdispatcher/dispatcher.proto"):
        rc = protoc.main(["protoc", f"-I{src}", f"--python_out={out}", f"--grpc_python_out={out}", os.path.join(src, name)])
        assert rc == 0, f"grpc_tools.protoc failed on {name}"
    for pkg in ("tmhealth", "tmecho", "tmaudio", "tmmedia", "tmdispatcher"):
        open(os.path.join(out, pkg, "__init__.py"), "w").close()
    sys.path.insert(0, out)
    LEFT_FOR_THE_END.append(out)


_generate_stubs()


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Service:
    """A running executable: its port, its log, and a clean SIGTERM stop."""

    def __init__(self, exe, env=None, args=(), host="127.0.0.1", port=None, nofile=None):
        """`port`: where the service is expected to listen when a flag, not PORT, sets it;
        `nofile`: a descriptor limit (RLIMIT_NOFILE) for the process. Without either of `port` or
        a PORT in `env`, the service binds PORT=0 and the port it got is read from its log (no
        race for a port picked free beforehand)."""
        self.exe = exe
        self.host = host
        self.port = port or (int(env["PORT"]) if env and "PORT" in env else None)
        if self.port is None and (env or {}).get("LOG_LEVEL") in ("warning", "error", "critical"):
            self.port = free_port(host)  # a quiet service does not log the port it bound: pick one
        self.log = tempfile.NamedTemporaryFile(prefix=f"{exe}-", suffix=".log", delete=False)
        LEFT_FOR_THE_END.append(self.log.name)
        full_env = dict(os.environ)
        scratch = tempfile.mkdtemp(prefix="talkmesh-service-")
        LEFT_FOR_THE_END.append(scratch)
        self.scratch = scratch
        # The Dispatcher needs a job store and a RunPod endpoint; by default a fresh store and
        # a port nothing listens on (tests that run jobs point it at the emulator).
        full_env.update({"HOST": host, "PORT": str(self.port or 0), "LOG_LEVEL": "debug",
                         "BLOB_STORE": "file://" + os.path.join(scratch, "blobs"),
                         "JOB_STORE": "sqlite://" + os.path.join(scratch, "jobs.db"),
                         "RUNPOD_ENDPOINT_ID": "test", "RUNPOD_BASE_URL": "http://127.0.0.1:9/v2"})
        full_env.update(env or {})
        def limit():
            if nofile:
                import resource
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        self.proc = subprocess.Popen([os.path.join(BIN, exe), *args], env=full_env, stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=limit if nofile else None)  # none: vfork, so no grpcio fork handler runs
        self.wait_ready()

    @property
    def address(self):
        return f"{self.host}:{self.port}"

    def bound_port(self):
        """The port in the service's "serving" log line (it bound PORT=0), or None before it."""
        for line in self.read_log().splitlines():
            if '"serving gRPC, HTTP/2 and HTTP/1.1"' in line:
                return int(json.loads(line)["port"])
        return None

    def wait_ready(self, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.exe} exited with {self.proc.returncode}: {self.read_log()}")
            if self.port is None:
                self.port = self.bound_port()
                if self.port is None:
                    time.sleep(0.02)
                    continue
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"{self.exe} did not start listening: {self.read_log()}")

    def read_log(self):
        with open(self.log.name) as fh:
            return fh.read()

    def stop(self, timeout=40):
        try:
            return self._stop(timeout)
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def _stop(self, timeout):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"{self.exe} did not exit after SIGTERM")
        return self.proc.returncode

    def metrics(self, prefix):
        """The samples of /metrics whose name starts with `prefix` (labels included in the name)."""
        status, text = self.http_get("/metrics")
        assert status == 200
        return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith(prefix)}

    def http_get(self, path, timeout=5):
        with urllib.request.urlopen(f"http://{self.address}{path}", timeout=timeout) as response:
            return response.status, response.read().decode()


@pytest.fixture(scope="module")
def testserver():
    service = Service("talkmesh-testserver", env={"MAX_RECEIVE_MESSAGE_BYTES": str(4 << 20), "HANDSHAKE_TIMEOUT": "1s"})
    yield service
    assert service.stop() == 0, service.read_log()


@pytest.fixture
def start_service():
    started = []

    def start(exe="talkmesh-testserver", **kwargs):
        service = Service(exe, **kwargs)
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL server for the session; tests take a fresh database each."""
    from pgserver import PostgresServer

    server = PostgresServer()
    yield server
    server.stop()
