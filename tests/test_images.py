"""Image loading and safety: every input kind, every refusal, colour-mode handling. No real network:
the resolver and the socket opener are replaced, and "remote" servers are a local http.server."""

import base64
import http.server
import io
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from vlmkit.processing import image_fetch as fetch_module
from vlmkit.processing.images import (
    ImageError, ImageLimits, describe_source, forbidden_address_reason, load_image, load_images,
)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height RGB pixels, with ~1 MB of (compressible) zero rows."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (1 << 20), 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


@pytest.fixture
def red_png() -> bytes:
    return encode(Image.new("RGB", (8, 6), (255, 0, 0)))


# ------------------------------------------------------------------------------------------ input kinds

def test_every_local_input_kind(red_png, tmp_path):
    path = tmp_path / "red.png"
    path.write_bytes(red_png)
    uri = "data:image/png;base64," + base64.b64encode(red_png).decode()
    wrapped = "data:image/png;base64," + "\n".join(base64.encodebytes(red_png).decode().split())
    urlsafe = "data:image/png;base64," + base64.urlsafe_b64encode(red_png).decode().rstrip("=")
    plain = "data:image/png," + "".join(f"%{b:02X}" for b in red_png)
    inputs = [Image.open(io.BytesIO(red_png)), str(path), path, red_png, bytearray(red_png),
              memoryview(red_png), uri, wrapped, urlsafe, plain]
    for x in inputs:
        image = load_image(x)
        assert image.mode == "RGB" and image.size == (8, 6), describe_source(x)
        assert image.getpixel((3, 3)) == (255, 0, 0)


def test_load_images_counts_and_indexes(red_png):
    assert len(load_images([red_png] * 3)) == 3
    with pytest.raises(ImageError, match="too many images: 17 > max_images=16"):
        load_images([red_png] * 17)
    with pytest.raises(ImageError) as info:
        load_images([red_png, b"junk"])
    assert info.value.index == 1 and "image 1 (bytes (4 bytes))" in str(info.value)


def test_unsupported_type():
    with pytest.raises(ImageError, match="unsupported input type int"):
        load_image(42)


# ---------------------------------------------------------------------------------------- bad payloads

