"""What a pickle global *means* to ckptlab. Four sets, exact ``(module, name)`` matches only.

- TENSOR: symbols ckptlab understands as data and evaluates with its own small functions
  (storage tags, tensor rebuilds, OrderedDict, dtypes, ``_codecs.encode``...).
- BENIGN: symbols that appear in ordinary SD checkpoints (Lightning callbacks, numpy scalars,
  ``argparse.Namespace``...). They stay inert records; they never make a file unsafe.
- DANGEROUS: anything that executes code, imports, resolves names or reaches the OS or network,
  plus every dotted name (``torch`` + ``os.system`` resolves to ``torch.os.system``).
- UNKNOWN: everything else (suspicious: nothing known to execute code, but not understood).

Nothing here imports the modules it names; names are only ever compared as strings.
"""

from __future__ import annotations

import _compat_pickle

TENSOR = "tensor"
BENIGN = "benign"
DANGEROUS = "dangerous"
UNKNOWN = "unknown"

#: torch storage class name -> safetensors dtype name (None: a storage ckptlab cannot represent)
STORAGE_DTYPES: dict[str, str | None] = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL", "UntypedStorage": "U8",
    "ComplexFloatStorage": None, "ComplexDoubleStorage": None, "QInt8Storage": None,
    "QInt32Storage": None, "QUInt8Storage": None, "QUInt4x2Storage": None, "QUInt2x4Storage": None,
}

#: ``torch.<dtype>`` globals (as torch pickles them) -> safetensors dtype name
TORCH_DTYPES: dict[str, str | None] = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
    "complex64": None, "complex128": None, "complex32": None, "qint8": None, "quint8": None,
    "qint32": None, "quint4x2": None, "quint2x4": None,
}

_TENSOR_PAIRS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch.nn.parameter", "Parameter"),
    ("torch", "Tensor"),
    ("torch", "Size"),
    ("torch", "device"),
    ("_codecs", "encode"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytearray"),
    ("builtins", "bytes"),
    ("builtins", "complex"),
    # read by recursing with this same reader, never by calling torch (security.md 1.3)
    ("torch.storage", "_load_from_bytes"),
}
_TENSOR_PAIRS |= {("torch", n) for n in STORAGE_DTYPES} | {("torch", n) for n in TORCH_DTYPES}
_TENSOR_PAIRS |= {("torch.storage", "UntypedStorage")}

BENIGN_PAIRS = frozenset({
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
    ("lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint"),
    ("pytorch_lightning.callbacks.early_stopping", "EarlyStopping"),
    ("argparse", "Namespace"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("collections", "defaultdict"),
    ("copyreg", "_reconstructor"),
    ("builtins", "object"),
    ("torch.nn.modules.container", "ParameterDict"),
    ("torch.torch_version", "TorchVersion"),
    ("torch.serialization", "_get_layout"),  # sparse layouts (torch's weights_only allows it)
    # plain value types that turn up in training info and hyper-parameters
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"), ("datetime", "datetime"), ("datetime", "date"), ("datetime", "timedelta"),
    ("datetime", "timezone"), ("decimal", "Decimal"), ("fractions", "Fraction"), ("typing", "Any"),
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "int"), ("builtins", "float"),
    ("builtins", "str"), ("builtins", "bool"), ("builtins", "slice"), ("builtins", "range"),
    ("omegaconf.dictconfig", "DictConfig"), ("omegaconf.listconfig", "ListConfig"),
    ("omegaconf.base", "ContainerMetadata"), ("omegaconf.base", "Metadata"), ("omegaconf.nodes", "AnyNode"),
})

