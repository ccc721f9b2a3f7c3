"""Output folders (issue 18, points 2 and 3; issue 15's quantize bug): never overwritten without --force, never an
input deleted, one writer per destination, nothing half-written whatever the signal, stale staging removed, odd -o
values refused in one line; `quantize` stages beside the folder and works for int8 and int4.

Most cases drive outdir's staging directly (no export needed); one real export, shared by the quantize tests, and one
interrupted export in a subprocess cover the commands end to end."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rwkv_export.cli import app
from rwkv_export.errors import OutputExistsError, OutputLockedError
from rwkv_export.manifest import MANIFEST_NAME
from rwkv_export.outdir import STAGE_TAG, remove_stale, staged_output_dir

from ckpts import state_dict, write

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def beside(out: Path) -> list[str]:
    """Hidden things rwkv-export may leave next to `out`: staging folders, replaced folders, lock files."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def assert_one_line_error(res, match: str):
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in res.output, res.output
    assert match in err, err


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ---- the move into place ----------------------------------------------------------------------------------------


def test_a_folder_that_appears_during_the_export_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="appeared or filled during the export; nothing was written"):
        with staged_output_dir(out, force=False) as tmp:
            (tmp / "model.onnx").write_text("new")
            out.mkdir()
            (out / "theirs.txt").write_text("someone else's")  # e.g. a second export that finished first
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert beside(out) == []


def test_with_force_it_is_replaced_and_an_empty_folder_always_is(tmp_path):
    out = tmp_path / "out"
    with staged_output_dir(out, force=True) as tmp:
        (tmp / "model.onnx").write_text("new")
        out.mkdir()
        (out / "old.txt").write_text("old")
    assert [p.name for p in out.iterdir()] == ["model.onnx"] and beside(out) == []
    out2 = tmp_path / "out2"
    with staged_output_dir(out2, force=False) as tmp:
        (tmp / "model.onnx").write_text("new")
        out2.mkdir()  # empty: nothing to lose
    assert [p.name for p in out2.iterdir()] == ["model.onnx"]


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    out = tmp_path / "out"
    with staged_output_dir(out, force=False) as tmp:
        assert ".out.lock" in beside(out)
        with pytest.raises(OutputLockedError, match="another rwkv-export is writing"):
            with staged_output_dir(out, force=True):
                pass
        (tmp / "model.onnx").write_text("first")
    assert (out / "model.onnx").read_text() == "first" and beside(out) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_clean_up_like_sigint(tmp_path, sig):
    out = tmp_path / "out"
    before = signal.getsignal(sig)
    with pytest.raises(SystemExit) as exc:
        with staged_output_dir(out, force=False) as tmp:
            (tmp / "model.onnx").write_bytes(b"x" * 1000)
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the handler raises before this ends
    assert exc.value.code == 128 + sig
    assert not out.exists() and beside(out) == []
    assert signal.getsignal(sig) is before  # handlers restored


def test_stale_staging_of_a_dead_process_is_removed_and_a_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / f".out{STAGE_TAG}{dead_pid()}-abc"
    stale.mkdir()
    (stale / "model.onnx.data").write_bytes(b"\0" * 4096)
    live_owner = subprocess.Popen(["sleep", "60"])
    try:
        live = tmp_path / f".out{STAGE_TAG}{live_owner.pid}-def"
        live.mkdir()
        with staged_output_dir(out, force=False) as tmp:
            (tmp / "model.onnx").write_text("new")
        assert not stale.exists() and live.is_dir()
    finally:
        live_owner.kill()
        live_owner.wait()


def test_a_folder_moved_aside_by_a_killed_export_is_put_back(tmp_path):
    """Killed (SIGKILL) between its two renames, an export with --force leaves the old folder as .NAME.old-PID-*:
    the next run restores it rather than losing it."""
    out = tmp_path / "out"
    old = tmp_path / f".out.old-{dead_pid()}-1234"
    old.mkdir()
    (old / "manifest.json").write_text("{}")
    remove_stale(out)
    assert (out / "manifest.json").read_text() == "{}" and beside(out) == []


# ---- odd -o values and inputs, through the CLI --------------------------------------------------------------------


