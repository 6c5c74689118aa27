"""The S3 blob store against a real S3 API on loopback (moto's server behind a front that checks
every signature with botocore and injects faults): each operation, a 200 MB multipart upload in
bounded memory, an aborted upload, retries on throttling, 500s and dropped connections, presigned
URLs (and one past its expiry), and a whole job through the Gateway with every service on S3."""
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time

import pytest

from conftest import BIN
from s3front import S3Front
from test_dispatcher import Mesh, ffprobe, inputs  # noqa: F401  (inputs is a fixture)
from test_gateway import Gateway, multipart, new_key, wait_terminal


@pytest.fixture(scope="module")
def s3():
    with S3Front() as front:
        front.bucket("blobs")
        yield front


@pytest.fixture
def workdir():
    directory = tempfile.mkdtemp(prefix="talkmesh-s3-")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def blobs(s3, *args, env=None, check=True, prefix="t"):
    """`talkmesh blobs …` on the S3 store; returns the finished process with .out and .err."""
    process = subprocess.Popen([os.path.join(BIN, "talkmesh"), "blobs", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **s3.env("blobs", prefix), **(env or {})})
    out, err = process.communicate(timeout=300)
    if check:
        assert process.returncode == 0, err
    process.out, process.err = out, err
    return process


def peak_rss_kb(*command, env):
    """Runs a command under GNU time; returns (exit status, stderr, peak RSS in KiB). (wait4's
    ru_maxrss from this process would count the forked Python's pages before exec.)"""
    result = subprocess.run(["/usr/bin/time", "-f", "peak-rss %M", *command], capture_output=True, text=True, env={**os.environ, **env})
    peak = int(result.stderr.strip().splitlines()[-1].split()[-1])
    return result.returncode, result.stderr, peak


def random_file(path, size):
    with open(path, "wb") as fh:
        left = size
        while left:
            piece = os.urandom(min(left, 1 << 20))
            fh.write(piece)
            left -= len(piece)
    return path


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def test_every_operation_signed_and_checked(s3, workdir):
    refused_before = len(s3.rejections)  # other tests' refusals (a wrong secret, a tampered URL) are theirs
    small = random_file(f"{workdir}/small.bin", 300_000)
    blobs(s3, "put", small, "ops/a.bin")
    blobs(s3, "put", small, "ops/b-c_d.1.bin")
    stat = json.loads(blobs(s3, "stat", "--json", "ops/a.bin").out)
    assert stat["size"] == 300_000 and stat["etag"]
    listed = json.loads(blobs(s3, "ls", "--json", "ops/").out)["blobs"]
    assert [b["key"] for b in listed] == ["ops/a.bin", "ops/b-c_d.1.bin"] and {b["size"] for b in listed} == {300_000}
    # The prefix of the store URL holds every key; other prefixes are not seen.
    assert set(s3.keys("blobs", "t/ops/")) == {"t/ops/a.bin", "t/ops/b-c_d.1.bin"}
    assert json.loads(blobs(s3, "ls", "--json", "ops/", prefix="other").out)["blobs"] == []
    blobs(s3, "get", "ops/a.bin", f"{workdir}/back.bin")
    assert sha256(f"{workdir}/back.bin") == sha256(small)
    blobs(s3, "rm", "ops/a.bin", "ops/never-was.bin")
    missing = blobs(s3, "stat", "ops/a.bin", check=False)
    assert missing.returncode == 1 and "no blob ops/a.bin" in missing.err
    gone = blobs(s3, "get", "ops/a.bin", f"{workdir}/x", check=False)
    assert gone.returncode != 0 and "NOT_FOUND" in gone.err
    # Every request was signed as botocore signs it (the front refuses any other).
    assert s3.rejections[refused_before:] == []


def test_a_wrong_secret_is_refused_with_storage_failed(s3, workdir):
    before = len(s3.rejections)
    result = blobs(s3, "stat", "ops/b-c_d.1.bin", env={"AWS_SECRET_ACCESS_KEY": "wrong"}, check=False)
    assert result.returncode != 0 and "STORAGE_FAILED" in result.err and "403" in result.err
    assert len(s3.rejections) == before + 1 and "mismatch" in s3.rejections[-1]


def test_a_200_mb_blob_goes_in_parts_with_bounded_memory(s3, workdir):
    big = random_file(f"{workdir}/big.bin", 200 << 20)
    env = s3.env("blobs", "t")
    s3.max_body = 0
    parts_before = len(s3.seen("PUT", "partNumber="))
    status, err, rss = peak_rss_kb(os.path.join(BIN, "talkmesh"), "blobs", "put", big, "big/200.bin", env=env)
    assert status == 0, err
    parts = len(s3.seen("PUT", "partNumber=")) - parts_before
    assert parts == 25, parts  # 8 MiB parts
    assert s3.max_body <= 8 << 20
    assert rss < 80 * 1024, f"uploading 200 MB peaked at {rss} KiB"
    assert s3.keys("blobs", "t/big/") == {"t/big/200.bin": 200 << 20}
    status, err, rss = peak_rss_kb(os.path.join(BIN, "talkmesh"), "blobs", "get", "big/200.bin", f"{workdir}/big.back", env=env)
    assert status == 0, err
    assert rss < 80 * 1024, f"downloading 200 MB peaked at {rss} KiB"
    assert sha256(f"{workdir}/big.back") == sha256(big)
    blobs(s3, "rm", "big/200.bin")


