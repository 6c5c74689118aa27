"""The fuzz targets' committed corpora (seeds, and every crash libFuzzer ever found) replayed
through `talkmesh-fuzz` as built by `make test` (no libFuzzer): a regression of any past crash
fails here. `make fuzz` runs the same targets under libFuzzer and AddressSanitizer."""
import os
import subprocess

import pytest

from conftest import BIN, ROOT

CORPUS = os.path.join(ROOT, "Tests", "Fuzz", "Corpus")
FUZZ = os.path.join(BIN, "talkmesh-fuzz")
TARGETS = sorted(os.listdir(CORPUS))


def test_every_target_has_a_corpus_and_every_corpus_a_target():
    result = subprocess.run([FUZZ], capture_output=True, text=True, timeout=30)
    assert result.returncode == 64
    listed = result.stderr.split("targets:")[1].strip().split(", ")
    assert sorted(set(listed) - {"self-test"}) == TARGETS
    for target in TARGETS:
        assert any(name.startswith("seed-") for name in os.listdir(os.path.join(CORPUS, target))), target


@pytest.mark.parametrize("target", TARGETS)
def test_the_corpus_replays_without_a_crash(target):
    directory = os.path.join(CORPUS, target)
    result = subprocess.run([FUZZ, target, directory], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"{target}: {len(os.listdir(directory))} inputs replayed, no crash"


@pytest.mark.parametrize("target, seed, answer", [
    ("http1-session", "seed-pipelined", b"HTTP/1.1 200 OK"),
    ("http2-session", "seed-grpc-echo", b"\x0a\x03abc\x12\x02hi"),
])
def test_the_server_targets_reach_a_real_server(target, seed, answer):
    """The socket harness gets real answers (a harness that never reached the server would fuzz nothing)."""
    result = subprocess.run([FUZZ, target, os.path.join(CORPUS, target, seed)], capture_output=True, timeout=60,
                            env={**os.environ, "TALKMESH_FUZZ_ANSWERS": "1"})
    assert result.returncode == 0 and answer in result.stdout, result.stdout[-500:]


def test_a_failing_input_fails_the_replay(tmp_path):
    """A crash in a target reaches the exit status (the self-test target fails on "crash…")."""
    (tmp_path / "fine").write_bytes(b"fine")
    assert subprocess.run([FUZZ, "self-test", str(tmp_path / "fine")], capture_output=True, timeout=60).returncode == 0
    (tmp_path / "crash").write_bytes(b"crash")
    result = subprocess.run([FUZZ, "self-test", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "property violated" in result.stderr
    assert subprocess.run([FUZZ, "no-such-target", str(tmp_path)], capture_output=True, timeout=60).returncode == 64
