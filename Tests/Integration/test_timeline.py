"""The job timeline: every state change of a job and of each chunk attempt, with times, kept with
the job — `GET /v1/jobs/{id}/timeline` and `talkmesh timeline ID`, through the whole mesh with a
chunk that fails once on the emulator and is retried."""
import os
import re
import shutil
import subprocess
import tempfile
import time

from conftest import BIN
from test_dispatcher import Mesh, inputs  # noqa: F401
from test_gateway import Gateway, new_key


def test_the_timeline_holds_every_transition_and_the_cli_draws_it(inputs):  # noqa: F811
    directory = tempfile.mkdtemp(prefix="talkmesh-timeline-")
    keys_file = os.path.join(directory, "keys.json")
    key = new_key(keys_file, "--rate", "1000", "--burst", "1000")
    # Every third RunPod job fails (seeded): some chunk needs a second attempt.
    mesh = Mesh(emulator_args=("--fail-rate", "0.3", "--seed", "7", "--speed", "0.1"))
    gateway = Gateway(mesh, keys_file)
    try:
        form = {"image": "@" + inputs["dir"] + "/face.png", "audio": "@" + inputs["dir"] + "/short.wav", "width": "128", "height": "128",
                "chunk_target_sec": "6"}
        status, _, created = gateway.json("POST", "/v1/jobs", key=key, form=form)
        assert status == 202, created
        deadline = time.time() + 120
        while time.time() < deadline:
            status, _, job = gateway.json("GET", f"/v1/jobs/{created['id']}", key=key)
            if job["status"] not in ("in_queue", "running"):
                break
            time.sleep(0.2)
        assert job["status"] == "completed", job
        status, _, timeline = gateway.json("GET", f"/v1/jobs/{created['id']}/timeline", key=key)
        assert status == 200, timeline
        events = timeline["events"]
        assert [(e["from"], e["to"]) for e in events if "chunk" not in e] == [("in_queue", "running"), ("running", "completed")]
        times = [e["at"] for e in events]
        assert times == sorted(times), "oldest first"
        chunks = timeline["chunks"]
        assert len(chunks) >= 3
        retried = 0
        for chunk in chunks:
            mine = [e for e in events if e.get("chunk") == chunk["index"]]
            states = [e["to"] for e in mine]
            assert states[0] == "submitting" and states[-1] == "completed", states
            assert "submitted" in states
            assert all(e["runpod_job_id"] for e in mine if e["to"] in ("submitted", "running", "completed"))
            if max(e["attempt"] for e in mine) >= 2:  # retried: in place (/retry) or submitted again
                retried += 1
                assert any(e.get("error_code") == "RUNPOD_JOB_FAILED" for e in mine), mine
        assert retried >= 1, "the seeded failures hit a chunk"
        assert job["chunks"]["completed"] == len(chunks)
        # Only asked for: GetJob, the poll and the list leave the timeline out.
        from tmdispatcher import dispatcher_pb2 as pb
        assert len(mesh.stub.GetJob(pb.GetJobRequest(id=created["id"]), timeout=10).timeline) == 0
        full = mesh.stub.GetJob(pb.GetJobRequest(id=created["id"], include_timeline=True), timeout=10)
        assert len(full.timeline) == len(events) and full.timeline[-1].to == "completed"
        assert "timeline" not in job and "events" not in job
        # Another key sees no timeline of this job.
        other = new_key(keys_file, "--rate", "1000", "--burst", "1000")
        time.sleep(1.2)
        assert gateway.json("GET", f"/v1/jobs/{created['id']}/timeline", key=other)[0] == 404
        # The CLI's chart: a header, the job's transitions, an axis and one row per chunk.
        env = {**os.environ, "TALKMESH_GATEWAY": gateway.url, "TALKMESH_API_KEY": key}
        chart = subprocess.run([os.path.join(BIN, "talkmesh"), "timeline", created["id"], "--width", "40"], env=env,
                               capture_output=True, text=True, check=True).stdout.splitlines()
        assert chart[0].startswith(created["id"] + " completed") and "running +" in chart[1] and "completed +" in chart[1]
        rows = [line for line in chart if re.match(r"\s+\d+\s", line)]
        assert len(rows) == len(chunks)
        for row in rows:
            bar = row[row.index("|") + 1:row.rindex("|")]
            assert len(bar) == 40 and "#" in bar or "." in bar, row
        assert any("x" in row[row.index("|"):] for row in rows), chart
        missing = subprocess.run([os.path.join(BIN, "talkmesh"), "timeline", "job_000000000000000000000000"], env=env,
                                 capture_output=True, text=True)
        assert missing.returncode == 3 and "JOB_NOT_FOUND" in missing.stderr
    finally:
        gateway.stop()
        mesh.stop()
        shutil.rmtree(directory, ignore_errors=True)
