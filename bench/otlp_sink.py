"""Starts the OTLP/HTTP receiver of the tracing-cost benchmarks (bench/otlp_sink.c): it reads each
export, answers 200 and decodes nothing, so the benchmarks measure the service, not the receiver.
It shares the machine with the server under test, standing in for a collector that would run
elsewhere, so it is written in C (a Python receiver cost as much per export as the exporter). It
is built here with the Swift toolchain's clang, which every machine that builds TalkMesh has."""
import atexit
import os
import shutil
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def clang():
    found = shutil.which("clang")
    if found:
        return found
    swift = shutil.which("swift")
    beside = os.path.join(os.path.dirname(os.path.realpath(swift)), "clang") if swift else ""
    if not os.path.exists(beside):
        raise SystemExit("bench: clang not found (it comes with the Swift toolchain)")
    return beside


def start():
    """Builds the receiver (into a directory removed at exit) and starts it: (process, port)."""
    directory = tempfile.mkdtemp(prefix="bench-otlp-sink-")
    atexit.register(shutil.rmtree, directory, True)
    binary = os.path.join(directory, "otlp_sink")
    subprocess.run([clang(), "-O2", "-pthread", "-o", binary, os.path.join(HERE, "otlp_sink.c")], check=True)
    process = subprocess.Popen([binary], stdout=subprocess.PIPE, text=True)
    return process, int(process.stdout.readline())
