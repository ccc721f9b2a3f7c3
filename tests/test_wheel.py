"""The package as a user gets it from `pip install rwkv-export`: a wheel, no source tree.

The wheel is built (`pip wheel --no-deps --no-build-isolation`) from a copy of the files the package is made of, so
the checkout is not written to; it is installed into a fresh venv that reaches the dependencies through a .pth line
naming this environment's site-packages (its editable rwkv_export is a finder hook there, which a plain path entry
does not run), and every command runs from a folder outside the checkout with relative paths, the npm packages going
into a fresh user cache (RWKV_EXPORT_CACHE) from npm's own cache (`npm ci --offline`; CI has filled it).

Also rwkv_export.node's resolution of the npm packages (checkout first, then the cache, else install), with fakes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import urllib.request
import zipfile
from pathlib import Path

import pytest

from rwkv_export import node
from rwkv_export.errors import RwkvExportError

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_SOURCES = ["pyproject.toml", "README.md", "rwkv_export", "runtime_ref", "web_demo"]
PROBE = "pkg/index.js"


# -- rwkv_export.node: where the npm packages come from ------------------------------------------------------------


def _src(tmp_path: Path, installed: bool = False) -> Path:
    src = tmp_path / "js"
    src.mkdir()
    (src / "package.json").write_text('{"name": "x"}')
    (src / "package-lock.json").write_text('{"lockfileVersion": 3}')
    if installed:
        (src / "node_modules" / "pkg").mkdir(parents=True)
        (src / "node_modules" / PROBE).write_text("")
    return src


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RWKV_EXPORT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fake_npm(tmp_path: Path, body: str) -> Path:
    """A folder with an `npm` executable running `body` (sh, absolute paths) and the real node: the whole PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "npm").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'npm_calls'}\n{body}\n")
    (bin_dir / "npm").chmod(0o755)
    (bin_dir / "node").symlink_to(shutil.which("node"))
    return bin_dir


def test_an_installed_node_modules_is_used_first(tmp_path, cache, monkeypatch):
    src = _src(tmp_path, installed=True)
    monkeypatch.setenv("PATH", str(_fake_npm(tmp_path, "exit 1")))
    assert node.npm_packages(src, PROBE, "x") == src
    assert not (tmp_path / "npm_calls").exists() and not cache.exists()


def test_first_use_installs_into_the_cache_offline_first(tmp_path, cache, monkeypatch):
    src = _src(tmp_path)
    monkeypatch.setenv("PATH", str(_fake_npm(tmp_path, f"/bin/mkdir -p node_modules/pkg && /usr/bin/touch node_modules/{PROBE}")))
    dest = node.npm_packages(src, PROBE, "x")
    assert dest.parent == cache and (dest / "node_modules" / PROBE).is_file()
    assert (dest / "package-lock.json").read_text() == (src / "package-lock.json").read_text()
    assert "--offline" in (tmp_path / "npm_calls").read_text().splitlines()[0]
    assert [p.name for p in cache.iterdir()] == [dest.name]  # no staging folder left
    (tmp_path / "npm_calls").unlink()
    assert node.npm_packages(src, PROBE, "x") == dest and not (tmp_path / "npm_calls").exists()  # second use
    (src / "package-lock.json").write_text('{"lockfileVersion": 3, "changed": 1}')
    assert node.npm_packages(src, PROBE, "x") != dest  # another lock, another folder


def test_offline_failure_falls_back_to_the_registry(tmp_path, cache, monkeypatch):
    src = _src(tmp_path)
    script = f'case "$*" in *--offline*) exit 1;; esac; /bin/mkdir -p node_modules/pkg && /usr/bin/touch node_modules/{PROBE}'
    monkeypatch.setenv("PATH", str(_fake_npm(tmp_path, script)))
    assert (node.npm_packages(src, PROBE, "x") / "node_modules" / PROBE).is_file()
    calls = (tmp_path / "npm_calls").read_text().splitlines()
    assert len(calls) == 2 and "--offline" in calls[0] and "--offline" not in calls[1]


def test_npm_failure_or_absence_is_one_line_and_leaves_nothing(tmp_path, cache, monkeypatch):
    src = _src(tmp_path)
    monkeypatch.setenv("PATH", str(_fake_npm(tmp_path, "echo 'npm error 404 Not Found - GET x' >&2; exit 1")))
    with pytest.raises(RwkvExportError, match="the TF.js check: `npm ci` in .* failed: npm error 404") as e:
        node.npm_packages(src, PROBE, "the TF.js check")
    assert "\n" not in str(e.value) and list(cache.iterdir()) == []
    (tmp_path / "bin" / "npm").unlink()
    with pytest.raises(RwkvExportError, match="needs npm to install its packages") as e:
        node.npm_packages(src, PROBE, "the TF.js check")
    assert "\n" not in str(e.value)
    (tmp_path / "bin" / "node").unlink()
    with pytest.raises(RwkvExportError, match=r"needs Node >= 20 with npm \(not found\)") as e:
        node.npm_packages(src, PROBE, "the TF.js check")
    assert "\n" not in str(e.value)


