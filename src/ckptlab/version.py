"""The package version, in the lowest layer so that any module may name it (the ``ckptlab`` package itself is
the public API, at the top)."""

__version__ = "0.1.0"
