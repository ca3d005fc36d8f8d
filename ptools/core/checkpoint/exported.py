"""ExportedProgram archives (``.pt2``): checked by ptools before torch sees them.

``torch.export.load`` unpickles parts of the archive with ``torch.load(weights_only=False)``
(weights and constants marked ``use_pickle``, legacy weight files, sample inputs after a
failed safe attempt) and plain ``pickle.loads`` (opaque constants), and loads compiled
libraries for AOTInductor packages. Without ``--trust`` every pickled member must pass the
safe reader, anything that would run code is refused, and while torch loads the archive its
unpickling is held to ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import io
import json
import posixpath
import zipfile
from collections.abc import Iterator
from typing import Any

from ptools.core.checkpoint.readers import ZIP_ERRORS, ZIP_MAGIC, _zip_member
from ptools.core.checkpoint.tensors import StorageRef
from ptools.core.checkpoint.unpickle import TRUST_HINT, unpickle
from ptools.core.files import require_regular_file
from ptools.core.limits import brief, brief_text
from ptools.errors import BadInputError, UnsafeFileError

_DATA_DIRS = ("data/weights/", "data/constants/", "data/sample_inputs/")
_CODE_DIRS = ("data/aotinductor/", "data/executorch/", "data/mtia", "xl_model_weights/")
_OBJECT_PREFIXES = ("custom_obj_", "opaque_obj_")


def check_exported_program(path: str) -> None:
    """Refuse a ``.pt2`` whose loading could run code from it.

    Raises:
        UnsafeFileError: a pickled member needs globals outside the allowlist, or the archive
            holds compiled code or pickled Python objects.
        BadInputError: not a readable ``.pt2`` archive.
    """
    require_regular_file(path, "ExportedProgram file")
    try:
        archive = zipfile.ZipFile(path)
        names = archive.namelist()
    except ZIP_ERRORS as failure:
        raise BadInputError(f"{path}: not a .pt2 archive ({failure})") from None
    with archive:
        raw_members = _raw_tensor_members(archive, path, names)
        for name in names:
            inner = name.split("/", 1)[1] if "/" in name else name
            if inner.startswith(_CODE_DIRS):
                raise UnsafeFileError(
                    f"{path} holds compiled code or external weights ({brief(inner)}); loading it runs that code",
                    TRUST_HINT,
                )
            if not inner.startswith(_DATA_DIRS) or name.endswith("_config.json") or name.endswith("/"):
                continue
            if name in raw_members:
                continue
            if posixpath.basename(name).startswith(_OBJECT_PREFIXES):
                raise UnsafeFileError(f"{path} holds a pickled Python object ({brief(inner)})", TRUST_HINT)
            check_pickled_blob(_zip_member(archive, path, name), f"{path} ({inner})")


def _raw_tensor_members(archive: zipfile.ZipFile, path: str, names: list[str]) -> set[str]:
    """Members the archive's configs declare as raw tensor bytes (``use_pickle: false``)."""
    raw: set[str] = set()
    for name in names:
        if not name.endswith("_config.json") or "/data/" not in f"/{name}":
            continue
        folder = posixpath.dirname(name)
        try:
            config = json.loads(_zip_member(archive, path, name, 64 << 20)).get("config")
        except (ValueError, RecursionError, AttributeError):
            raise BadInputError(f"{path}: corrupt config {brief(name)}") from None
        if not isinstance(config, dict):
            continue
        for entry in config.values():
            if isinstance(entry, dict) and entry.get("use_pickle") is False and isinstance(entry.get("path_name"), str):
                raw.add(posixpath.join(folder, entry["path_name"]))
    return raw


def check_pickled_blob(blob: bytes, what: str) -> None:
    """Pass bytes written by ``torch.save`` (or a bare pickle) through the safe reader.

    Raises:
        UnsafeFileError: they need globals outside the allowlist.
        BadInputError: they are neither, or corrupt.
    """

    def any_storage(key: str, location: str, size: int) -> StorageRef:
        return StorageRef(file=what, key=key, size_bytes=size, location=location)

    if blob.startswith(ZIP_MAGIC):
        try:
            inner = zipfile.ZipFile(io.BytesIO(blob))
            pickles = [n for n in inner.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        except ZIP_ERRORS as failure:
            raise BadInputError(f"{what}: corrupt archive ({failure})") from None
        if not pickles:
            raise BadInputError(f"{what}: an archive without data.pkl")
        unpickle(_zip_member(inner, what, pickles[0]), any_storage, what=what)
    elif blob[:1] == b"\x80":
        unpickle(blob, any_storage, what=what)
    else:
        raise BadInputError(f"{what}: neither raw tensor data listed in a config nor a pickle")


@contextlib.contextmanager
def _weights_only_unpickling() -> Iterator[None]:
    """While torch loads an archive: ``torch.load`` always with ``weights_only=True``, and the
    plain-pickle and TorchScript-object loaders refused (defence in depth behind the check)."""
    import importlib

    import torch

    try:  # where torch keeps its .pt2 loader (2.7+); older versions unpickle through torch.load only
        _package: Any = importlib.import_module("torch.export.pt2_archive._package")
    except ImportError:
        _package = None
    real_load = torch.load

    def safe_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise UnsafeFileError("the archive asks to unpickle a Python object", TRUST_HINT)

    class _NoPickle:
        loads = staticmethod(refuse)
        load = staticmethod(refuse)

    saved = (
        torch.load,
        getattr(torch._C, "_pickle_load_obj", None),
        getattr(_package, "pickle", None) if _package is not None else None,
    )
    torch.load = safe_load
    if saved[1] is not None:
        torch._C._pickle_load_obj = refuse
    if saved[2] is not None:
        _package.pickle = _NoPickle
    try:
        yield
    finally:
        torch.load = saved[0]
        if saved[1] is not None:
            torch._C._pickle_load_obj = saved[1]
        if saved[2] is not None:
            _package.pickle = saved[2]


def load_exported_program(path: str, trust: bool = False) -> Any:
    """``torch.export.load(path)``, after :func:`check_exported_program` unless ``trust``.

    Raises:
        UnsafeFileError: see :func:`check_exported_program`.
        BadInputError: torch cannot load it.
    """
    if not trust:
        check_exported_program(path)
    import torch

    guard = contextlib.nullcontext() if trust else _weights_only_unpickling()
    try:
        with guard:
            return torch.export.load(path)
    except (UnsafeFileError, BadInputError):
        raise
    except Exception as failure:
        raise BadInputError(
            f"{path}: not a loadable ExportedProgram ({type(failure).__name__}: {brief_text(str(failure))})"
        ) from None
