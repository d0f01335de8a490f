"""The model library: scan folders into a SQLite catalog, hash in one pass, fingerprint tensors,
find duplicates, plan disk space, report. Submodules are imported on demand (the CLI starts
without torch)."""
