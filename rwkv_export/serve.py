"""`rwkv-export serve`: the browser demo (web_demo/) and one export folder over HTTP, cross-origin isolated.

Layout of the site (nothing else is served; no directory listings):
  /                                    web_demo/'s own files: index.html and the top-level .js/.mjs/.css/.wasm
  /node_modules/onnxruntime-web/dist/  onnxruntime-web's runtime files; likewise the top level of the dist/ folders
  /node_modules/@tensorflow/*/dist/    of the TF.js packages runtimes.html uses (NPM_DIRS; tfjs-tflite's wasm/ too),
                                       where installed: nothing else of the demo's npm packages
  /model/                              the export folder: manifest.json and the files it names, each confined to
                                       the folder (manifest.confined_path: no '..', no hidden file, no link out)

Every response carries Cross-Origin-Opener-Policy: same-origin and Cross-Origin-Embedder-Policy: require-corp, so
the page is `crossOriginIsolated` and onnxruntime-web can use wasm threads (SharedArrayBuffer), plus
Cross-Origin-Resource-Policy: same-origin on the files. A request whose Host header names neither the bound address
nor an IP literal is refused (403), so a web page cannot reach the server through DNS rebinding; a malformed request
(NUL, bad percent-encoding, an overlong URL, a garbage request line, a method other than GET/HEAD) gets a 4xx.

The demo's files are package data (rwkv_export/web_demo/ in a wheel; web_demo/ beside the package in a checkout).
onnxruntime-web comes from web_demo/node_modules where installed (a checkout), else it is installed into the user
cache on first use (rwkv_export/node.py).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote_to_bytes

from .errors import ManifestError, RwkvExportError

_PKG = Path(__file__).resolve().parent
WEB_DEMO_DIR = _PKG / "web_demo" if (_PKG / "web_demo" / "index.html").is_file() else _PKG.parent / "web_demo"
ORT_DIST = "node_modules/onnxruntime-web/dist"
ORT_ENTRY = f"{ORT_DIST}/ort.wasm.min.mjs"  # the file the demo's worker imports for the wasm backend
# The npm folders served, top-level files only: onnxruntime-web, and the TF.js packages of runtimes.html (TF.js graph
# models on its cpu/wasm/webgl/webgpu backends, tfjs-tflite; the TFLite runtime's wasm files lie in wasm/, not dist/)
TFJS_PACKAGES = ("core", "converter", "backend-cpu", "backend-wasm", "backend-webgl", "backend-webgpu", "tflite")
NPM_DIRS = (ORT_DIST, *(f"node_modules/@tensorflow/tfjs-{p}/dist" for p in TFJS_PACKAGES),
            "node_modules/@tensorflow/tfjs-tflite/wasm")
WEB_FORMATS = ("onnx", "tfjs", "tflite")  # step graph formats the pages run (index.html: onnx; runtimes.html: all)
MODEL_PREFIX = "/model/"
DEMO_SUFFIXES = (".html", ".js", ".mjs", ".css", ".wasm")  # the demo's own files: top level of web_demo/, these kinds only

ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}

# Module scripts are refused unless served with a JavaScript MIME type; Python's table lacks .mjs on some systems.
MIME_TYPES = {
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".wasm": "application/wasm",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",  # the RWKV World vocab (rwkv_vocab_v20230424.txt): UTF-8, whatever the system says
    ".onnx": "application/octet-stream",
    ".tflite": "application/octet-stream",
    ".bin": "application/octet-stream",  # TF.js weight shards
    ".data": "application/octet-stream",
    ".map": "application/json",
    ".css": "text/css",
    ".html": "text/html; charset=utf-8",
}
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]/@]+)(?::(\d{1,5}))?")


def check_web_demo(web_root: Path = WEB_DEMO_DIR) -> tuple[Path, Path]:
    """(the demo's folder, the folder holding its node_modules), installing the npm packages on first use; one-line
    error otherwise."""
    from .node import npm_packages

    web_root = Path(web_root).resolve()
    if not (web_root / "index.html").is_file():
        raise RwkvExportError(f"web demo files not found at {web_root}: reinstall rwkv-export (they are package data)")
    packages = npm_packages(web_root, ORT_ENTRY.removeprefix("node_modules/"), "the web demo (onnxruntime-web)")
    return web_root, packages.resolve()


def check_model_folder(folder: Path) -> dict:
    """read_manifest (files present, confined, sizes and sha256 as listed) and at least one step graph the pages run
    (ONNX for index.html; TF.js or TFLite folders open in runtimes.html)."""
    from .manifest import read_manifest

    manifest = read_manifest(Path(folder))
    if not any(g.get("kind") == "step" and g.get("format") in WEB_FORMATS for g in manifest.get("graphs", [])):
        raise ManifestError(f"{folder} has no ONNX, TF.js or TFLite step graph for the web pages")
    return manifest


def host_allowed(header: str | None, bound_host: str, port: int) -> bool:
    """A Host header the server answers: `localhost`, an IP literal (a rebinding page can only use a DNS name) or
    the host it was bound to, with the bound port (no port = 80)."""
    m = _HOST.fullmatch((header or "").strip())
    if not m or int(m.group(2) or 80) != port:
        return False
    name = m.group(1).lower()
    if name in ("localhost", bound_host.lower(), f"[{bound_host.lower()}]"):
        return True
    try:
        ipaddress.ip_address(name[1:-1] if name.startswith("[") else name)
        return True
    except ValueError:
        return False


def _inside(root: Path, rel: str) -> Path | None:
    """root/rel if it is a regular file that resolves inside root, else None."""
    p = (root / rel).resolve()
    return p if p.is_relative_to(root) and p.is_file() else None


class Site:
    """Which file a URL path names: the demo's own files, the NPM_DIRS files, the manifest's files."""

    def __init__(self, web_root: Path, packages: Path, model_dir: Path):
        self.web_root, self.model_dir = web_root, model_dir.resolve()
        self.npm_dirs = [(d.split("/"), (packages / d).resolve()) for d in NPM_DIRS]

    def model_file(self, rel: str) -> Path | None:
        from .manifest import MANIFEST_NAME, confined_path, named_files, read_manifest

        try:  # read on every request: the folder may be re-exported while it is served
            if rel != MANIFEST_NAME:  # (a damaged manifest.json is served too: the page reports what is wrong)
                m = read_manifest(self.model_dir, verify_files=False)
                if rel not in {r for _, r in named_files(m)}:
                    return None
            p = confined_path(self.model_dir, rel)
        except ManifestError:
            return None
        return p if p.is_file() else None

    def lookup(self, parts: list[str]) -> Path | None:
        if any(p.startswith(".") or "\\" in p for p in parts):  # '..', hidden files, staging folders
            return None
        if not parts:
            return _inside(self.web_root, "index.html")
        if parts[0] == MODEL_PREFIX.strip("/"):
            return self.model_file("/".join(parts[1:])) if len(parts) > 1 else None
        for prefix, root in self.npm_dirs:
            if parts[: len(prefix)] == prefix and len(parts) == len(prefix) + 1:
                return _inside(root, parts[-1])
        if len(parts) == 1 and parts[0].endswith(DEMO_SUFFIXES):
            return _inside(self.web_root, parts[0])
        return None


def url_parts(target: str) -> list[str] | None:
    """The decoded path segments of a request target ('.' and empty ones dropped), or None if it is malformed:
    not origin-form, bad percent-encoding, not UTF-8, NUL or control characters."""
    path = target.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/") or _BAD_PERCENT.search(path):
        return None
    raw = unquote_to_bytes(path)
    if any(b < 0x20 or b == 0x7F for b in raw):
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return [p for p in text.split("/") if p not in ("", ".")]


class DemoRequestHandler(BaseHTTPRequestHandler):
    """GET/HEAD of the Site's files, with cross-origin isolation headers; everything else a 4xx."""

    server_version = "rwkv-export"
    default_request_version = "HTTP/1.0"  # a garbage request line gets a status line, not HTTP/0.9's bare body
    timeout = 60  # a client that stops sending does not hold its thread forever
    _status = None

    def send_response(self, code, message=None) -> None:
        self._status = int(code)
        super().send_response(code, message)

    def parse_request(self) -> bool:
        if not super().parse_request():
            if self._status is None:  # e.g. an empty request line, which the base class drops without an answer
                self.send_error(HTTPStatus.BAD_REQUEST)
            return False
        if self.command not in ("GET", "HEAD"):
            self.send_error(HTTPStatus.METHOD_NOT_ALLOWED)
            return False
        return True

    def do_GET(self) -> None:
        f = self.send_head()
        if f is not None:
            with f:
                try:
                    shutil.copyfileobj(f, self.wfile)
                except (BrokenPipeError, ConnectionResetError):  # the page went away mid-download
                    pass

    def do_HEAD(self) -> None:
        f = self.send_head()
        if f is not None:
            f.close()

    def send_head(self):
        if not host_allowed(self.headers.get("Host"), self.server.bound_host, self.server.server_address[1]):
            self.send_error(HTTPStatus.FORBIDDEN, "Host not allowed")
            return None
        parts = url_parts(self.path)
        if parts is None:
            self.send_error(HTTPStatus.BAD_REQUEST)
            return None
        try:  # a trailing '/' names a folder, and no folder is served (only '/', the demo's page)
            path = None if parts and self.path.split("?", 1)[0].endswith("/") else self.server.site.lookup(parts)
            f = open(path, "rb") if path is not None else None
        except (OSError, ValueError):
            f = None
        if f is None:
            self.send_error(HTTPStatus.NOT_FOUND)
            return None
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", MIME_TYPES.get(path.suffix.lower(), "application/octet-stream"))
        self.send_header("Content-Length", str(os.fstat(f.fileno()).st_size))
        self.end_headers()
        return f

    def end_headers(self) -> None:
        for k, v in ISOLATION_HEADERS.items():
            self.send_header(k, v)
        # Always the current bytes: an export folder rewritten while served must never be answered from a cache.
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def finish(self) -> None:
        super().finish()
        if self._status in (400, 414, 431):  # read what the client still sends, so closing does not reset the answer
            try:
                self.connection.shutdown(socket.SHUT_WR)
                self.connection.settimeout(1)
                for _ in range(64):
                    if not self.connection.recv(1 << 16):
                        break
            except OSError:
                pass

    def log_message(self, format: str, *args) -> None:  # quiet: only failed requests (log_request below)
        pass

    def log_request(self, code="-", size="-") -> None:
        if str(int(code) if isinstance(code, int) else code).startswith(("4", "5")):
            line = getattr(self, "requestline", "")[:200].encode("ascii", "backslashreplace").decode()
            sys.stderr.write(f"serve: {line!r} -> {int(code)}\n")


class DemoServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (BrokenPipeError, ConnectionResetError, TimeoutError)):
            return
        super().handle_error(request, client_address)


