"""A1111 infotext: our writer and reader against an independent A1111 parser written here.

The oracle is A1111 1.10's ``parse_generation_parameters`` as the reference describes it (``re_param_code``, the
last-line rule, ``unquote`` = ``json.loads``, ``Size`` split into ``Size-1``/``Size-2``), written out below without
using any ckptlab code. Every text is parsed by both; they must agree. A naive ``split(",")`` parser (sd-parsers'
behaviour) is shown to lose the quoted values that ours keeps.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest

from ckptlab.imaging.infotext import format_infotext, join_hashes, parse_infotext, split_hashes

# ----------------------------------------------------------------------------------- the independent oracle

RE_PARAM_CODE = r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)'
RE_PARAM = re.compile(RE_PARAM_CODE)
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")


def _unquote(text: str) -> str:
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:  # noqa: BLE001 - A1111 keeps the text as it is
        return text


def a1111_parse(x: str) -> dict:
    """A1111's ``infotext_utils.parse_generation_parameters`` (the parts that read the text)."""
    res: dict = {}
    prompt, negative_prompt, done_with_prompt = "", "", False
    *lines, lastline = x.strip().split("\n")
    if len(RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    for k, v in RE_PARAM.findall(lastline):
        try:
            if v[0] == '"' and v[-1] == '"':
                v = _unquote(v)
            m = RE_IMAGESIZE.match(v)
            if m is not None:
                res[f"{k}-1"] = m.group(1)
                res[f"{k}-2"] = m.group(2)
            else:
                res[k] = v
        except Exception:  # noqa: BLE001 - A1111 prints and goes on
            pass
    return res


def ours_as_a1111(text: str) -> dict:
    """Our parse in the oracle's shape (flags left out: A1111's reader drops them)."""
    it = parse_infotext(text)
    res = {"Prompt": it.prompt, "Negative prompt": it.negative}
    for k, v in it.params.items():
        if v == k:
            continue
        m = RE_IMAGESIZE.match(v) if isinstance(v, str) else None
        if m:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    return res


def naive_parse(line: str) -> dict:
    """sd-parsers 0.6's reading of the parameter line: ``split(",")`` then ``split(":")``, 2-part items only."""
    out = {}
    for item in line.split(","):
        parts = item.split(":")
        if len(parts) == 2:
            out[parts[0].strip()] = parts[1].strip()
    return out


REFERENCE = (
    "masterpiece, a lighthouse at dusk, <lora:add_detail:0.8>\n"
    "second line: with a colon\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, "
    "VAE: vae-ft-mse-840000-ema-pruned.safetensors, Denoising strength: 0.4, Clip skip: 2, Hires upscale: 2, "
    "Hires upscaler: Latent, Lora hashes: \"add_detail: 7c6bad76eb54, style: 0a1b2c3d4e5f\", "
    "TI hashes: \"easynegative: c74b4e810b03\", Emphasis: No norm, Version: v1.10.1"
)

TEXTS = {
    "reference": REFERENCE,
    "no-negative": "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 1, Size: 512x512, Model hash: abc1234567",
    "only-params": "Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 64x64",
    "windows-newlines": REFERENCE.replace("\n", "\r\n"),
    "steps-in-prompt": ("Steps: up the hill, Seed: 3, Size: 4x4, Sampler: none\nNegative prompt: Steps: 2, CFG scale: 3, "
                        "Seed: 4\nSteps: 30, Sampler: Euler, CFG scale: 5, Seed: 99, Size: 640x480"),
    "pre-1.6": ("old prompt\nNegative prompt: bad\nSteps: 28, Sampler: Euler a, CFG scale: 11, Seed: 3967410442, "
                "Size: 512x704, Model hash: 925997e9, Model: nai-full, Denoising strength: 0.7, Clip skip: 2, "
                "ENSD: 31337, Hires upscale: 1.5, Hires upscaler: Latent (nearest-exact)"),
    "escaped-quotes": ('p\nSteps: 5, Sampler: Euler, CFG scale: 7, Seed: 2, ADetailer prompt: "a \\"b\\", c: d", '
                       'Wildcard: "line1\\nline2"'),
    "unicode": 'ein Bild, 猫\nNegative prompt: schlecht\nSteps: 5, Sampler: Euler, CFG scale: 7, Seed: 2, Note: "é, ü: 日本"',
    "no-param-line": "just a prompt\nwith two lines",
    "multi-line-negative": "p\nNegative prompt: a\nb, c\nSteps: 5, Sampler: Euler, CFG scale: 7, Seed: 2",
}


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_agrees_with_a1111(name):
    text = TEXTS[name]
    assert ours_as_a1111(text) == a1111_parse(text)


def test_reference_values_exact():
    it = parse_infotext(REFERENCE)
    assert it.prompt == "masterpiece, a lighthouse at dusk, <lora:add_detail:0.8>\nsecond line: with a colon"
    assert it.negative == "blurry, lowres"
    assert it.params["Lora hashes"] == "add_detail: 7c6bad76eb54, style: 0a1b2c3d4e5f"
    assert split_hashes(it.params["Lora hashes"]) == {"add_detail": "7c6bad76eb54", "style": "0a1b2c3d4e5f"}
    assert it.params["Version"] == "v1.10.1"
    assert it.size == (512, 768)
    nets = it.extra_networks()
    assert [(n.kind, n.name, n.weight) for n in nets] == [("lora", "add_detail", 0.8)]


def test_naive_split_loses_quoted_values_ours_does_not():
    line = REFERENCE.splitlines()[-1]
    naive = naive_parse(line)
    assert "Lora hashes" not in naive and "TI hashes" not in naive  # lost
    assert naive.get("style") == '0a1b2c3d4e5f"'  # and a bogus key appears, as the reference says
    ours = parse_infotext(REFERENCE).params
    assert ours["Lora hashes"] == "add_detail: 7c6bad76eb54, style: 0a1b2c3d4e5f"
    assert ours["TI hashes"] == "easynegative: c74b4e810b03"
    assert "style" not in ours


def _random_text(rnd: random.Random, alphabet: str, n: int) -> str:
    s = "".join(rnd.choice(alphabet) for _ in range(n))
    lines = [ln.strip() for ln in s.split("\n")]
    lines = [ln if ln and not ln.startswith("Negative prompt:") else "x" for ln in lines]
    return "\n".join(lines)


KEYS = ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model", "VAE",
        "Denoising strength", "Clip skip", "Hires upscaler", "Lora hashes", "TI hashes", "ADetailer prompt",
        "Template", "Version", "My-ext/key"]


