"""`pac-launch --dashboard [HOST:]PORT`: the run in a browser. The coordinator's process serves one page
(dashboard.html: its styles and script inline, nothing fetched from elsewhere, so it works offline) and the
run's snapshot as JSON at /state.json, which the page reads every second: the peers' table, the loss and
validation curves as they grow, the plan and the last log lines. 127.0.0.1 unless a host is given: the page
shows the run's metrics and peer names, so choose who can reach it."""

from __future__ import annotations

import json
import socket
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pac.errors import PacError
from pac.runtime.run_view import RunView

PAGE = Path(__file__).with_name("dashboard.html")
LOG_LINES = 200  # the page's log: the last lines


def parse_address(text: str) -> tuple[str, int]:
    """`PORT` or `HOST:PORT` (an IPv6 host in brackets: [::1]:8080); port 0 takes a free one."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or int(port) > 65535:
        raise PacError(f"--dashboard {text!r}: give a port, or HOST:PORT, like 8765 or 0.0.0.0:8765")
    return host, int(port)


class Dashboard(RunView):
    def __init__(self, address: str):
        host, port = parse_address(address)
        self.page = PAGE.read_bytes()
        self.state = b"{}"
        self.lines: deque[str] = deque(maxlen=LOG_LINES)
        self.lock = threading.Lock()
        dashboard = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/":
                    dashboard._reply(self, "text/html; charset=utf-8", dashboard.page)
                elif path == "/state.json":
                    with dashboard.lock:
                        body = dashboard.state
                    dashboard._reply(self, "application/json", body)
                else:
                    self.send_error(404, "the dashboard serves / and /state.json")

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
                pass  # a request a second would bury the run's own lines

        server_class = ThreadingHTTPServer
        if ":" in host:

            class server_class(ThreadingHTTPServer):  # noqa: N801
                address_family = socket.AF_INET6

        try:
            self.server = server_class((host, port), Handler)
        except OSError as exc:
            raise PacError(f"--dashboard {address}: cannot listen there ({exc}); pick another port") from None
        self.server.daemon_threads = True
        bound_host, bound_port = self.server.server_address[:2]
        self.url = f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}/"
        self.thread = threading.Thread(target=self.server.serve_forever, name="pac-dashboard", daemon=True)
        self.thread.start()

    @staticmethod
    def _reply(handler: BaseHTTPRequestHandler, kind: str, body: bytes) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", kind)
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Cache-Control", "no-store")
        handler.end_headers()
        handler.wfile.write(body)

    def line(self, text: str) -> None:
        with self.lock:
            self.lines.append(text)

    def update(self, snapshot: dict[str, Any]) -> None:
        with self.lock:
            self.state = json.dumps({**snapshot, "log": list(self.lines)}, default=str).encode()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
