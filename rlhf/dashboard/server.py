"""A small local web server over a runs root: stdlib http.server, one thread per request.

Every request reads the run files afresh (runs may still be training) and keeps no state
between requests, so the threaded server needs no locks; the only shared value is the
plotly.js bundle, cached once by :func:`rlhf.dashboard.render.plotly_js`.

Requests whose ``Host`` header names anything but this machine (``localhost``,
``127.0.0.1``, ``[::1]``, the address the server is bound to, or a name given with
``--allow-host``) get 403: a web page on another site that rebinds its DNS name to
127.0.0.1 can then not read run data through the visitor's browser (DNS rebinding).

Endpoints:
    ``/``                      run list with checkboxes to overlay runs
    ``/run/<key>``             one run: stages, curves, samples, lineage
    ``/compare?runs=a,b``      curves of several runs overlaid (``runs=a&runs=b`` works too)
    ``/api/runs``              run list as JSON
    ``/api/run/<key>``         one run as JSON
    ``/static/plotly.min.js``  plotly.js from the installed plotly package
"""

from __future__ import annotations

import json
import logging
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import parse_qs, unquote, urlsplit

from rlhf.dashboard import render
from rlhf.dashboard.data import find_run, list_runs, load_run

__all__ = ["DashboardServer", "make_server"]

logger = logging.getLogger(__name__)


LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def _host_name(header: str) -> str:
    """The host part of a Host header, lower-case, without port or IPv6 brackets."""
    header = header.strip().lower()
    if header.startswith("["):  # [::1]:8765
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class DashboardServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its runs root and the host names it answers to.

    Args:
        address: (host, port) to bind.
        runs_root: Folder whose subfolders are pipeline runs.
        allowed_hosts: Extra host names (or addresses) accepted in the Host header, e.g. the
            machine's name when serving on 0.0.0.0 for a colleague; "*" accepts any (and with
            it DNS rebinding).
    """

    daemon_threads = True  # a hung browser connection must not keep the process alive on exit

    def __init__(self, address: tuple[str, int], runs_root: Path, allowed_hosts: Sequence[str] = ()) -> None:
        self.runs_root = Path(runs_root)
        super().__init__(address, _Handler)
        bound = str(self.server_address[0]).lower()
        self.allowed_hosts = {*LOCAL_HOSTS, bound, *(_host_name(h) for h in allowed_hosts)}

    def host_allowed(self, header: str | None) -> bool:
        """Whether a request's Host header names this server (see the module docstring)."""
        if "*" in self.allowed_hosts:
            return True
        return bool(header) and _host_name(header) in self.allowed_hosts

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class _Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    server_version = "rlhf-dashboard"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        logger.info("%s - %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str, *, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=86400" if cache else "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _html(self, text: str, status: int = HTTPStatus.OK) -> None:
        self._send(status, text.encode("utf-8"), "text/html; charset=utf-8")

    def _json(self, value: Any, status: int = HTTPStatus.OK) -> None:
        self._send(status, json.dumps(value, default=str).encode("utf-8"), "application/json")

    def _error(self, status: int, message: str, *, api: bool) -> None:
        if api:
            self._json({"error": message}, status)
        else:
            self._html(
                f'<!DOCTYPE html><html><head><meta charset="utf-8"><link rel="icon" href="data:,">'
                f"<title>{int(status)}</title></head><body><h1>{int(status)}</h1>"
                f'<p>{render._e(message)}</p><p><a href="/">all runs</a></p></body></html>',
                status,
            )

    def do_HEAD(self) -> None:  # noqa: N802 (stdlib naming)
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802 (stdlib naming)
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        api = path.startswith("/api/")
        if not self.server.host_allowed(self.headers.get("Host")):
            host = self.headers.get("Host")
            logger.warning("refused a request for Host %r (not this machine; see --allow-host)", host)
            self._error(
                HTTPStatus.FORBIDDEN,
                f"this dashboard answers to {', '.join(sorted(self.server.allowed_hosts))}, not to host {host!r}; "
                "start it with --allow-host NAME to accept another name",
                api=api,
            )
            return
        try:
            self._route(path, parse_qs(parts.query), api)
        except BrokenPipeError:
            pass  # the browser went away
        except Exception as err:
            logger.error("error serving %s:\n%s", self.path, traceback.format_exc())
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(err).__name__}: {err}", api=api)

    def _route(self, path: str, query: dict[str, list[str]], api: bool) -> None:
        root = self.server.runs_root
        if path in ("/", "/index.html"):
            self._html(render.render_index(list_runs(root), str(root)))
        elif path == "/api/runs":
            self._json(list_runs(root))
        elif path.startswith("/run/") or path.startswith("/api/run/"):
            key = path.split("/run/", 1)[1].strip("/")
            run_dir = find_run(root, key)
            if run_dir is None:
                self._error(HTTPStatus.NOT_FOUND, f"no run {key!r} under {root}", api=api)
                return
            run = load_run(run_dir)
            if api:
                self._json(run.to_json())
            else:
                self._html(render.render_run(run))
        elif path == "/compare":
            keys = [key for value in query.get("runs", []) for key in value.split(",") if key]
            if not keys:
                self._error(HTTPStatus.BAD_REQUEST, "choose runs to compare: /compare?runs=a,b", api=False)
                return
            runs = []
            for key in dict.fromkeys(keys):
                run_dir = find_run(root, key)
                if run_dir is None:
                    self._error(HTTPStatus.NOT_FOUND, f"no run {key!r} under {root}", api=False)
                    return
                runs.append(load_run(run_dir, with_lineage=False))
            self._html(render.render_compare(runs))
        elif path == render.PLOTLY_URL:
            self._send(HTTPStatus.OK, render.plotly_js().encode("utf-8"), "text/javascript; charset=utf-8", cache=True)
        else:
            self._error(HTTPStatus.NOT_FOUND, f"nothing at {path}", api=api)


def make_server(
    runs_root: str | Path, host: str = "127.0.0.1", port: int = 8765, allowed_hosts: Sequence[str] = ()
) -> DashboardServer:
    """Bind the dashboard server (port 0 picks a free port); call ``serve_forever()`` to run it.

    ``allowed_hosts`` adds names accepted in the Host header (see :class:`DashboardServer`).
    """
    return DashboardServer((host, port), Path(runs_root), allowed_hosts)