@pytest.mark.parametrize("seed", range(40))
def test_random_round_trip_and_agreement(seed):
    """Texts our writer makes from random prompts and values (with , : newlines quotes backslashes and non-ASCII)
    read back exactly, and the A1111 oracle reads the same."""
    rnd = random.Random(seed)
    alphabet = "abc xyz,:;\n\"\\()[]<>é日-_/=0123456789"
    prompt = _random_text(rnd, alphabet, rnd.randint(1, 60))
    negative = _random_text(rnd, alphabet, rnd.randint(0, 30))
    params = {"Steps": rnd.randint(1, 150), "Sampler": "DPM++ 2M", "CFG scale": 7, "Seed": rnd.randint(0, 2**32)}
    for k in rnd.sample(KEYS[4:], 5):
        v = "".join(rnd.choice(alphabet.replace("\n", "") + "\n") for _ in range(rnd.randint(1, 25))).strip()
        params[k] = v if v and v != k else "v"
    text = format_infotext(prompt, negative, params)
    it = parse_infotext(text)
    assert it.prompt == prompt
    assert it.negative == negative
    assert it.params == {k: str(v) for k, v in params.items()}
    assert ours_as_a1111(text) == a1111_parse(text)


def test_flags_written_bare_and_read_back():
    text = format_infotext("p", "", {"Steps": 4, "Sampler": "Euler", "CFG scale": 7, "Seed": 1, "Tiling": "Tiling",
                                     "NGMS": None})
    assert text.endswith("Seed: 1, Tiling")
    it = parse_infotext(text)
    assert it.params["Tiling"] == "Tiling" and it.flags == ["Tiling"] and "NGMS" not in it.params


def test_hashes_object_and_civitai_resources():
    hashes = {"model": "6ce0161689", "lora:add_detail": "7c6bad76eb", "embed:easyneg": "c74b4e810b"}
    res = [{"type": "checkpoint", "modelVersionId": 128713, "modelName": "DreamShaper", "versionName": "8"},
           {"type": "lora", "weight": 0.8, "modelVersionId": 62833, "modelName": "Detail Tweaker, LoRA"}]
    meta = {"remixOfId": 1, "nested": {"a": [1, {"b": "c, d: e"}]}}
    text = (f"p\nSteps: 5, Sampler: Euler, CFG scale: 7, Seed: 2, Hashes: {json.dumps(hashes)}, "
            f"Civitai resources: {json.dumps(res)}, Civitai metadata: {json.dumps(meta)}, Version: v1")
    p = parse_infotext(text).params
    assert p["Hashes"] == hashes and p["Civitai resources"] == res and p["Civitai metadata"] == meta
    assert p["Version"] == "v1"


