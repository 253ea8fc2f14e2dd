"""Fetch an image over http(s) without letting a request reach internal services (SSRF).

Rules: http/https only; the destination host must resolve ONLY to public unicast addresses, checked before
every hop and again at connect time against the very addresses we connect to (so DNS rebinding between
check and connect does not help); redirects are followed here, one hop at a time, each re-checked; no
proxies; the whole download has a byte cap and ONE hard deadline covering DNS, connect, TLS, headers, body and
every redirect: the work runs in its own thread, and when the deadline passes the caller gets its error at once
while the sockets the fetch opened are shut down, which wakes any read blocked on a server that trickles bytes.
"""

from __future__ import annotations

import errno
import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

__all__ = ["fetch_url", "forbidden_address_reason", "redact_url", "shorten"]


def _resolve_host(host: str, port: int) -> list[str]:
    """All addresses `host` resolves to (module-level so tests can substitute a fake resolver)."""
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


def _open_socket(ip: str, port: int, timeout) -> socket.socket:
    """Connect to an already-vetted address (module-level so tests can redirect it to a local server)."""
    return socket.create_connection((ip, port), timeout)


_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix: the low 32 bits are an IPv4 address


def forbidden_address_reason(ip_text: str) -> str | None:
    """Why an address must not be fetched from (None when it is a public unicast address)."""
    ip = ipaddress.ip_address(ip_text.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address):
        # An IPv4 address smuggled inside IPv6 reaches the same IPv4 host, so judge that one.
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            ip = embedded
    for flag in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
        if getattr(ip, "is_" + flag):
            return flag.replace("_", "-") + " address"
    if not ip.is_global:
        return "non-public address"
    return None


def _vetted_addresses(host: str, port: int, fail) -> list[str]:
    try:
        addresses = _resolve_host(host, port)
    except (OSError, UnicodeError) as e:
        raise fail(f"cannot resolve host {host!r}: {e}{NO_NETWORK}") from None
    if not addresses:
        raise fail(f"host {host!r} has no addresses")
    for ip in addresses:  # refuse if ANY address is internal: DNS may answer differently next time
        reason = forbidden_address_reason(ip)
        if reason:
            raise fail(f"refusing to fetch from {host} ({ip}): {reason}")
    return addresses


class _ForbiddenDestination(OSError):
    pass


NO_NETWORK = "; no network?"  # appended to failures that an offline machine would also give

# Connection failures that mean "the network is not there" rather than "the server said no".
_OFFLINE_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.ETIMEDOUT}


def _network_hint(error) -> str:
    if isinstance(error, (socket.gaierror, TimeoutError)) or getattr(error, "errno", None) in _OFFLINE_ERRNOS:
        return NO_NETWORK
    return ""


class _Deadline:
    """One fetch's hard deadline. Sockets opened for the fetch are registered here; `expire()` shuts them down,
    so a read blocked on a slow server returns at once instead of waiting for its next byte."""

    def __init__(self, seconds: float):
        self.seconds, self.at = seconds, time.monotonic() + seconds
        self.expired = False
        self._connections: list = []
        self._lock = threading.Lock()

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def track(self, connection) -> None:
        with self._lock:
            self._connections.append(connection)

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            connections = list(self._connections)
        for connection in connections:
            sock = connection.sock  # after TLS setup this is the SSLSocket holding the same descriptor
            if sock is not None:
                try:  # the plain-socket shutdown (not SSLSocket's) so a thread inside an SSL read is woken too
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass


def _guarded_create_connection(address, deadline: _Deadline, source_address=None):
    # Runs at connect time for every hop, and connects to the exact addresses it vetted, so a DNS
    # answer that changes between the check and the connection (rebinding) cannot slip through.
    host, port = address

    def fail(reason):
        return _ForbiddenDestination(reason)

    last_error: OSError | None = None
    for ip in _vetted_addresses(host, port, fail):
        remaining = deadline.remaining()
        if deadline.expired or remaining <= 0:
            raise TimeoutError("deadline passed before connecting")
        try:
            return _open_socket(ip, port, remaining)  # connect itself is one blocking call bounded by this
        except OSError as e:
            last_error = e
    raise last_error or OSError(f"cannot connect to {host}")


