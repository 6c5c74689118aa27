"""The Media service through a real gRPC client. Fixtures are made by the test (lavfi testsrc2
and sine, a hand-written PNG with alpha, a JPEG given an EXIF orientation tag); results are
checked with ffprobe and by decoding pixels."""
import json
import os
import shutil
import struct
import subprocess
import tempfile
import zlib

import grpc
import numpy as np
import pytest

from conftest import Service
from tmmedia import media_pb2, media_pb2_grpc


def ffmpeg(*args):
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


def ffprobe(path, *args):
    out = subprocess.run(["ffprobe", "-v", "error", "-of", "json", *args, path], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def pixels(path):
    """Decodes an image to an RGB array with the ffmpeg CLI."""
    info = ffprobe(path, "-show_streams")["streams"][0]
    w, h = info["width"], info["height"]
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", path, "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, dtype=np.uint8).reshape(h, w, 3)


def write_png_rgba(path, rgba):
    h, w, _ = rgba.shape
    raw = b"".join(b"\x00" + rgba[y].tobytes() for y in range(h))
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0))
                 + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def with_exif_orientation(jpeg, orientation):
    """Inserts an APP1 Exif segment (big-endian TIFF, IFD0 with one Orientation entry) after SOI."""
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + b"\x00\x00\x00\x00"
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


@pytest.fixture(scope="module")
def media():
    blobs = tempfile.mkdtemp(prefix="talkmesh-media-blobs-")
    os.makedirs(f"{blobs}/in")
    service = Service("talkmesh-media", env={"BLOB_STORE": f"file://{blobs}"})
    channel = grpc.insecure_channel(service.address)
    yield media_pb2_grpc.MediaServiceStub(channel), blobs
    channel.close()
    assert service.stop() == 0
    shutil.rmtree(blobs, ignore_errors=True)


