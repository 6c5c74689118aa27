"""A real S3 API on loopback for the tests: moto's server, behind a front that does what moto
does not — checks every request's SigV4 signature (headers or presigned query) with botocore, the
AWS SDK's own signer, refuses expired presigned URLs, checks signed payload hashes, and injects
faults on demand (throttling, 500s, dropped connections) so retries can be tested.

    with S3Front() as s3:
        env = s3.env("bucket", "prefix")      # BLOB_STORE, S3_ENDPOINT, credentials
        s3.fail(2, status=503, code="SlowDown", method="PUT")
"""
import hashlib
import http.client
import http.server
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse

import boto3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from conftest import free_port

ACCESS_KEY = "AKIDTALKMESHTEST"
SECRET_KEY = "talkmesh/secret+key"
REGION = "eu-west-1"


def wait_for_port(port, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


def _error(code, message, status):
    body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>{message}</Message></Error>").encode()
    return status, body


class _Front(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class S3Front:
    def __init__(self):
        self.moto_port = free_port()
        self.port = free_port()
        self.lock = threading.Lock()
        self.faults = []          # [method or None, path fragment or None, status, code, remaining]
        self.requests = []        # (method, path, status)
        self.rejections = []      # why a request was refused
        self.max_body = 0
        # The services' S3_SCRATCH_DIR unless a test names its own: removed with the front, where
        # the default ($TMPDIR/talkmesh-scratch) would outlive every run.
        self.scratch = tempfile.mkdtemp(prefix="talkmesh-s3-scratch-")

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self):
        self.moto = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(self.moto_port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.moto_port, timeout=30)
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_one(self):
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                status, headers, answer = front._serve(self.command, self.path, self.headers, body)
                if status is None:  # a dropped connection
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                if not any(n.lower() == "content-length" for n, _ in headers):
                    self.send_header("content-length", str(len(answer)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(answer)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_one

        self.server = _Front(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.moto.terminate()
        try:
            self.moto.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.moto.kill()
        shutil.rmtree(self.scratch, ignore_errors=True)

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        """boto3 straight to moto (unchecked): to create buckets and look at objects."""
        return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.moto_port}", region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def bucket(self, name):
        self.client().create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": REGION})
        return name

    def env(self, bucket, prefix="", **extra):
        url = f"s3://{bucket}" + (f"/{prefix}" if prefix else "")
        return {"BLOB_STORE": url, "S3_ENDPOINT": self.endpoint, "S3_REGION": REGION, "S3_SCRATCH_DIR": self.scratch,
                "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, **extra}

    def keys(self, bucket, prefix=""):
        out = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                out[item["Key"]] = item["Size"]
        return out

    def fail(self, count, status=503, code="SlowDown", method=None, path=None):
        """The next `count` requests (matching method and a path fragment) get this error;
        status None drops the connection instead."""
        with self.lock:
            self.faults.append([method, path, status, code, count])

    def seen(self, method=None, path=None):
        with self.lock:
            return [r for r in self.requests if (method is None or r[0] == method) and (path is None or path in r[1])]

    # -- one request -----------------------------------------------------------------------

    def _serve(self, method, target, headers, body):
        with self.lock:
            self.max_body = max(self.max_body, len(body))
            for fault in self.faults:
                if fault[4] > 0 and (fault[0] in (None, method)) and (fault[1] is None or fault[1] in target):
                    fault[4] -= 1
                    self.requests.append((method, target, fault[2] or 0))
                    if fault[2] is None:
                        return None, [], b""
                    status, answer = _error(fault[3], "injected by the test", fault[2])
                    return status, [("content-type", "application/xml")], answer
        refusal = self._check(method, target, headers, body)
        if refusal:
            with self.lock:
                self.rejections.append(refusal[1].decode())
                self.requests.append((method, target, refusal[0]))
            return refusal[0], [("content-type", "application/xml")], refusal[1]
        forwarded = {k: v for k, v in headers.items() if k.lower() not in ("connection", "keep-alive")}
        connection = http.client.HTTPConnection("127.0.0.1", self.moto_port, timeout=120)
        connection.request(method, target, body=body or None, headers=forwarded)
        response = connection.getresponse()
        answer = response.read()
        connection.close()
        keep = [(k, v) for k, v in response.getheaders() if k.lower() not in ("connection", "transfer-encoding", "content-length", "server", "date")]
        if method == "HEAD":
            keep.append(("content-length", response.getheader("content-length", "0")))
        with self.lock:
            self.requests.append((method, target, response.status))
        return response.status, keep, answer

    def _check(self, method, target, headers, body):
        """Recomputes the signature with botocore; a refusal as (status, body) or None."""
        host = headers.get("host", "")
        url = f"http://{host}{target}"
        split = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(split.query, keep_blank_values=True)
        credentials = Credentials(ACCESS_KEY, SECRET_KEY)
        if "X-Amz-Signature" in query:
            signed_at = time.mktime(time.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ")) - time.timezone
            if time.time() > signed_at + int(query["X-Amz-Expires"][0]):
                return _error("AccessDenied", "Request has expired", 403)
            if not query["X-Amz-Credential"][0].startswith(ACCESS_KEY + "/"):
                return _error("InvalidAccessKeyId", "unknown key", 403)
            # The canonical request of a presigned URL: every query parameter but the signature.
            pairs = [(k, v) for k, v in urllib.parse.parse_qsl(split.query, keep_blank_values=True) if k != "X-Amz-Signature"]
            canonical_query = "&".join(f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
                                       for k, v in sorted(pairs))
            canonical = "\n".join([method, split.path, canonical_query, f"host:{host}\n", "host", "UNSIGNED-PAYLOAD"])
            request = AWSRequest(method=method, url=url, headers={"host": host})
            request.context["timestamp"] = query["X-Amz-Date"][0]
            auth = S3SigV4Auth(credentials, "s3", REGION)
            expected = auth.signature(auth.string_to_sign(request, canonical), request)
            if expected != query["X-Amz-Signature"][0]:
                return _error("SignatureDoesNotMatch", "presigned signature mismatch", 403)
            return None
        authorization = headers.get("authorization", "")
        if not authorization.startswith("AWS4-HMAC-SHA256 "):
            return _error("AccessDenied", "no SigV4 authorization", 403)
        fields = dict(part.strip().split("=", 1) for part in authorization[len("AWS4-HMAC-SHA256 "):].split(","))
        if not fields["Credential"].startswith(ACCESS_KEY + "/") or f"/{REGION}/s3/" not in fields["Credential"]:
            return _error("InvalidAccessKeyId", "unknown key or region", 403)
        signed = fields["SignedHeaders"].split(";")
        request = AWSRequest(method=method, url=url, headers={name: headers.get(name, "") for name in signed})
        request.context["timestamp"] = headers.get("x-amz-date", "")
        auth = S3SigV4Auth(credentials, "s3", REGION)
        # botocore's own canonical request (its query and header rules), with the payload hash sent.
        canonical = auth.canonical_request(request)
        expected = auth.signature(auth.string_to_sign(request, canonical), request)
        if expected != fields["Signature"]:
            return _error("SignatureDoesNotMatch", f"header signature mismatch; botocore's canonical request: {canonical!r}", 403)
        claimed = headers.get("x-amz-content-sha256", "")
        if claimed != "UNSIGNED-PAYLOAD" and claimed != hashlib.sha256(body).hexdigest():
            return _error("XAmzContentSHA256Mismatch", "the payload hash does not match the body", 400)
        return None
