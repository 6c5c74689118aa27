"""Hosts for the multi-host test, made of Linux network namespaces: each host is a namespace with
its own loopback and one veth whose other end is on a bridge, with its own address, like a pod on
a node's network. The bridge's own address (in the test's namespace) serves DNS, so names resolve
as a headless Service's do: every replica's address under one name. `/etc/netns/NS/resolv.conf`
points each host's system resolver at it (`ip netns exec` mounts it over /etc/resolv.conf).

Everything made is removed by `close()`, which the test runs in a `finally`, and namespaces left by
an earlier run that was killed are removed at the start."""
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "Integration"))

from conftest import BIN  # noqa: E402
from fake_dns import FakeDNS  # noqa: E402

PREFIX = "tmc"  # every namespace, link and /etc/netns entry this test makes starts with it
DOMAIN = "talkmesh.test"


def ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def remove_stale():
    """Namespaces and links of earlier runs whose process is gone."""
    for line in ip("netns", "list").stdout.splitlines():
        name = line.split()[0]
        match = re.fullmatch(PREFIX + r"(\d+)-\w+", name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            ip("netns", "del", name, check=False)
            shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)
    for line in ip("-o", "link", "show").stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        match = re.fullmatch(PREFIX + r"(\d+)[bv]\d*", name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            ip("link", "del", name, check=False)


class Process:
    """A program running on one host, logging to a file."""

    def __init__(self, host, name, command, env, log_dir):
        self.host, self.name = host, name
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(["ip", "netns", "exec", host.namespace, *command], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self):
        return self.proc.poll() is None

    def kill(self):
        """kill -9: no drain, no goodbye (`ip netns exec` exec()s the program, so this is its pid)."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout=20):
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()

    def tail(self, size=3000):
        with open(self.log_path, "rb") as fh:
            return fh.read()[-size:].decode(errors="replace")


class Host:
    def __init__(self, fabric, name, address, index):
        self.fabric, self.name, self.address = fabric, name, address
        self.namespace = f"{fabric.tag}-{name}"
        self.outer = f"{fabric.tag}v{index}"  # the veth end on the bridge
        inner = f"{fabric.tag}p{index}"
        ip("netns", "add", self.namespace)
        fabric.namespaces.append(self.namespace)
        os.makedirs(f"/etc/netns/{self.namespace}", exist_ok=True)
        with open(f"/etc/netns/{self.namespace}/resolv.conf", "w") as fh:
            fh.write(f"nameserver {fabric.gateway}\noptions timeout:1 attempts:3\n")
        ip("link", "add", self.outer, "type", "veth", "peer", "name", inner)
        ip("link", "set", inner, "netns", self.namespace)
        ip("-n", self.namespace, "link", "set", "lo", "up")
        ip("-n", self.namespace, "addr", "add", f"{address}/24", "dev", inner)
        ip("-n", self.namespace, "link", "set", inner, "up")
        ip("link", "set", self.outer, "master", fabric.bridge, "up")
        self.processes = []

    def run(self, name, command, env):
        process = Process(self, name, command, env, self.fabric.logs)
        self.processes.append(process)
        return process

    def link(self, up):
        """The host's cable: down, nothing reaches it and nothing leaves (no RST, no FIN)."""
        ip("link", "set", self.outer, "up" if up else "down")


class Fabric:
    def __init__(self):
        remove_stale()
        pid = os.getpid()
        self.tag = f"{PREFIX}{pid}"
        self.bridge = f"{self.tag}b"
        self.subnet = f"10.{200 + pid % 50}.{(pid // 50) % 250}"
        self.gateway = f"{self.subnet}.1"
        self.namespaces, self.hosts = [], {}
        self.logs = tempfile.mkdtemp(prefix="talkmesh-cluster-")
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        self.dns = FakeDNS(records={}, host=self.gateway, port=53)

    def host(self, name):
        index = len(self.hosts) + 2
        host = Host(self, name, f"{self.subnet}.{index}", index)
        self.hosts[name] = host
        return host

    def publish(self, service, hosts):
        """`service.talkmesh.test` resolves to these hosts' addresses (a headless Service's records)."""
        self.dns.records[f"{service}.{DOMAIN}"] = [h.address for h in hosts]

    def close(self):
        for host in self.hosts.values():
            for process in host.processes:
                try:
                    process.stop(timeout=5)
                except Exception:  # noqa: BLE001 — the namespaces must go whatever happened
                    pass
        self.dns.close()
        for namespace in self.namespaces:
            # Whatever still runs there (a server started under `ip netns exec` by other code)
            # would keep the namespace, and its link, alive after `netns del`.
            for pid in ip("netns", "pids", namespace, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            ip("netns", "del", namespace, check=False)
            shutil.rmtree(f"/etc/netns/{namespace}", ignore_errors=True)
        ip("link", "del", self.bridge, check=False)


def service_env(**extra):
    """A service's environment: the test's PATH and nothing else inherited."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LOG_LEVEL": "info", "LOG_FORMAT": "json",
            "EVENT_LOOPS": "1", **{k: str(v) for k, v in extra.items()}}


def executable(name):
    return os.path.join(BIN, name)


def wait_http(url, timeout=30, process=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and not process.alive():
            raise AssertionError(f"{process.name} exited: {process.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer 200" + (f": {process.tail()}" if process else ""))


def metrics(address, port, timeout=5):
    """name{labels} → value from a service's /metrics."""
    with urllib.request.urlopen(f"http://{address}:{port}/metrics", timeout=timeout) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
