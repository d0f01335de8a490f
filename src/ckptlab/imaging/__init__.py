"""Image generation: a diffusers pipeline built in memory from a model file, A1111-compatible infotext, grids."""
