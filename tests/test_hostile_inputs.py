"""Files and strings that are not what they seem: a --storage that is not a journal, device and
layer names built to inject code into generated sources or drive the terminal, a password in a
storage URL, a path built to run a command when a hint is pasted, TeX in a device name; and
lookup time that must not grow with the database."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autoconv import ConvSpec, Plan, get_algorithm
from autoconv.cli import app
from autoconv.device import DeviceInfo
from autoconv.errors import TuningDBError
from autoconv.render import SOURCE_SAFE, source_text, template_hash
from autoconv.store import SQLiteStore, TunedResult
from autoconv.tuning.study import open_storage
from autoconv.tuning.tuner import tune_layer

from test_reliability import FAKE_GPU, L, L_SPEC, FakeEvaluator

runner = CliRunner()
WIDE = {"COLUMNS": "200"}
INJECTION = 'EvilGPU */\n#error INJECTED\n/* \\ "q" \x00 é ??/ 100%'
ESCAPES = "Evil\x1b[2J\x1b]0;owned\x07GPU\x9b"


def cli(*args: str):
    return runner.invoke(app, list(args), env=WIDE)


def untouched(path: Path):
    before = path.read_bytes(), stat.S_IMODE(path.stat().st_mode)
    return lambda: (path.read_bytes(), stat.S_IMODE(path.stat().st_mode)) == before


def record(path: Path, device: DeviceInfo, spec: ConvSpec = L_SPEC) -> None:
    with SQLiteStore(path) as db:
        db.record_device(device)
        db.save_result(TunedResult(device=device.fingerprint(), spec=spec, algorithm="im2col_gemm",
                                   template_hash=template_hash(), params=get_algorithm("im2col_gemm").heuristic(spec, device),
                                   median_ms=1.0, gflops=1.0, rel_error=1e-6, default_ms=1.0, trials=1))


# 1 and 10. --storage: an empty or new file, or an Optuna journal; anything else untouched ------

def test_a_tuning_database_given_as_storage_is_refused_and_untouched(opencl, tmp_path):
    mine = tmp_path / "mine.db"
    assert cli("tune", L, "--trials", "2", "--repeats", "1", "--jobs", "1", "--db", str(mine)).exit_code == 0
    same = untouched(mine)
    for db in (mine, tmp_path / "other.db"):
        result = cli("tune", L, "--trials", "2", "--repeats", "1", "--jobs", "1", "--db", str(db), "--storage", str(mine))
        assert result.exit_code != 0, result.output
        assert "is an SQLite database" in result.output and "sqlite:///" in result.output
        assert "Traceback" not in result.output
        assert same(), "the database given as --storage was changed"
    assert not list(tmp_path.glob("*.damaged-*"))
    assert not (tmp_path / "other.db").exists()  # refused before any database was made


@pytest.mark.parametrize("content", [b"my notes\nline two\n", b"{}\n", b"[1, 2]\n", b"\x00\x01binary",
                                     b'{"op_code": 0, "wor', b"\n"])
def test_other_files_given_as_storage_are_refused_untouched(tmp_path, content):
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    same = untouched(path)
    if content.startswith(b'{"op_code"'):  # a journal torn in its first entry: a journal, repaired
        with pytest.warns(RuntimeWarning, match="damaged tail"):
            open_storage(str(path))
        return
    with pytest.raises(TuningDBError, match="left untouched"):
        open_storage(str(path))
    assert same()
    assert not list(tmp_path.glob("*.damaged-*"))


def test_a_fifo_given_as_storage_is_refused_at_once(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(TuningDBError, match="not a regular file"):
        open_storage(str(fifo))
    assert time.monotonic() - started < 5


def test_a_new_or_empty_file_and_a_journal_are_storages(tmp_path):
    journal = tmp_path / "shared.journal"
    storage = open_storage(str(journal))
    tune_layer(L_SPEC, FAKE_GPU, FakeEvaluator(), SQLiteStore(tmp_path / "a.db"), trials=3, storage=storage)
    assert journal.stat().st_size > 0
    open_storage(str(journal))  # a journal again
    empty = tmp_path / "empty.journal"
    empty.write_bytes(b"")
    open_storage(str(empty))


def test_a_storage_password_is_never_printed():
    for url, secret in (("postgresql://nobody@127.0.0.1:1/x?password=s3cretQ", "s3cretQ"),
                        ("postgresql://nobody:pa@ssw0rd@127.0.0.1:1/x", "ssw0rd"),
                        ("postgresql://nobody:s3cret%40Q@127.0.0.1:1/x", "s3cret")):
        with pytest.raises(TuningDBError) as caught:
            open_storage(url)
        assert secret not in str(caught.value), str(caught.value)


# 2. every string reaching a generated source or header goes through source_text -------------

@pytest.mark.parametrize("text", [INJECTION, "*/", "/*", "a\nb", "a\\", "\x00", "é✓", "??/", '"', "%41",
                                  "\r\n#define X", "\u2028", "\udcff"])
def test_source_text_is_inert_in_comments_and_strings(text):
    safe = source_text(text)
    assert set(safe) <= SOURCE_SAFE | {"%"}
    assert "*" not in safe and "\\" not in safe and "\n" not in safe and '"' not in safe and "?" not in safe
    assert source_text(text) != source_text(text + "x")


def test_an_injected_device_or_layer_name_stays_in_its_comment(tmp_path):
    from autoconv.export import ExportEntry, export

    evil = DeviceInfo("opencl", INJECTION, "evilvendor", INJECTION, INJECTION, "cpu", 2, 65536, 1024, (1024,) * 3)
    db = tmp_path / "evil.db"
    record(db, evil)
    out = tmp_path / "e1"
    result = cli("export", "--all", "--db", str(db), "--device", "EvilGPU", "--out", str(out))
    assert result.exit_code == 0, result.output
    export([ExportEntry(INJECTION, L_SPEC, Plan("direct"), True)], evil, tmp_path / "e2")
    for folder in (out, tmp_path / "e2"):
        for path in folder.iterdir():
            if path.suffix not in (".cl", ".h"):
                continue
            text = path.read_text(encoding="ascii")  # only ASCII reaches generated files
            assert "INJECTED" in text  # the name is there, as text
            assert not re.search(r"^\s*#\s*error", text, re.M), path.name
            if path.suffix == ".cl":
                assert text.index("*/") > text.index("INJECTED")  # the first comment closes after the name
    header = next(out.glob("*.h"))
    if shutil.which("gcc"):
        check = subprocess.run(["gcc", "-fsyntax-only", "-x", "c", str(header)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr


# 11. re-export keeps the user's edits ---------------------------------------------------------

def test_re_export_refuses_to_discard_an_edited_kernel_or_header(tmp_path):
    from autoconv.export import ExportEntry, ExportError, export

    entry = [ExportEntry("l", L_SPEC, Plan("direct"), True)]
    out = tmp_path / "out"
    export(entry, FAKE_GPU, out)
    export(entry, FAKE_GPU, out)  # untouched: replaced
    for edited in (next(out.glob("*.cl")), next(out.glob("*.h"))):
        original = edited.read_bytes()
        edited.write_bytes(original.replace(b"\n", b"\n// my tweak\n", 1))
        same = untouched(edited)
        with pytest.raises(ExportError, match="edited"):
            export(entry, FAKE_GPU, out)
        assert same()
        edited.write_bytes(original)
    export(entry, FAKE_GPU, out)


# 3. lookup: the layer's rows through the index; one shared re-read ---------------------------

def test_a_tuned_layer_is_looked_up_without_reading_the_whole_database(tmp_path, monkeypatch):
    from autoconv.serve import session as session_module

    db = tmp_path / "t.db"
    record(db, FAKE_GPU)
    record(db, FAKE_GPU, L_SPEC.replace(k=L_SPEC.k + 1))

    def whole_read(path, device=None):
        raise AssertionError("the whole database was read for a tuned layer")
    monkeypatch.setattr(session_module, "read_contents", whole_read)
    session = session_module.Session(session_module.Settings(db_path=db, shipped_db_dir=None))
    assert session.lookup(L_SPEC, FAKE_GPU).source == "tuned"
    assert "another epilogue" in session.lookup(L_SPEC.replace(activation="relu"), FAKE_GPU).source
    with pytest.raises(AssertionError, match="whole database"):
        session.lookup(L_SPEC.replace(r=1, s=1, padding=0), FAKE_GPU)  # a fallback reads it


def test_a_fallback_reads_only_this_device_and_its_peers(tmp_path):
    from autoconv.serve.session import read_contents

    db = tmp_path / "many.db"
    other = DeviceInfo("cuda", "CUDA", "nvidia", "Some GPU", "12.0", "gpu", 100, 49152, 1024, (1024, 1024, 64))
    peer = replace(FAKE_GPU, name="Fake GPU 2")
    for device in (FAKE_GPU, other, peer):
        record(db, device)
    fingerprints = {r.device for r in read_contents(db, FAKE_GPU).results}
    assert fingerprints == {FAKE_GPU.fingerprint(), peer.fingerprint()}
    assert len(read_contents(db).results) == 3


def test_threads_share_one_re_read_of_a_changed_database(tmp_path, monkeypatch):
    from autoconv.serve import session as session_module

    db = tmp_path / "t.db"
    record(db, FAKE_GPU)
    reads = []
    real = session_module.read_contents

    def slow_read(path, device=None):
        reads.append(path)
        time.sleep(0.3)
        return real(path, device)
    monkeypatch.setattr(session_module, "read_contents", slow_read)
    session = session_module.Session(session_module.Settings(db_path=db, shipped_db_dir=None))
    threads = [threading.Thread(target=session.contents, args=(db,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(reads) == 1


# 4-7. what commands print ----------------------------------------------------------------------

def test_terminal_escapes_in_stored_names_are_printed_inert(tmp_path):
    db = tmp_path / "esc.db"
    device = DeviceInfo("opencl", ESCAPES, "v", ESCAPES, "1.0", "cpu", 2, 65536, 1024, (1024,) * 3)
    record(db, device)
    for args in (("db", "list", "--db", str(db)), ("db", "list", "--db", str(db), "--csv"),
                 ("db", "show", L, "--db", str(db)), ("db", "show", L, "--db", str(db), "--csv")):
        result = cli(*args)
        assert result.exit_code == 0, result.output
        assert "Evil" in result.output
        assert not any(ch in result.output for ch in "\x1b\x07\x9b"), (args, result.output)


def test_the_fallback_hint_quotes_the_db_path(opencl, tmp_path):
    folder = tmp_path / "a b;touch PWNED"
    folder.mkdir()
    db = folder / "t.db"
    record(db, FAKE_GPU)  # a database, but nothing in it for this machine's device
    result = cli("run", "n=1,c=4,h=6,w=6,k=4,r=3,s=3,pad=1", "--repeats", "1", "--db", str(db))
    assert result.exit_code == 0, result.output
    assert f"--db {shlex.quote(str(db))}" in result.output.replace("\n", "")


def test_db_plot_takes_tex_in_device_names_literally(tmp_path):
    pytest.importorskip("matplotlib")
    db = tmp_path / "tex.db"
    for name in (r"GPU $\frac{", r"GPU $x$ \alpha"):
        device = DeviceInfo("opencl", "CL", "v", name, "1.0", "gpu", 8, 16384, 64, (64, 64, 64))
        with SQLiteStore(db) as store:
            tune_layer(L_SPEC, device, FakeEvaluator(), store, trials=3)
    result = cli("db", "plot", str(tmp_path / "curves.png"), "--db", str(db))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "curves.png").stat().st_size > 0


# 8 and 9. plot and HTML files: the umask's mode, an existing file's mode kept, checked before work

def test_plot_files_follow_the_umask_and_keep_an_existing_mode(tmp_path):
    from autoconv.plots import write_atomically

    old = os.umask(0o022)
    try:
        new = tmp_path / "new.png"
        write_atomically(new, b"x")
        assert stat.S_IMODE(new.stat().st_mode) == 0o644
        kept = tmp_path / "kept.html"
        kept.write_bytes(b"old")
        os.chmod(kept, 0o640)
        write_atomically(kept, b"new")
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_bytes() == b"new"
    finally:
        os.umask(old)


def test_an_unwritable_plot_or_html_directory_is_refused_before_measuring():
    pytest.importorskip("matplotlib")
    from autoconv.plots import PlotError, check_output_path

    unwritable = Path("/proc/self")  # not writable, even for root
    assert not os.access(unwritable, os.W_OK)
    with pytest.raises(PlotError, match="not writable"):
        check_output_path(unwritable / "plot.png")
    result = cli("explain", L, "--html", str(unwritable / "report.html"))
    assert result.exit_code != 0 and "not writable" in result.output


def test_plots_label_log_axes_plainly_and_keep_the_fastest_bar_visible(monkeypatch):
    """No 6x10^1 (TeX is off, so it would show as raw markup), the fastest bar clear of the
    floor, and a point above the roof explained in the legend."""
    pytest.importorskip("matplotlib")
    from autoconv import plots
    from autoconv.roofline import DeviceRoofs

    figures = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: figures.append(figure) or b"")
    points = [plots.MethodPoint("l1", "direct", 60.0, 2.0, 0.5), plots.MethodPoint("l1", "winograd", 0.2, 900.0, 20.0),
              plots.MethodPoint("l2", "im2col_gemm", 1.5, 150.0, 10.0)]
    plots.compare_figure(points, DeviceRoofs(peak_gflops=500.0, bandwidth_gbs=20.0), "dev")
    plots.tuning_curves_figure({"l1 winograd": [3.0, 1.0, 0.3]}, "curves", None, {"l1 winograd": 0.35})
    for figure in figures:
        figure.canvas.draw()
        for axes in figure.axes:
            labels = [t.get_text() for t in axes.get_yticklabels() + axes.get_xticklabels()]
            assert not any("times" in text or "\\\\" in text or "$" in text for text in labels), labels
    bars, roof = figures[0].axes
    assert bars.get_ylim()[0] <= 0.2 / 3  # the 0.2 ms bar is a bar, not a sliver at the floor
    assert any("above the roof" in t.get_text() for t in roof.get_legend().get_texts())
    (curves,) = figures[1].axes  # db plot marks the stored (re-timed) time db list serves
    assert any("stored" in t.get_text() for t in curves.get_legend().get_texts())
