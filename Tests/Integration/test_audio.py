"""The Audio service through a real gRPC client: pydub as the oracle for silences, every common
format, exact reassembly, RunPod's size limit, and the error paths. Fixtures are made here
(numpy PCM, espeak-ng speech, the ffmpeg CLI for other formats)."""
import base64
import os
import shutil
import subprocess
import tempfile
import time
import wave

import grpc
import numpy as np
import pytest
from pydub import AudioSegment, silence

from conftest import Service
from tmaudio import audio_pb2, audio_pb2_grpc


@pytest.fixture(scope="module")
def blobs():
    directory = tempfile.mkdtemp(prefix="talkmesh-audio-blobs-")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


# The module's Audio service, for tests that read its /metrics.
RUNNING = {}


@pytest.fixture(scope="module")
def audio(blobs):
    service = Service("talkmesh-audio", env={"BLOB_STORE": f"file://{blobs}", "MAX_AUDIO_SEC": "900"})
    RUNNING["audio"] = service
    channel = grpc.insecure_channel(service.address)
    yield audio_pb2_grpc.AudioServiceStub(channel), blobs
    channel.close()
    RUNNING.pop("audio")
    assert service.stop() == 0


def write_wav(path, samples, rate, channels):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with wave.open(path, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.asarray(samples, dtype="<i2").tobytes())


def layout_pcm(rate, channels, layout, seed=1):
    """Tone bursts and near-silent gaps with noise, interleaved int16."""
    rng = np.random.default_rng(seed)
    parts, t0 = [], 0
    for seconds, loud in layout:
        n = int(seconds * rate)
        t = np.arange(t0, t0 + n) / rate
        signal = (8000 * np.sin(2 * np.pi * 180 * t) if loud else 0) + rng.integers(-60, 60, n)
        parts.append(signal)
        t0 += n
    mono = np.clip(np.concatenate(parts), -32768, 32767).astype(np.int16)
    return np.repeat(mono, channels) if channels > 1 else mono