def _url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else ("::1" if host == "::" else host)
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


def make_server(folder, host: str = "127.0.0.1", port: int = 8000, *, web_root: Path | None = None):
    """Validate FOLDER and the demo, bind HOST:PORT (0 = any free port). Returns (server, url); the caller runs
    server.serve_forever() (in a thread if it likes) and server.shutdown() / server.server_close() to stop."""
    folder = Path(folder)
    check_model_folder(folder)
    web, packages = check_web_demo(WEB_DEMO_DIR if web_root is None else web_root)
    if not 0 <= port <= 65535:
        raise RwkvExportError(f"--port {port} is not a port number (0 to 65535; 0 = any free port)")
    server_class = DemoServer
    if ":" in host:
        server_class = type("DemoServer6", (DemoServer,), {"address_family": socket.AF_INET6})
    try:
        server = server_class((host, port), DemoRequestHandler)
    except (OSError, OverflowError) as e:
        raise RwkvExportError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    server.site = Site(web, packages, folder)
    server.bound_host = host
    return server, _url(host, server.server_address[1])


def serve(folder, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the demo for FOLDER until Ctrl+C, printing the URL to open."""
    server, url = make_server(folder, host, port)
    print(f"Serving the web demo for {Path(folder)} at {url}  (Ctrl+C to stop)", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print("note: browsers allow wasm threads and sha256 checks only on localhost or https; "
              "from another machine the demo runs single-threaded", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def serve_in_thread(folder, host: str = "127.0.0.1", port: int = 0, *, web_root: Path | None = None):
    """For tests and benchmarks: start make_server() in a daemon thread. Returns (server, url)."""
    server, url = make_server(folder, host, port, web_root=web_root)
    threading.Thread(target=server.serve_forever, name="rwkv-export-serve", daemon=True).start()
    return server, url
