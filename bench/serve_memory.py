"""Server memory under huge images (issue 19, item 6): RSS of a `vlmkit serve` process before, during (peak) and
after 1 and 2 concurrent requests, each of 16 one-colour 6000x6000 PNGs (~1.3 MB of JSON, 576 Mpx decoded).

    python bench/serve_memory.py [--model default] [--tree DIR] [--max-request-pixels N] [--side 6000]

--tree: the source checkout whose vlmkit runs the server (to compare two versions); --max-request-pixels is
passed to `vlmkit serve` only when given (older versions have no such flag). Prints a Markdown table."""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakSampler:
    def __init__(self, pid: int, every_s: float = 0.02):
        self.pid, self.every_s, self.peak, self._stop = pid, every_s, 0.0, threading.Event()

    def __enter__(self):
        self.peak = rss_mib(self.pid)
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib(self.pid))
            time.sleep(self.every_s)

    def __exit__(self, *exc):
        self._stop.set()
        self.peak = max(self.peak, rss_mib(self.pid))


def post(url: str, body: bytes) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as r:
            return r.status, r.read().decode()[:200]
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()[:200]


def request_body(model: str, side: int, n: int, text="What is in the picture?") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (40, 160, 90)).save(buffer, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    content = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": uri}}] * n
    return json.dumps({"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": content}]}).encode()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--name", default="vlmkit-default", help="the model name the server answers to")
    ap.add_argument("--tree", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap.add_argument("--max-request-pixels", type=int, default=None)
    ap.add_argument("--side", type=int, default=6000)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--label", default="")
    args = ap.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "vlmkit", "serve", "--model", args.model, "--name", args.name, "--port",
               str(port), "--no-ui", "--max-body-mb", "64"]
    if args.max_request_pixels is not None:
        command += ["--max-request-pixels", str(args.max_request_pixels)]
    env = {**os.environ, "PYTHONPATH": args.tree}
    server = subprocess.Popen(command, env=env, cwd=args.tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start")
                time.sleep(0.5)
        chat = url + "/v1/chat/completions"
        status, text = post(chat, request_body(args.name, 64, 1))  # warm-up: one small image
        assert status == 200, text
        body = request_body(args.name, args.side, args.images)
        for concurrent in (1, 2):
            time.sleep(1)
            before = rss_mib(server.pid)
            results = []
            start = time.monotonic()
            with PeakSampler(server.pid) as peak:
                threads = [threading.Thread(target=lambda: results.append(post(chat, body))) for _ in range(concurrent)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            took = time.monotonic() - start
            time.sleep(2)
            after = rss_mib(server.pid)
            statuses = ",".join(str(code) for code, _ in results)
            rows.append((concurrent, statuses, before, peak.peak, after, took, results[0][1][:90]))
    finally:
        server.terminate()
        server.wait(30)
    mb = len(body) / 2**20
    print(f"\n{args.label} {args.images} one-colour {args.side}x{args.side} PNGs per request ({mb:.1f} MB of JSON), "
          f"--max-request-pixels {args.max_request_pixels or 'default'}\n")
    print("| concurrent | status | RSS before (MiB) | peak (MiB) | after (MiB) | wall (s) | first answer |")
    print("|---|---|---|---|---|---|---|")
    for concurrent, statuses, before, peak, after, took, answer in rows:
        print(f"| {concurrent} | {statuses} | {before:.0f} | {peak:.0f} | {after:.0f} | {took:.1f} | "
              f"{answer.replace('|', '/')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