def test_one_line_variants():
    one = "a cat, sitting Negative prompt: ugly, blurry Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 5"
    it = parse_infotext(one)
    assert (it.prompt, it.negative) == ("a cat, sitting", "ugly, blurry")
    assert it.params == {"Steps": "20", "Sampler": "Euler", "CFG scale": "7", "Seed": "5"}
    it = parse_infotext("a cat Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 5")
    assert it.prompt == "a cat" and it.params["Seed"] == "5"
    # a quoted value of a normal parameter line that mentions Steps is not a split point
    text = 'Steps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, ADetailer prompt: "x Steps: 9, Seed: 3, Sampler: y"'
    assert parse_infotext(text).params["ADetailer prompt"] == "x Steps: 9, Seed: 3, Sampler: y"
    assert ours_as_a1111(text) == a1111_parse(text)


def test_hostile_values_do_not_break_the_reader():
    deep = "[" * 200_000 + "]" * 200_000
    text = f"p\nSteps: 5, Sampler: Euler, CFG scale: 7, Seed: 2, Hashes: {deep}, Version: v"
    p = parse_infotext(text).params
    assert isinstance(p["Hashes"], str) and p["Version"] == "v"  # kept as text, no RecursionError
    unclosed = 'p\nSteps: 5, Sampler: Euler, CFG scale: 7, Seed: 2, Note: "never closed, Seed: 3'
    assert parse_infotext(unclosed).params["Steps"] == "5"
    huge = "x, " * 2_000_000 + "\nSteps: 5, Sampler: Euler, CFG scale: 7, Seed: 2"
    assert len(parse_infotext(huge).prompt) <= 1 << 20  # capped, not parsed in full


def test_join_and_split_hashes():
    pairs = {"add:detail": "7c6bad76eb54", "st,yle": "0a1b2c3d4e5f"}
    assert join_hashes(pairs) == "adddetail: 7c6bad76eb54, style: 0a1b2c3d4e5f"
    assert split_hashes(join_hashes(pairs)) == {"adddetail": "7c6bad76eb54", "style": "0a1b2c3d4e5f"}


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_round_trip_through_an_image(tmp_path, suffix):
    """format -> write the image -> read it back with our reader -> parse: the same, and the oracle agrees."""
    from PIL import Image

    from ckptlab.imaging.imagefile import save_image
    from ckptlab.imaging.metadata import read_raw

    params = {"Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 7.5, "Seed": 42,
              "Size": "64x64", "Model hash": "6ce0161689", "Model": "v1-5, pruned: ema", "Lora hashes":
              "add_detail: 7c6bad76eb54, style: 0a1b2c3d4e5f", "Version": "v1.10.1"}
    prompt, negative = "a lighthouse, dusk: \"golden\"\n日本語 line", "blurry\nlowres"
    text = format_infotext(prompt, negative, params)
    out = tmp_path / f"img{suffix}"
    save_image(out, Image.new("RGB", (16, 16)), text)
    read = read_raw(out).texts["parameters"]
    assert read == text
    it = parse_infotext(read)
    assert (it.prompt, it.negative) == (prompt, negative)
    assert it.params == {k: str(v) for k, v in params.items()}
    assert ours_as_a1111(read) == a1111_parse(read)


def test_linear_a1111_reading_equals_the_regex():
    """``a1111_params`` (linear time) returns exactly what A1111's regex finds, on the texts above and on random
    lines made of the characters that matter (key characters, colons, commas, quotes, backslashes, tabs)."""
    from ckptlab.imaging.infotext import a1111_params

    for text in TEXTS.values():
        for line in text.replace("\r\n", "\n").split("\n"):
            assert a1111_params(line) == RE_PARAM.findall(line)
    rnd = random.Random(7)
    alphabet = 'ab :,"\\ -/\t_é1{}'
    for _ in range(30_000):
        line = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 40)))
        assert a1111_params(line) == RE_PARAM.findall(line), repr(line)
        assert a1111_params(line, limit=2) == RE_PARAM.findall(line)[:2]


HOSTILE_LINES = ["ab " * 350_000, "kk: {a, " * 130_000, 'kk: ["a, ' * 110_000, 'kk: "a, ' * 130_000,
                 "x Steps: 1 " * 95_000, "a:b:" * 260_000, "- " * 500_000]


def test_hostile_lines_take_linear_time(tmp_path):
    """A megabyte-long line that makes A1111's regex (and a naive bracket scan) quadratic: hours. Run in a child
    with a generous timeout, which only a quadratic reader can exceed."""
    import subprocess
    import sys

    script = tmp_path / "parse.py"
    script.write_text(
        "import sys\nfrom tests.imaging.test_infotext import HOSTILE_LINES\n"
        "from ckptlab.imaging.infotext import parse_infotext\n"
        "for line in HOSTILE_LINES:\n    parse_infotext(line)\n    parse_infotext('p\\n' + line)\nprint('ok')\n")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=f"{root / 'src'}{os.pathsep}{root}")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert r.stdout.strip() == "ok", r.stderr
