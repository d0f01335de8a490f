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


# ------------------------------------------------------------------------------ one CLI language


def _commands():
    """Every leaf command of the real app, as argv prefixes (``["civitai", "link"]``)."""
    import typer

    def walk(cmd, prefix):
        subs = getattr(cmd, "commands", None)
        if subs is None:
            yield prefix, cmd
            return
        for name, sub in subs.items():
            yield from walk(sub, [*prefix, name])

    return list(walk(typer.main.get_command(cli_main.app), []))


COMMANDS = _commands()
COMMAND_IDS = [" ".join(p) for p, _ in COMMANDS]


def _help(capsys, argv):
    with pytest.raises(SystemExit) as ei:
        cli_main.main(argv)
    out = capsys.readouterr()
    assert ei.value.code == 0, out.err
    return out.out


def test_the_walk_finds_every_command():
    """The lists below are built from the app; this keeps the walk itself honest."""
    assert {"inspect", "check", "convert", "scan", "prune", "precision", "to-diffusers", "merge", "download",
            "civitai link", "civitai info", "apply-plan"} <= set(COMMAND_IDS)
    assert len(COMMAND_IDS) == len(set(COMMAND_IDS)) >= 22


@pytest.mark.parametrize("argv", [[]] + [p for p, _ in COMMANDS], ids=["root"] + COMMAND_IDS)
def test_help_is_plain_and_h_works(capsys, monkeypatch, argv):
    """``-h`` is ``--help`` on the root and every command; help shows flags bare and values with a plain
    name: no typer type tags such as ``<bool>``, ``<list[str]>``, ``<path>`` and no ``{inputs}`` usage."""
    import re

    monkeypatch.setenv("COLUMNS", "200")
    long = _help(capsys, [*argv, "--help"])
    short = _help(capsys, [*argv, "-h"])
    assert short == long
    assert "Usage: ckptlab" in long
    tags = re.findall(r"<(?:bool|str|int|float|path|list\[[^\]]*\]|int range|float range|Path)>", long)
    assert not tags, long
    usage = next(ln for ln in long.splitlines() if "Usage:" in ln)
    assert "{" not in usage and "<" not in usage, usage
    for flag in ("--json", "--overwrite", "--dry-run"):
        for ln in long.splitlines():
            if re.search(rf"{flag}\s", ln):  # a flag takes no value: nothing between it and its help
                assert not re.search(rf"{flag}\s+(TEXT|PATH|INTEGER|FLOAT|VALUE|BOOLEAN)\b", ln), ln


CATALOG_COMMANDS = {"scan", "hash", "ls", "show", "dupes", "plan-space", "report", "apply-plan", "prune",
                    "precision", "extract", "replace", "to-diffusers", "from-diffusers", "convert", "merge",
                    "download", "civitai link", "civitai show"}  # civitai info reads no catalog


def _option_spellings(cmd):
    out = set()
    for p in cmd.params:
        hidden = getattr(p, "hidden_opts", frozenset())
        out |= {o for o in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])] if o not in hidden}
    return out


@pytest.mark.parametrize("cid", sorted(CATALOG_COMMANDS), ids=sorted(CATALOG_COMMANDS))
def test_catalog_commands_take_db(cid):
    cmd = dict(zip(COMMAND_IDS, (c for _, c in COMMANDS), strict=True))[cid]
    assert "--db" in _option_spellings(cmd)


def test_one_spelling_per_concept():
    """The same thing is spelled the same everywhere; old spellings survive only as hidden aliases."""
    retired = {"--catalog": "--db", "--workers": "--jobs", "--threads-io": "--jobs", "--output-dir": "--out-dir",
               "--outdir": "--out-dir", "--out": "--output", "--dtype": "--precision", "--force": "--overwrite",
               "--dryrun": "--dry-run", "--database": "--db"}
    for cid, (_, cmd) in zip(COMMAND_IDS, COMMANDS, strict=True):
        shown = _option_spellings(cmd)
        bad = {o: retired[o] for o in shown if o in retired}
        assert not bad, f"{cid}: {bad}"
        for p in cmd.params:  # the usual short forms mean the usual thing
            opts = getattr(p, "opts", [])
            if "-o" in opts:
                assert "--output" in opts, cid
            if "-j" in opts:
                assert "--jobs" in opts, cid
            if "-h" in opts:
                pytest.fail(f"{cid}: -h is help")


@pytest.mark.parametrize(("argv", "old", "new"), [
    (["apply-plan"], "--catalog", "--db"),
    (["scan"], "--workers", "--jobs"),
    (["merge"], "--dtype", "--precision"),
])
def test_hidden_aliases_parse_but_are_not_shown(capsys, monkeypatch, argv, old, new):
    monkeypatch.setenv("COLUMNS", "200")
    text = _help(capsys, [*argv, "-h"])
    assert new in text and old not in text
    cmd = dict(zip(COMMAND_IDS, (c for _, c in COMMANDS), strict=True))[" ".join(argv)]
    [param] = [p for p in cmd.params if new in getattr(p, "opts", [])]
    assert old in param.opts  # still parsed: scripts written against the old spelling keep working


def test_hidden_alias_sets_the_same_value(tmp_path, cli):
    """scan --workers 1 and scan --jobs 1 reach the same parameter (a catalog is made either way)."""
    for i, flag in enumerate(("--workers", "--jobs", "-j")):
        db = tmp_path / f"c{i}.db"
        r = cli("scan", "--db", db, flag, "1", tmp_path, "--json")
        assert r.returncode == 0, r.stderr
        assert db.is_file()
    r = cli("scan", "--jobs", "0", tmp_path)
    assert r.returncode == 2 and "--jobs" in r.stderr, r.stderr  # the error names the shown spelling


def test_piped_output_is_never_hard_wrapped(tmp_path, cli):
    """rich wrapped stdout at 80 columns when it was not a terminal: a long path split over two lines."""
    from ckptlab.sample.build import write_model

    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / ("and-another-one-" * 4)
    deep.mkdir(parents=True)
    src = write_model(deep / ("model-with-a-long-name-" * 3 + ".safetensors"), "sd1_vae", small=True)
    assert len(str(src)) > 200
    env = {"COLUMNS": "80"}  # what rich assumes for a file anyway; explicit so the test does not depend on it
    r = cli("check", src, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"safe       {src} (safetensors)"], r.stdout
    r = cli("precision", src, "--to", "fp32", "--only", "vae", "--dry-run", env=env)
    assert r.returncode == 0, r.stderr
    [line] = r.stdout.splitlines()
    assert line.startswith(f"{src} -> would write {deep}/") and line.endswith("tensors changed)") or \
        "nothing written" in line, line
    r = cli("prune", deep / "missing.safetensors", env=env)
    [err] = r.stderr.splitlines()
    assert err == f"ckptlab: error: {deep / 'missing.safetensors'}: no such file", err
