"""Settings: environment variables, flags over them, validation with exit code 2, --help."""
import os
import subprocess

import pytest

from conftest import BIN, ROOT, Service

EXECUTABLES = ["talkmesh-gateway", "talkmesh-media", "talkmesh-audio", "talkmesh-dispatcher", "talkmesh-testserver"]


def run(exe, *args, env=None, timeout=10):
    full = dict(os.environ)
    full.update(env or {})
    return subprocess.run([os.path.join(BIN, exe), *args], env=full, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("exe", EXECUTABLES)
def test_help_lists_the_settings_and_exits_zero(exe):
    result = run(exe, "--help")
    assert result.returncode == 0
    for name in ("PORT", "LOG_FORMAT", "TLS_CERT_FILE", "MAX_RECEIVE_MESSAGE_BYTES", "DRAIN_TIMEOUT"):
        assert name in result.stdout


@pytest.mark.parametrize("env,args,fragment", [
    ({"PORT": "70000"}, [], "PORT=70000"),
    ({"PORT": "abc"}, [], "PORT=abc"),
    ({}, ["--port=-5"], "--port=-5"),
    ({"LOG_FORMAT": "xml"}, [], "LOG_FORMAT=xml"),
    ({"LOG_LEVEL": "loud"}, [], "LOG_LEVEL=loud"),
    ({"DRAIN_TIMEOUT": "soon"}, [], "DRAIN_TIMEOUT=soon"),
    ({"TLS_CERT_FILE": "/nonexistent.pem"}, [], "TLS_CERT_FILE and TLS_KEY_FILE"),
    ({"TLS_CERT_FILE": "/nonexistent.pem", "TLS_KEY_FILE": "/nonexistent.key"}, [], "cannot read /nonexistent.pem"),
    ({"MAX_RECEIVE_MESSAGE_BYTES": "0"}, [], "MAX_RECEIVE_MESSAGE_BYTES=0"),
])
def test_bad_settings_exit_two_with_a_clear_message(env, args, fragment):
    result = run("talkmesh-media", *args, env=env)
    assert result.returncode == 2
    assert fragment in result.stderr


def test_unknown_flag_exits_two():
    result = run("talkmesh-audio", "--no-such-flag")
    assert result.returncode == 2


def test_flag_overrides_environment(start_service):
    # PORT in the environment is taken by the fixture; --port must win over it.
    from conftest import free_port
    port = free_port()
    service = start_service("talkmesh-media", args=["--port", str(port)], port=port)
    assert service.http_get("/healthz") == (200, "ok\n")
    assert f'"port":"{port}"' in service.read_log()
    assert service.stop() == 0


def test_json_logs_on_stdout(start_service):
    import json
    service = start_service("talkmesh-dispatcher", env={"LOG_FORMAT": "json"})
    assert service.stop() == 0
    lines = [line for line in service.read_log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    assert any(r["msg"].startswith("serving") and r["service"] == "talkmesh-dispatcher" for r in records)
    assert all({"ts", "level", "msg"} <= set(r) for r in records)


def test_port_in_use_exits_two(start_service):
    service = start_service("talkmesh-gateway")
    # Binding with SO_REUSEPORT succeeds only for the same user and reuse-port sockets, so a
    # plain listener holds the port against us.
    import socket
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    result = run("talkmesh-gateway", env={"HOST": "127.0.0.1", "PORT": str(port)})
    holder.close()
    assert result.returncode == 2
    assert "cannot bind" in result.stdout + result.stderr
    service.stop()


def test_the_readme_settings_table_is_the_services_own():
    # Generated from every binary's --settings-json: a setting added, renamed or re-defaulted in
    # Swift without `scripts/settings-table` fails here.
    result = subprocess.run([os.path.join(ROOT, "scripts", "settings-table"), "--check"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TALKMESH_BIN": BIN})
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_settings_check_detects_a_stale_readme(tmp_path):
    import shutil
    shutil.copytree(os.path.join(ROOT, "scripts"), tmp_path / "scripts")
    readme = open(os.path.join(ROOT, "README.md")).read()
    (tmp_path / "README.md").write_text(readme.replace("| `WORKERS` | Media, Audio |", "| `WORKERS` | Media |"))
    result = subprocess.run([str(tmp_path / "scripts" / "settings-table"), "--check"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TALKMESH_BIN": BIN})
    assert result.returncode == 1 and "stale" in result.stderr


@pytest.mark.parametrize("exe,env,args,fragment", [
    ("talkmesh-gateway", {"JOB_CACHE_TTL": "61s"}, [], "JOB_CACHE_TTL=61s"),
    ("talkmesh-gateway", {"VIDEO_URL_TTL": "8d"}, [], "VIDEO_URL_TTL=8d"),
    ("talkmesh-dispatcher", {"LEASE_TTL": "100ms", "RUNPOD_ENDPOINT_ID": "e"}, [], "LEASE_TTL=100ms"),
    ("talkmesh-dispatcher", {}, ["--chunk-target-sec", "61"], "--chunk-target-sec=61"),
    ("talkmesh-runpod-emulator", {}, ["--fail-rate", "1.5"], "--fail-rate=1.5"),
    ("talkmesh-runpod-emulator", {"EMULATOR_WORKERS": "0"}, [], "EMULATOR_WORKERS=0"),
    ("talkmesh-media", {}, ["--workers"], "--workers needs a value"),
])
def test_each_service_checks_its_own_settings(exe, env, args, fragment):
    result = run(exe, *args, env=env)
    assert result.returncode == 2
    assert fragment in result.stderr
