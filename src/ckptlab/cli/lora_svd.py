"""ckptlab lora commands (placeholder until implemented)."""

from __future__ import annotations


def register(group) -> None:
    pass
