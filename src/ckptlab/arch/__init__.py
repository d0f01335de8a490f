"""What is known about each model family, data-driven.

- ``arch.components``: ``split_components(keys)`` and ``COMPONENT_PREFIXES`` (stable API, see its docstring).
- ``arch.family`` / ``arch.families``: the ``Family`` record type and one entry per family (``families.get(id)``):
  detection markers and everything the transforms, merges, VRAM estimate and catalog read (docs/families.md).
- ``arch.adapters``: LoRA / LyCORIS / embedding / hypernetwork / ControlNet / upscaler recognition.
- ``arch.detect``: kind, family, variant and prediction with evidence; ``arch.checks``: warnings;
  ``arch.vram``: the VRAM estimate.
- ``arch.layout``: a family's key layout in one file (identify's family + the record's component prefixes, the
  mixed-family refusal), for the transforms; ``arch.vae_fit``: the VAE latent-group check.

Nothing in this package imports torch.
"""
