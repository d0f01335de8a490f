"""``ckptlab.cli.main.main``: how exceptions become one line and an exit code."""

from __future__ import annotations

import pytest

from ckptlab.cli import main as cli_main


def _raising(exc_factory):
    def fake_app(**kw):
        exc_factory()
    return fake_app


def _ctrl_c():
    raise KeyboardInterrupt


def _lock_error_during_ctrl_c():
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        # what threading.Condition.wait can raise when Ctrl-C lands inside it
        raise RuntimeError("release unlocked lock") from None  # "from None" hides it, __context__ keeps it


def _plain_error():
    raise RuntimeError("release unlocked lock")


@pytest.mark.parametrize("factory, code, words", [
    (_ctrl_c, 130, "interrupted"),
    (_lock_error_during_ctrl_c, 130, "interrupted"),
    (_plain_error, 70, "internal error: RuntimeError"),
])
def test_exit_codes_and_one_line(monkeypatch, capsys, factory, code, words):
    monkeypatch.delenv("CKPTLAB_DEBUG", raising=False)
    monkeypatch.setattr(cli_main, "app", _raising(factory))
    with pytest.raises(SystemExit) as ei:
        cli_main.main([])
    assert ei.value.code == code
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1 and "Traceback" not in err
