"""The README's install is what CI runs: .ci/run takes README.md's install block and runs it as written, and that
block runs tools/setup.sh. Here the pieces, without reinstalling anything: the block .ci/run extracts, and
tools/setup.sh's system step against fake `node`, `apt-cache`, `apt-get`, `id` and `python3` (it must stop with one
clear line on Debian 12's Node 18, use apt-get only for what is missing, and never need `sudo` as root)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_install_block():
    res = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--print-install"], capture_output=True, text=True,
                         timeout=60, check=True)
    block = res.stdout.strip()
    assert block == "bash tools/setup.sh && . .venv/bin/activate"
    readme = (ROOT / "README.md").read_text()
    assert f"<!-- .ci/run runs the next block -->\n```\n{block}\n```" in readme
    assert "sudo apt-get" not in readme
    assert "pytest" in (ROOT / ".ci" / "run").read_text().splitlines()[-1]


def _fake_system(tmp_path: Path, node: str | None, candidate: str, uid: int = 0, chromium: bool = True,
                 sudo: bool = False) -> dict:
    """A copy of tools/setup.sh in a bare folder and the env of a PATH of fakes plus the two real tools it uses
    (awk, dirname): nothing real is installed, whatever the machine has (a real sudo, apt-get, node)."""
    (tmp_path / "tools").mkdir()
    shutil.copy(ROOT / "tools" / "setup.sh", tmp_path / "tools" / "setup.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    fakes = {
        "apt-cache": f'echo "nodejs:"; echo "  Candidate: {candidate}"',
        "apt-get": f'echo "apt-get $*" >> {log}',
        "id": f"echo {uid}",
        "python3": f'echo "python3 $*" >> {log}; exit 1',  # the step after the system one: stop there
    }
    if node is not None:
        fakes["node"] = f'case "$1" in --version) echo v{node};; -p) echo {node.split(".")[0]};; esac'
    if chromium:
        fakes["chromium"] = "exit 0"
    if sudo:
        fakes["sudo"] = f'echo "sudo $*" >> {log}; "$@"'
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    (bin_dir / "npm").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "npm").chmod(0o755)
    for tool in ("awk", "dirname"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    return {**os.environ, "PATH": str(bin_dir)}


def _setup(tmp_path: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("bash"), str(tmp_path / "tools" / "setup.sh")], env=env, capture_output=True, text=True,
                          timeout=60)


def _calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls"
    return log.read_text().splitlines() if log.exists() else []


def test_setup_stops_on_debian12_node18_with_one_line(tmp_path):
    res = _setup(tmp_path, _fake_system(tmp_path, "18.20.4", "18.20.4+dfsg-1~deb12u3"))
    assert res.returncode == 1
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("error: Node >= 20 is needed (found v18.20.4;") and "NodeSource" in line, line
    assert _calls(tmp_path) == [] and not (tmp_path / ".venv").exists()


def test_setup_installs_only_what_is_missing_without_sudo_as_root(tmp_path):
    env = _fake_system(tmp_path, "20.20.2", "20.20.2-1nodesource1", chromium=False)
    res = _setup(tmp_path, env)
    calls = _calls(tmp_path)
    assert calls[:2] == ["apt-get update -qq", "apt-get install -y -qq --no-install-recommends chromium"], calls
    assert calls[2].startswith("python3 -c") and res.returncode == 1  # went on to the Python step (faked to stop)
    assert "sudo" not in res.stderr


def test_setup_installs_a_recent_distro_nodejs(tmp_path):
    """No Node, and the distribution's nodejs is 20+ (e.g. Debian 13): apt-get installs it."""
    res = _setup(tmp_path, _fake_system(tmp_path, None, "20.19.2+dfsg-1"))
    assert _calls(tmp_path)[1] == "apt-get install -y -qq --no-install-recommends nodejs", res.stderr


def test_setup_as_a_user_without_sudo_names_the_command(tmp_path):
    res = _setup(tmp_path, _fake_system(tmp_path, "20.20.2", "20.20.2-1nodesource1", uid=1000, chromium=False))
    assert res.returncode == 1 and _calls(tmp_path) == []
    (line,) = res.stderr.strip().splitlines()
    assert line == "error: installing chromium needs root: run `apt-get install -y chromium` as root, then re-run"


def test_setup_as_a_user_uses_sudo(tmp_path):
    env = _fake_system(tmp_path, "20.20.2", "20.20.2-1nodesource1", uid=1000, chromium=False, sudo=True)
    _setup(tmp_path, env)
    assert _calls(tmp_path)[:2] == ["sudo apt-get update -qq", "apt-get update -qq"]
