"""The Gateway over TLS: every route with curl over h2 (ALPN) and HTTP/1.1, and the forwarded
DispatcherService from a grpcio secure channel — the same keys, jobs and answers as in clear."""
import os
import subprocess

import grpc
import pytest

from test_gateway import Gateway, multipart, video_url_ok, world  # noqa: F401  (world is a fixture)
from test_dispatcher import inputs  # noqa: F401
from test_tls import certs  # noqa: F401
from tmdispatcher import dispatcher_pb2 as pb, dispatcher_pb2_grpc


@pytest.fixture(scope="module")
def secure(world, certs):  # noqa: F811
    gateway = Gateway(world["mesh"], world["keys_file"], TLS_CERT_FILE=f"{certs}/server.pem", TLS_KEY_FILE=f"{certs}/server.key")
    yield gateway
    gateway.stop()


@pytest.mark.parametrize("alpn", [["--http2"], ["--http1.1"]], ids=["h2", "http1.1"])
def test_every_route_over_tls(world, secure, certs, alpn):  # noqa: F811
    key, files = world["key"], world["files"]
    protocol = alpn + ["--cacert", f"{certs}/ca.pem"]
    version = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_version}", *protocol, f"{secure.url}/healthz"],
                             capture_output=True, text=True).stdout
    assert version == ("2" if alpn == ["--http2"] else "1.1")
    status, _, created = secure.json("POST", "/v1/jobs", key=key, protocol=protocol, form=multipart(files))
    assert status == 202, created
    job_id = created["id"]
    events = subprocess.run(["curl", "-sN", "--max-time", "60", *protocol, "-H", f"X-API-Key: {key}", f"{secure.url}/v1/jobs/{job_id}/events"],
                            capture_output=True, text=True).stdout
    assert '"status":"completed"' in events, events[-500:]
    status, _, job = secure.json("GET", f"/v1/jobs/{job_id}", key=key, protocol=protocol)
    assert status == 200 and job["status"] == "completed"
    status, _, page = secure.json("GET", "/v1/jobs?page_size=5", key=key, protocol=protocol)
    assert status == 200 and job_id in [j["id"] for j in page["jobs"]]
    status, headers, part = secure.curl("GET", f"/v1/jobs/{job_id}/video", key=key, protocol=protocol, headers=["Range: bytes=0-7"])
    assert status == 206 and part[4:8] == b"ftyp"
    status, _, error = secure.json("DELETE", f"/v1/jobs/{job_id}", key=key, protocol=protocol)
    assert status == 409 and error["error"]["code"] == "JOB_TERMINAL"
    # The seeds' routes: the video URL names the https origin the client called.
    status, _, seed = secure.json("GET", f"/jobs/{job_id}", key=key, protocol=protocol)
    assert status == 200 and seed["status"] == "COMPLETED" and seed["video_base64"]
    status, _, result = secure.json("GET", f"/result/{job_id}", key=key, protocol=protocol)
    assert status == 200 and video_url_ok(secure, result["data"]["url"], job_id, origin=secure.url), result
    status, _, document = secure.json("GET", "/openapi.json", protocol=protocol)
    assert status == 200 and document["openapi"] == "3.1.0"
    for path in ["/healthz", "/readyz", "/metrics", "/health"]:
        assert secure.curl("GET", path, protocol=protocol)[0] == 200, path
    assert secure.curl("GET", "/v1/jobs", protocol=protocol)[0] == 401


def test_grpc_over_tls_with_a_key(world, secure, certs):  # noqa: F811
    credentials = grpc.ssl_channel_credentials(root_certificates=open(f"{certs}/ca.pem", "rb").read())
    channel = grpc.secure_channel(secure.service.address, credentials)
    stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
    with pytest.raises(grpc.RpcError) as failure:
        stub.ListJobs(pb.ListJobsRequest(), timeout=10)
    assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
    page = stub.ListJobs(pb.ListJobsRequest(page_size=3), metadata=[("authorization", f"Bearer {world['key']}")], timeout=10)
    assert all(job.owner == page.jobs[0].owner for job in page.jobs)
    channel.close()
