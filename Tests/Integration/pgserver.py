"""A real PostgreSQL server for tests and benchmarks: initdb in a scratch directory, `postgres` on a
free loopback port, run as the `postgres` user when we are root (PostgreSQL refuses to run as
root). scripts/bootstrap installs the server (Debian's `postgresql`)."""
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid


def _bin(name):
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    if not versions:
        raise RuntimeError("PostgreSQL server binaries not found: run scripts/bootstrap")
    return os.path.join(versions[-1], name)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, durable=False, host="127.0.0.1", wrap=(), port=None):
        """`durable`: fsync as in production (benchmarks); tests run without it. `host`: the
        address to listen on; `wrap`: a command prefix to run it under (`ip netns exec NS`)."""
        self.dir = tempfile.mkdtemp(prefix="talkmesh-pg-")
        os.chmod(self.dir, 0o755)
        self.data = os.path.join(self.dir, "data")
        self.host = host
        self.port = port or _free_port()
        self._as = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups"]
        subprocess.run([*self._as, _bin("initdb"), "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"],
                       check=True, capture_output=True)
        if host != "127.0.0.1":
            # initdb trusts loopback only; the cluster test's clients are other hosts on a bridge.
            with open(os.path.join(self.data, "pg_hba.conf"), "a") as hba:
                hba.write("host all all 0.0.0.0/0 trust\n")
        settings = ["-c", f"listen_addresses={host}", "-c", "max_connections=200"]
        if not durable:
            settings += ["-c", "fsync=off", "-c", "full_page_writes=off"]
        self.log = open(os.path.join(self.dir, "postgres.log"), "w")
        # Under a watchdog shell (pgwatchdog.sh) that stops the server and removes its directory once
        # this process is gone, however it ended (a test run killed outright left servers running).
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pgwatchdog.sh")) as fh:
            watchdog = fh.read()
        self.proc = subprocess.Popen([*wrap, *self._as, "/bin/sh", "-c", watchdog, "talkmesh-pg-watchdog", str(os.getpid()), self.dir,
                                      _bin("postgres"), "-D", self.data, "-p", str(self.port), "-k", self.dir, *settings],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while subprocess.run([_bin("pg_isready"), "-h", host, "-p", str(self.port), "-q"]).returncode != 0:
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("PostgreSQL did not start: " + open(os.path.join(self.dir, "postgres.log")).read()[-2000:])
            time.sleep(0.1)

    def psql(self, sql, database="postgres"):
        return subprocess.run([_bin("psql"), "-h", self.host, "-p", str(self.port), "-U", "postgres", "-d", database,
                               "-v", "ON_ERROR_STOP=1", "-At", "-c", sql], check=True, capture_output=True, text=True).stdout

    def new_database(self):
        """A fresh database; its URL for JOB_STORE."""
        name = "t_" + uuid.uuid4().hex[:12]
        self.psql(f"CREATE DATABASE {name}")
        return name, f"postgres://postgres@{self.host}:{self.port}/{name}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown: sessions are ended, not waited for
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