class _GuardedConnectionMixin:
    def __init__(self, *args, deadline: _Deadline, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = lambda address, timeout=None, source_address=None: _guarded_create_connection(
            address, deadline, source_address)
        deadline.track(self)


class _GuardedHTTPConnection(_GuardedConnectionMixin, http.client.HTTPConnection):
    pass


class _GuardedHTTPSConnection(_GuardedConnectionMixin, http.client.HTTPSConnection):
    pass  # TLS (SNI, cert check) still uses the hostname


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):
        return self.do_open(lambda *a, **kw: _GuardedHTTPConnection(*a, deadline=self.deadline, **kw), req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline, context):
        super().__init__(context=context)
        self.deadline = deadline

    def https_open(self, req):
        return self.do_open(lambda *a, **kw: _GuardedHTTPSConnection(*a, deadline=self.deadline, **kw), req,
                            context=self._context)


def _build_opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    # Built by hand instead of build_opener(): no proxy handler (a proxy would fetch internal URLs for us),
    # no file:/ftp:/data: handlers, and no redirect handler (redirects are followed in _fetch).
    opener = urllib.request.OpenerDirector()
    for handler in (_GuardedHTTPHandler(deadline), _GuardedHTTPSHandler(deadline, ssl.create_default_context()),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


_REDIRECT_CODES = (301, 302, 303, 307, 308)


def fetch_url(url: str, limits, fail) -> bytes:
    """Bytes at `url` under `limits` (an ImageLimits); `fail(reason)` builds the exception to raise.
    Returns or raises within `limits.timeout_s` whatever the server does (DNS lookups that hang are
    abandoned to finish in the background; nothing they return is used)."""
    deadline = _Deadline(limits.timeout_s)
    outcome: dict = {}
    done = threading.Event()

    def work():
        try:
            outcome["data"] = _fetch(url, limits, fail, deadline)
        except BaseException as e:  # handed to the caller, who decides what to raise
            outcome["error"] = e
        finally:
            done.set()

    threading.Thread(target=work, name="vlmkit-fetch", daemon=True).start()
    if not done.wait(max(0.0, deadline.remaining())):
        deadline.expire()
        raise fail(_timed_out(limits))
    if "error" in outcome:
        raise outcome["error"]
    return outcome["data"]


def _timed_out(limits) -> str:
    return (f"download timed out after {limits.timeout_s:g} s (timeout_s covers connect, headers and body); "
            "slow server or no network?")


def _fetch(url: str, limits, fail, deadline: _Deadline) -> bytes:
    opener = _build_opener(deadline)
    for hop in range(limits.max_redirects + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise fail(f"only http(s) URLs with a host can be fetched (got {shorten(redact_url(url))})")
        try:
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        except ValueError:
            raise fail("invalid port in URL") from None
        _vetted_addresses(parts.hostname, port, fail)  # early, clear refusal; re-checked at connect time
        request = urllib.request.Request(url, headers={"User-Agent": "vlmkit", "Accept": "image/*"})
        remaining = deadline.remaining()
        if remaining <= 0:
            raise fail(_timed_out(limits))
        try:
            response = opener.open(request, timeout=remaining)
        except urllib.error.HTTPError as e:
            location = e.headers.get("Location") if e.code in _REDIRECT_CODES else None
            e.close()
            if location is None:
                raise fail(f"HTTP error {e.code} from {shorten(redact_url(url))}") from None
            url = urllib.parse.urljoin(url, location)
            continue
        except urllib.error.URLError as e:
            if isinstance(e.reason, _ForbiddenDestination):
                raise fail(str(e.reason)) from None
            raise fail(f"cannot fetch URL: {e.reason}{_network_hint(e.reason)}") from None
        except (OSError, http.client.HTTPException) as e:
            raise fail(f"cannot fetch URL: {e}{_network_hint(e)}") from None
        with response:
            return _read_capped(response, deadline, limits, fail)
    raise fail(f"too many redirects (max_redirects={limits.max_redirects})")


def _read_capped(response, deadline: _Deadline, limits, fail) -> bytes:
    declared = response.headers.get("Content-Length")
    if declared and declared.strip().isdigit() and int(declared) > limits.max_bytes:
        raise fail(f"remote image too large: {declared} bytes > max_bytes={limits.max_bytes}")
    chunks, total = [], 0
    try:
        while True:
            if deadline.remaining() <= 0:
                raise fail(_timed_out(limits))
            chunk = response.read1(64 * 1024)  # what has arrived (up to 64 KiB), not "wait until 64 KiB"
            if not chunk:
                break
            total += len(chunk)
            if total > limits.max_bytes:
                raise fail(f"remote image too large: > max_bytes={limits.max_bytes}")
            chunks.append(chunk)
    except (OSError, http.client.HTTPException) as e:
        raise fail(f"download failed: {e}") from None
    return b"".join(chunks)


def shorten(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def redact_url(url: str) -> str:
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))
    except ValueError:
        return url.split("?", 1)[0]
