"""LoRA work on the streaming write path: bake LoRAs into a model, extract a LoRA from a fine-tune, resize,
merge, convert between namings, and explain a LoRA file (docs/lora.md).

- ``lora.file``: a LoRA file read as modules (one adapted layer each: algorithm, parameter keys, alpha).
- ``lora.naming``: which model weight each module adapts (the alias table of a family's weights) and the
  module names each naming style (kohya, PEFT, diffusers, ComfyUI) gives it.
- ``lora.maths``: the weight update ΔW of one module, as the loaders compute it at inference.
- ``lora.write``: the LoRA output writer (kohya ``ss_*`` metadata, ModelSpec, ``sshs_model_hash`` of the
  bytes written, provenance).
- ``lora.bake``, ``lora.extract``, ``lora.resize``, ``lora.combine``, ``lora.convert``, ``lora.info``: the
  commands.
"""
