"""What is known about each model family, data-driven.

- ``arch.components``: ``split_components(keys)`` and ``COMPONENT_PREFIXES`` (stable API, see its docstring).
- ``arch.family`` / ``arch.families``: the ``Family`` description type and one entry per family.
- ``arch.adapters``: LoRA / LyCORIS / embedding / hypernetwork / ControlNet / upscaler recognition.
- ``arch.detect``: kind, family, variant and prediction with evidence; ``arch.checks``: warnings;
  ``arch.vram``: the VRAM estimate.

Nothing in this package imports torch.
"""
