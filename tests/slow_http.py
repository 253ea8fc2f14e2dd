"""A local HTTP server that trickles its answer one byte at a time, and the monkeypatching that lets the image
fetcher reach it: the fetcher refuses loopback, so a fake resolver answers a public address for `slow.test`
and the socket opener connects that address to the local server instead. In-process only (tests)."""

from __future__ import annotations

import socket
import threading
import time

from vlmkit.processing import image_fetch

PUBLIC_IP = "93.184.216.34"  # what the fake resolver answers; connections to it go to the local server


class TricklingServer:
    """GET /slow-headers: status line and headers one byte per `interval` s; GET /slow-body: headers at once,
    then a body one byte per `interval` s. `connections` counts requests being answered right now."""

    def __init__(self, interval: float = 1.0, body_size: int = 1000):
        self.interval, self.body_size = interval, body_size
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def __enter__(self):
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.listener.close()

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket):
        with self._lock:
            self.connections += 1
        try:
            request = conn.recv(4096).decode("latin-1")
            path = request.split(" ", 2)[1] if request.count(" ") >= 2 else "/"
            head = (f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {self.body_size}\r\n"
                    "X-Padding: " + "p" * 40 + "\r\n\r\n").encode()
            body = b"\x89" * self.body_size
            if path == "/slow-headers":
                slow = head + body
            else:
                conn.sendall(head)
                slow = body
            for byte in slow:
                if self._stop.wait(self.interval):
                    return
                conn.sendall(bytes([byte]))
        except OSError:  # the client gave up (what the tests expect)
            pass
        finally:
            with self._lock:
                self.connections -= 1
            conn.close()

    def wait_for_connections(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.connections < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self.connections} of {n} fetches reached the slow server")
            time.sleep(0.02)


def route_public_host_to(monkeypatch, port: int, host: str = "slow.test") -> None:
    """Make `host` resolve to a public address and connect that address to 127.0.0.1:`port`."""
    monkeypatch.setattr(image_fetch, "_resolve_host", lambda name, p: [PUBLIC_IP] if name == host else [name])

    def open_socket(ip, _port, timeout):
        assert ip == PUBLIC_IP, f"connection attempted to {ip}"
        return socket.create_connection(("127.0.0.1", port), timeout)

    monkeypatch.setattr(image_fetch, "_open_socket", open_socket)