@pytest.fixture
def ckpt_dir(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    write(d / "m.pth", state_dict("tiny"))
    return d


@pytest.mark.parametrize("case,match", [
    ("dangling-symlink", "is a dangling symbolic link"),
    ("symlink-force", "is a symbolic link to"),
    ("dot-force", "names no folder of its own"),
    ("cwd-parent-force", "is the current folder or holds it"),
    ("checkpoint-folder-force", "holds the input"),
    ("checkpoint-ancestor-force", "holds the input"),
    ("tokenizer-folder-force", "holds the input"),
])
def test_odd_output_paths_are_refused_and_inputs_never_deleted(tmp_path, ckpt_dir, monkeypatch, case, match):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    ckpt, extra = ckpt_dir / "m.pth", []
    if case == "dangling-symlink":
        out = work / "dangling"
        out.symlink_to(tmp_path / "nowhere")
    elif case == "symlink-force":
        out = work / "link"
        out.symlink_to(tmp_path / "ck")
    elif case == "dot-force":
        out = Path(".")
    elif case == "cwd-parent-force":
        out = tmp_path
    elif case == "checkpoint-folder-force":
        out = ckpt_dir
    elif case == "checkpoint-ancestor-force":
        (ckpt_dir / "sub").mkdir()
        os.link(ckpt_dir / "m.pth", ckpt_dir / "sub" / "m.pth")
        out, ckpt = ckpt_dir, Path("../ck/sub/m.pth")  # relative, one folder down
    else:
        (ckpt_dir / "tokenizer.json").write_text("{}")
        out, ckpt, extra = ckpt_dir, "builtin:tiny", ["--tokenizer", ckpt_dir / "tokenizer.json"]
    snapshot = sorted(str(p) for p in tmp_path.rglob("*"))
    force = [] if case == "dangling-symlink" else ["--force"]
    assert_one_line_error(run("onnx", ckpt, "-o", out, *force, *extra, "-q"), match)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == snapshot  # nothing written, nothing deleted
    assert (ckpt_dir / "m.pth").stat().st_size > 0


def test_sigterm_during_an_export_leaves_nothing_and_a_second_writer_is_refused(tmp_path):
    """A real `onnx` run in a subprocess: a second export to the same -o is refused while it runs (the lock), and
    SIGTERM removes its staging folder and lock (it used to leave `.out.partial-*` behind)."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the export of builtin:tiny takes well under a second now: the child's graph writing is held back (a sleep
    # before each graph is saved, patched in by this test only) so that the second writer and the signal meet it
    # while it runs
    child = ("import sys, time; from rwkv_export import onnx_build; save = onnx_build.Graph.save; "
             "onnx_build.Graph.save = lambda self, path: (time.sleep(60), save(self, path))[1]; "
             "from rwkv_export.cli import main; sys.argv[0] = 'rwkv-export'; main()")
    proc = subprocess.Popen([sys.executable, "-c", child, "onnx", "builtin:tiny", "-o", str(out),
                             "--no-check", "-q"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not any(STAGE_TAG in n for n in beside(out)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
            time.sleep(0.2)
        second = run("onnx", "builtin:tiny", "-o", out, "--no-check", "-q")
        assert_one_line_error(second, "another rwkv-export is writing")
        assert proc.poll() is None, "the export ended before the signal: nothing was tested"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in proc.stderr.read()
    assert not out.exists() and beside(out) == []


# ---- quantize: staged beside the folder, int8 and int4 (issue 15: both failed on a symlinked data file) -----------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "out"
    res = run("onnx", "builtin:tiny", "-o", out, "--no-check", "-q")  # with the prompt graph: a shared .data file
    assert res.exit_code == 0, res.output
    assert (out / "model.onnx.data").is_file()
    return out


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_sigterm_during_quantize_leaves_the_folder_as_it_was(exported, monkeypatch):
    from rwkv_export import quantize

    before = snapshot(exported)

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    monkeypatch.setattr(quantize, "quantize_graphs", killed)
    res = run("quantize", exported, "--quant", "int8", "--force", "-q")
    assert res.exit_code == 128 + signal.SIGTERM, res.output
    assert snapshot(exported) == before and beside(exported) == []


def test_quantize_int8_and_int4_stage_beside_the_folder(exported, monkeypatch):
    from rwkv_export import quantize

    before = snapshot(exported)
    staged_in = []
    real = quantize.quantize_graphs

    def spy(variant, graphs, **kw):
        staged_in.extend((Path(src).parent, Path(src).is_symlink()) for src, _ in graphs)
        return real(variant, graphs, **kw)

    monkeypatch.setattr(quantize, "quantize_graphs", spy)
    res = run("quantize", exported, "--quant", "int8,int4", "-q")
    assert res.exit_code == 0, res.output
    # staged in a hidden folder beside the export (not inside, where `serve` would serve it), from real files
    assert len(staged_in) == 4  # step and prompt graph of each variant, quantized together
    for parent, is_link in staged_in:
        assert parent.parent == exported.parent and parent.name.startswith(f".{exported.name}{STAGE_TAG}")
        assert not is_link
    m = json.loads((exported / MANIFEST_NAME).read_text())
    graphs = {(g["variant"], g["kind"]): g for g in m["graphs"]}
    assert set(graphs) == {(v, k) for v in ("fp32", "int8", "int4") for k in ("step", "sequence")}
    for v in ("int8", "int4"):
        assert graphs[(v, "step")]["parity"]["passed"] and graphs[(v, "sequence")]["parity"]["passed"]
        assert graphs[(v, "step")]["quantization"]["variant"] == v
    listed = {f["file"] for f in m["files"]}
    assert {"model_int8.onnx", "model_q4.onnx", "prefill_int8.onnx", "prefill_q4.onnx"} <= listed
    assert listed == {p.name for p in exported.iterdir()} - {MANIFEST_NAME}  # every file listed, nothing hidden
    assert not any(p.is_symlink() for p in exported.iterdir())
    after = snapshot(exported)
    assert all(after[f] == before[f] for f in before if f != MANIFEST_NAME)  # the fp32 files untouched
    assert beside(exported) == []
