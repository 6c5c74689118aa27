"""The README's Gateway examples, run as the one script they are, against a running mesh: every
curl call answers with a status its comment allows (no 5xx, no 401 after the key is created, no
404), and the files and ids the script passes along are real."""
import os
import re
import shutil
import subprocess

from conftest import BIN, ROOT
from test_gateway import world  # noqa: F401  (world is a fixture)
from test_dispatcher import inputs  # noqa: F401


def gateway_examples():
    text = open(os.path.join(ROOT, "README.md")).read()
    marker = text.index("<!-- examples:gateway")
    start = text.index("```sh\n", marker) + len("```sh\n")
    return text[start:text.index("```", start)]


def test_the_readme_gateway_examples_run(world):  # noqa: F811
    gateway, files = world["gateway"], world["files"]
    script = gateway_examples()
    assert "curl" in script and "/generate" in script
    script = script.replace("GW=http://127.0.0.1:8080", f"GW={gateway.url}")
    # Run where the Gateway's key file is keys.json (the README's name), with its two inputs beside.
    cwd = os.path.dirname(world["keys_file"])
    assert os.path.basename(world["keys_file"]) == "keys.json"
    shutil.copy(files["face"], os.path.join(cwd, "face.png"))
    shutil.copy(files["speech"], os.path.join(cwd, "speech.wav"))
    # Every curl reports its status and URL on stderr; the script itself is the README's, unchanged.
    prelude = ("set -euo pipefail\n"
               "curl() { command curl --max-time 120 -w '%{stderr}STATUS %{http_code} %{method} %{url_effective}\\n' \"$@\"; }\n")
    result = subprocess.run(["bash", "-c", prelude + script], cwd=cwd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"]})
    assert result.returncode == 0, result.stderr[-3000:]
    calls = re.findall(r"STATUS (\d+) (\S+) (\S+)", result.stderr)
    assert len(calls) >= 18, result.stderr
    for status, method, url in calls:
        code = int(status)
        path = url[len(gateway.url):]
        allowed = {202, 409} if method == "DELETE" else ({200, 409} if path.startswith("/result/") else {200, 202, 206})
        assert code in allowed, (method, path, code, result.stdout[-2000:])
    # The downloads are the job's video and its first KiB.
    video = open(os.path.join(cwd, "video.mp4"), "rb").read()
    assert video[4:8] == b"ftyp" and open(os.path.join(cwd, "head.bin"), "rb").read() == video[:1024]
    # The revoked example key is marked revoked in the file; the demo key still works.
    listing = subprocess.run([os.path.join(BIN, "talkmesh"), "keys", "list", "--keys-file", world["keys_file"]],
                             capture_output=True, text=True, check=True).stdout
    assert any("\tacme\t" in line and "revoked" in line for line in listing.splitlines()), listing