def speech(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    subprocess.run(["espeak-ng", "-m", "-w", path, text], check=True)


def ffmpeg(*args):
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


def ms_ranges(response):
    return [[round(s.start_sec * 1000), round(s.end_sec * 1000)] for s in response.silences]


def read_chunk(blobs, key):
    with wave.open(os.path.join(blobs, key), "rb") as w:
        return w.getframerate(), w.getnchannels(), np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


LAYOUT = [(2.0, True), (0.8, False), (3.1, True), (0.45, False), (1.2, True), (1.5, False), (0.7, True), (0.6, False), (2.2, True)]


@pytest.mark.parametrize("rate,channels", [(16000, 1), (44100, 2), (22050, 1), (48000, 2)])
@pytest.mark.parametrize("min_silence,thresh", [(500, -40), (300, -35), (200, -50)])
def test_silences_equal_pydub_on_synthesized_pcm(audio, rate, channels, min_silence, thresh):
    stub, blobs = audio
    key = f"oracle/pcm-{rate}-{channels}.wav"
    path = os.path.join(blobs, key)
    if not os.path.exists(path):
        write_wav(path, layout_pcm(rate, channels, LAYOUT), rate, channels)
    response = stub.SplitAudio(audio_pb2.SplitAudioRequest(audio_key=key, min_silence_ms=min_silence, silence_thresh_db=thresh), timeout=60)
    expected = silence.detect_silence(AudioSegment.from_wav(path), min_silence, thresh, 1)
    assert expected, "the fixture must contain silences"
    assert ms_ranges(response) == expected


@pytest.mark.parametrize("min_silence,thresh", [(500, -40), (300, -30), (150, -45)])
def test_silences_equal_pydub_on_espeak_speech(audio, min_silence, thresh):
    stub, blobs = audio
    key = "oracle/speech.wav"
    path = os.path.join(blobs, key)
    if not os.path.exists(path):
        speech(path, '<speak>Hello there. <break time="900ms"/> This is a test of the splitter. <break time="700ms"/> '
                     'It finds the pauses between sentences. <break time="1200ms"/> And it cuts at them, exactly.</speak>')
    response = stub.SplitAudio(audio_pb2.SplitAudioRequest(audio_key=key, min_silence_ms=min_silence, silence_thresh_db=thresh), timeout=60)
    expected = silence.detect_silence(AudioSegment.from_wav(path), min_silence, thresh, 1)
    assert expected
    assert ms_ranges(response) == expected


@pytest.fixture(scope="module")
def long_speech(audio):
    """About three minutes of espeak-ng speech with pauses, 22.05 kHz mono."""
    stub, blobs = audio
    key = "long/speech.wav"
    path = os.path.join(blobs, key)
    sentences = " ".join(f"Sentence number {n} talks for a while about nothing in particular. <break time=\"{600 + (n % 5) * 150}ms\"/>"
                         for n in range(40))
    speech(path, f"<speak>{sentences}</speak>")
    return key, path


def test_long_speech_chunks_tile_the_timeline_on_the_frame_grid(audio, long_speech):
    stub, blobs = audio
    key, path = long_speech
    response = stub.SplitAudio(audio_pb2.SplitAudioRequest(audio_key=key, keep_full=True), timeout=120)
    assert response.duration_sec > 120
    assert len(response.chunks) >= 3
    assert response.sample_rate == 16000 and response.channels == 1
    position = 0.0
    for index, chunk in enumerate(response.chunks):
        assert chunk.index == index
        assert abs(chunk.start_sec - position) < 1e-9
        assert chunk.duration_sec <= 60 + 1e-9
        if index < len(response.chunks) - 1:
            frames = chunk.duration_sec * 25
            assert abs(frames - round(frames)) < 1e-6, chunk  # a whole number of 25 fps frames
            # The cut lies inside a detected silence (speech with pauses always offers one).
            cut = chunk.start_sec + chunk.duration_sec
            assert any(s.start_sec - 0.02 <= cut <= s.end_sec + 0.02 for s in response.silences), cut
        position += chunk.duration_sec
    assert abs(position - response.duration_sec) < 1e-6

    # Reassembly: the chunks laid end to end are exactly the whole input converted once.
    pieces = []
    for chunk in response.chunks:
        rate, channels, samples = read_chunk(blobs, chunk.key)
        assert (rate, channels) == (16000, 1)
        assert abs(len(samples) / rate - chunk.duration_sec) < 1e-9
        pieces.append(samples)
        # Each chunk fits RunPod's 10 MB request in base64.
        with open(os.path.join(blobs, chunk.key), "rb") as fh:
            assert len(base64.b64encode(fh.read())) < 10_000_000
    _, _, full = read_chunk(blobs, response.full_audio_key)
    assert np.array_equal(np.concatenate(pieces), full)
    # And that conversion is faithful: it matches ffmpeg's own resampling of the input closely.
    reference = subprocess.run(["ffmpeg", "-v", "error", "-i", path, "-ar", "16000", "-ac", "1", "-f", "s16le", "-"],
                               capture_output=True, check=True).stdout
    reference = np.frombuffer(reference, dtype="<i2")
    assert abs(len(reference) - len(full)) <= 32
    n = min(len(reference), len(full))
    assert np.max(np.abs(reference[:n].astype(int) - full[:n].astype(int))) <= 64


@pytest.fixture(scope="module")
def short_native(blobs):
    """Four seconds of 16 kHz mono 16-bit: three of tone, one of silence (what RunPod takes)."""
    key = "short/native.wav"
    samples = layout_pcm(16000, 1, [(3.0, True), (1.0, False)])
    write_wav(os.path.join(blobs, key), samples, 16000, 1)
    return key, samples


def test_short_audio_is_one_chunk_and_identical_samples(audio, short_native):
    stub, blobs = audio
    key, samples = short_native
    response = stub.SplitAudio(audio_pb2.SplitAudioRequest(audio_key=key), timeout=30)
    assert len(response.chunks) == 1
    _, _, chunk = read_chunk(blobs, response.chunks[0].key)
    assert np.array_equal(chunk, samples)  # already 16 kHz mono 16-bit: no change at all


@pytest.mark.parametrize("name,args", [
    ("s16.wav", ["-c:a", "pcm_s16le"]),
    ("s24.wav", ["-c:a", "pcm_s24le"]),
    ("s32.wav", ["-c:a", "pcm_s32le"]),
    ("f32.wav", ["-c:a", "pcm_f32le"]),
    ("audio.mp3", ["-c:a", "libmp3lame", "-b:a", "96k"]),
    ("audio.m4a", ["-c:a", "aac", "-b:a", "96k"]),
    ("audio.aac", ["-c:a", "aac", "-f", "adts"]),
    ("audio.ogg", ["-c:a", "libopus", "-b:a", "48k"]),
    ("audio.opus", ["-c:a", "libopus"]),
    ("audio.flac", ["-c:a", "flac"]),
    ("stereo.flac", ["-ac", "2", "-c:a", "flac"]),
    ("surround.flac", ["-af", "pan=5.1|c0=c0|c1=c0|c2=c0|c3=c0|c4=c0|c5=c0", "-c:a", "flac"]),
])
def test_every_common_format_decodes(audio, name, args):
    stub, blobs = audio
    source = os.path.join(blobs, "formats/source.wav")
    if not os.path.exists(source):
        write_wav(source, layout_pcm(44100, 1, [(2.0, True), (1.0, False), (2.0, True)]), 44100, 1)
    target = os.path.join(blobs, "formats", name)
    ffmpeg("-i", source, *args, target)
    probe = stub.ProbeAudio(audio_pb2.ProbeAudioRequest(audio_key=f"formats/{name}"), timeout=30)
    assert abs(probe.duration_sec - 5.0) < 0.1
    if name == "surround.flac":
        assert probe.channels == 6
    response = stub.SplitAudio(audio_pb2.SplitAudioRequest(audio_key=f"formats/{name}", channels=1), timeout=60)
    assert abs(response.duration_sec - 5.0) < 0.1
    assert len(response.chunks) == 1
    assert any(1.9 < s.start_sec < 2.2 and 2.8 < s.end_sec < 3.1 for s in response.silences), ms_ranges(response)
    rate, channels, samples = read_chunk(blobs, response.chunks[0].key)
    assert (rate, channels) == (16000, 1)
    assert np.abs(samples[: 16000]).max() > 3000  # the tone survived the conversion (5.1 downmixed)


def error_of(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_truncated_mp3_is_invalid_audio(audio):
    stub, blobs = audio
    source = os.path.join(blobs, "bad/long.wav")
    write_wav(source, layout_pcm(22050, 1, [(20.0, True)]), 22050, 1)
    mp3 = os.path.join(blobs, "bad/long.mp3")
    ffmpeg("-i", source, "-c:a", "libmp3lame", mp3)
    with open(mp3, "rb") as fh:
        data = fh.read()
    with open(os.path.join(blobs, "bad/truncated.mp3"), "wb") as fh:
        fh.write(data[: len(data) // 2])
    code, details = error_of(lambda: stub.SplitAudio(audio_pb2.SplitAudioRequest(audio_key="bad/truncated.mp3"), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("INVALID_AUDIO:") and "truncated" in details


def test_jpeg_named_wav_is_invalid_audio(audio):
    stub, blobs = audio
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x64", "-frames:v", "1", os.path.join(blobs, "bad/picture.jpg"))
    os.rename(os.path.join(blobs, "bad/picture.jpg"), os.path.join(blobs, "bad/picture.wav"))
    code, details = error_of(lambda: stub.SplitAudio(audio_pb2.SplitAudioRequest(audio_key="bad/picture.wav"), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("INVALID_AUDIO:")


def test_text_file_is_invalid_audio(audio):
    stub, blobs = audio
    with open(os.path.join(blobs, "bad/notes.wav"), "w") as fh:
        fh.write("this is not audio\n" * 50)
    code, details = error_of(lambda: stub.SplitAudio(audio_pb2.SplitAudioRequest(audio_key="bad/notes.wav"), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("INVALID_AUDIO:")


def test_empty_audio(audio):
    stub, blobs = audio
    write_wav(os.path.join(blobs, "bad/empty.wav"), np.zeros(0, dtype=np.int16), 16000, 1)
    code, details = error_of(lambda: stub.SplitAudio(audio_pb2.SplitAudioRequest(audio_key="bad/empty.wav"), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("EMPTY_AUDIO:")


def test_missing_key_and_bad_keys(audio):
    stub, _ = audio
    code, details = error_of(lambda: stub.SplitAudio(audio_pb2.SplitAudioRequest(audio_key="nope/missing.wav"), timeout=30))
    assert code == grpc.StatusCode.NOT_FOUND and details.startswith("NOT_FOUND:")
    code, details = error_of(lambda: stub.SplitAudio(audio_pb2.SplitAudioRequest(audio_key="../../etc/passwd"), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("INVALID_KEY:")


@pytest.mark.parametrize("field,request_args", [
    ("audio_key", {}),
    ("target_sec", {"target_sec": 2}),
    ("max_sec", {"target_sec": 45, "max_sec": 30}),
    ("min_silence_ms", {"min_silence_ms": 5}),
    ("silence_thresh_db", {"silence_thresh_db": 6}),
    ("fps", {"fps": 1000}),
    ("sample_rate", {"sample_rate": 1000}),
    ("channels", {"channels": 3}),
])
def test_invalid_parameters_name_the_field(audio, field, request_args, short_native):
    stub, _ = audio
    args = {"audio_key": "short/native.wav", **request_args} if field != "audio_key" else {}
    code, details = error_of(lambda: stub.SplitAudio(audio_pb2.SplitAudioRequest(**args), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(f"INVALID_ARGUMENT: {field}:"), details


def test_a_chunk_over_runpods_limit_is_refused_before_work(audio, short_native):
    stub, _ = audio
    code, details = error_of(lambda: stub.SplitAudio(audio_pb2.SplitAudioRequest(
        audio_key="short/native.wav", sample_rate=48000, channels=2), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("CHUNK_TOO_LARGE:")


def test_audio_over_the_limit(blobs, short_native):
    service = Service("talkmesh-audio", env={"BLOB_STORE": f"file://{blobs}", "MAX_AUDIO_SEC": "3"})
    try:
        with grpc.insecure_channel(service.address) as channel:
            stub = audio_pb2_grpc.AudioServiceStub(channel)
            code, details = error_of(lambda: stub.SplitAudio(audio_pb2.SplitAudioRequest(audio_key="short/native.wav"), timeout=30))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("AUDIO_TOO_LONG:")
    finally:
        assert service.stop() == 0


def test_deadline_stops_the_work_and_the_service_keeps_serving(audio, long_speech, short_native):
    """Seen from the server: the pool's job for the call ends by its cancellation flag (counted in
    /metrics as stopped early), not by running to its end."""
    stub, _ = audio
    service = RUNNING["audio"]
    key, _ = long_speech
    before = service.metrics("talkmesh_work_pool_")
    code, _ = error_of(lambda: stub.SplitAudio(audio_pb2.SplitAudioRequest(audio_key=key), timeout=0.02))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.time() + 20
    while service.metrics("talkmesh_work_pool_")["talkmesh_work_pool_busy"] > 0 and time.time() < deadline:
        time.sleep(0.02)
    after = service.metrics("talkmesh_work_pool_")
    assert after["talkmesh_work_pool_busy"] == 0
    # The call's job (one, unless the deadline passed before it was handed to the pool, as a slow
    # sanitizer build may see) ended early by its flag: none of it ran to its end.
    ran = after["talkmesh_work_pool_jobs_total"] - before["talkmesh_work_pool_jobs_total"]
    stopped = after["talkmesh_work_pool_jobs_stopped_total"] - before["talkmesh_work_pool_jobs_stopped_total"]
    assert ran <= 1 and stopped == ran, (ran, stopped)
    assert len(stub.SplitAudio(audio_pb2.SplitAudioRequest(audio_key="short/native.wav"), timeout=30).chunks) == 1


def test_bad_blob_store_setting_exits_two():
    result = subprocess.run([os.path.join(os.environ.get("TALKMESH_BIN", os.path.join(os.path.dirname(__file__), "../../.build/debug")), "talkmesh-audio")],
                            env={**os.environ, "BLOB_STORE": "s4://nowhere"}, capture_output=True, text=True, timeout=10)
    assert result.returncode == 2 and "BLOB_STORE" in result.stderr
