"""Derive the CLIP BPE tokenizer files (``vocab.json``, ``merges.txt``) that ``transformers.CLIPTokenizer``
reads from open_clip's ``bpe_simple_vocab_16e6.txt.gz`` (the merges OpenAI CLIP, SD1, SD2 and SDXL use).

Usage (the wheel is fetched with ``pip download --no-deps open-clip-torch``, never installed):

    python tools/derive_clip_tokenizer.py open_clip_torch-*.whl src/ckptlab/data/clip_tokenizer

Vocabulary order (CLIP's ``SimpleTokenizer``): the 256 byte-to-unicode characters, the same characters
with ``</w>`` appended, one entry per merge (the two halves joined), then ``<|startoftext|>`` and
``<|endoftext|>`` - 49408 tokens. ``merges.txt`` is the merge list under a ``#version: 0.2`` line.
"""

from __future__ import annotations

import gzip
import json
import sys
import zipfile
from pathlib import Path

N_MERGES = 49152 - 256 - 2  # CLIP uses the first 48894 merges of the file


def byte_alphabet() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table, in byte-value order of the printable ranges first."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def derive(bpe_text: str) -> tuple[dict[str, int], list[str]]:
    lines = bpe_text.split("\n")
    merges = lines[1:1 + N_MERGES]
    alphabet = byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    tokens += ["".join(m.split(" ")) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise SystemExit("duplicate tokens: the BPE file is not the expected one")
    return vocab, merges


def main(argv: list[str]) -> None:
    src, out = Path(argv[0]), Path(argv[1])
    if src.suffix == ".whl":
        with zipfile.ZipFile(src) as z:
            raw = z.read("open_clip/bpe_simple_vocab_16e6.txt.gz")
    else:
        raw = src.read_bytes()
    vocab, merges = derive(gzip.decompress(raw).decode("utf-8"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"{len(vocab)} tokens, {len(merges)} merges -> {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