# Whole modules (and their submodules) that execute code, import, or reach the OS / network.
DANGEROUS_MODULES = frozenset({
    "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "sys", "runpy", "importlib", "pkgutil",
    "inspect", "pydoc", "pickle", "_pickle", "pickletools", "marshal", "shelve", "dill", "cloudpickle",
    "joblib", "shutil", "socket", "ssl", "select", "selectors", "webbrowser", "ctypes", "_ctypes", "pty",
    "code", "codeop", "cProfile", "profile", "pdb", "bdb", "trace", "timeit", "doctest", "ensurepip", "pip",
    "venv", "asyncio", "multiprocessing", "concurrent", "threading", "_thread", "signal", "types",
    "operator", "_operator", "functools", "io", "_io", "tempfile", "glob", "fileinput", "zipimport",
    "zipfile", "tarfile", "platform", "sysconfig", "uuid", "http", "httplib", "urllib", "urllib2",
    "requests", "aiohttp", "ftplib", "smtplib", "telnetlib", "imaplib", "poplib", "xmlrpc", "mailcap",
    "_osx_support", "_aix_support", "_pyrepl", "idlelib", "lib2to3", "distutils", "setuptools", "test",
    "commands", "popen2", "builtins.__dict__", "numpy.f2py", "numpy.testing", "numpy.lib.npyio",
    "numpy.distutils", "torch.serialization", "torch.jit", "torch._dynamo", "torch._inductor", "torch.fx",
    "torch.utils", "torch.hub", "torch.package", "torch.ops", "torch._ops", "torch.cuda", "torch.library",
    "torch.testing", "torch.backends", "torch.multiprocessing", "torch.distributed", "logging",
    "_posixsubprocess", "gc", "weakref", "atexit", "site", "_sitebuiltins", "readline", "rlcompleter",
    "tkinter", "turtle", "cgi", "cgitb", "smtpd", "socketserver", "wsgiref", "xml", "sqlite3", "dbm",
    "ckptlab", "fickling", "picklescan", "modelscan", "_interpreters", "interpreters", "_xxsubinterpreters",
    "nturl2path", "builtins.eval", "copy", "string",
})

# Single names that execute code or resolve attributes, in modules that are otherwise harmless.
DANGEROUS_PAIRS = frozenset({
    ("builtins", n) for n in (
        "eval", "exec", "execfile", "compile", "getattr", "setattr", "delattr", "__import__", "open",
        "breakpoint", "apply", "input", "globals", "locals", "vars", "help", "exit", "quit", "memoryview",
        "classmethod", "staticmethod", "property", "super", "type", "print", "reload", "file",
        "__build_class__", "__loader__", "__spec__", "dir", "callable", "map", "filter",
    )
} | {
    ("torch", "load"), ("torch", "save"), ("torch", "compile"), ("torch", "from_file"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"), ("numpy", "load"), ("numpy", "loads"),
    ("numpy", "fromfile"), ("numpy", "save"), ("numpy", "memmap"), ("collections", "namedtuple"),
    ("numpy.core.multiarray", "_load"), ("numpy._core.multiarray", "_load"),
    ("torch.storage", "_load_from_bytes_unsafe"), ("torch.storage", "TypedStorage"),
})


def normalize(module: str, name: str) -> tuple[str, str]:
    """Python 2 names the way the unpickler maps them (``__builtin__`` -> ``builtins``...)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _module_dangerous(module: str) -> str | None:
    """The dangerous module (or parent package) ``module`` belongs to, if any."""
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        if ".".join(parts[:i]) in DANGEROUS_MODULES:
            return ".".join(parts[:i])
    return None


def classify(module: object, name: object) -> tuple[str, str]:
    """``(category, reason)`` for the global ``module.name`` (operands as found in the file)."""
    if type(module) is not str or type(name) is not str:
        return DANGEROUS, "global built from non-string operands (dynamic import)"
    if "." in name:
        return DANGEROUS, "dotted global name resolves attributes of the module"
    if not name or not module or not all(p.isidentifier() for p in module.split(".")) or not name.isidentifier():
        return DANGEROUS, "global name is not a plain identifier"
    if normalize(module, name) in BENIGN_PAIRS and (module, name) not in DANGEROUS_PAIRS:
        return BENIGN, "known benign, kept inert"
    for mod, nm in {(module, name), normalize(module, name)}:
        if (mod, nm) in DANGEROUS_PAIRS:
            return DANGEROUS, "executes code or reaches the OS"
        bad = _module_dangerous(mod)
        if bad:
            return DANGEROUS, f"module {bad} executes code or reaches the OS"
    mod, nm = normalize(module, name)
    if (mod, nm) in _TENSOR_PAIRS:
        return TENSOR, "tensor data"
    if (mod, nm) in BENIGN_PAIRS:
        return BENIGN, "known benign, kept inert"
    return UNKNOWN, "not on the allowlist"