@pytest.mark.parametrize("payload,reason", [
    (b"", "empty"),
    (b"definitely not an image", "not a recognised image"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not a recognised image"),  # EPS is not allowed
])
def test_bad_bytes_are_refused(payload, reason):
    with pytest.raises(ImageError, match=reason):
        load_image(payload, index=3)


def test_truncated_and_corrupt_images_are_refused():
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    png, jpeg = encode(noisy), encode(noisy, "JPEG")
    for data in (png[: len(png) // 2], jpeg[: len(jpeg) // 3]):
        with pytest.raises(ImageError, match="corrupt or truncated|cannot decode"):
            load_image(data)
    corrupt = bytearray(png)
    corrupt[60:200] = b"\xff" * 140  # garbage inside IDAT: checksum / zlib errors
    with pytest.raises(ImageError):
        load_image(bytes(corrupt))


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(empty)
    with pytest.raises(ImageError, match="no such file"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(tmp_path)


def test_local_paths_can_be_disabled(red_png, tmp_path):
    path = tmp_path / "red.png"
    path.write_bytes(red_png)
    for x in (path, str(path)):
        with pytest.raises(ImageError, match="local file paths are disabled"):
            load_image(x, limits=ImageLimits(allow_paths=False))
    assert load_image(red_png, limits=ImageLimits(allow_paths=False)).size == (8, 6)


def test_payload_size_caps(red_png, tmp_path):
    small = ImageLimits(max_bytes=len(red_png) - 1)
    path = tmp_path / "red.png"
    path.write_bytes(red_png)
    for x in (red_png, path, "data:image/png;base64," + base64.b64encode(red_png).decode()):
        with pytest.raises(ImageError, match="too large"):
            load_image(x, limits=small)


def test_decompression_bomb_refused_before_decoding(monkeypatch):
    def no_decoding(self):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    start = time.perf_counter()
    with pytest.raises(ImageError, match="too many pixels"):
        load_image(png_bomb(100_000, 100_000))  # 10 Gpx: PIL's own check fires at open
    # Our check does not rely on PIL's global: with it disabled, 50 Mpx > 40 Mpx is still refused.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ImageError, match="too many pixels: 10000x5000"):
        load_image(png_bomb(10_000, 5_000))
    assert time.perf_counter() - start < 1.0


def test_pixel_cap_applies_to_pil_inputs_too():
    with pytest.raises(ImageError, match="too many pixels"):
        load_image(Image.new("RGB", (100, 100)), limits=ImageLimits(max_pixels=9_999))


def test_error_messages_never_contain_payloads():
    payload = base64.b64encode(b"x" * 300).decode()
    with pytest.raises(ImageError) as info:
        load_image("data:image/png;base64," + payload, index=0)
    message = str(info.value)
    assert payload[:40] not in message and "data URI (image/png" in message and message.startswith("image 0")
    with pytest.raises(ImageError, match="invalid base64"):
        load_image("data:image/png;base64,@@@@")
    with pytest.raises(ImageError) as info:  # raw base64 passed as a "path"
        load_image(payload)
    assert payload[:40] not in str(info.value) and "string (400 chars)" in str(info.value)


# ----------------------------------------------------------------------------------------- colour modes

def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    loaded = load_image(encode(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert loaded.size == (20, 40)
    top, bottom = loaded.getpixel((10, 5)), loaded.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize("image,expected", [
    (Image.new("RGBA", (4, 4), (255, 0, 0, 0)), (255, 255, 255)),  # fully transparent -> white
    (Image.new("RGBA", (4, 4), (0, 0, 0, 128)), (127, 127, 127)),  # half transparent black on white
    (Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),
    (Image.new("L", (4, 4), 77), (77, 77, 77)),
    (Image.new("1", (4, 4), 1), (255, 255, 255)),
])
def test_transparency_on_white_and_gray(image, expected):
    assert load_image(encode(image)).getpixel((1, 1)) == expected


def test_palette_with_transparency_on_white():
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    loaded = load_image(encode(palette, transparency=1))
    assert loaded.getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_and_float_images_are_scaled():
    sixteen = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert sixteen.mode == "I;16"
    loaded = load_image(encode(sixteen))
    assert [loaded.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    loaded = load_image(encode(floats, "TIFF"))
    assert [loaded.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_cmyk_jpeg_becomes_rgb():
    loaded = load_image(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"))  # pure red
    r, g, b = loaded.getpixel((8, 8))
    assert loaded.mode == "RGB" and r > 240 and g < 15 and b < 15


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert load_image(data).getpixel((4, 4)) == (255, 0, 0)


# --------------------------------------------------------------------------------------------- remote

@pytest.mark.parametrize("address,allowed", [
    ("8.8.8.8", True), ("2001:4860:4860::8888", True), ("127.0.0.1", False), ("10.1.2.3", False),
    ("172.16.0.1", False), ("192.168.1.1", False), ("169.254.169.254", False), ("0.0.0.0", False),
    ("224.0.0.1", False), ("100.64.0.1", False), ("::1", False), ("fe80::1%eth0", False),
    ("fc00::1", False), ("::ffff:10.0.0.1", False), ("2002:a00:1::", False),  # 6to4 wrapping 10.0.0.1
    ("64:ff9b::a00:1", False), ("64:ff9b::808:808", True),  # NAT64 of 10.0.0.1 / 8.8.8.8
])
def test_forbidden_address_reason(address, allowed):
    assert (forbidden_address_reason(address) is None) == allowed


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args):
        raise AssertionError("tried to use the network")

    monkeypatch.setattr(fetch_module, "_resolve_host", refuse)
    monkeypatch.setattr(fetch_module, "_open_socket", refuse)


def test_remote_urls_refused_unless_enabled(no_network):
    with pytest.raises(ImageError, match="remote image URLs are disabled"):
        load_image("https://example.com/cat.png?token=secret", index=2)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/x.png", "http://10.0.0.7:8080/x.png", "http://169.254.169.254/latest/meta-data",
    "http://[::1]/x.png", "http://[::ffff:192.168.0.1]/x.png", "http://0.0.0.0/x.png",
])
def test_internal_ip_urls_refused_even_when_enabled(url, monkeypatch):
    monkeypatch.setattr(fetch_module, "_open_socket", lambda *a: pytest.fail("connected"))
    with pytest.raises(ImageError, match="refusing to fetch"):
        load_image(url, limits=ImageLimits(allow_remote=True))


def test_hostnames_resolving_to_internal_addresses_are_refused(monkeypatch):
    answers = {"intranet.test": ["10.9.8.7"], "mixed.test": ["8.8.8.8", "192.168.0.10"]}
    monkeypatch.setattr(fetch_module, "_resolve_host", lambda host, port: answers[host])
    monkeypatch.setattr(fetch_module, "_open_socket", lambda *a: pytest.fail("connected"))
    for host in answers:
        with pytest.raises(ImageError, match=f"refusing to fetch from {host}"):
            load_image(f"https://{host}/x.png", limits=ImageLimits(allow_remote=True))


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):
        status, headers, body = self.routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


PUBLIC_IP = "93.184.216.34"  # what the fake DNS answers for public.test; connections go to the local server


@pytest.fixture
def fake_internet(monkeypatch, red_png):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    port = server.server_address[1]
    _Handler.routes = {
        "/ok.png": (200, {"Content-Type": "image/png"}, red_png),
        "/relative": (302, {"Location": "/ok.png"}, b""),
        "/to-internal": (302, {"Location": "http://intranet.test/x.png"}, b""),
        "/to-loopback": (302, {"Location": f"http://127.0.0.1:{port}/ok.png"}, b""),
        "/to-file": (302, {"Location": "file:///etc/passwd"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
        "/big": (200, {}, b"x" * 5000),
        "/missing": (404, {}, b""),
    }
    dns = {"public.test": [PUBLIC_IP], "intranet.test": ["10.0.0.5"]}
    monkeypatch.setattr(fetch_module, "_resolve_host", lambda host, p: dns.get(host) or [host])

    def open_socket(ip, _port, timeout):
        assert ip == PUBLIC_IP, f"connection attempted to {ip}"
        import socket
        return socket.create_connection(("127.0.0.1", port), timeout)

    monkeypatch.setattr(fetch_module, "_open_socket", open_socket)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield dns
    server.shutdown()
    server.server_close()


REMOTE = ImageLimits(allow_remote=True, timeout_s=5)


def test_remote_fetch_and_relative_redirect(fake_internet):
    assert load_image("http://public.test/ok.png", limits=REMOTE).getpixel((0, 0)) == (255, 0, 0)
    assert load_image("http://public.test/relative", limits=REMOTE).size == (8, 6)


@pytest.mark.parametrize("path,reason", [
    ("/to-internal", "refusing to fetch from intranet.test"),
    ("/to-loopback", "refusing to fetch from 127.0.0.1"),
    ("/to-file", "only http"),
    ("/loop", "too many redirects"),
    ("/missing", "HTTP error 404"),
])
def test_redirects_are_checked_every_hop(fake_internet, path, reason):
    with pytest.raises(ImageError, match=reason):
        load_image(f"http://public.test{path}", limits=REMOTE)


def test_remote_size_cap(fake_internet):
    with pytest.raises(ImageError, match="too large"):
        load_image("http://public.test/big", limits=ImageLimits(allow_remote=True, max_bytes=1000))


def test_dns_rebinding_is_caught_at_connect_time(fake_internet, monkeypatch):
    answers = iter([[PUBLIC_IP], ["10.0.0.5"]])  # public for the check, internal for the connection
    monkeypatch.setattr(fetch_module, "_resolve_host", lambda host, port: next(answers))
    with pytest.raises(ImageError, match="private address"):
        load_image("http://public.test/ok.png", limits=REMOTE)


def test_url_descriptions_drop_query_and_credentials():
    text = describe_source("https://user:pw@example.com:8443/a/cat.png?sig=SECRET")
    assert text == "https://example.com:8443/a/cat.png"


@pytest.mark.parametrize("path", ["/slow-headers", "/slow-body"])
def test_trickling_server_is_cut_at_the_total_deadline(monkeypatch, path):
    # Every byte arrives within the socket timeout, so only a deadline over the whole fetch stops it.
    from slow_http import TricklingServer, route_public_host_to

    with TricklingServer(interval=0.25) as server:
        route_public_host_to(monkeypatch, server.port)
        start = time.monotonic()
        with pytest.raises(ImageError, match=r"timed out after 1\.5 s"):
            load_image(f"http://slow.test{path}", limits=ImageLimits(allow_remote=True, timeout_s=1.5))
        took = time.monotonic() - start
        assert 1.4 < took < 2.0, took
        deadline = time.monotonic() + 2  # the abandoned fetch's socket is shut down, so its thread ends
        while server.connections and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.connections == 0


def test_request_pixel_budget_is_checked_before_any_decoding(monkeypatch):
    small = encode(Image.new("RGB", (100, 100), "red"))
    with pytest.raises(ImageError, match=r"3 images of 30000 decoded pixels together > max_request_pixels=25000"):
        monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded before the check"))
        load_images([small] * 3, ImageLimits(max_request_pixels=25_000))
    monkeypatch.undo()
    assert len(load_images([small] * 2, ImageLimits(max_request_pixels=25_000))) == 2


def _shrink_for(family_settings_size):
    from vlmkit.processing.early_resize import shrink_hint_for
    from vlmkit.processing.image_processors import image_processor_for

    processor = image_processor_for("idefics3", {"size": {"longest_edge": family_settings_size},
                                                 "max_image_size": {"longest_edge": family_settings_size},
                                                 "do_image_splitting": False})
    return processor, shrink_hint_for(processor)


def _smooth_photo(width, height, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 50 + 1, width // 50 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def test_ordinary_images_are_decoded_exactly_even_with_a_shrink_hint():
    processor, shrink = _shrink_for(192)
    data = encode(_smooth_photo(1920, 1080), "PNG")  # 2 Mpx: under EARLY_REDUCE_MIN_PIXELS
    assert load_images([data], shrink=shrink)[0].size == (1920, 1080)
    exact = processor([load_image(data)])["pixel_values"]
    assert (processor(load_images([data], shrink=shrink))["pixel_values"] == exact).all()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_huge_images_are_decoded_small_with_nearly_the_same_pixels(fmt):
    processor, shrink = _shrink_for(192)
    photo = _smooth_photo(4800, 3000)
    data = encode(photo, fmt, **({"quality": 95} if fmt == "JPEG" else {"compress_level": 1}))
    reduced = load_images([data], shrink=shrink)[0]
    assert 576 <= reduced.width <= 1200 and reduced.mode == "RGB", reduced.size  # >= 3x the 192 px output
    exact = processor([load_image(data)])["pixel_values"]
    early = processor([reduced])["pixel_values"]
    assert early.shape == exact.shape
    assert (early - exact).abs().mean() < 0.01 and (early - exact).abs().max() < 0.1  # in [-1, 1] units


def test_early_reduce_applies_exif_orientation_and_transparency():
    processor, shrink = _shrink_for(192)
    photo = _smooth_photo(3000, 2000)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    data = encode(photo, "JPEG", exif=exif.tobytes(), quality=95)
    full, early = load_image(data), load_images([data], shrink=shrink)[0]
    assert full.size == (2000, 3000) and early.height > early.width
    assert abs(early.width / early.height - 2 / 3) < 0.01
    rgba = Image.new("RGBA", (3000, 2000), (255, 0, 0, 0))  # fully transparent red: white once flattened
    rgba.paste((0, 0, 255, 255), (0, 0, 1500, 2000))  # left half opaque blue
    early = load_images([encode(rgba)], shrink=shrink)[0]
    assert early.getpixel((10, 10)) == (0, 0, 255) and early.getpixel((early.width - 10, 10)) == (255, 255, 255)


def test_a_hanging_dns_lookup_is_abandoned_at_the_deadline(monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(fetch_module, "_resolve_host", lambda host, port: release.wait(30) and [])
    start = time.monotonic()
    try:
        with pytest.raises(ImageError, match=r"timed out after 1 s"):
            load_image("http://hanging-dns.test/x.png", limits=ImageLimits(allow_remote=True, timeout_s=1))
        assert time.monotonic() - start < 1.5
    finally:
        release.set()
