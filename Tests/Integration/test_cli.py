"""`talkmesh up`, `talkmesh submit` and the other job commands, and `make demo`'s flow: the
commands a newcomer runs, run as they would run them."""
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request

import pytest

from conftest import BIN, ROOT, free_port

TALKMESH = os.path.join(BIN, "talkmesh")


def port_pair(step=10):
    """A free port whose replica port (+10) is free too."""
    for _ in range(50):
        port = free_port()
        if port + step > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + step))
            except OSError:
                continue
        return port
    raise AssertionError("no free port pair")


def up_flags():
    """Ports for every service, none of them (nor Media's and Audio's replica ports, +10) the same:
    free ports picked one after another can repeat, which `talkmesh up` rightly refuses."""
    for _ in range(50):
        gateway, media, audio, dispatcher, emulator = free_port(), port_pair(), port_pair(), free_port(), free_port()
        taken = [gateway, media, media + 10, audio, audio + 10, dispatcher, emulator]
        if len(set(taken)) == len(taken):
            return ["--gateway-port", str(gateway), "--media-port", str(media), "--audio-port", str(audio),
                    "--dispatcher-port", str(dispatcher), "--emulator-port", str(emulator)]
    raise AssertionError("no distinct free ports")


class Up:
    """`talkmesh up` as a child: its stderr collected, its readiness awaited."""

    def __init__(self, *args, data_dir=None):
        self.dir = data_dir or tempfile.mkdtemp(prefix="talkmesh-up-")
        self.flags = up_flags()
        self.proc = subprocess.Popen([TALKMESH, "up", "--data-dir", self.dir, *self.flags, *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.err, self.out = [], []
        for stream, sink in ((self.proc.stderr, self.err), (self.proc.stdout, self.out)):
            threading.Thread(target=lambda s=stream, k=sink: [k.append(line) for line in s], daemon=True).start()

    def flag(self, name):
        return int(self.flags[self.flags.index(name) + 1])

    @property
    def gateway(self):
        return f"http://127.0.0.1:{self.flag('--gateway-port')}"

    def wait_ready(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any("talkmesh up: ready" in line for line in self.err):
                return self
            assert self.proc.poll() is None, "".join(self.err[-30:])
            time.sleep(0.05)
        raise AssertionError("talkmesh up not ready: " + "".join(self.err[-30:]))

    def children(self):
        """{executable name: [pids]} of the supervised services."""
        found = {}
        for pid in subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split():
            try:
                exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
            except OSError:
                continue
            found.setdefault(exe, []).append(int(pid))
        return found

    def cli(self, *args, timeout=120, check=None):
        result = subprocess.run([TALKMESH, *args, "--data-dir", self.dir], capture_output=True, text=True, timeout=timeout)
        if check is not None:
            assert result.returncode == check, (result.returncode, result.stdout, result.stderr)
        return result

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def files():
    d = tempfile.mkdtemp(prefix="talkmesh-cli-")
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=s=400x600", "-frames:v", "1", f"{d}/face.png"], check=True)
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "sine=frequency=300:duration=6", "-ar", "16000", f"{d}/tone.wav"],
                   check=True)
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "sine=frequency=300:duration=40", "-ar", "16000", f"{d}/long.wav"],
                   check=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def mesh():
    """Two Media replicas; an emulator slow enough (0.2 s per second of audio) to cancel a job in."""
    up = Up("--media", "2", "--emulator-arg=--speed=0.2", "--emulator-arg=--workers=4").wait_ready()
    yield up
    up.stop()


def test_up_prints_the_gateway_and_a_private_dev_key_and_reuses_it(mesh):
    banner = "".join(mesh.err)
    key = open(os.path.join(mesh.dir, "dev-api-key")).read().strip()
    assert mesh.gateway in banner and key in banner and key.startswith("tmk_")
    assert os.stat(os.path.join(mesh.dir, "dev-api-key")).st_mode & 0o777 == 0o600
    assert open(os.path.join(mesh.dir, "gateway-url")).read().strip() == mesh.gateway
    assert set(mesh.children()) == {"talkmesh-gateway", "talkmesh-dispatcher", "talkmesh-media", "talkmesh-audio",
                                    "talkmesh-runpod-emulator"}
    assert len(mesh.children()["talkmesh-media"]) == 2
    # Each service's log lines come prefixed with its name (plain: stdout is not a terminal).
    assert any(line.startswith("media-2    | ") for line in mesh.out) and not any("\x1b[" in line for line in mesh.out)
    # The key works, and no key is refused.
    request = urllib.request.Request(mesh.gateway + "/v1/jobs", headers={"authorization": f"Bearer {key}"})
    assert json.load(urllib.request.urlopen(request, timeout=10))["jobs"] is not None
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(mesh.gateway + "/v1/jobs", timeout=10)
    assert refused.value.code == 401


