"""scalecap.images: every reference kind, every corpus file, and the guards (roots, addresses, caps).

HTTP tests run against a real http.server on 127.0.0.1; S3 tests against the real SeaweedFS.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import textwrap
import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image, ImageFile

from scalecap.errors import (
    ConfigError,
    ImageAccessDenied,
    ImageError,
    ImageFetchError,
    ImageNotFound,
    ImageTooLarge,
    NotAnImage,
)
from scalecap.images import (
    ImageLimits,
    describe_source,
    encode_data_url,
    image_ref_kind,
    load_image,
)
from scalecap.netguard import forbidden_reason
from tests.image_corpus import (
    EXPECTED_ERRORS,
    GOOD,
    PNG16_VALUES,
    huge_png_bytes,
    write_corpus,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def close(px: tuple[int, ...], want: tuple[int, ...], tol: int = 6) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(px, want, strict=True))


# ----------------------------------------------------------------------------- corpus


@pytest.mark.parametrize("name", GOOD)
def test_good_corpus_item_loads_as_rgb_within_bounds(corpus, name):
    limits = ImageLimits()
    im = load_image(corpus[name], limits=limits)
    assert im.mode == "RGB"
    assert limits.min_pixels <= im.width * im.height <= limits.max_pixels


@pytest.mark.parametrize("name", sorted(EXPECTED_ERRORS))
def test_bad_corpus_item_raises_its_typed_error_naming_the_source(corpus, name):
    with pytest.raises(EXPECTED_ERRORS[name]) as info:
        load_image(corpus[name])
    assert str(corpus[name]) in str(info.value)


def test_exif_orientation_is_applied(corpus):
    # Stored 96x48, red left / blue right, orientation 6: displayed 48x96, red on top.
    im = load_image(corpus["exif_rotated_jpeg"])
    assert im.size == (48, 96)
    assert close(im.getpixel((24, 10)), (255, 0, 0))
    assert close(im.getpixel((24, 85)), (0, 0, 255))


def test_16bit_png_is_scaled_to_8bit_not_clipped(corpus):
    arr = np.asarray(load_image(corpus["png16"]))
    want = np.rint(PNG16_VALUES / 257.0).astype(np.uint8)
    assert arr.shape == (64, 64, 3)
    assert np.array_equal(arr[..., 0], want)
    assert arr[..., 0].max() == 255 and arr[..., 0].min() == 0
    assert 100 < arr[32, 0, 0] < 160  # 32768 -> 128; clipping would read 255


def test_cmyk_jpeg_converts_to_rgb_colours(corpus):
    im = load_image(corpus["cmyk_jpeg"])
    assert close(im.getpixel((5, 30)), (0, 255, 255))  # pure cyan
    assert close(im.getpixel((58, 30)), (255, 255, 255))  # no ink


@pytest.mark.parametrize(
    ("name", "first"),
    [("gif_animated", (255, 0, 0)), ("apng_animated", (0, 0, 255)), ("webp_animated", (0, 255, 0))],
)
def test_animated_images_give_their_first_frame(corpus, name, first):
    if name not in corpus:
        pytest.skip("Pillow built without WebP")
    im = load_image(corpus[name])
    assert close(im.getpixel((32, 32)), first)


def test_alpha_and_palette_transparency_composite_on_white(corpus):
    rgba = load_image(corpus["rgba_png"])
    assert rgba.getpixel((5, 5)) == (255, 255, 255)  # fully transparent
    assert close(rgba.getpixel((60, 5)), (255, 127, 127), tol=2)  # half-transparent red
    pal = load_image(corpus["palette_png"])
    assert pal.getpixel((5, 5)) == (255, 255, 255)  # transparent index
    assert pal.getpixel((60, 5)) == (0, 0, 255)


def test_small_images_are_upscaled_and_large_ones_downscaled_keeping_aspect(corpus):
    limits = ImageLimits()
    tiny = load_image(corpus["tiny_png"], limits=limits)  # 10x10
    assert tiny.width == tiny.height and tiny.width * tiny.height >= limits.min_pixels
    big = load_image(corpus["big_jpeg"], limits=limits)  # 2400x1800 JPEG: DCT-scaled by 1/2, then resized
    assert big.width * big.height <= limits.max_pixels
    assert abs(big.width / big.height - 4 / 3) < 0.01
    small = load_image(corpus["big_jpeg"], limits=ImageLimits(min_pixels=100, max_pixels=1000))
    assert 100 <= small.width * small.height <= 1000


def test_extreme_aspect_ratio_stays_within_max_pixels():
    sliver = Image.new("RGB", (5000, 2), (1, 2, 3))
    im = load_image(sliver, limits=ImageLimits(min_pixels=10, max_pixels=1000))
    assert im.height >= 1 and im.width * im.height <= 1000


def test_pillow_globals_are_left_alone(corpus):
    before = (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS)
    for name in ("truncated_jpeg", "truncated_png", "huge_png"):
        with pytest.raises(ImageError):
            load_image(corpus[name])
    assert before == (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS)
    assert before[0] is False


# ----------------------------------------------------------------------------- pixel bomb


def test_pixel_limit_is_ours_and_checked_from_the_header():
    # 3000x3000 is under Pillow's own limits, so only our header check can refuse it.
    data = huge_png_bytes(3000, 3000)
    with pytest.raises(ImageTooLarge, match="max_decode_pixels"):
        load_image(data, limits=ImageLimits(max_decode_pixels=1_000_000))
    assert load_image(data, limits=ImageLimits(max_decode_pixels=9_000_000)).mode == "RGB"


def test_20000x20000_png_is_refused_without_allocating_its_bitmap(corpus):
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLarge):
            load_image(corpus["huge_png"], limits=ImageLimits(max_decode_pixels=10**9))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * 2**20  # the 50 KB file, not a 400-megapixel image
    # Pillow's bitmaps are not traced by tracemalloc: check the process's peak RSS as well.
    script = textwrap.dedent(
        f"""
        import resource, sys
        from scalecap.errors import ImageTooLarge
        from scalecap.images import load_image
        load_image({str(corpus["jpeg"])!r})
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            load_image({str(corpus["huge_png"])!r})
            sys.exit("loaded")
        except ImageTooLarge:
            pass
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) < 20 * 1024  # KiB; decoding it would take ~380 MiB (a byte per pixel)


