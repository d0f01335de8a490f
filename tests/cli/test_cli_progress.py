"""``cli.common.progress_phases``: one library call that reports two phases to two callbacks (``civitai link``:
bytes hashed, then files linked) gets one rich bar per phase, one at a time (rich refuses two live bars)."""

from __future__ import annotations

import io

from rich.console import Console

from ckptlab.cli import common


def test_each_phase_gets_its_own_bar_one_at_a_time(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(common, "err_console", Console(file=buf, force_terminal=True, width=100))
    with common.progress_phases(True) as phase:
        hashing, linking = phase("cataloguing", unit_bytes=True), phase("linking", unit_bytes=False)
        hashing(0, total=2048)
        hashing(1024)
        linking(0, total=3)  # closes the first bar, opens the second (two live bars would raise LiveError)
        linking(2)
    out = buf.getvalue()
    assert "cataloguing" in out and "linking" in out
    assert "2/3" in out  # the second phase counts files, not bytes


def test_disabled_phases_print_nothing(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(common, "err_console", Console(file=buf, force_terminal=True, width=100))
    with common.progress_phases(False) as phase:
        phase("cataloguing")(10, total=10)
    assert buf.getvalue() == ""
