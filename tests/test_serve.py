"""`rwkv-export serve` over real sockets: only the manifest's files and the demo's own files are served (confined:
no symbolic link out, no hidden staging folder), the Host header is checked (DNS rebinding), and malformed requests
get a 4xx without crashing the handler. The browser side of the demo is tested in test_web_demo.py.

No model is exported here: the server never opens a model, it serves bytes, so the folder is a hand-made manifest
(written by manifest.write_manifest, which lists each file with its size and sha256) over small files, and most
tests use a stand-in demo folder whose onnxruntime-web is one small file. One test serves the real web_demo/.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path

import pytest

from rwkv_export.errors import RwkvExportError
from rwkv_export.manifest import FORMAT, FORMAT_VERSION, write_manifest
from rwkv_export.serve import ISOLATION_HEADERS, ORT_ENTRY, WEB_DEMO_DIR, host_allowed, serve_in_thread, url_parts


def make_folder(root: Path) -> Path:
    """An export folder as `serve` sees it: manifest.json naming model.onnx and its weights file."""
    root.mkdir(parents=True)
    (root / "model.onnx").write_bytes(b"graph bytes")
    (root / "model.onnx.data").write_bytes(b"weight bytes" * 100)
    io = [{"name": "token", "role": "token"}]
    graph = {"kind": "step", "variant": "fp32", "format": "onnx", "file": "model.onnx",
             "data_files": ["model.onnx.data"], "inputs": io, "outputs": [{"name": "logits", "role": "logits"}]}
    write_manifest(root, {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": {"architecture": "rwkv", "rwkv_version": "4", "n_layer": 1, "n_embd": 8, "vocab_size": 256,
                  "source": {"kind": "test"}},
        "state": {"tensors": [{"name": "att_x", "shape": [1, 8], "dtype": "float32"}]},
        "tokenizer": {"kind": "bytes", "vocab_size": 256}, "graphs": [graph], "files": [],
    })
    return root


def make_web(root: Path) -> Path:
    """A stand-in demo folder: index.html, main.js, and onnxruntime-web's entry file as if `npm ci` had run."""
    root.mkdir(parents=True)
    (root / "index.html").write_text("<!doctype html><script type=module src=main.js></script>")
    (root / "main.js").write_text("export {};")
    (root / "package.json").write_text("{}")
    entry = root / ORT_ENTRY
    entry.parent.mkdir(parents=True)
    entry.write_text("export const ort = 1;")
    (entry.parent.parent / "package.json").write_text("{}")
    return root


@pytest.fixture
def site(tmp_path):
    return make_folder(tmp_path / "export"), make_web(tmp_path / "web")


@contextmanager
def served(folder, web_root=None):
    server, url = serve_in_thread(folder, web_root=web_root)
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def get(port: int, path: str, host: str | None = None, method: str = "GET"):
    """(status, headers, body) for a raw path (http.client sends it as given: no normalisation of '..')."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest(method, path, skip_host=True)
    conn.putheader("Host", host if host is not None else f"127.0.0.1:{port}")
    conn.endheaders()
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, r.headers, body


def raw(port: int, data: bytes) -> int:
    """Send raw bytes, return the status code of the answer (0 if none came)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        out = b""
        while b"\r\n" not in out:
            chunk = s.recv(4096)
            if not chunk:
                break
            out += chunk
    first = out.split(b"\r\n", 1)[0].split()
    return int(first[1]) if len(first) >= 2 and first[0].startswith(b"HTTP/") and first[1].isdigit() else 0