# -- the wheel -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("wheel")
    src = d / "src"
    src.mkdir()
    for name in PACKAGE_SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("node_modules", "__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(d), "."],
                   cwd=src, check=True, timeout=600)
    (whl,) = d.glob("rwkv_export-*.whl")
    return whl


def test_wheel_holds_the_driver_and_the_demo_but_no_node_modules(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for f in ["rwkv_export/js/tfjs_step.mjs", "rwkv_export/js/package.json", "rwkv_export/js/package-lock.json",
              "rwkv_export/web_demo/index.html", "rwkv_export/web_demo/main.js", "rwkv_export/web_demo/worker.js",
              "rwkv_export/web_demo/package-lock.json", "rwkv_export/data/tiny-pydoc.safetensors",
              "runtime_ref/rwkv4.py"]:
        assert f in names, f
    demo = {p.name for p in (ROOT / "web_demo").iterdir() if p.suffix in (".html", ".js", ".mjs", ".css")}
    assert demo <= {n.removeprefix("rwkv_export/web_demo/") for n in names}, "a demo file is not in the wheel"
    assert not [n for n in names if "node_modules" in n or n.startswith("tests/")]


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """(run, cwd): run(*args) runs the installed `rwkv-export` in cwd, a folder outside the checkout."""
    d = tmp_path_factory.mktemp("installed")
    venv = d / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
                   check=True, timeout=600)
    cwd = d / "work"
    cwd.mkdir()
    env = {**os.environ, "RWKV_EXPORT_CACHE": str(d / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    env.pop("VIRTUAL_ENV", None)

    def run(*args, timeout=900, **kw):
        return subprocess.run([str(venv / "bin" / "rwkv-export"), *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout, **kw)

    run.py, run.env = py, env
    return run, cwd


def test_installed_wheel_is_what_runs(installed):
    run, cwd = installed
    where = subprocess.run([run.py, "-c", "import rwkv_export, runtime_ref, rwkv_export.serve as s; "
                            "print(rwkv_export.__file__, runtime_ref.__file__, s.WEB_DEMO_DIR)"],
                           cwd=cwd, env=run.env, capture_output=True, text=True, check=True).stdout.split()
    for p in where:
        assert not Path(p).resolve().is_relative_to(ROOT), f"{p} is the checkout's, not the wheel's"
    assert Path(where[2]).name == "web_demo" and Path(where[2]).parent.name == "rwkv_export"
    res = run("--help")
    assert res.returncode == 0 and "onnx" in res.stdout and "serve" in res.stdout, res.stderr
    res = run("builtins")
    assert res.returncode == 0 and "builtin:tiny-pydoc" in res.stdout, res.stderr


def test_installed_wheel_exports_checks_quantizes_generates_and_serves(installed):
    run, cwd = installed
    # relative paths throughout; the gates run once, in `check` (the export's own gate is the same code)
    res = run("onnx", "builtin:tiny", "-o", "out", "--no-prefill", "--no-check")
    assert res.returncode == 0, res.stderr[-2000:]
    res = run("check", "out")
    assert res.returncode == 0 and "PASS" in res.stdout + res.stderr, res.stderr[-2000:]
    res = run("quantize", "out", "--quant", "int8")  # its quality gate reads held-out text from the package data
    assert res.returncode == 0 and re.search(r"int8.*PASS", res.stdout + res.stderr), res.stderr[-2000:]
    res = run("generate", "out", "-p", "ab", "-n", "8", "--seed", "1", "-q", "--variant", "int8")
    assert res.returncode == 0 and res.stdout.startswith("ab"), res.stderr[-2000:]
    proc = subprocess.Popen([str(Path(run.py).parent / "rwkv-export"), "serve", "out", "--port", "0"], cwd=cwd,
                            env=run.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # after the first-use install of onnxruntime-web into the cache
        m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        assert m, line + (proc.stderr.read() if proc.poll() is not None else "")
        url = m.group(1)
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.status == 200 and b"main.js" in r.read()
        with urllib.request.urlopen(url + "model/model.onnx", timeout=30) as r:
            assert r.read() == (cwd / "out" / "model.onnx").read_bytes()
        with urllib.request.urlopen(url + "node_modules/onnxruntime-web/dist/ort.wasm.min.mjs", timeout=30) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "text/javascript"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_installed_wheel_runs_the_tfjs_check(installed):
    """The TF.js check needs the Node driver (package data) and @tensorflow/tfjs (installed on first use)."""
    run, cwd = installed
    res = run("tfjs", "builtin:tiny", "-o", "out_tfjs", "--no-check")  # the README's form, relative -o
    assert res.returncode == 0, res.stderr[-2000:]
    res = run("check", "out_tfjs")  # the parity check in Node, from the folder's relative path
    assert "installing the npm packages for running a TF.js model" in res.stderr
    assert res.returncode == 0 and re.search(r"parity tfjs/fp32 .*PASS", res.stdout + res.stderr), res.stderr[-2000:]
    assert json.loads((cwd / "out_tfjs" / "manifest.json").read_text())["graphs"][0]["format"] == "tfjs"
