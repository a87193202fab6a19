"""The studio's HTTP server: Python's own threading server, the page's static files and the JSON API.

Safe by default: it binds to 127.0.0.1, and on loopback it answers only requests addressed to a loopback
name (a web page elsewhere cannot reach it by rebinding a name of its own to 127.0.0.1). Bound to any other
address it needs the token it prints: given once in the address, then kept in a cookie. A request that
changes anything is JSON (a form of another site cannot send it). Every path a request names is resolved
inside the runs folder. A refused or malformed request gets its 4xx and a one-line message; a failure of
the studio itself a 500 and a line, its traceback only in the studio's terminal.
"""

from __future__ import annotations

import hmac
import json
import secrets
import sys
import traceback
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from qadapt.errors import QadaptError
from qadapt.run_dir import RunDir
from qadapt.studio.pages import ROUTES, SCRIPTS
from qadapt.studio.processes import JOB_LOGS, Processes
from qadapt.studio.web import HttpError, Request, inside

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_PORT = 7870
MAX_BODY = 1 << 20
STATIC = Path(__file__).parent / "static"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8"}
COOKIE = "qadapt_studio"


class Studio:
    """What every request works on: the runs folder, the recipes folder, the processes started, the token."""

    def __init__(self, runs: Path, recipes: Path | None = None, token: str | None = None, cwd: Path | None = None):
        self.runs = Path(runs).resolve()
        self.recipes = Path(recipes).resolve() if recipes is not None and Path(recipes).is_dir() else None
        self.token = token
        self.processes = Processes(Path(cwd or Path.cwd()), self.runs / JOB_LOGS)
        self.state: dict = {}  # what a page keeps between requests (the chat page's loaded base), by page

    def run_folder(self, name: str) -> Path:
        """The run directory `name` names under the runs folder; a 403 outside it, a 404 when it is no run."""
        folder = inside(self.runs, name, "run")
        if not RunDir(folder).is_run():
            raise HttpError(404, f"no run {name!r} under {self.runs}")
        return folder

    def answer(self, method: str, path: str, query: dict, body: dict):
        """The JSON answer of the route `method path` names."""
        self.processes.reap()
        for route in ROUTES:
            params = route.match(method, path)
            if params is not None:
                return route.handler(self, Request(method, path, query, body, params))
        if any(route.match(route.method, path) is not None for route in ROUTES):
            raise HttpError(405, f"{method} is not how {path} is used")
        raise HttpError(404, f"no such address: {path}")


class Handler(BaseHTTPRequestHandler):
    server_version = "qadapt-studio"

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def log_message(self, format: str, *args) -> None:  # the terminal shows what the studio says, not each GET
        pass

    def _handle(self, method: str) -> None:
        studio: Studio = self.server.studio
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        try:
            self._check_address(studio)
            set_cookie = self._check_token(studio, query)
            if method == "GET" and (url.path == "/" or url.path.startswith("/static/")):
                self._static(url.path, set_cookie)
            elif url.path.startswith("/api/"):
                body = self._json_body() if method == "POST" else {}
                self._send(200, studio.answer(method, unquote(url.path), query, body))
            else:
                raise HttpError(404, f"no such address: {url.path}")
        except HttpError as exc:
            self._send(exc.status, {"error": str(exc)})
        except QadaptError as exc:
            self._send(400, {"error": str(exc)})
        except Exception as exc:  # a failure of the studio: a line for the page, the traceback for the terminal
            traceback.print_exc(file=sys.stderr)
            line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self._send(500, {"error": f"the studio failed on this request: {type(exc).__name__} {line}".strip()})

    def _check_address(self, studio: Studio) -> None:
        if self.server.server_address[0] not in LOOPBACK:
            return  # another address: the token guards it
        host = self.headers.get("Host", "")
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]")[0]
        if name not in LOOPBACK:
            raise HttpError(403, f"this studio answers requests to 127.0.0.1 or localhost, not to {host!r}")

    def _check_token(self, studio: Studio, query: dict) -> bool:
        """Whether the request carries the token (None needed: True); a 401 when it does not. True also
        when it came in the address, so that the answer sets the cookie."""
        if studio.token is None:
            return False
        cookie = SimpleCookie(self.headers.get("Cookie", ""))
        given = [self.headers.get("X-Studio-Token"), cookie[COOKIE].value if COOKIE in cookie else None]
        if any(value and hmac.compare_digest(value, studio.token) for value in given):
            return False
        if any(hmac.compare_digest(value, studio.token) for value in query.get("token", [])):
            return True
        raise HttpError(401, "this studio needs its token: open the address `qadapt studio` printed")

    def _json_body(self) -> dict:
        if self.headers.get_content_type() != "application/json":
            raise HttpError(415, "send JSON (Content-Type: application/json)")
        length = self.headers.get("Content-Length", "0")
        if not length.isdigit() or int(length) > MAX_BODY:
            raise HttpError(413, f"a request body must be at most {MAX_BODY} bytes, with its Content-Length")
        try:
            body = json.loads(self.rfile.read(int(length)) or b"{}")
        except ValueError as exc:
            raise HttpError(400, f"the body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise HttpError(400, "the body must be a JSON object")
        return body

    def _static(self, path: str, set_cookie: bool) -> None:
        name = "index.html" if path == "/" else path.removeprefix("/static/")
        files = {p.name: p for p in STATIC.iterdir() if p.suffix in CONTENT_TYPES}
        if name not in files:
            raise HttpError(404, f"no such file: {path}")
        content = files[name].read_text()
        if name == "index.html":  # each page's script, from the registry
            content = content.replace("<!-- page scripts -->", "\n".join(
                f'<script src="/static/{script}"></script>' for script in SCRIPTS))
        extra = {}
        if set_cookie:
            extra["Set-Cookie"] = f"{COOKIE}={self.server.studio.token}; HttpOnly; SameSite=Strict; Path=/"
        self._send_bytes(200, content.encode(), CONTENT_TYPES[files[name].suffix], extra)

    def _send(self, status: int, answer) -> None:
        self._send_bytes(status, json.dumps(answer).encode(), "application/json", {})

    def _send_bytes(self, status: int, content: bytes, content_type: str, extra: dict) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(content)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'self'; style-src 'self' 'unsafe-inline'")
        for key, value in extra.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(content)


def make_server(studio: Studio, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> ThreadingHTTPServer:
    """The server, bound (port 0: any free one); `serve_forever()` runs it."""
    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        raise QadaptError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pass another --port or --host") \
            from None
    server.daemon_threads = True
    server.studio = studio
    return server


def serve(runs: Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT, recipes: Path | None = None) -> None:
    """`qadapt studio`: serve until Ctrl-C; the runs it started go on."""
    runs = Path(runs)
    if not runs.is_dir():
        runs.mkdir(parents=True)
        print(f"made the runs folder {runs}")
    token = None if host in LOOPBACK else secrets.token_urlsafe(24)
    server = make_server(Studio(runs, recipes, token), host, port)
    shown = f"[{host}]" if ":" in host else host
    address = f"http://{shown}:{server.server_port}/" + (f"?token={token}" if token else "")
    print(f"qadapt studio on {address}  (runs under {runs.resolve()})")
    if token:
        print(f"listening on {host}, not only on this machine: anyone who can reach it and has the token can start "
              "runs; keep the address to yourself")
    print("Ctrl-C stops the studio; the runs it started go on")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