def test_serves_the_manifest_files_and_the_demo(site):
    folder, web = site
    with served(folder, web) as port:
        status, headers, body = get(port, "/")
        assert status == 200 and b"main.js" in body
        assert all(headers[k] == v for k, v in ISOLATION_HEADERS.items()), headers
        assert get(port, "/main.js")[:2][0] == 200
        status, headers, body = get(port, "/" + ORT_ENTRY)
        assert status == 200 and headers["Content-Type"] == "text/javascript" and body == b"export const ort = 1;"
        status, _, body = get(port, "/model/manifest.json")
        assert status == 200 and json.loads(body)["graphs"][0]["file"] == "model.onnx"
        for name in ["model.onnx", "model.onnx.data"]:
            status, headers, body = get(port, f"/model/{name}")
            assert status == 200 and body == (folder / name).read_bytes(), name
            assert int(headers["Content-Length"]) == (folder / name).stat().st_size
        status, headers, body = get(port, "/model/model.onnx.data", method="HEAD")
        assert status == 200 and body == b"" and int(headers["Content-Length"]) == 1200
        (folder / "manifest.json").write_text("{ not json")  # served as it is, for the page to report
        assert get(port, "/model/manifest.json")[::2] == (200, b"{ not json")
        assert get(port, "/model/model.onnx")[0] == 404  # no manifest to name it


def test_serves_nothing_else(site):
    """Files the manifest does not name, hidden staging folders, the demo's other files, traversal spellings: 404."""
    folder, web = site
    (folder / "notes.txt").write_text("not part of the export")
    staging = folder / ".model_int8.onnx.partial-1234"
    staging.mkdir()
    (staging / "model.onnx").write_bytes(b"half-written")
    (web / "sub").mkdir()
    (web / "sub" / "x.js").write_text("x")
    with served(folder, web) as port:
        (folder / "late.onnx").write_bytes(b"appeared after the manifest")
        for path in ["/model/notes.txt", "/model/late.onnx", "/model/.model_int8.onnx.partial-1234/model.onnx",
                     "/model/%2emodel_int8.onnx.partial-1234/model.onnx", "/model/", "/model", "/package.json",
                     "/sub/x.js", "/node_modules/onnxruntime-web/package.json", "/node_modules/",
                     "/node_modules/onnxruntime-web/dist/", "/node_modules/onnxruntime-web/dist/../package.json",
                     "/model/../../export/model.onnx", "/model/%2e%2e/%2e%2e/etc/passwd", "/../../etc/passwd",
                     "/model/..%2f..%2fetc%2fpasswd", "/model/model.onnx/", "/nope.js", "/index.html/x"]:
            assert get(port, path)[0] == 404, path


def test_no_symbolic_link_out(site, tmp_path):
    """A link to / in the folder, a listed file swapped for a link out after the server started, links in the demo
    and in onnxruntime-web's folder: none is followed out."""
    folder, web = site
    outside = tmp_path / "outside.txt"
    outside.write_text("private")
    (folder / "root").symlink_to("/")
    (web / "evil.js").symlink_to(outside)
    (web / ORT_ENTRY).parent.joinpath("evil.mjs").symlink_to(outside)
    with served(folder, web) as port:
        assert get(port, "/model/model.onnx.data")[0] == 200
        (folder / "model.onnx.data").unlink()
        (folder / "model.onnx.data").symlink_to(outside)
        for path in ["/model/root/etc/passwd", "/model/model.onnx.data", "/evil.js",
                     "/node_modules/onnxruntime-web/dist/evil.mjs"]:
            status, _, body = get(port, path)
            assert status == 404 and b"private" not in body, path


def test_host_header_is_checked(site):
    folder, web = site
    with served(folder, web) as port:
        for host in [f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"LOCALHOST:{port}"]:
            assert get(port, "/", host=host)[0] == 200, host
        for host in [f"evil.example:{port}", f"localhost.evil.example:{port}", "localhost", f"127.0.0.1:{port + 1}",
                     "", f"user@localhost:{port}", f"localhost:{port}/x", "[::1"]:
            assert get(port, "/", host=host)[0] == 403, host
    assert host_allowed("192.168.1.7:8000", "0.0.0.0", 8000)  # bound to all interfaces: an IP literal is safe
    assert not host_allowed("attacker.example:8000", "0.0.0.0", 8000)
    assert host_allowed("box.lan:8000", "box.lan", 8000) and not host_allowed("box.lan:8001", "box.lan", 8000)
    assert host_allowed("example:80", "example", 80) and host_allowed("example", "example", 80)


