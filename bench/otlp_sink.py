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


def compare(untraced, traced, rounds):
    """Runs `untraced()` and `traced()` (each returns req/s) in `rounds` interleaved pairs, the
    order swapped every round (so neither side always runs first, just after the other's load):
    this machine's noise moves whole seconds by 10-20 %, and a slow second then hits both sides
    of a pair alike. Returns both lists of rates."""
    off, on = [], []
    for index in range(rounds):
        if index % 2 == 0:
            off.append(untraced())
            on.append(traced())
        else:
            on.append(traced())
            off.append(untraced())
    return off, on


def report(off, on, what):
    """Prints the medians, the cost, and the spread of the pairs' own costs."""
    import statistics
    u, t = statistics.median(off), statistics.median(on)
    pairs = sorted((1 - b / a) * 100 for a, b in zip(off, on))
    quarter = len(pairs) // 4
    print(f"tracing: {what}, median of {len(off)} interleaved rounds:")
    print(f"  tracing off: {u:,.0f} req/s")
    print(f"  tracing on: {t:,.0f} req/s")
    print(f"  cost of tracing: {(1 - t / u) * 100:.1f} % (aim < 10 %); the pairs' own costs: "
          f"middle half {pairs[quarter]:.1f} to {pairs[-1 - quarter]:.1f} %")


def spans(metrics_url):
    """The traced server's exported, dropped and still queued span counts, from its /metrics (a
    last partial batch waits for the schedule, OTEL_BSP_SCHEDULE_DELAY)."""
    import re
    import urllib.request
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    exported = re.search(r"^talkmesh_otel_spans_exported_total (\d+)", text, re.M)
    dropped = sum(int(n) for n in re.findall(r"^talkmesh_otel_spans_dropped_total\{[^}]*\} (\d+)", text, re.M))
    queued = re.search(r"^talkmesh_otel_spans_queued (\d+)", text, re.M)
    return int(exported.group(1)) if exported else 0, dropped, int(queued.group(1)) if queued else 0