def test_a_failed_part_aborts_the_upload_and_leaves_nothing(s3, workdir):
    big = random_file(f"{workdir}/mid.bin", 20 << 20)
    s3.fail(1, status=403, code="AccessDenied", method="PUT", path="partNumber=2")
    result = blobs(s3, "put", big, "aborted/mid.bin", check=False)
    assert result.returncode != 0 and "STORAGE_FAILED" in result.err
    assert any("uploadId=" in path for _, path, _ in s3.seen("DELETE", "aborted/mid.bin"))
    assert s3.client().list_multipart_uploads(Bucket="blobs").get("Uploads", []) == []
    assert s3.keys("blobs", "t/aborted/") == {}


def test_throttling_500s_and_dropped_connections_are_retried(s3, workdir):
    small = random_file(f"{workdir}/r.bin", 50_000)
    s3.fail(2, status=503, code="SlowDown", method="PUT", path="retry/a.bin")
    blobs(s3, "put", small, "retry/a.bin")
    assert [status for _, _, status in s3.seen("PUT", "retry/a.bin")] == [503, 503, 200]
    s3.fail(1, status=500, code="InternalError", method="GET", path="retry/a.bin")
    s3.fail(1, status=None, method="GET", path="retry/a.bin")  # the connection dropped
    blobs(s3, "get", "retry/a.bin", f"{workdir}/r.back")
    assert sha256(f"{workdir}/r.back") == sha256(small)
    s3.fail(1, status=429, code="TooManyRequests", method="HEAD", path="retry/a.bin")
    assert json.loads(blobs(s3, "stat", "--json", "retry/a.bin").out)["size"] == 50_000
    # Retries run out: STORAGE_UNAVAILABLE after exactly S3_MAX_ATTEMPTS tries.
    s3.fail(10, status=503, code="SlowDown", method="PUT", path="retry/b.bin")
    result = blobs(s3, "put", small, "retry/b.bin", env={"S3_MAX_ATTEMPTS": "3"}, check=False)
    assert result.returncode != 0 and "STORAGE_UNAVAILABLE" in result.err
    assert len(s3.seen("PUT", "retry/b.bin")) == 3
    s3.faults.clear()


def test_presigned_urls_work_with_curl_until_they_expire(s3, workdir):
    small = random_file(f"{workdir}/p.bin", 70_000)
    blobs(s3, "put", small, "signed/p.bin")
    url = blobs(s3, "presign", "signed/p.bin", "--expires", "600").out.strip()
    assert url.startswith(s3.endpoint + "/blobs/t/signed/p.bin?") and "X-Amz-Signature=" in url and "X-Amz-Expires=600" in url
    fetched = subprocess.run(["curl", "-s", "-o", f"{workdir}/p.back", "-w", "%{http_code}", url], capture_output=True, text=True)
    assert fetched.stdout == "200" and sha256(f"{workdir}/p.back") == sha256(small)
    # Another key with the same signature is refused.
    tampered = url.replace("signed/p.bin", "signed/q.bin")
    refused = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", tampered], capture_output=True, text=True)
    assert refused.stdout.endswith("403") and "SignatureDoesNotMatch" in refused.stdout
    short = blobs(s3, "presign", "signed/p.bin", "--expires", "1").out.strip()
    time.sleep(2.2)
    expired = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", short], capture_output=True, text=True)
    assert expired.stdout.endswith("403") and "Request has expired" in expired.stdout
    # A file store has no URLs of its own.
    local = subprocess.run([os.path.join(BIN, "talkmesh"), "blobs", "presign", "x.bin", "--blob-store", f"file://{workdir}/files"],
                           capture_output=True, text=True)
    assert local.returncode != 0 and "no URLs" in local.stderr


def test_bad_s3_settings_stop_a_service_at_start(workdir):
    for env, word in [({"BLOB_STORE": "s3://Bad_Bucket"}, "bucket"),
                      ({"BLOB_STORE": "s3://fine-bucket", "S3_ENDPOINT": "ftp://x"}, "S3_ENDPOINT"),
                      ({"BLOB_STORE": "s3://fine-bucket", "S3_ENDPOINT": "http://x", "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b",
                        "S3_PART_SIZE": "1MiB"}, "S3_PART_SIZE"),
                      ({"BLOB_STORE": "s3://fine-bucket", "S3_ENDPOINT": "http://x", "AWS_SHARED_CREDENTIALS_FILE": f"{workdir}/none"}, "credentials")]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        result = subprocess.run([os.path.join(BIN, "talkmesh-media")], env={**clean, **env, "PORT": "0"}, capture_output=True, text=True, timeout=10)
        assert result.returncode == 2 and word in result.stderr, (env, result.stderr)