def test_submit_writes_the_video_and_calls_reach_both_media_replicas(mesh, files):
    outputs = []
    for n in range(3):
        target = os.path.join(mesh.dir, f"out{n}.mp4")
        result = mesh.cli("submit", "--image", f"{files}/face.png", "--audio", f"{files}/tone.wav", "--width", "320", "--height", "480",
                          "-o", target, check=0)
        outputs.append(target)
        assert f"video: {target}" in result.stdout and "completed in" in result.stdout
        # Progress lines (not a terminal: one per change), ending complete.
        assert "splitting" in result.stderr or "rendering" in result.stderr
        assert "completed  chunks 1/1  100%" in result.stderr
    for target in outputs:
        probe = json.loads(subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_type,width,height:format=duration",
                                           "-of", "json", target], capture_output=True, text=True, check=True).stdout)
        video = [s for s in probe["streams"] if s["codec_type"] == "video"][0]
        assert (video["width"], video["height"]) == (320, 480) and abs(float(probe["format"]["duration"]) - 6) < 0.1
        assert not os.path.exists(target + ".part")
    calls = []
    for port in (mesh.flag("--media-port"), mesh.flag("--media-port") + 10):
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        calls.append(sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                         if line.startswith("talkmesh_grpc_server_requests_total") and "MediaService" in line))
    assert all(count > 0 for count in calls), calls  # three jobs × (resize, encode audio, stitch) spread over both


def test_status_jobs_watch_and_json_output(mesh, files):
    result = mesh.cli("submit", "--image", f"{files}/face.png", "--audio", f"{files}/tone.wav", "--json", "--quiet",
                      "-o", os.path.join(mesh.dir, "j.mp4"), check=0)
    job = json.loads(result.stdout)
    assert job["status"] == "completed" and job["output"].endswith("j.mp4") and len(job["chunk_list"]) == 1 and result.stderr == ""
    status = json.loads(mesh.cli("status", job["id"], "--json", check=0).stdout)
    assert status["id"] == job["id"] and status["chunk_list"][0]["status"] == "completed"
    text = mesh.cli("status", job["id"], check=0).stdout
    assert text.startswith(f"job {job['id']}: completed in ") and "chunk 0:" in text and "on RunPod (queue" in text
    listed = json.loads(mesh.cli("jobs", "--json", "--status", "completed", check=0).stdout)["jobs"]
    assert job["id"] in [j["id"] for j in listed] and all(j["status"] == "completed" for j in listed)
    table = mesh.cli("jobs", "--limit", "1", check=0).stdout.splitlines()
    assert table[0].startswith("ID\tSTATUS") and len(table) == 2
    # watch on a finished job: its last state, then exit 0; --json is one object per line.
    watched = mesh.cli("watch", job["id"], "--json", check=0).stdout.splitlines()
    assert json.loads(watched[-1])["status"] == "completed"
    # Errors: a stable code on stderr and in --json, and the documented exit codes.
    missing = mesh.cli("status", "job_nope", "--json", check=3)
    assert json.loads(missing.stdout)["error"]["code"] == "JOB_NOT_FOUND" and "JOB_NOT_FOUND" in missing.stderr
    assert "JOB_TERMINAL" in mesh.cli("cancel", job["id"], check=3).stderr
    assert "UNAUTHORIZED: the API key is not valid" in mesh.cli("jobs", "--api-key", "tmk_wrong", check=3).stderr
    unreachable = mesh.cli("jobs", "--gateway", f"http://127.0.0.1:{free_port()}", check=2)
    assert "GATEWAY_UNREACHABLE" in unreachable.stderr
    assert "cannot read /nonexistent.png" in mesh.cli("submit", "--image", "/nonexistent.png", "--audio", f"{files}/tone.wav", check=64).stderr


