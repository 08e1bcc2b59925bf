"""Network addresses and ports: parsing HOST:PORT, whether a port is free, whether something answers there."""

from __future__ import annotations

import errno
import ipaddress
import socket
import time

from noprop.ops.cli import LaunchError


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def format_address(host: str, port: int) -> str:
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(text: str, default_port: int, what: str = "address") -> tuple[str, int]:
    """``HOST:PORT``, ``HOST`` (default port) or ``[V6]:PORT`` -> (host, port)."""
    text = text.strip()
    if not text:
        raise LaunchError(f"{what} is empty: give HOST:PORT, e.g. 127.0.0.1:{default_port}")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if not sep or (rest and not rest.startswith(":")):
            raise LaunchError(f"{what} {text!r} is not HOST:PORT (IPv6: [ADDR]:PORT)")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:  # a bare IPv6 address
        host, port_text = text, ""
    else:
        host, port_text = text, ""
    if not host:
        raise LaunchError(f"{what} {text!r} has no host: give HOST:PORT, e.g. 127.0.0.1:{default_port}")
    port = default_port
    if port_text:
        try:
            port = int(port_text)
        except ValueError:
            raise LaunchError(f"{what} {text!r}: port {port_text!r} is not a number") from None
    check_port(port, what)
    return host, port


def check_port(port: int, what: str = "port") -> int:
    if not 1 <= port <= 65535:
        raise LaunchError(f"{what}: port {port} is out of range 1..65535")
    return port


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET


def port_free(host: str, port: int) -> bool:
    """Whether we could listen on host:port now (0.0.0.0 and :: test the wildcard). SO_REUSEADDR as the
    servers use it: connections of a previous server in TIME_WAIT do not count, a listening socket does."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), port))
        except socket.gaierror:
            raise LaunchError(f"cannot resolve host {host!r}: give an IP address or a known host name") from None
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                raise LaunchError(f"{host} is not an address of this machine: give one of its addresses, "
                                  "127.0.0.1 or 0.0.0.0") from None
            return False
    return True


def port_free_soon(host: str, port: int, wait: float = 8.0) -> bool:
    """port_free, allowing a server that is still shutting down (a killed noprop-server's SuperLink exits a few
    seconds after its launcher) up to ``wait`` s to let go of the port."""
    deadline = time.monotonic() + wait
    while not port_free(host, port):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS considers free right now (the usual small race applies)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host.strip("[]"), 0))
        return int(s.getsockname()[1])


def tcp_answers(host: str, port: int, timeout: float = 1.0) -> str | None:
    """None if something accepts a TCP connection at host:port, else the reason it does not."""
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def wait_tcp(host: str, port: int, timeout: float, interval: float = 0.5) -> str | None:
    """Try for up to ``timeout`` s; None once it answers, else the last reason."""
    deadline = time.monotonic() + timeout
    while True:
        reason = tcp_answers(host, port, timeout=min(2.0, max(timeout, 0.1)))
        if reason is None or time.monotonic() >= deadline:
            return reason
        time.sleep(interval)
