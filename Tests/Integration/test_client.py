"""Our RPC client (driven through talkmesh-testclient and the talkmesh CLI) against a Python
grpcio server and against our own server: interop, TLS and mTLS, health, trace context."""
import json
import os
import subprocess

import pytest

import grpcio_servers
from conftest import BIN, free_port
from test_tls import certs  # noqa: F401 - the certificate fixture


def run_testclient(*args, timeout=60):
    result = subprocess.run([os.path.join(BIN, "talkmesh-testclient"), *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def health(*args, timeout=20):
    return subprocess.run([os.path.join(BIN, "talkmesh"), "health", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def grpcio_server():
    port = free_port()
    server = grpcio_servers.start(port)
    yield f"127.0.0.1:{port}"
    server.stop(0)


def check_interop(result, server_trailing):
    unary = result["unary"]
    assert unary["payload_ok"] is True and unary["text"] == "héllo"
    assert "x-request-id=abc-123" in unary["metadata"]
    assert "trace-bin=AAH+/w==" in unary["metadata"]
    if server_trailing:
        assert "x-initial=from-grpcio" in unary["initial"]
        assert "x-trailing=bye" in unary["trailing"] and "x-echo-bin=AP8=" in unary["trailing"]
    assert result["streaming"]["sequences"] == list(range(25))
    assert result["error"]["name"] == "FAILED_PRECONDITION"
    assert result["error"]["message"] == "bad % input — ünïcode"
    assert result["deadline"]["name"] == "DEADLINE_EXCEEDED"
    assert 250 <= result["deadline"]["elapsed_ms"] < 3000
    trace = result["trace"]
    # The server saw our trace id; the span id is a new one (ours, or its own child span).
    assert trace["server_traceparent"].split("-")[1] == trace["sent_trace_id"]
    assert trace["server_traceparent"].split("-")[2] != trace["sent_span_id"]


def test_our_client_against_grpcio_server(grpcio_server):
    check_interop(run_testclient("interop", "--target", grpcio_server), server_trailing=True)


def test_our_client_against_our_server(testserver):
    check_interop(run_testclient("interop", "--target", testserver.address), server_trailing=False)
    # The handler's log line carries the caller's trace id.
    result = run_testclient("interop", "--target", testserver.address)
    assert f'"trace_id":"{result["trace"]["sent_trace_id"]}"' in testserver.read_log()


def test_our_client_with_tls_and_mtls(start_service, certs):  # noqa: F811
    server_tls = {"TLS_CERT_FILE": f"{certs}/server.pem", "TLS_KEY_FILE": f"{certs}/server.key"}
    service = start_service(env=server_tls)
    check_interop(run_testclient("interop", "--target", service.address, "--ca-file", f"{certs}/ca.pem"), server_trailing=False)
    mtls = start_service(env={**server_tls, "TLS_CLIENT_CA_FILE": f"{certs}/ca.pem"})
    check_interop(run_testclient("interop", "--target", mtls.address, "--ca-file", f"{certs}/ca.pem",
                             "--cert-file", f"{certs}/client.pem", "--key-file", f"{certs}/client.key"), server_trailing=False)
    refused = run_testclient("balance", "--target", mtls.address, "--ca-file", f"{certs}/ca.pem", "--calls", "4", "--concurrency", "1")
    assert refused["failures"] == 4 and refused["errors"][0]["name"] == "UNAVAILABLE"


def test_our_client_against_grpcio_with_tls(certs):  # noqa: F811
    import grpc
    port = free_port()
    with open(f"{certs}/server.key", "rb") as k, open(f"{certs}/server.pem", "rb") as c:
        credentials = grpc.ssl_server_credentials([(k.read(), c.read())])
    server = grpcio_servers.start(port, credentials)
    try:
        check_interop(run_testclient("interop", "--target", f"127.0.0.1:{port}", "--ca-file", f"{certs}/ca.pem"), server_trailing=True)
    finally:
        server.stop(0)


def test_health_cli_against_our_services(start_service):
    service = start_service("talkmesh-media")
    result = health(service.address)
    assert result.returncode == 0 and result.stdout.strip() == "SERVING"
    result = health(service.address, "--service", "no.such.Service")
    assert result.returncode == 4 and "NOT_FOUND" in result.stderr
    result = health(f"ipv4:{service.address}", "--timeout", "2s")
    assert result.returncode == 0
    result = health(f"dns:///localhost:{service.port}")
    assert result.returncode == 0 and result.stdout.strip() == "SERVING"
    assert service.stop() == 0
    result = health(service.address)
    assert result.returncode == 2 and "UNAVAILABLE" in result.stderr


def test_health_cli_against_grpcio(grpcio_server):
    result = health(grpcio_server)
    assert result.returncode == 0 and result.stdout.strip() == "SERVING"
    result = health(grpcio_server, "--service", "draining.Service")
    assert result.returncode == 4 and result.stdout.strip() == "NOT_SERVING"
    # A call that reaches the server and fails there is exit code 3, with the status in --json.
    result = health(grpcio_server, "--service", "broken.Service", "--json")
    assert result.returncode == 3, result.stderr
    assert json.loads(result.stdout) == {"error": {"code": "INTERNAL", "message": "the health check itself failed"}}


def test_health_cli_bad_arguments():
    assert health("127.0.0.1:99999").returncode == 1
    assert health("ipv4:not-an-ip:50051").returncode == 1
    assert health("dns://127.0.0.1").returncode == 1
    assert health("127.0.0.1:1", "--timeout", "soon").returncode == 1


def test_health_port_serves_probes_when_the_main_port_requires_mtls(start_service, certs):  # noqa: F811
    health_port = free_port()
    service = start_service(env={"TLS_CERT_FILE": f"{certs}/server.pem", "TLS_KEY_FILE": f"{certs}/server.key",
                                 "TLS_CLIENT_CA_FILE": f"{certs}/ca.pem", "HEALTH_PORT": str(health_port)})
    result = health(f"127.0.0.1:{health_port}")
    assert result.returncode == 0 and result.stdout.strip() == "SERVING"
    out = subprocess.run(["curl", "-sS", f"http://127.0.0.1:{health_port}/healthz"], capture_output=True, text=True, timeout=10)
    assert out.stdout == "ok\n"
    # Only health is served there.
    refused = run_testclient("balance", "--target", f"127.0.0.1:{health_port}", "--calls", "2", "--concurrency", "1")
    assert refused["failures"] == 2 and refused["errors"][0]["name"] == "UNIMPLEMENTED"
    # The main port still refuses a client without a certificate.
    result = health(service.address, "--ca-file", f"{certs}/ca.pem")
    assert result.returncode == 2
    result = health(service.address, "--ca-file", f"{certs}/ca.pem", "--cert-file", f"{certs}/client.pem", "--key-file", f"{certs}/client.key")
    assert result.returncode == 0
    assert service.stop() == 0
