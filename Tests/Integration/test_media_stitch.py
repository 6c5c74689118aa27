"""StitchVideos and EncodeAudio on the real service: stream copy, re-encode, the original audio in sync, refusals, a full disk, a deadline."""
import os
import shutil
import subprocess
import tempfile
import grpc
import numpy as np
import pytest
from conftest import Service
from tmmedia import media_pb2, media_pb2_grpc
from test_media import error_of, ffmpeg, ffprobe, media  # noqa: F401  (media is a fixture)


# ---------------------------------------------------------------- StitchVideos

@pytest.fixture(scope="module")
def parts(media):
    _, blobs = media
    os.makedirs(f"{blobs}/parts", exist_ok=True)
    ffmpeg("-f", "lavfi", "-i", "testsrc2=s=384x576:r=25", "-f", "lavfi", "-i", "sine=f=440:sample_rate=44100",
           "-t", "45", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", f"{blobs}/parts/p0.mp4")
    for n in range(1, 10):
        shutil.copy(f"{blobs}/parts/p0.mp4", f"{blobs}/parts/p{n}.mp4")
    return [f"parts/p{n}.mp4" for n in range(10)]


def packets(path, stream):
    data = ffprobe(path, "-select_streams", stream, "-show_entries", "packet=dts,duration_time,dts_time")["packets"]
    return [int(p["dts"]) for p in data]


def test_ten_parts_of_45s_stitch_by_stream_copy(media, parts):
    stub, blobs = media
    response = stub.StitchVideos(media_pb2.StitchVideosRequest(video_keys=parts, output_key="out/ten.mp4"), timeout=120)
    assert response.mode == "copy"
    path = os.path.join(blobs, response.video_key)
    one = float(ffprobe(f"{blobs}/{parts[0]}", "-show_streams", "-select_streams", "v")["streams"][0]["duration"])
    video = ffprobe(path, "-show_streams", "-select_streams", "v")["streams"][0]
    assert abs(float(video["duration"]) - 10 * one) <= 0.04  # within one frame
    assert abs(response.duration_sec - 10 * one) <= 0.04
    for stream in ("v", "a"):
        dts = packets(path, stream)
        assert all(b > a for a, b in zip(dts, dts[1:])), f"{stream} DTS not strictly increasing"
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    assert head.find(b"moov") != -1 and (head.find(b"mdat") == -1 or head.find(b"moov") < head.find(b"mdat"))  # +faststart
    probe = stub.ProbeMedia(media_pb2.ProbeMediaRequest(key=response.video_key), timeout=30)
    kinds = {s.type: s for s in probe.streams}
    # Each AAC part is a little longer than its video (encoder priming and padding); per-stream
    # offsets keep both gap-free, so the container is as long as its longest stream.
    assert probe.container.startswith("mov") and abs(kinds["video"].duration_sec - 10 * one) <= 0.04
    assert probe.duration_sec >= kinds["video"].duration_sec - 0.001
    assert kinds["video"].width == 384 and kinds["video"].height == 576 and abs(kinds["video"].frame_rate - 25) < 0.01
    assert kinds["audio"].sample_rate == 44100


def test_a_different_resolution_forces_reencode(media):
    stub, blobs = media
    ffmpeg("-f", "lavfi", "-i", "testsrc2=s=384x576:r=25", "-f", "lavfi", "-i", "sine=f=440:sample_rate=44100", "-t", "3",
           "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", f"{blobs}/parts/a.mp4")
    ffmpeg("-f", "lavfi", "-i", "testsrc2=s=512x512:r=25", "-f", "lavfi", "-i", "sine=f=220:sample_rate=48000", "-t", "2",
           "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", f"{blobs}/parts/b.mp4")
    response = stub.StitchVideos(media_pb2.StitchVideosRequest(video_keys=["parts/a.mp4", "parts/b.mp4", "parts/a.mp4"],
                                                               output_key="out/mixed.mp4"), timeout=120)
    assert response.mode == "reencode"
    streams = ffprobe(os.path.join(blobs, response.video_key), "-show_streams")["streams"]
    video = next(s for s in streams if s["codec_type"] == "video")
    audio = next(s for s in streams if s["codec_type"] == "audio")
    assert (video["codec_name"], video["width"], video["height"]) == ("h264", 384, 576)
    assert audio["codec_name"] == "aac"
    assert abs(float(video["duration"]) - 8.0) <= 0.08
    assert abs(float(audio["duration"]) - 8.0) <= 0.1


def test_original_audio_replaces_the_parts_audio(media, parts):
    stub, blobs = media
    ffmpeg("-f", "lavfi", "-i", "sine=f=300:sample_rate=22050", "-t", "134.37", f"{blobs}/in/original.wav")
    response = stub.StitchVideos(media_pb2.StitchVideosRequest(video_keys=parts[:3], audio_key="in/original.wav", output_key="out/overlay.mp4"), timeout=120)
    assert response.mode == "copy"
    streams = ffprobe(os.path.join(blobs, response.video_key), "-show_streams")["streams"]
    audio = [s for s in streams if s["codec_type"] == "audio"]
    assert len(audio) == 1 and audio[0]["codec_name"] == "aac" and int(audio[0]["sample_rate"]) == 22050
    assert abs(float(audio[0]["duration"]) - 134.37) <= 0.05  # as long as the original


def test_encode_audio_then_stitch_copies_it_in_sync(media, parts):
    stub, blobs = media
    # A click at exactly 1.000 s: after EncodeAudio and a stitch that copies the AAC, it must still
    # be at 1.000 s (the encoder's 1024 priming samples hidden by the edit list, not played).
    ffmpeg("-f", "lavfi", "-i", "aevalsrc='if(between(t,1,1.005),0.9,0)':s=22050:d=134.37", f"{blobs}/in/click.wav")
    encoded = stub.EncodeAudio(media_pb2.EncodeAudioRequest(audio_key="in/click.wav", output_key="out/click.m4a"), timeout=120)
    assert encoded.audio_key == "out/click.m4a" and abs(encoded.duration_sec - 134.37) < 0.001
    streams = ffprobe(os.path.join(blobs, encoded.audio_key), "-show_streams")["streams"]
    assert [s["codec_name"] for s in streams] == ["aac"]
    response = stub.StitchVideos(media_pb2.StitchVideosRequest(video_keys=parts[:3], audio_key=encoded.audio_key, output_key="out/click.mp4"), timeout=120)
    assert response.mode == "copy"
    out = os.path.join(blobs, response.video_key)
    audio = [s for s in ffprobe(out, "-show_streams")["streams"] if s["codec_type"] == "audio"][0]
    assert abs(float(audio["duration"]) - 134.37) <= 0.05
    pcm = subprocess.run(["ffmpeg", "-v", "error", "-i", out, "-map", "0:a", "-f", "s16le", "-ac", "1", "-"], check=True,
                         capture_output=True).stdout
    samples = [int.from_bytes(pcm[i:i + 2], "little", signed=True) for i in range(0, 22050 * 2 * 2, 2)]
    onset = next(i for i, v in enumerate(samples) if abs(v) > 8000) / 22050
    assert abs(onset - 1.0) < 0.003, onset


def test_encode_audio_refuses_what_is_not_audio(media):
    stub, blobs = media
    with open(f"{blobs}/in/notaudio.wav", "w") as fh:
        fh.write("plain text, not audio")
    assert error_of(lambda: stub.EncodeAudio(media_pb2.EncodeAudioRequest(audio_key="in/notaudio.wav"), timeout=30))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert error_of(lambda: stub.EncodeAudio(media_pb2.EncodeAudioRequest(audio_key="in/missing.wav"), timeout=30))[0] == grpc.StatusCode.NOT_FOUND
    assert error_of(lambda: stub.EncodeAudio(media_pb2.EncodeAudioRequest(), timeout=30))[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_truncated_mp4_is_invalid_video(media, parts):
    stub, blobs = media
    with open(f"{blobs}/{parts[0]}", "rb") as fh:
        data = fh.read()
    with open(f"{blobs}/parts/truncated.mp4", "wb") as fh:
        fh.write(data[: len(data) // 2])
    code, details = error_of(lambda: stub.StitchVideos(media_pb2.StitchVideosRequest(video_keys=[parts[1], "parts/truncated.mp4"]), timeout=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("INVALID_VIDEO:")
    code, _ = error_of(lambda: stub.StitchVideos(media_pb2.StitchVideosRequest(video_keys=["parts/none.mp4"]), timeout=60))
    assert code == grpc.StatusCode.NOT_FOUND
    code, details = error_of(lambda: stub.StitchVideos(media_pb2.StitchVideosRequest(video_keys=[]), timeout=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "video_keys" in details


def test_a_full_disk_is_resource_exhausted_and_leaves_nothing(media, parts):
    _, blobs = media
    mount = tempfile.mkdtemp(prefix="talkmesh-full-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", mount], check=True)
    try:
        os.makedirs(f"{mount}/parts")
        ffmpeg("-f", "lavfi", "-i", "testsrc2=s=384x576:r=25", "-t", "4", "-c:v", "libx264", "-preset", "ultrafast",
               "-pix_fmt", "yuv420p", f"{mount}/parts/small.mp4")
        size = os.path.getsize(f"{mount}/parts/small.mp4")
        copies = int(3.5 * 1024 * 1024 / size) + 2  # the output cannot fit
        service = Service("talkmesh-media", env={"BLOB_STORE": f"file://{mount}"})
        try:
            with grpc.insecure_channel(service.address) as channel:
                stub = media_pb2_grpc.MediaServiceStub(channel)
                code, details = error_of(lambda: stub.StitchVideos(media_pb2.StitchVideosRequest(
                    video_keys=["parts/small.mp4"] * copies, output_key="out/full.mp4"), timeout=120))
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith("STORAGE_FULL:")
                assert not os.path.exists(f"{mount}/out/full.mp4")
                assert os.listdir(f"{mount}/.tmp") == []
        finally:
            assert service.stop() == 0
    finally:
        subprocess.run(["umount", mount], check=True)
        os.rmdir(mount)


def test_a_deadline_stops_a_stitch_and_the_service_keeps_serving(media, parts):
    stub, blobs = media
    code, _ = error_of(lambda: stub.StitchVideos(media_pb2.StitchVideosRequest(video_keys=parts, output_key="out/late.mp4"), timeout=0.05))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    import time
    time.sleep(1.0)  # the cancelled job stops at its next check and removes its scratch file
    assert not os.path.exists(f"{blobs}/out/late.mp4")
    assert [n for n in os.listdir(f"{blobs}/.tmp") if n.endswith(".mp4")] == []
    assert stub.ProbeMedia(media_pb2.ProbeMediaRequest(key=parts[0]), timeout=30).streams


def test_a_part_whose_frames_do_not_decode_is_invalid_video(media):
    # An intact container whose video packets are garbage, in a stitch that must re-encode (two
    # sizes): the part is refused, not silently shortened to the frames that happened to decode.
    stub, blobs = media
    os.makedirs(f"{blobs}/parts", exist_ok=True)
    ffmpeg("-f", "lavfi", "-i", "testsrc2=s=512x512:r=25", "-t", "2", "-c:v", "libx264", "-preset", "ultrafast",
           "-pix_fmt", "yuv420p", f"{blobs}/parts/garbled-src.mp4")
    ffmpeg("-f", "lavfi", "-i", "testsrc2=s=384x576:r=25", "-t", "1", "-c:v", "libx264", "-preset", "ultrafast",
           "-pix_fmt", "yuv420p", f"{blobs}/parts/garbled-ok.mp4")
    data = bytearray(open(f"{blobs}/parts/garbled-src.mp4", "rb").read())
    start = data.find(b"mdat") + 4
    size = int.from_bytes(data[start - 8:start - 4], "big") - 8
    data[start:start + size] = b"\xff" * size
    with open(f"{blobs}/parts/garbled.mp4", "wb") as fh:
        fh.write(data)
    code, details = error_of(lambda: stub.StitchVideos(media_pb2.StitchVideosRequest(
        video_keys=["parts/garbled-ok.mp4", "parts/garbled.mp4"], output_key="out/garbled.mp4"), timeout=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("INVALID_VIDEO:") and "does not decode" in details, details
    assert not os.path.exists(f"{blobs}/out/garbled.mp4")
    # The service goes on stitching.
    assert stub.StitchVideos(media_pb2.StitchVideosRequest(video_keys=["parts/garbled-ok.mp4", "parts/garbled-src.mp4"]),
                             timeout=60).mode == "reencode"