# ----------------------------------------------------------------------------- local sources


def test_bytes_path_str_file_uri_and_data_uri_all_load(corpus, tmp_path):
    path = corpus["png"]
    spaced = tmp_path / "with space ü.png"
    spaced.write_bytes(path.read_bytes())
    data = path.read_bytes()
    sources = [
        data,
        bytearray(data),
        memoryview(data),
        path,
        str(path),
        "file://" + quote(str(spaced)),
        encode_data_url(Image.open(path), "PNG"),
    ]
    for source in sources:
        im = load_image(source)
        assert (im.mode, im.size) == ("RGB", (96, 64)), describe_source(source)


def test_pil_input_is_converted_without_touching_the_callers_image(corpus):
    rgba = Image.new("RGBA", (80, 60), (0, 0, 0, 0))
    im = load_image(rgba)
    assert rgba.mode == "RGBA" and im is not rgba
    assert im.getpixel((0, 0)) == (255, 255, 255)
    lazy_jpeg = Image.open(corpus["big_jpeg"])  # not loaded yet: no draft mode on it
    assert load_image(lazy_jpeg).size == load_image(corpus["big_jpeg"]).size
    assert lazy_jpeg.size == (2400, 1800)
    rgb = Image.new("RGB", (80, 60), (9, 9, 9))
    out = load_image(rgb)
    out.putpixel((0, 0), (1, 1, 1))
    assert rgb.getpixel((0, 0)) == (9, 9, 9)


def test_byte_caps_apply_to_files_bytes_and_data_uris(corpus):
    limits = ImageLimits(max_bytes=1000)
    data = corpus["png"].read_bytes()
    for source in (corpus["png"], data, encode_data_url(Image.open(corpus["png"]), "PNG")):
        with pytest.raises(ImageTooLarge, match="max_bytes"):
            load_image(source, limits=limits)


