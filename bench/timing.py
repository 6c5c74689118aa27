"""Timing a command exactly and still bounding it in time, for the benchmarks."""
import subprocess
import threading
import time


def timed_run(command, limit, **popen):
    """Runs `command` (with these `subprocess.Popen` arguments), killed if it still runs after
    `limit` seconds; returns (seconds, exit code, stdout). It waits with a blocking read and
    waitpid: `subprocess.run(timeout=…)` polls for the exit with sleeps that grow to 50 ms, which
    rounded every time it measured up to the next of 0.5, 1.5, 3.5, … 63.5, 113.5 ms."""
    started = time.perf_counter()
    process = subprocess.Popen(command, **popen)
    watchdog = threading.Timer(limit, process.kill)
    watchdog.start()
    try:
        out, _ = process.communicate()
    finally:
        watchdog.cancel()
    return time.perf_counter() - started, process.returncode, out