def test_credentials_from_a_shared_credentials_file(s3, workdir):
    with open(f"{workdir}/credentials", "w") as fh:
        fh.write("[default]\naws_access_key_id = nobody\naws_secret_access_key = nothing\n\n"
                 f"[talkmesh]\naws_access_key_id = {s3.env('blobs')['AWS_ACCESS_KEY_ID']}\n"
                 f"aws_secret_access_key = {s3.env('blobs')['AWS_SECRET_ACCESS_KEY']}\n")
    blobs(s3, "put", random_file(f"{workdir}/profile.bin", 1000), "profile/c.bin")
    env = {k: v for k, v in s3.env("blobs", "t").items() if not k.startswith("AWS_")}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    result = subprocess.run([os.path.join(BIN, "talkmesh"), "blobs", "ls", "profile/"], capture_output=True, text=True,
                            env={**clean, **env, "AWS_SHARED_CREDENTIALS_FILE": f"{workdir}/credentials", "AWS_PROFILE": "talkmesh"})
    assert result.returncode == 0 and "profile/c.bin" in result.stdout, result.stderr


def test_a_whole_job_with_every_service_on_s3(inputs, workdir):  # noqa: F811
    keys_file = f"{workdir}/keys.json"
    key = new_key(keys_file, "--rate", "1000", "--burst", "1000", "--job-rate", "100", "--job-burst", "100")
    mesh = Mesh(store="s3")
    gateway = Gateway(mesh, keys_file, VIDEO_URL_TTL="2h")
    try:
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "sine=frequency=300:duration=6", "-ar", "16000",
                        f"{workdir}/tone.wav"], check=True)
        files = {"face": f"{inputs['dir']}/face.png", "speech": f"{workdir}/tone.wav"}
        status, _, created = gateway.json("POST", "/v1/jobs", key=key, form=multipart(files))
        assert status == 202, created
        job = wait_terminal(gateway, key, created["id"], timeout=120)
        assert job["status"] == "completed", job
        # video.url is presigned for VIDEO_URL_TTL and works without the API key.
        url = job["video"]["url"]
        assert url.startswith(mesh.s3.endpoint + "/mesh/blobs/jobs/") and "X-Amz-Expires=7200" in url, url
        assert "url_expires_at" in job["video"]
        fetched = subprocess.run(["curl", "-s", "-o", f"{workdir}/video.mp4", "-w", "%{http_code}", url], capture_output=True, text=True)
        assert fetched.stdout == "200"
        info = ffprobe(f"{workdir}/video.mp4")
        assert {s["codec_type"] for s in info["streams"]} == {"video", "audio"}
        assert abs(float(info["format"]["duration"]) - 6.0) < 0.1
        # The Gateway streams the same bytes from S3, ranges included.
        status, headers, body = gateway.curl("GET", f"/v1/jobs/{job['id']}/video", key=key)
        assert status == 200 and body == open(f"{workdir}/video.mp4", "rb").read()
        status, headers, part = gateway.curl("GET", f"/v1/jobs/{job['id']}/video", key=key, headers=["Range: bytes=100-1999999"])
        assert status == 206 and part == body[100:2_000_000] and headers["content-range"] == f"bytes 100-{min(len(body), 2_000_000) - 1}/{len(body)}"
        status, _, _ = gateway.curl("GET", f"/v1/jobs/{job['id']}/video", key=key, headers=[f"If-None-Match: {headers['etag']}"])
        assert status == 304
        # Inline base64 reads from S3 too.
        status, _, inline = gateway.json("GET", f"/v1/jobs/{job['id']}?include=video_base64", key=key)
        assert status == 200 and len(inline["video_base64"]) > 1000
        # What is left in the bucket: the uploads and the final video; intermediates deleted.
        deadline = time.time() + 20
        while len(mesh.blob_keys("jobs/")) != 1 and time.time() < deadline:
            time.sleep(0.2)
        left = mesh.blob_keys("jobs/")
        assert len(left) == 1 and left[0].endswith(".mp4"), left
        assert len(mesh.blob_keys("uploads/")) == 2
        # No local scratch file outlives its call.
        scratch = os.path.join(mesh.dir, "scratch")
        assert not os.path.isdir(scratch) or os.listdir(scratch) == []
        # Every request of every service was signed as botocore signs it.
        assert mesh.s3.rejections == []
    finally:
        gateway.stop()
        mesh.stop()