def error_of(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


# ---------------------------------------------------------------- ResizeImage

@pytest.mark.parametrize("name,size", [("portrait", (1080, 1920)), ("landscape", (1920, 1080)), ("square", (800, 800))])
@pytest.mark.parametrize("target", [(384, 576), (512, 512), (1280, 720), (64, 64), (4096, 64), (64, 4096)])  # the edges of 64–4096 too
def test_resize_pads_centred_content(media, name, size, target):
    stub, blobs = media
    source = f"{blobs}/in/{name}.png"
    if not os.path.exists(source):
        ffmpeg("-f", "lavfi", "-i", f"color=c=0xC08040:s={size[0]}x{size[1]}", "-frames:v", "1", source)
    response = stub.ResizeImage(media_pb2.ResizeImageRequest(image_key=f"in/{name}.png", width=target[0], height=target[1]), timeout=30)
    assert (response.width, response.height, response.source_width, response.source_height) == (*target, *size)
    image = pixels(os.path.join(blobs, response.image_key))
    assert image.shape == (target[1], target[0], 3)
    scale = min(target[0] / size[0], target[1] / size[1])
    content_w, content_h = round(size[0] * scale), round(size[1] * scale)
    left, top = (target[0] - content_w) // 2, (target[1] - content_h) // 2
    # Padding is black; the content (a flat colour) fills exactly the centred rectangle.
    if left > 1:
        assert image[:, : left - 1].max() == 0 and image[:, left + content_w + 1:].max() == 0
    if top > 1:
        assert image[: top - 1].max() == 0 and image[top + content_h + 1:].max() == 0
    centre = image[top + 2: top + content_h - 2, left + 2: left + content_w - 2].reshape(-1, 3)
    assert np.abs(centre.astype(int) - [0xC0, 0x80, 0x40]).max() <= 3


def psnr(a, b):
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


@pytest.mark.parametrize("source,fmt,out", [("testsrc2", "png", "png"), ("photo", "jpeg", "png"), ("photo", "png", "png"),
                                            ("photo", "jpeg", "jpeg"), ("testsrc2", "png", "jpeg")])
def test_resize_matches_the_ffmpeg_cli_lanczos(media, source, fmt, out):
    """The fast paths (one decode, DCT-domain JPEG reduction, 2×2 halving before Lanczos, two
    bands on two threads, JPEG output scaled and padded in 4:2:0) stay close to ffmpeg's own
    one-pass Lanczos scale of the full picture."""
    stub, blobs = media
    generator = {"testsrc2": "testsrc2=s=1080x1920",
                 "photo": "mandelbrot=s=1080x1920,noise=alls=14:allf=t+u,gblur=sigma=0.8"}[source]
    key = f"in/quality-{source}.{fmt}"
    quality = ["-pix_fmt", "yuvj420p", "-q:v", "3"] if fmt == "jpeg" else []
    ffmpeg("-f", "lavfi", "-i", generator, "-frames:v", "1", *quality, os.path.join(blobs, key))
    response = stub.ResizeImage(media_pb2.ResizeImageRequest(image_key=key, width=384, height=576, format=out, jpeg_quality=95,
                                                             output_key=f"out/quality-{source}-{fmt}.{out}"), timeout=30)
    assert (response.source_width, response.source_height) == (1080, 1920)  # the full size, though a JPEG decodes at half
    reference = os.path.join(blobs, f"out/reference-{source}-{fmt}.png")
    ffmpeg("-i", os.path.join(blobs, key), "-vf", "scale=384:576:force_original_aspect_ratio=decrease:flags=lanczos+accurate_rnd+full_chroma_int,"
           "pad=384:576:(ow-iw)/2:(oh-ih)/2", "-pix_fmt", "rgb24", reference)
    ours = pixels(os.path.join(blobs, response.image_key))
    assert ours.shape == (576, 384, 3)
    # The picture, and the black padding around it. A 4:2:0 JPEG of the grainy photo is 28.8 dB even
    # from the CLI itself (its -q:v 2 output against its PNG), so JPEG output is held to 27.
    assert psnr(ours[:, 30:354], pixels(reference)[:, 30:354]) >= (36 if out == "png" else 27)
    pad = (ours[:, :28], ours[:, 356:]) if out == "png" else (ours[:, :16], ours[:, 368:])  # JPEG: 16×16 macroblocks with no picture
    assert max(p.max() for p in pad) <= (0 if out == "png" else 4)


def test_png_output_stays_within_ten_percent_of_libavcodecs_default(media):
    """The fast encoder settings (up filter, zlib level 2) cost at most 10 % in size against
    libavcodec's PNG defaults on the same pixels."""
    stub, blobs = media
    ffmpeg("-f", "lavfi", "-i", "testsrc2=s=1080x1920", "-frames:v", "1", os.path.join(blobs, "in/size.png"))
    response = stub.ResizeImage(media_pb2.ResizeImageRequest(image_key="in/size.png", width=384, height=576, output_key="out/size.png"), timeout=30)
    ours = os.path.join(blobs, response.image_key)
    default = os.path.join(blobs, "out/size-default.png")
    ffmpeg("-i", ours, default)  # the same pixels, libavcodec's default PNG encoder settings
    assert np.array_equal(pixels(ours), pixels(default))
    assert os.path.getsize(ours) <= 1.10 * os.path.getsize(default)


@pytest.mark.parametrize("size", [(1080, 1920), (1920, 1080)])
def test_resize_crop_fills_the_frame_from_the_centre(media, size):
    """The source's long axis has a red band at its start and a blue one at its end, each 10 % of
    it; scaling the short side to 512 and cropping the centre removes about 22 % at each end, so a
    centred crop shows neither band and green everywhere, and one that drifts by an eighth of the
    frame would show one of them."""
    stub, blobs = media
    w, h = size
    rgba = np.zeros((h, w, 4), dtype=np.uint8)
    rgba[..., 1], rgba[..., 3] = 200, 255
    band = max(w, h) // 10
    if h > w:
        rgba[:band, :, :3], rgba[-band:, :, :3] = (220, 0, 0), (0, 0, 220)
    else:
        rgba[:, :band, :3], rgba[:, -band:, :3] = (220, 0, 0), (0, 0, 220)
    write_png_rgba(f"{blobs}/in/crop-{w}x{h}.png", rgba)
    response = stub.ResizeImage(media_pb2.ResizeImageRequest(image_key=f"in/crop-{w}x{h}.png", width=512, height=512, fit="crop"),
                                timeout=30)
    image = pixels(os.path.join(blobs, response.image_key)).astype(int)
    assert image.shape == (512, 512, 3)
    # Green to every edge: no padding, and neither end's band.
    for edge in (image[:2], image[-2:], image[:, :2], image[:, -2:]):
        assert edge[..., 1].min() > 170 and edge[..., 0].max() < 40 and edge[..., 2].max() < 40


def test_exif_orientation_is_honoured(media):
    stub, blobs = media
    # 400×200 landscape, blue with a red square in the top-left corner.
    rgba = np.zeros((200, 400, 4), dtype=np.uint8)
    rgba[..., 2] = 255
    rgba[..., 3] = 255
    rgba[:60, :60] = [255, 0, 0, 255]
    write_png_rgba(f"{blobs}/in/marker.png", rgba)
    ffmpeg("-i", f"{blobs}/in/marker.png", "-q:v", "2", f"{blobs}/in/marker.jpg")
    with open(f"{blobs}/in/marker.jpg", "rb") as fh:
        jpeg = fh.read()
    with open(f"{blobs}/in/rotated.jpg", "wb") as fh:
        fh.write(with_exif_orientation(jpeg, 6))  # stored sideways: shown rotated 90° clockwise
    response = stub.ResizeImage(media_pb2.ResizeImageRequest(image_key="in/rotated.jpg", width=200, height=400), timeout=30)
    assert (response.source_width, response.source_height) == (200, 400)
    image = pixels(os.path.join(blobs, response.image_key)).astype(int)
    assert image[10, 190, 0] > 200 and image[10, 190, 2] < 60   # the marker is now top-right
    assert image[10, 10, 2] > 200 and image[10, 10, 0] < 60     # top-left is blue


def test_alpha_is_composited_on_the_background(media):
    stub, blobs = media
    rgba = np.zeros((200, 200, 4), dtype=np.uint8)
    rgba[:, :100] = [0, 200, 0, 255]      # opaque green left half
    rgba[:, 100:] = [0, 0, 255, 0]        # fully transparent right half
    write_png_rgba(f"{blobs}/in/alpha.png", rgba)
    response = stub.ResizeImage(media_pb2.ResizeImageRequest(image_key="in/alpha.png", width=200, height=200, background="#FF0000"), timeout=30)
    image = pixels(os.path.join(blobs, response.image_key)).astype(int)
    assert np.abs(image[100, 40] - [0, 200, 0]).max() <= 3
    assert np.abs(image[100, 160] - [255, 0, 0]).max() <= 3


def test_jpeg_output_and_quality(media):
    stub, blobs = media
    ffmpeg("-f", "lavfi", "-i", "testsrc2=s=1080x1920", "-frames:v", "1", f"{blobs}/in/q.png")
    sizes = []
    for quality in (30, 95):
        response = stub.ResizeImage(media_pb2.ResizeImageRequest(image_key="in/q.png", width=512, height=512, format="jpeg",
                                                                jpeg_quality=quality, output_key=f"out/q{quality}.jpg"), timeout=30)
        assert response.format == "jpeg"
        info = ffprobe(os.path.join(blobs, response.image_key), "-show_streams")["streams"][0]
        assert info["codec_name"] == "mjpeg" and (info["width"], info["height"]) == (512, 512)
        sizes.append(os.path.getsize(os.path.join(blobs, response.image_key)))
    assert sizes[0] < sizes[1]


@pytest.mark.parametrize("args,field", [({"width": 63, "height": 64}, "width"), ({"width": 4098, "height": 64}, "width"),
                                        ({"width": 385, "height": 576}, "width"), ({"width": 384, "height": 577}, "height"),
                                        ({"width": 384, "height": 576, "fit": "stretch"}, "fit"),
                                        ({"width": 384, "height": 576, "format": "gif"}, "format"),
                                        ({"width": 384, "height": 576, "background": "red"}, "background")])
def test_invalid_resize_parameters(media, args, field):
    stub, _ = media
    code, details = error_of(lambda: stub.ResizeImage(media_pb2.ResizeImageRequest(image_key="in/portrait.png", **args), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(f"INVALID_ARGUMENT: {field}:")


def test_text_file_named_png_is_invalid_image(media):
    stub, blobs = media
    with open(f"{blobs}/in/fake.png", "w") as fh:
        fh.write("not a picture at all\n" * 100)
    code, details = error_of(lambda: stub.ResizeImage(media_pb2.ResizeImageRequest(image_key="in/fake.png", width=384, height=576), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("INVALID_IMAGE:")


def test_missing_image_is_not_found(media):
    stub, _ = media
    code, details = error_of(lambda: stub.ResizeImage(media_pb2.ResizeImageRequest(image_key="in/none.png", width=384, height=576), timeout=30))
    assert code == grpc.StatusCode.NOT_FOUND


def test_image_over_the_pixel_limit_is_refused_before_decoding(media):
    _, blobs = media
    ffmpeg("-f", "lavfi", "-i", "testsrc2=s=1080x1920", "-frames:v", "1", f"{blobs}/in/limit.png")
    service = Service("talkmesh-media", env={"BLOB_STORE": f"file://{blobs}", "MAX_IMAGE_PIXELS": "1000000"})
    try:
        with grpc.insecure_channel(service.address) as channel:
            stub = media_pb2_grpc.MediaServiceStub(channel)
            code, details = error_of(lambda: stub.ResizeImage(media_pb2.ResizeImageRequest(image_key="in/limit.png", width=384, height=576), timeout=30))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("IMAGE_TOO_LARGE:")
    finally:
        assert service.stop() == 0


@pytest.mark.parametrize("ext,args", [("png", []), ("jpg", ["-q:v", "3"]), ("webp", ["-c:v", "libwebp", "-lossless", "0"]),
                                      ("lossless.webp", ["-c:v", "libwebp", "-lossless", "1"]), ("bmp", []), ("gif", [])])
def test_every_accepted_format_resizes_and_reports_its_source_size(media, ext, args):
    """The header reader and the decoder agree on each format's size: PNG, JPEG, WebP (VP8, VP8L), BMP, GIF."""
    stub, blobs = media
    ffmpeg("-f", "lavfi", "-i", "testsrc2=s=300x200", "-frames:v", "1", *args, f"{blobs}/in/format.{ext}")
    response = stub.ResizeImage(media_pb2.ResizeImageRequest(image_key=f"in/format.{ext}", width=128, height=128,
                                                            output_key=f"out/format-{ext}.png"), timeout=30)
    assert (response.source_width, response.source_height) == (300, 200)
    assert ffprobe(f"{blobs}/out/format-{ext}.png", "-show_streams")["streams"][0]["width"] == 128


def test_an_image_format_outside_the_list_is_invalid_image(media):
    stub, blobs = media
    ffmpeg("-f", "lavfi", "-i", "testsrc2=s=300x200", "-frames:v", "1", f"{blobs}/in/format.tiff")
    code, details = error_of(lambda: stub.ResizeImage(media_pb2.ResizeImageRequest(image_key="in/format.tiff", width=128, height=128), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("INVALID_IMAGE:")


def test_a_failed_call_is_logged_once_with_its_cause_and_the_caller_gets_no_path():
    blobs = tempfile.mkdtemp(prefix="talkmesh-media-log-")
    service = Service("talkmesh-media", env={"BLOB_STORE": f"file://{blobs}"})
    try:
        os.makedirs(f"{blobs}/in")
        ffmpeg("-f", "lavfi", "-i", "testsrc2=s=640x480", "-frames:v", "1", f"{blobs}/in/a.png")
        with open(f"{blobs}/in/taken", "w") as fh:
            fh.write("a file where the output key needs a directory")
        trace = "4bf92f3577b34da6a3ce929d0e0e4736"
        with grpc.insecure_channel(service.address) as channel:
            stub = media_pb2_grpc.MediaServiceStub(channel)
            code, details = error_of(lambda: stub.ResizeImage(
                media_pb2.ResizeImageRequest(image_key="in/a.png", width=384, height=576, output_key="in/taken/out.png"),
                timeout=30, metadata=[("traceparent", f"00-{trace}-00f067aa0ba902b7-01")]))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("INVALID_KEY:"), details
            assert blobs not in details and "Not a directory" not in details
            # A cause that is about the caller's own input is theirs to see.
            with open(f"{blobs}/in/fake.png", "w") as fh:
                fh.write("not a picture at all\n" * 100)
            code, details = error_of(lambda: stub.ResizeImage(media_pb2.ResizeImageRequest(image_key="in/fake.png", width=384, height=576), timeout=30))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("INVALID_IMAGE:")
        lines = [json.loads(line) for line in service.read_log().splitlines() if line.startswith("{")]
        failed = [line for line in lines if line.get("msg") == "call failed"]
        assert len(failed) == 2, failed
        first = failed[0]
        assert first["method"] == "/talkmesh.v1.MediaService/ResizeImage" and first["grpc_status"] == "INVALID_ARGUMENT"
        assert first["trace_id"] == trace and first["level"] == "info"
        assert f"{blobs}/in/taken" in first["error"] and "Not a directory" in first["error"]
        assert "trace_id" not in failed[1] or failed[1]["trace_id"] != trace
    finally:
        assert service.stop() == 0
        shutil.rmtree(blobs, ignore_errors=True)


@pytest.mark.parametrize("workers,calls", [(1, 4), (3, 6)])
def test_workers_bounds_the_work_running_at_once(workers, calls):
    """WORKERS threads decode and encode; calls beyond them wait. Seen from the server: the most
    jobs that ever ran at once on its pool (/metrics) is at most WORKERS, and with one worker the
    others were seen waiting."""
    import concurrent.futures
    blobs = tempfile.mkdtemp(prefix="talkmesh-media-workers-")
    os.makedirs(f"{blobs}/in")
    ffmpeg("-f", "lavfi", "-i", "testsrc2=s=3000x3000", "-frames:v", "1", f"{blobs}/in/big.png")
    service = Service("talkmesh-media", env={"BLOB_STORE": f"file://{blobs}", "WORKERS": str(workers)})
    try:
        channel = grpc.insecure_channel(service.address)
        stub = media_pb2_grpc.MediaServiceStub(channel)
        request = media_pb2.ResizeImageRequest(image_key="in/big.png", width=1280, height=720)
        with concurrent.futures.ThreadPoolExecutor(calls) as pool:
            results = list(pool.map(lambda _: stub.ResizeImage(request, timeout=120), range(calls)))
        assert all((r.width, r.height) == (1280, 720) for r in results)
        seen = service.metrics("talkmesh_work_pool_")
        assert seen["talkmesh_work_pool_threads"] == workers
        assert seen["talkmesh_work_pool_jobs_total"] == calls
        assert 1 <= seen["talkmesh_work_pool_busy_max"] <= workers
        assert seen["talkmesh_work_pool_busy"] == 0 and seen["talkmesh_work_pool_queued"] == 0
        if workers == 1:
            assert seen["talkmesh_work_pool_queued_max"] >= 1
        channel.close()
    finally:
        assert service.stop() == 0
        shutil.rmtree(blobs, ignore_errors=True)