# (raw request, the status it must get). Every one is the client's fault: 4xx, except an HTTP version the server
# does not speak, whose standard answer is 505.
BAD_REQUESTS = {
    "100 KB URL": (b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: {host}\r\n\r\n", 414),
    "garbage request line": (b"\xff\xfe\x00garbage\r\n\r\n", 400),
    "method only": (b"GET\r\n\r\n", 400),
    "empty request line": (b"\r\n\r\n", 400),
    "%00": (b"GET /%00 HTTP/1.1\r\nHost: {host}\r\n\r\n", 400),
    "%00 in the model path": (b"GET /model/model.onnx%00.txt HTTP/1.1\r\nHost: {host}\r\n\r\n", 400),
    "bad percent-encoding": (b"GET /%zz HTTP/1.1\r\nHost: {host}\r\n\r\n", 400),
    "truncated percent-encoding": (b"GET /main.js% HTTP/1.1\r\nHost: {host}\r\n\r\n", 400),
    "percent-encoded invalid UTF-8": (b"GET /%ff%fe.js HTTP/1.1\r\nHost: {host}\r\n\r\n", 400),
    "control character": (b"GET /a%0d%0aSet-Cookie:x HTTP/1.1\r\nHost: {host}\r\n\r\n", 400),
    "absolute-form target": (b"GET http://evil.example/ HTTP/1.1\r\nHost: {host}\r\n\r\n", 400),
    "POST": (b"POST / HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n", 405),
    "unknown method": (b"BREW /model/model.onnx HTTP/1.1\r\nHost: {host}\r\n\r\n", 405),
    "70 KB header": (b"GET / HTTP/1.1\r\nHost: {host}\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    "no Host": (b"GET / HTTP/1.1\r\n\r\n", 403),
    "HTTP/2 request line": (b"GET / HTTP/2.0\r\nHost: {host}\r\n\r\n", 505),
}


def test_bad_requests_get_a_4xx_and_the_server_goes_on(site, capfd):
    folder, web = site
    with served(folder, web) as port:
        host = f"127.0.0.1:{port}".encode()
        codes = {name: raw(port, data.replace(b"{host}", host)) for name, (data, _) in BAD_REQUESTS.items()}
        assert codes == {name: code for name, (_, code) in BAD_REQUESTS.items()}
        assert get(port, "/model/model.onnx")[0] == 200  # still serving
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception" not in err, err


def test_url_parts():
    assert url_parts("/model/./a//b.onnx?x=1#f") == ["model", "a", "b.onnx"]
    assert url_parts("/%E6%9D%B1.txt") == ["東.txt"]
    assert url_parts("/a/../b") == ["a", "..", "b"]  # kept: the site refuses '..' (404), it never normalises it away
    for bad in ["/%00", "/%zz", "/%4", "/%c3", "x", "http://h/", "/a\x7f"]:
        assert url_parts(bad) is None, bad


def test_relative_folder_and_bad_port(site, tmp_path, monkeypatch):
    folder, web = site
    monkeypatch.chdir(tmp_path)
    with served(Path("export"), Path("web")) as port:  # relative paths, as typed after `cd`
        assert get(port, "/model/model.onnx")[0] == 200
        os.chdir("/")  # the server keeps working when the process changes its folder
        assert get(port, "/model/model.onnx")[0] == 200 and get(port, "/")[0] == 200
    monkeypatch.chdir(tmp_path)
    for port in (99999, -1):
        with pytest.raises(RwkvExportError, match="not a port number") as e:
            serve_in_thread(Path("export"), port=port, web_root=Path("web"))
        assert "\n" not in str(e.value)


def test_serves_the_real_demo_and_its_onnxruntime_web(site):
    """The demo as shipped (web_demo/, or rwkv_export/web_demo in a wheel) with onnxruntime-web's dist files."""
    folder, _ = site
    with served(folder) as port:
        for path in ["/", "/main.js", "/worker.js", "/style.css", "/" + ORT_ENTRY,
                     "/node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.wasm"]:
            assert get(port, path)[0] == 200, path
        names = [p.name for p in WEB_DEMO_DIR.iterdir() if p.is_file()]
        assert "README.md" in names and get(port, "/README.md")[0] == 404
