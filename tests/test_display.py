"""The one size formatter and the terminal-safety helpers (hand-computed expectations)."""


from ckptlab.display import cap, human_size, one_line, printable, strip_unsafe


def test_human_size_iec_units():
    assert human_size(0) == "0 B"
    assert human_size(1023) == "1023 B"
    assert human_size(1024) == "1.0 KiB"
    assert human_size(1536) == "1.5 KiB"
    assert human_size(29.6 * 2**20) == "29.6 MiB"
    assert human_size(int(6.46 * 2**30), precision=2) == "6.46 GiB"
    assert human_size(-2048) == "-2.0 KiB"
    assert human_size(None) == ""
    assert human_size(3 * 2**50) == "3.0 PiB"


def test_printable_shows_escapes_and_bidi():
    assert printable("plain name.safetensors") == "plain name.safetensors"
    assert printable("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert printable("evil\u202egpj.exe") == "evil\\u202egpj.exe"
    assert printable("line\rover") == "line\\x0dover"
    assert printable("x\x9by") == "x\\x9by"  # C1 CSI
    assert printable("a\nb") == "a\\x0ab"
    assert printable("a\nb", keep_newlines=True) == "a\nb"
    assert printable("日本語 ü") == "日本語 ü"


def test_strip_unsafe_for_names():
    assert strip_unsafe("model\u202e\u2066x\x07.safetensors") == "modelx.safetensors"


def test_cap_and_one_line():
    assert cap("abc", 5) == "abc"
    long = "y" * 1_500_000
    line = one_line(long)
    assert len(line) < 1100 and line.endswith("[1499000 more characters]")
    assert "\n" not in one_line("a\nb\x1b")


def test_cap_total_counts_the_note_in_the_limit():
    from ckptlab.display import cap_total

    text = "x" * 1600
    line = cap_total(text, 1000)
    assert len(line) == 1000
    kept = 1000 - len(line[line.index("…"):])
    assert line == "x" * kept + f"… [{1600 - kept} more characters]"  # N is exactly what was left out
    assert cap_total("abc", 3) == "abc" and cap_total("abcdef", 3) == "abc"


def test_error_line_of_a_1600_character_path_is_at_most_1000_characters_in_total(cli, tmp_path):
    """`inspect` on a ~1,600-character path printed a 1,039-character error line; README promises 1,000."""
    path = "/" + "/".join(["d" * 200] * 8)  # 1,608 characters, does not exist
    assert len(path) > 1600
    r = cli("inspect", path)
    assert r.returncode != 0
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptlab: error: "), r.stderr
    assert len(lines[0]) <= 1000 and lines[0].endswith(" more characters]"), len(lines[0])


def test_warning_line_caps_the_whole_line(capsys):
    from ckptlab.cli.common import warning_line

    warning_line("w" * 1600)
    line = capsys.readouterr().err.rstrip("\n")
    assert "\n" not in line and line.startswith("ckptlab: warning: www") and len(line) <= 1000


def _size_formatting_files() -> set[str]:
    """Source files that print a number followed by a byte unit themselves (``f"{mb:.1f} MiB"``)."""
    import re

    from conftest import SRC

    unit = re.compile(r"\}\s*(KiB|MiB|GiB|TiB|KB|MB|GB)\b")
    return {str(p.relative_to(SRC)) for p in (SRC / "ckptlab").rglob("*.py")
            if p.name != "display.py" and unit.search(p.read_text(encoding="utf-8"))}


#: VRAM estimates are stated in GiB with fixed decimals on purpose (how UIs and model cards quote them)
FIXED_UNIT = {"ckptlab/arch/vram.py", "ckptlab/cli/cmd_inspect.py"}


def test_the_walk_finds_hand_made_sizes():
    assert FIXED_UNIT <= _size_formatting_files()



def test_sizes_are_formatted_by_human_size_only():
    assert _size_formatting_files() - FIXED_UNIT == set()
