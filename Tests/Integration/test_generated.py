"""The committed protoc-c output and Swift bridge are what proto/generate makes now."""
import os
import subprocess

from conftest import ROOT


def test_generated_code_is_current():
    result = subprocess.run([os.path.join(ROOT, "proto", "generate"), "--check"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "generated code is current" in result.stdout


def test_check_detects_a_stale_file(tmp_path):
    # A copy of the tree with one generated file altered must fail the check.
    import shutil
    copy = tmp_path / "repo"
    shutil.copytree(os.path.join(ROOT, "proto"), copy / "proto")
    shutil.copytree(os.path.join(ROOT, "Shared", "Messages"), copy / "Shared" / "Messages")
    target = copy / "Shared" / "Messages" / "Generated" / "grpc_health_v1_health.pb.swift"
    target.write_text(target.read_text() + "// edited by hand\n")
    result = subprocess.run([str(copy / "proto" / "generate"), "--check"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "stale" in result.stderr
