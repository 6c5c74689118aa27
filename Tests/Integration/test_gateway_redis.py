"""Rate limits across Gateway replicas: two Gateways share one real redis-server, so the sum of
what they accept stays within a key's budget; with Redis stopped each falls back to its own
buckets (a warning and a metric, never no limits and never an outage), and picks Redis up again."""
import os
import shutil
import subprocess
import tempfile
import time

import pytest

from conftest import free_port
from test_dispatcher import Mesh
from test_gateway import Gateway, new_key


class Redis:
    def __init__(self, directory, port=None, password=None):
        self.directory = directory
        self.port = port or free_port()
        self.auth = ["-a", password, "--no-auth-warning"] if password else []
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", directory, *(["--requirepass", password] if password else [])],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline:
            if subprocess.run(["redis-cli", "-p", str(self.port), *self.auth, "ping"], capture_output=True, text=True).stdout.strip() == "PONG":
                return
            time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def cli(self, *args):
        return subprocess.run(["redis-cli", "-p", str(self.port), *self.auth, *args], capture_output=True, text=True, check=True).stdout.strip()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def shared():
    directory = tempfile.mkdtemp(prefix="talkmesh-redis-")
    redis = Redis(directory)
    keys_file = os.path.join(directory, "keys.json")
    mesh = Mesh()
    # A generous time box: a loaded CI machine must not turn a slow answer into a fallback.
    gateways = [Gateway(mesh, keys_file, REDIS_URL=redis.url, REDIS_TIMEOUT_MS="1000") for _ in range(2)]
    world = {"redis": redis, "gateways": gateways, "keys_file": keys_file, "dir": directory}
    yield world
    for gateway in gateways:
        gateway.stop()
    mesh.stop()
    world["redis"].stop()  # the one running now: a test restarts it
    shutil.rmtree(directory, ignore_errors=True)


def metric(gateway, name):
    _, _, body = gateway.curl("GET", "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def hammer(gateways, key, count):
    """`count` requests alternating between the Gateways; returns (accepted, refused, seconds)."""
    accepted = refused = 0
    started = time.time()
    for index in range(count):
        status, headers, _ = gateways[index % len(gateways)].curl("GET", "/v1/jobs/job_0000000000000000", key=key)
        if status == 429:
            refused += 1
            assert int(headers["retry-after"]) >= 1 and headers["ratelimit-remaining"] == "0"
        else:
            assert status == 404, status
            accepted += 1
    return accepted, refused, time.time() - started


def test_two_gateways_sharing_redis_stay_within_one_budget(shared):
    gateways, redis = shared["gateways"], shared["redis"]
    key = new_key(shared["keys_file"], "--rate", "0.5", "--burst", "8")
    time.sleep(1.5)  # the key file is reloaded each second
    accepted, refused, seconds = hammer(gateways, key, 40)
    # One bucket for both: the burst plus what refills while the loop runs (per replica, 16 would pass).
    assert 8 <= accepted <= 8 + int(seconds * 0.5) + 1, (accepted, seconds)
    assert refused == 40 - accepted
    # The bucket lives in Redis under the key's id, with an expiry.
    keys = redis.cli("--scan", "--pattern", "talkmesh:ratelimit:*").split()
    assert any(name.startswith("talkmesh:ratelimit:req:") for name in keys), keys
    assert int(redis.cli("pttl", next(n for n in keys if n.startswith("talkmesh:ratelimit:req:")))) > 0
    for gateway in gateways:
        assert metric(gateway, "talkmesh_gateway_ratelimit_redis_up") == 1


def test_flushed_scripts_are_loaded_again(shared):
    gateways, redis = shared["gateways"], shared["redis"]
    key = new_key(shared["keys_file"], "--rate", "0.5", "--burst", "4")
    time.sleep(1.5)
    fallbacks = [metric(gateway, "talkmesh_gateway_ratelimit_fallback_total") for gateway in gateways]  # a stopped Redis's, if earlier
    redis.cli("script", "flush")
    accepted, _, seconds = hammer(gateways, key, 12)
    assert 4 <= accepted <= 4 + int(seconds * 0.5) + 1, (accepted, seconds)
    # No request fell back to per-replica limits: the flushed script was simply loaded again.
    assert [metric(gateway, "talkmesh_gateway_ratelimit_fallback_total") for gateway in gateways] == fallbacks


def test_a_redis_outage_falls_back_to_per_replica_limits_and_recovers(shared):
    gateways, redis = shared["gateways"], shared["redis"]
    key = new_key(shared["keys_file"], "--rate", "0.2", "--burst", "5")
    time.sleep(1.5)
    redis.stop()
    try:
        accepted, refused, seconds = hammer(gateways, key, 30)
        # Each replica limits on its own: neither unlimited nor shut.
        assert 5 <= accepted <= 2 * (5 + int(seconds * 0.2) + 1), (accepted, seconds)
        assert refused > 0
        for gateway in gateways:
            assert metric(gateway, "talkmesh_gateway_ratelimit_fallback_total") > 0
            assert metric(gateway, "talkmesh_gateway_ratelimit_redis_up") == 0
            assert "Redis" in gateway.service.read_log()
        # Health and readiness do not depend on Redis.
        assert gateways[0].curl("GET", "/readyz")[0] == 200
    finally:
        shared["redis"] = Redis(shared["dir"], port=redis.port)
    # Back: the connection is retried with backoff (at most 5 s apart) and the limits are shared again.
    deadline = time.time() + 20
    while time.time() < deadline:
        gateways[0].curl("GET", "/v1/jobs/job_0000000000000000", key=key)
        gateways[1].curl("GET", "/v1/jobs/job_0000000000000000", key=key)
        if all(metric(gateway, "talkmesh_gateway_ratelimit_redis_up") == 1 for gateway in gateways):
            break
        time.sleep(0.5)
    assert all(metric(gateway, "talkmesh_gateway_ratelimit_redis_up") == 1 for gateway in gateways)


def test_a_bad_redis_url_is_a_clear_start_up_error(shared):
    from conftest import BIN
    result = subprocess.run([os.path.join(BIN, "talkmesh-gateway")], capture_output=True, text=True, timeout=30,
                            env={**os.environ, "REDIS_URL": "http://nope", "API_KEYS_FILE": shared["keys_file"], "PORT": "0"})
    assert result.returncode == 2 and "REDIS_URL" in result.stderr, (result.returncode, result.stderr)


def test_a_password_and_a_database_from_the_url(shared):
    """AUTH with a password that needs percent-encoding in the URL (decoded once), then SELECT."""
    directory = tempfile.mkdtemp(prefix="talkmesh-redis-auth-")
    redis = Redis(directory, password="p%ss word")
    gateway = Gateway(shared["gateways"][0].mesh, shared["keys_file"], REDIS_URL=f"redis://:p%25ss%20word@127.0.0.1:{redis.port}/3",
                      REDIS_TIMEOUT_MS="1000")
    try:
        key = new_key(shared["keys_file"], "--rate", "0.5", "--burst", "3")
        time.sleep(1.5)
        accepted, _, _ = hammer([gateway], key, 6)
        assert 3 <= accepted <= 4
        assert metric(gateway, "talkmesh_gateway_ratelimit_redis_up") == 1
        assert metric(gateway, "talkmesh_gateway_ratelimit_fallback_total") == 0
        assert redis.cli("-n", "3", "--scan", "--pattern", "talkmesh:ratelimit:*"), "nothing stored in database 3"
    finally:
        gateway.stop()
        redis.stop()
        shutil.rmtree(directory, ignore_errors=True)
