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
