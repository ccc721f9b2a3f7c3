"""`rwkv-export serve`: the browser demo (web_demo/) and one export folder over HTTP, cross-origin isolated.

Layout of the site:
  /                                    web_demo/ (index.html, ES modules, css)
  /node_modules/onnxruntime-web/dist/  onnxruntime-web's runtime files (nothing else under node_modules is served)
  /model/                              the export folder (manifest.json, *.onnx, tokenizer.json or the World vocab .txt)

Every response carries Cross-Origin-Opener-Policy: same-origin and Cross-Origin-Embedder-Policy: require-corp, so
the page is `crossOriginIsolated` and onnxruntime-web can use wasm threads (SharedArrayBuffer), plus
Cross-Origin-Resource-Policy: same-origin on the files.

web_demo/ is found beside the package (a source checkout: rwkv_export/ and web_demo/ in one folder); an installed
wheel does not contain it.
"""

from __future__ import annotations

import posixpath
import socket
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .errors import ManifestError, RwkvExportError

WEB_DEMO_DIR = Path(__file__).resolve().parent.parent / "web_demo"
ORT_DIST = "node_modules/onnxruntime-web/dist"
ORT_ENTRY = f"{ORT_DIST}/ort.wasm.min.mjs"  # the file the demo's worker imports for the wasm backend
MODEL_PREFIX = "/model/"

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
    ".data": "application/octet-stream",
    ".map": "application/json",
    ".css": "text/css",
    ".html": "text/html",
}


def check_web_demo(web_root: Path = WEB_DEMO_DIR) -> Path:
    """The demo's folder, with its npm packages installed; a one-line error otherwise."""
    web_root = Path(web_root)
    if not (web_root / "index.html").is_file():
        raise RwkvExportError(
            f"web demo files not found at {web_root}: `rwkv-export serve` runs from a source checkout "
            "(web_demo/ next to rwkv_export/), which an installed wheel does not include"
        )
    if not (web_root / ORT_ENTRY).is_file():
        raise RwkvExportError(
            f"onnxruntime-web is not installed in {web_root / 'node_modules'}: run `npm ci --prefix {web_root}`"
        )
    return web_root


def check_model_folder(folder: Path) -> dict:
    """read_manifest (files present, sizes and sha256 as listed) and at least one ONNX step graph."""
    from .manifest import read_manifest

    manifest = read_manifest(Path(folder))
    if not any(g.get("kind") == "step" and g.get("format") == "onnx" for g in manifest.get("graphs", [])):
        raise ManifestError(f"{folder} has no ONNX step graph for the web demo")
    return manifest


class DemoRequestHandler(SimpleHTTPRequestHandler):
    """Static files from web_demo/ and the model folder, with cross-origin isolation headers."""

    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, **MIME_TYPES}

    def __init__(self, *args, web_root: Path, model_dir: Path, **kwargs):
        self.web_root = Path(web_root)
        self.model_dir = Path(model_dir)
        super().__init__(*args, directory=str(self.web_root), **kwargs)

    def translate_path(self, path: str) -> str:
        """Map a URL path to a file under web_demo/ or the model folder; anything else maps to a missing path."""
        raw = unquote(urlsplit(path).path)
        # Resolve '.' and '..' first, so no prefix rule below can be walked out of.
        parts = [p for p in posixpath.normpath("/" + raw).split("/") if p and p not in (".", "..")]
        if any("\\" in p or ":" in p for p in parts):
            return str(self.web_root / "__not_served__")
        if parts[:1] == [MODEL_PREFIX.strip("/")]:
            root, parts = self.model_dir, parts[1:]
        elif parts[:1] == ["node_modules"]:
            if parts[: len(ORT_DIST.split("/"))] != ORT_DIST.split("/"):
                return str(self.web_root / "__not_served__")
            root = self.web_root
        else:
            root = self.web_root
        target = root.joinpath(*parts)
        return str(target) + "/" if raw.endswith("/") or not parts else str(target)

    def list_directory(self, path):  # no directory listings
        self.send_error(404, "Not found")
        return None

    def send_head(self):
        # Always the current bytes: If-Modified-Since has one-second resolution, and an export folder rewritten
        # within that second would otherwise be answered with 304 and a stale manifest.
        del self.headers["If-Modified-Since"]
        return super().send_head()

    def end_headers(self) -> None:
        for k, v in ISOLATION_HEADERS.items():
            self.send_header(k, v)
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # quiet: only failed requests (log_request below)
        pass

    def log_request(self, code="-", size="-") -> None:
        if str(getattr(code, "value", code)).startswith(("4", "5")):
            sys.stderr.write(f"serve: {self.command} {self.path} -> {getattr(code, 'value', code)}\n")

    def copyfile(self, source, outputfile) -> None:
        try:
            super().copyfile(source, outputfile)
        except (BrokenPipeError, ConnectionResetError):  # the page went away mid-download
            pass


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
    web = check_web_demo(WEB_DEMO_DIR if web_root is None else web_root)
    handler = partial(DemoRequestHandler, web_root=web, model_dir=folder.resolve())
    server_class = DemoServer
    if ":" in host:
        server_class = type("DemoServer6", (DemoServer,), {"address_family": socket.AF_INET6})
    try:
        server = server_class((host, port), handler)
    except OSError as e:
        raise RwkvExportError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
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
