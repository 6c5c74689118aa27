"""TLS on the same port: ALPN h2 for gRPC (grpcio secure channel), http/1.1 for curl; mutual TLS
refuses a client without a certificate. Certificates are made by the test with openssl."""
import os
import shutil
import subprocess
import tempfile

import grpc
import pytest

from tmecho import echo_pb2, echo_pb2_grpc
from tmhealth import health_pb2, health_pb2_grpc


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs():
    d = tempfile.mkdtemp(prefix="talkmesh-tls-")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
            "-subj", "/CN=TalkMesh Test CA", "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        with open(os.path.join(d, f"{name}.ext"), "w") as fh:
            fh.write(ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def read(d, name):
    with open(os.path.join(d, name), "rb") as fh:
        return fh.read()


def test_grpc_over_tls_with_alpn_h2(start_service, certs):
    service = start_service(env={"TLS_CERT_FILE": f"{certs}/server.pem", "TLS_KEY_FILE": f"{certs}/server.key"})
    credentials = grpc.ssl_channel_credentials(root_certificates=read(certs, "ca.pem"))
    with grpc.secure_channel(service.address, credentials) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        assert stub.Echo(echo_pb2.EchoRequest(payload=b"s" * 100000), timeout=5).payload == b"s" * 100000
        assert len(list(stub.Expand(echo_pb2.ExpandRequest(payload=b"t" * 10000, count=30), timeout=10))) == 30
    result = subprocess.run(["curl", "-sS", "-v", "--cacert", f"{certs}/ca.pem", f"https://{service.address}/healthz"],
                            capture_output=True, text=True, timeout=10)
    assert result.stdout == "ok\n"
    assert "ALPN: server accepted h2" in result.stderr
    result = subprocess.run(["curl", "-sS", "-v", "--http1.1", "--cacert", f"{certs}/ca.pem", f"https://{service.address}/healthz"],
                            capture_output=True, text=True, timeout=10)
    assert result.stdout == "ok\n"
    assert "ALPN: server accepted http/1.1" in result.stderr
    # TLS 1.1 is refused.
    result = subprocess.run(["openssl", "s_client", "-connect", service.address, "-tls1_1"], input="",
                            capture_output=True, text=True, timeout=10)
    assert result.returncode != 0
    assert "Cipher    : 0000" in result.stdout or "Cipher is (NONE)" in result.stdout
    assert service.stop() == 0


def test_mutual_tls_requires_a_client_certificate(start_service, certs):
    service = start_service(env={"TLS_CERT_FILE": f"{certs}/server.pem", "TLS_KEY_FILE": f"{certs}/server.key",
                                 "TLS_CLIENT_CA_FILE": f"{certs}/ca.pem"})
    with_cert = grpc.ssl_channel_credentials(read(certs, "ca.pem"), read(certs, "client.key"), read(certs, "client.pem"))
    with grpc.secure_channel(service.address, with_cert) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    without = grpc.ssl_channel_credentials(read(certs, "ca.pem"))
    with grpc.secure_channel(service.address, without) as channel:
        with pytest.raises(grpc.RpcError) as info:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert service.stop() == 0


def test_plaintext_client_on_a_tls_port_does_not_disturb_it(start_service, certs):
    service = start_service(env={"TLS_CERT_FILE": f"{certs}/server.pem", "TLS_KEY_FILE": f"{certs}/server.key"})
    result = subprocess.run(["curl", "-sS", "--max-time", "3", f"http://{service.address}/healthz"], capture_output=True, text=True)
    assert result.returncode != 0
    result = subprocess.run(["curl", "-sS", "--cacert", f"{certs}/ca.pem", f"https://{service.address}/healthz"],
                            capture_output=True, text=True, timeout=10)
    assert result.stdout == "ok\n"
    assert service.stop() == 0


def test_our_client_verifies_the_server_it_calls(start_service, certs):
    # talkmesh-testclient (our RPCClient over TLS): the right CA and name succeed; a CA that did
    # not sign the server, or a certificate for another name, fail the call as UNAVAILABLE and
    # never reach the handler.
    import json
    from conftest import BIN
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
            "-subj", "/CN=Other CA", "-keyout", "other-ca.key", "-out", "other-ca.pem", cwd=certs)
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=elsewhere",
            "-keyout", "elsewhere.key", "-out", "elsewhere.csr", cwd=certs)
    with open(os.path.join(certs, "elsewhere.ext"), "w") as fh:
        fh.write("subjectAltName=DNS:elsewhere.example\n")
    openssl("x509", "-req", "-in", "elsewhere.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "elsewhere.ext", "-out", "elsewhere.pem", cwd=certs)

    def call(service, ca):
        result = subprocess.run([os.path.join(BIN, "talkmesh-testclient"), "call", "--target", service.address,
                                 "--ca-file", f"{certs}/{ca}", "--timeout", "5s"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.strip().splitlines()[-1])

    right = start_service(env={"TLS_CERT_FILE": f"{certs}/server.pem", "TLS_KEY_FILE": f"{certs}/server.key"})
    assert call(right, "ca.pem")["ok"]
    untrusted = call(right, "other-ca.pem")
    assert not untrusted["ok"] and untrusted["error"]["name"] == "UNAVAILABLE", untrusted
    assert "certificate" in untrusted["error"]["message"], untrusted
    misnamed = start_service(env={"TLS_CERT_FILE": f"{certs}/elsewhere.pem", "TLS_KEY_FILE": f"{certs}/elsewhere.key"})
    wrong_name = call(misnamed, "ca.pem")
    assert not wrong_name["ok"] and wrong_name["error"]["name"] == "UNAVAILABLE", wrong_name
    assert "certificate" in wrong_name["error"]["message"], wrong_name
