"""Real-layout sample model files for tests, benchmarks and the demo library.

``layouts.keys(spec, small=...)`` gives the ordered key -> (dtype, shape) map of a spec;
``build.SPECS`` names the specs with the identification the public sources give for each (docs/sample.md);
``build.write_model`` writes one file; ``build.build_library`` a whole A1111/ComfyUI model folder.
"""