def test_cancel_ends_a_running_submit_with_the_jobs_error(mesh, files):
    submit = subprocess.Popen([TALKMESH, "submit", "--image", f"{files}/face.png", "--audio", f"{files}/long.wav", "--data-dir", mesh.dir,
                               "-o", os.path.join(mesh.dir, "never.mp4")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, running = time.time() + 30, []
        while not running and time.time() < deadline:
            running = json.loads(mesh.cli("jobs", "--json", "--status", "running", check=0).stdout)["jobs"]
            time.sleep(0.1)
        assert running, "the job never ran"
        cancelled = json.loads(mesh.cli("cancel", running[0]["id"], "--json", check=0).stdout)
        assert cancelled["id"] == running[0]["id"]
        out, err = submit.communicate(timeout=60)
    finally:
        if submit.poll() is None:
            submit.kill()
    assert submit.returncode == 4, (out, err)
    assert "cancelled" in err and not os.path.exists(os.path.join(mesh.dir, "never.mp4"))


def test_submit_of_a_failing_job_prints_the_error_code_and_exits_non_zero(files):
    up = Up("--emulator-arg=--fail-rate=1").wait_ready()
    try:
        result = up.cli("submit", "--image", f"{files}/face.png", "--audio", f"{files}/tone.wav", "-o", os.path.join(up.dir, "x.mp4"))
        assert result.returncode == 4, (result.stdout, result.stderr)
        assert "talkmesh submit: RUNPOD_JOB_FAILED: job job_" in result.stderr and "failed" in result.stderr
        assert not os.path.exists(os.path.join(up.dir, "x.mp4"))
        scripted = up.cli("submit", "--image", f"{files}/face.png", "--audio", f"{files}/tone.wav", "--json", "--quiet")
        assert scripted.returncode == 4 and json.loads(scripted.stdout)["error"]["code"] == "RUNPOD_JOB_FAILED"
    finally:
        up.stop()


def test_up_stops_the_others_and_exits_non_zero_when_a_service_dies():
    up = Up().wait_ready()
    try:
        children = up.children()
        victim = children["talkmesh-media"][0]
        others = [pid for exe, pids in children.items() for pid in pids if pid != victim]
        os.kill(victim, signal.SIGKILL)
        assert up.proc.wait(timeout=60) == 1
        report = "".join(up.err)
        assert "media was killed by signal 9; its last lines:" in report and "serving gRPC" in report
        assert not [pid for pid in others if alive(pid)]
    finally:
        up.stop()


def test_up_drains_and_exits_zero_on_sigterm_and_a_second_run_keeps_the_key():
    data = tempfile.mkdtemp(prefix="talkmesh-up-")
    up = Up(data_dir=data).wait_ready()
    children = [pid for pids in up.children().values() for pid in pids]
    key = open(os.path.join(data, "dev-api-key")).read()
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(timeout=60) == 0
    assert "talkmesh up: stopped" in "".join(up.err) and not [pid for pid in children if alive(pid)]
    again = Up(data_dir=data).wait_ready()
    try:
        assert open(os.path.join(data, "dev-api-key")).read() == key
    finally:
        again.stop()


def test_up_refuses_a_port_in_use_before_starting_anything():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data = tempfile.mkdtemp(prefix="talkmesh-up-")
        result = subprocess.run([TALKMESH, "up", "--data-dir", data, "--gateway-port", str(port),
                                 "--media-port", str(port_pair()), "--audio-port", str(port_pair()),
                                 "--dispatcher-port", str(free_port()), "--emulator-port", str(free_port())],
                                capture_output=True, text=True, timeout=30)
        shutil.rmtree(data, ignore_errors=True)
    assert result.returncode == 1 and f"port {port} (gateway) is in use" in result.stderr


def test_the_demo_flow_makes_a_video_with_its_seams(tmp_path):
    """`make demo` with a shorter clip: ~70 s of speech, so at least two chunks."""
    env = dict(os.environ, DEMO_SECONDS="70", DEMO_OUT=str(tmp_path), TALKMESH_BIN=BIN, DEMO_UP_FLAGS=" ".join(up_flags()))
    result = subprocess.run([os.path.join(ROOT, "scripts", "demo")], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    job = json.load(open(tmp_path / "demo-job.json"))
    assert job["status"] == "completed" and len(job["chunk_list"]) >= 2
    assert f"job {job['id']}: completed in" in result.stdout and "end to end" in result.stdout
    probe = json.loads(subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_type,width,height,r_frame_rate,duration",
                                       "-of", "json", str(tmp_path / "demo.mp4")], capture_output=True, text=True, check=True).stdout)
    kinds = {s["codec_type"]: s for s in probe["streams"]}
    assert set(kinds) == {"video", "audio"}
    video = kinds["video"]
    assert (video["width"], video["height"]) == (384, 576)
    numerator, denominator = map(int, video["r_frame_rate"].split("/"))
    speech = float(subprocess.run(["soxi", "-D", str(tmp_path / "demo-speech.wav")], capture_output=True, text=True, check=True).stdout)
    assert 69 <= speech <= 70.01
    assert abs(float(video["duration"]) - speech) <= denominator / numerator, (video["duration"], speech)
    seams = json.loads(subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=width,height", "-of", "json",
                                       str(tmp_path / "demo-seams.png")], capture_output=True, text=True, check=True).stdout)["streams"][0]
    rows = len(job["chunk_list"]) - 1
    assert (seams["width"], seams["height"]) == (4 * 192, rows * 288)  # four frames per seam, one row per seam
    # The mesh was stopped: nothing listens on its Gateway port any more.
    assert "stopping the mesh" in result.stderr


def test_health_and_keys_speak_json_too(mesh, tmp_path):
    health = subprocess.run([TALKMESH, "health", f"127.0.0.1:{mesh.flag('--dispatcher-port')}", "--json"], capture_output=True, text=True)
    assert health.returncode == 0 and json.loads(health.stdout) == {"status": "SERVING"}
    down = subprocess.run([TALKMESH, "health", f"127.0.0.1:{free_port()}", "--json"], capture_output=True, text=True)
    assert down.returncode == 2 and json.loads(down.stdout)["error"]["code"] == "UNAVAILABLE"
    keys = str(tmp_path / "keys.json")
    created = json.loads(subprocess.run([TALKMESH, "keys", "create", "--keys-file", keys, "--name", "ci", "--json"],
                                        capture_output=True, text=True, check=True).stdout)
    listed = json.loads(subprocess.run([TALKMESH, "keys", "list", "--keys-file", keys, "--json"], capture_output=True, text=True,
                                       check=True).stdout)["keys"]
    assert created["key"].startswith("tmk_") and [k["id"] for k in listed] == [created["id"]] and "key" not in listed[0]