def test_malformed_sources(tmp_path):
    with pytest.raises(NotAnImage, match="base64"):
        load_image("data:image/png;base64,!!!not base64!!!")
    with pytest.raises(NotAnImage, match="regular file"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="unsupported"):
        load_image("ftp://example.com/a.jpg")
    with pytest.raises(ImageError, match="unsupported"):
        load_image(12345)


def test_allowed_roots_confine_local_paths(corpus, tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    inside = root / "sub" / "ok.png"
    inside.write_bytes(corpus["png"].read_bytes())
    outside = tmp_path / "secret.png"
    outside.write_bytes(corpus["png"].read_bytes())
    (root / "escape.png").symlink_to(outside)  # a symlink inside the root pointing out
    sibling = tmp_path / "root-evil"  # shares the root's name as a prefix
    sibling.mkdir()
    (sibling / "x.png").write_bytes(corpus["png"].read_bytes())
    link_root = tmp_path / "link-to-root"
    link_root.symlink_to(root)

    limits = ImageLimits(allowed_roots=[str(root)])
    assert load_image(inside, limits=limits).mode == "RGB"
    assert load_image("file://" + str(inside), limits=limits).mode == "RGB"
    assert load_image(link_root / "sub" / "ok.png", limits=limits).mode == "RGB"
    assert load_image(inside, limits=ImageLimits(allowed_roots=[link_root])).mode == "RGB"
    denied = [
        outside,
        root / "escape.png",
        f"{root}/sub/../../secret.png",
        "file://" + str(outside),
        sibling / "x.png",
        tmp_path / "missing-outside.png",  # refused, not "not found": no probing outside
    ]
    for source in denied:
        with pytest.raises(ImageAccessDenied) as info:
            load_image(source, limits=limits)
        assert describe_source(source) in str(info.value)
    with pytest.raises(ImageNotFound):  # inside the root, a missing file is just missing
        load_image(root / "nope.png", limits=limits)
    with pytest.raises(ImageAccessDenied, match="not allowed"):
        load_image(inside, limits=ImageLimits(allowed_roots=[]))
    with pytest.raises(ImageAccessDenied):  # one root as a plain string, not its characters
        load_image(outside, limits=ImageLimits(allowed_roots=str(root)))
    # In-memory sources never touch the file system, so roots do not apply.
    assert load_image(inside.read_bytes(), limits=ImageLimits(allowed_roots=[])).mode == "RGB"


# ----------------------------------------------------------------------------- helpers


def test_image_ref_kind():
    cases = {
        "s3://b/k.jpg": "s3",
        "HTTPS://x/y.png": "http",
        "http://x/y.png": "http",
        "data:image/png;base64,AAAA": "data",
        "file:///tmp/a.jpg": "file",
        "/tmp/a.jpg": "path",
        "relative/a.jpg": "path",
        "gs://b/k": "unsupported",
    }
    for ref, kind in cases.items():
        assert image_ref_kind(ref) == kind, ref
    assert image_ref_kind(Path("/a")) == "path"
    assert image_ref_kind(b"x") == "bytes"
    assert image_ref_kind(Image.new("RGB", (1, 1))) == "image"
    assert image_ref_kind(3) == "unsupported"


def test_describe_source_hides_credentials_queries_and_payloads():
    url = "https://user:pw@img.example.com:8443/a/b.jpg?X-Amz-Signature=secret"
    assert describe_source(url) == "https://img.example.com:8443/a/b.jpg?…"
    data = "data:image/png;base64," + "A" * 10_000
    assert len(describe_source(data)) < 100 and "10022 chars" in describe_source(data)
    assert describe_source(b"abc") == "<3 bytes>"
    assert describe_source(Image.new("L", (3, 2))) == "<PIL image L 3x2>"
    assert describe_source("s3://bucket/key.jpg") == "s3://bucket/key.jpg"


def test_encode_data_url_round_trips():
    rgba = Image.new("RGBA", (70, 50), (10, 200, 30, 255))
    url = encode_data_url(rgba)
    assert url.startswith("data:image/jpeg;base64,")
    assert close(load_image(url).getpixel((35, 25)), (10, 200, 30))
    assert encode_data_url(rgba, "png").startswith("data:image/png;base64,")


def test_limits_are_validated():
    with pytest.raises(ConfigError):
        ImageLimits(min_pixels=2000, max_pixels=1000)
    with pytest.raises(ConfigError):
        ImageLimits(allowed_networks=["not-a-network"])


@pytest.mark.parametrize(
    ("addr", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "not globally routable"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("::ffff:10.0.0.1", "private"),
        ("2002:0a00:0001::", "6to4 of private"),
        ("64:ff9b::7f00:1", "loopback"),
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_address_policy(addr, reason):
    assert forbidden_reason(ipaddress.ip_address(addr)) == reason


def test_threads_load_concurrently(corpus):
    names = [n for n in GOOD for _ in range(3)]
    with ThreadPoolExecutor(8) as pool:
        images = list(pool.map(lambda n: load_image(corpus[n]), names))
    assert all(im.mode == "RGB" for im in images)


# ----------------------------------------------------------------------------- http(s)


class _Handler(BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[int, dict[str, str], bytes]]] = {}
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        status, headers, body = self.routes.get(self.path.split("?")[0], (404, {}, b"no"))
        try:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            if "Content-Length" not in headers and "X-No-Length" not in headers:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading at its byte cap

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_base(corpus):
    jpeg = corpus["jpeg"].read_bytes()
    big = os.urandom(200_000)
    _Handler.routes = {
        "/good.jpg": (200, {"Content-Type": "image/jpeg"}, jpeg),
        "/page.html": (200, {"Content-Type": "text/html"}, b"<html><body>hi</body></html>"),
        "/forbidden.jpg": (403, {}, b"no"),
        "/error.jpg": (500, {}, b"boom"),
        "/big-declared.jpg": (200, {"Content-Type": "image/jpeg"}, big),
        "/big-streamed.jpg": (200, {"X-No-Length": "1"}, big),
        "/redirect-good": (302, {"Location": "/good.jpg"}, b""),
        "/redirect-loop": (302, {"Location": "/redirect-loop"}, b""),
        "/redirect-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
        "/redirect-private": (302, {"Location": "http://10.0.0.1/a.jpg"}, b""),
        "/redirect-file": (302, {"Location": "file:///etc/passwd"}, b""),
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


OPEN = ImageLimits(allow_private_urls=True, http_timeout=10, fetch_backoff=0.01)


def test_http_loads_when_private_urls_are_allowed(http_base):
    im = load_image(f"{http_base}/good.jpg", limits=OPEN)
    assert (im.mode, im.size) == ("RGB", (128, 96))
    assert load_image(f"{http_base}/redirect-good", limits=OPEN).size == (128, 96)


@pytest.mark.parametrize(
    "host", ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "0.0.0.0:{port}",
             "[::ffff:127.0.0.1]:{port}"],
)  # fmt: skip
def test_private_addresses_are_refused_by_default_before_connecting(http_base, host):
    port = http_base.rsplit(":", 1)[1]
    url = f"http://{host.format(port=port)}/good.jpg?token=secret"
    _Handler.hits.clear()
    with pytest.raises(ImageAccessDenied, match="allow_private_urls") as info:
        load_image(url)
    assert describe_source(url) in str(info.value) and "secret" not in str(info.value)
    assert _Handler.hits == []  # refused before any request reached the server


def test_http_status_errors_are_typed(http_base):
    with pytest.raises(ImageNotFound, match="404") as info:
        load_image(f"{http_base}/missing.jpg?sig=secret", limits=OPEN)
    assert f"{http_base}/missing.jpg?…" in str(info.value) and "secret" not in str(info.value)
    with pytest.raises(ImageAccessDenied, match="403") as info:
        load_image(f"{http_base}/forbidden.jpg", limits=OPEN)
    assert str(info.value) == f"{http_base}/forbidden.jpg: HTTP 403 Forbidden"
    with pytest.raises(ImageFetchError, match=r"HTTP 500.*gave up after 4 attempt"):
        load_image(f"{http_base}/error.jpg", limits=OPEN)
    with pytest.raises(NotAnImage, match="text/html"):
        load_image(f"{http_base}/page.html", limits=OPEN)


def test_http_body_over_cap_is_refused(http_base):
    limits = ImageLimits(allow_private_urls=True, max_bytes=50_000)
    with pytest.raises(ImageTooLarge, match="Content-Length"):
        load_image(f"{http_base}/big-declared.jpg", limits=limits)
    with pytest.raises(ImageTooLarge, match="body is over"):
        load_image(f"{http_base}/big-streamed.jpg", limits=limits)


def test_redirects_are_checked_hop_by_hop(http_base):
    # 127.0.0.0/8 is exempted (like an internal image store); everything else private stays shut.
    limits = ImageLimits(allowed_networks=["127.0.0.0/8"], http_timeout=10)
    assert load_image(f"{http_base}/redirect-good", limits=limits).size == (128, 96)
    with pytest.raises(ImageAccessDenied, match=r"169\.254\.169\.254.*cloud metadata"):
        load_image(f"{http_base}/redirect-metadata", limits=limits)
    with pytest.raises(ImageAccessDenied, match=r"10\.0\.0\.1.*private"):
        load_image(f"{http_base}/redirect-private", limits=limits)
    with pytest.raises(ImageAccessDenied, match="http"):
        load_image(f"{http_base}/redirect-file", limits=OPEN)
    with pytest.raises(ImageError, match="redirects"):
        load_image(f"{http_base}/redirect-loop", limits=OPEN)


def test_unreachable_host_is_an_image_error():
    with pytest.raises(ImageFetchError, match=r"fetch failed.*gave up after 1 attempt"):
        load_image("http://127.0.0.1:9/a.jpg", limits=ImageLimits(allow_private_urls=True, fetch_retries=0))


# ----------------------------------------------------------------------------- s3 (SeaweedFS)


@pytest.mark.services
def test_s3_objects_load_and_fail_with_typed_errors(s3_server, s3_bucket, corpus, monkeypatch):
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="dir/a.jpg", Body=corpus["jpeg"].read_bytes())
    client.put_object(Bucket=s3_bucket, Key="text.jpg", Body=corpus["text_as_jpg"].read_bytes())
    limits = ImageLimits(s3_client_factory=s3_server.client)
    assert load_image(f"s3://{s3_bucket}/dir/a.jpg", limits=limits).size == (128, 96)
    with pytest.raises(ImageNotFound, match=f"s3://{s3_bucket}/nope.jpg"):
        load_image(f"s3://{s3_bucket}/nope.jpg", limits=limits)
    with pytest.raises(ImageNotFound):
        load_image("s3://no-such-bucket-scalecap/a.jpg", limits=limits)
    with pytest.raises(NotAnImage):
        load_image(f"s3://{s3_bucket}/text.jpg", limits=limits)
    with pytest.raises(ImageTooLarge):
        load_image(f"s3://{s3_bucket}/dir/a.jpg", limits=ImageLimits(
            max_bytes=1000, s3_client_factory=s3_server.client))  # fmt: skip

    def bad_keys():
        import boto3

        return boto3.client(
            "s3", endpoint_url=s3_server.endpoint_url, aws_access_key_id="wrong",
            aws_secret_access_key="wrong", region_name=s3_server.region,
        )  # fmt: skip

    with pytest.raises(ImageAccessDenied):
        load_image(f"s3://{s3_bucket}/dir/a.jpg", limits=ImageLimits(s3_client_factory=bad_keys))
    # Default client: built from the SCALECAP_S3_* settings.
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    assert load_image(f"s3://{s3_bucket}/dir/a.jpg").size == (128, 96)
