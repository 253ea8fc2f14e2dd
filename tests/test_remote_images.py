"""http(s) image URLs given by the user of the Python API and the command line are downloaded by default, under the
same guards as a server's opt-in (public addresses only, every redirect re-checked, size and time caps); off with
`vlmkit.load(..., allow_remote_images=False)` / `--no-remote-images`. No network here: a fake resolver answers a
public address for the test hosts and the socket opener connects it to a local HTTP server (the guard refuses
loopback, so the real address never reaches it)."""

import http.server
import io
import socket
import threading
import time

import pytest

import vlmkit
from hf_fixtures import sample_images
from vlmkit import cli
from vlmkit.processing import image_fetch
from vlmkit.processing.images import ImageError

PUBLIC_IP = "93.184.216.34"
FAST = dict(max_new_tokens=3)


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}
    hits: list = []

    def do_GET(self):
        self.hits.append(self.path)
        status, headers, body = self.routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def png():
    buffer = io.BytesIO()
    sample_images()[0].save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def internet(monkeypatch, png):
    """images.test -> a public address routed to a local server; intranet.test -> a private address;
    offline.test -> DNS failure (what an offline machine answers)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    _Handler.hits = []
    _Handler.routes = {
        "/cat.png": (200, {"Content-Type": "image/png"}, png),
        "/to-intranet": (302, {"Location": "http://intranet.test/cat.png"}, b""),
    }
    dns = {"images.test": [PUBLIC_IP], "intranet.test": ["10.0.0.5"]}

    def resolve(host, port):
        if host == "offline.test":
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return dns.get(host) or [host]

    def open_socket(ip, _port, timeout):
        assert ip == PUBLIC_IP, f"connection attempted to {ip}"
        return socket.create_connection(("127.0.0.1", server.server_address[1]), timeout)

    monkeypatch.setattr(image_fetch, "_resolve_host", resolve)
    monkeypatch.setattr(image_fetch, "_open_socket", open_socket)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield _Handler
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def model_folder(hf_checkpoint_dir):
    return hf_checkpoint_dir("llava")


@pytest.fixture(scope="module")
def m(model_folder):
    return vlmkit.load(model_folder)


def test_api_fetches_a_url_by_default(internet, m):
    url = "http://images.test/cat.png"
    local = m.generate("<image> What is this?", images=[sample_images()[0]], **FAST)
    assert m.generate("<image> What is this?", images=[url], **FAST) == local
    assert m.chat([{"role": "user", "content": [{"type": "image", "url": url},
                                                {"type": "text", "text": "What is this?"}]}], **FAST)
    assert len(m.score("<image> What is this?", ["a cat", "a dog"], images=[url])) == 2
    assert m.generate_batch(["<image> a", "<image> b"], images=[[url], [url]], **FAST)
    assert internet.hits and set(internet.hits) == {"/cat.png"}


def test_allow_remote_images_false_refuses_without_connecting(internet, model_folder):
    m = vlmkit.load(model_folder, allow_remote_images=False)
    with pytest.raises(ImageError, match="remote image URLs are disabled .*allow_remote_images=False"):
        m.generate("<image> What is this?", images=["http://images.test/cat.png"], **FAST)
    assert internet.hits == []


@pytest.mark.parametrize("url, reason", [
    ("http://10.0.0.5/cat.png", "refusing to fetch from 10.0.0.5 .*private address"),
    ("http://127.0.0.1:8080/cat.png", "refusing to fetch from 127.0.0.1 .*loopback address"),
    ("http://169.254.169.254/latest/meta-data", "refusing to fetch from 169.254.169.254"),
    ("http://intranet.test/cat.png", "refusing to fetch from intranet.test \\(10.0.0.5\\)"),
    ("http://images.test/to-intranet", "refusing to fetch from intranet.test"),  # re-checked after a redirect
])
def test_api_still_refuses_internal_addresses(internet, m, url, reason):
    with pytest.raises(ImageError, match=reason):
        m.generate("<image> What is this?", images=[url], **FAST)


def test_offline_gives_a_clear_error_quickly(internet, m):
    start = time.monotonic()
    with pytest.raises(ImageError) as caught:
        m.generate("<image> What is this?", images=["https://offline.test/cat.png?token=secret"], **FAST)
    assert time.monotonic() - start < 2
    message = str(caught.value)
    assert "https://offline.test/cat.png" in message and "secret" not in message
    assert "cannot resolve host 'offline.test'" in message and message.endswith("no network?")


# ------------------------------------------------------------------------------------------------ command line

@pytest.fixture(scope="module")
def folder(model_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("remote-cli") / "llava"
    vlmkit.save(vlmkit.load(model_folder), out)
    return str(out)


def test_cli_run_fetches_a_url(internet, folder, capsys):
    code = cli.main(["run", "-m", folder, "-i", "http://images.test/cat.png", "--max-new-tokens", "3", "hi"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip() and internet.hits == ["/cat.png"]


@pytest.mark.parametrize("argv, expected", [
    (["--no-remote-images", "-i", "http://images.test/cat.png"], "is a URL and --no-remote-images is set"),
    (["-i", "https://offline.test/cat.png"],
     "could not fetch image https://offline.test/cat.png: cannot resolve host 'offline.test'"),
    (["-i", "http://10.0.0.5/cat.png"], "could not fetch image http://10.0.0.5/cat.png: refusing to fetch"),
])
def test_cli_refusals_are_one_line_before_the_model_loads(internet, folder, capsys, monkeypatch, argv, expected):
    monkeypatch.setattr(vlmkit.api, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli.main(["run", "-m", folder, *argv, "hi"]) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert out == "" and len(lines) == 1 and expected in lines[0], err
    assert internet.hits == []


def test_cli_chat_image_command_takes_a_url(internet, folder, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("/image http://images.test/cat.png\nWhat is this?\n"))
    code = cli.main(["chat", "-m", folder, "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "image attached" in err and out.strip() and internet.hits == ["/cat.png"]
