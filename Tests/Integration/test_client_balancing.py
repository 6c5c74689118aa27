"""Client-side load balancing across the addresses of a name: servers on 127.0.0.2–.5 (one
port, different addresses, like the pods of a headless Service)."""
import json
import os
import signal
import subprocess
import threading
import time

import pytest

from conftest import BIN, Service, free_port
from fake_dns import FakeDNS


def start_backend(host, port, server_id, **env):
    return Service("talkmesh-testserver", host=host, port=port, args=["--port", str(port)],
                   env={"HOST": host, "SERVER_ID": server_id, **env})


def balance(target, *extra, timeout=120):
    result = subprocess.run([os.path.join(BIN, "talkmesh-testclient"), "balance", "--target", target, *extra],
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def three_servers():
    """Test servers s2, s3, s4 on 127.0.0.2–.4, one port; yields the static target naming all three."""
    port = free_port()
    backends = [start_backend(f"127.0.0.{n}", port, f"s{n}") for n in (2, 3, 4)]
    yield f"ipv4:127.0.0.2:{port},127.0.0.3:{port},127.0.0.4:{port}"
    for backend in backends:
        backend.stop()


def test_calls_spread_evenly_across_three_servers(three_servers):
    result = balance(three_servers, "--calls", "3000", "--concurrency", "12")
    assert result["failures"] == 0, result["errors"]
    counts = result["by_server"]
    assert set(counts) == {"s2", "s3", "s4"}
    for name, count in counts.items():
        assert 850 <= count <= 1150, counts  # within ±15 % of 1000


def test_calls_made_one_after_another_take_the_addresses_in_turn(three_servers):
    """Round robin, not merely an even spread: once every connection is ready, call n + 1 goes to
    the next address after call n's, the same rotation every time."""
    result = balance(three_servers, "--calls", "300", "--concurrency", "1")
    assert result["failures"] == 0, result["errors"]
    order = result["order"]
    assert len(order) == 300
    # The first calls may find only some connections ready; from the point all three have
    # answered, plus a full turn, the order is one fixed rotation of the three.
    start = max(order.index(name) for name in ("s2", "s3", "s4")) + 3
    settled = order[start:]
    assert len(settled) > 200
    assert len(set(settled[:3])) == 3, order[:start + 6]
    for index in range(len(settled) - 3):
        assert settled[index] == settled[index + 3] and settled[index] != settled[index + 1], (index, settled[index:index + 6])


def test_killing_a_server_mid_run_fails_no_idempotent_call():
    port = free_port()
    backends = {n: start_backend(f"127.0.0.{n}", port, f"s{n}") for n in (2, 3, 4)}
    outcome = {}

    def run():
        outcome["result"] = balance(f"ipv4:127.0.0.2:{port},127.0.0.3:{port},127.0.0.4:{port}", "--calls", "3000",
                                    "--concurrency", "6", "--interval-ms", "5", "--idempotent")

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(1.0)
    backends[3].proc.send_signal(signal.SIGKILL)
    backends[3].proc.wait()
    worker.join(120)
    result = outcome["result"]
    try:
        assert result["failures"] == 0, result["errors"]
        counts = result["by_server"]
        assert counts["s2"] > counts.get("s3", 0) and counts["s4"] > counts.get("s3", 0), counts
        assert sum(counts.values()) == 3000
    finally:
        for n in (2, 4):
            backends[n].stop()


def test_a_new_address_from_re_resolution_receives_calls():
    port = free_port()
    dns = FakeDNS("echo.talkmesh.test", ["127.0.0.2", "127.0.0.3", "127.0.0.4"])
    backends = [start_backend(f"127.0.0.{n}", port, f"s{n}") for n in (2, 3, 4)]
    outcome = {}

    def run():
        outcome["result"] = balance(f"dns://127.0.0.1:{dns.port}/echo.talkmesh.test:{port}", "--calls", "3000",
                                    "--concurrency", "6", "--interval-ms", "8", "--resolve-interval", "500ms")

    worker = threading.Thread(target=run)
    worker.start()
    try:
        time.sleep(1.5)
        backends.append(start_backend("127.0.0.5", port, "s5"))
        dns.addresses.append("127.0.0.5")
        worker.join(120)
        result = outcome["result"]
        assert result["failures"] == 0, result["errors"]
        counts = result["by_server"]
        assert counts.get("s5", 0) > 50, counts  # the fourth server joined the rotation
        assert all(counts.get(f"s{n}", 0) > counts["s5"] for n in (2, 3, 4)), counts
        assert dns.queries >= 4  # resolved again and again (A and AAAA each time)
    finally:
        dns.close()
        for backend in backends:
            backend.stop()


def test_a_removed_address_stops_receiving_calls():
    port = free_port()
    dns = FakeDNS("echo.talkmesh.test", ["127.0.0.2", "127.0.0.3"])
    backends = [start_backend(f"127.0.0.{n}", port, f"s{n}") for n in (2, 3)]
    try:
        outcome = {}

        def run():
            outcome["result"] = balance(f"dns://127.0.0.1:{dns.port}/echo.talkmesh.test:{port}", "--calls", "2000",
                                        "--concurrency", "4", "--interval-ms", "8", "--resolve-interval", "300ms")

        worker = threading.Thread(target=run)
        worker.start()
        time.sleep(1.0)
        dns.addresses = ["127.0.0.2"]  # s3 leaves the name but keeps running
        worker.join(120)
        result = outcome["result"]
        assert result["failures"] == 0, result["errors"]
        assert result["by_server"]["s2"] > 1.5 * result["by_server"]["s3"], result["by_server"]
        assert all(not a.startswith("127.0.0.3") for a in result["addresses"]), result["addresses"]
    finally:
        dns.close()
        for backend in backends:
            backend.stop()


def test_max_connection_age_moves_calls_to_new_connections():
    port = free_port()
    backends = [start_backend(f"127.0.0.{n}", port, f"s{n}", MAX_CONNECTION_AGE="1s") for n in (2, 3)]
    try:
        result = balance(f"ipv4:127.0.0.2:{port},127.0.0.3:{port}", "--calls", "1200", "--concurrency", "4", "--interval-ms", "5")
        assert result["failures"] == 0, result["errors"]
        assert min(result["by_server"].values()) > 400, result["by_server"]
        log = backends[0].read_log()
        assert log.count("connection reached its maximum age") >= 1
    finally:
        for backend in backends:
            backend.stop()
