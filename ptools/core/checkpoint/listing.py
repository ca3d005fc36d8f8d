"""What ``inspect-state-dict`` shows: the structure of a checkpoint and a table of its tensors."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ptools.core.checkpoint.readers import Checkpoint
from ptools.core.checkpoint.structure import describe, find_state_dict, flatten, plain, type_name
from ptools.core.checkpoint.tensors import TensorInfo, is_buffer_name, storage_identity
from ptools.core.checkpoint.values import TensorStats, read_tensor, tensor_stats
from ptools.errors import BadInputError


@dataclass
class TensorRow:
    """One tensor of the listing. ``tensor`` keeps the description for reading values."""

    name: str
    tensor: TensorInfo
    kind: str
    shares_storage_with: list[str] = field(default_factory=list)
    shares_storage_count: int = 0

    def to_dict(self) -> dict[str, Any]:
        t = self.tensor
        return {
            "name": self.name,
            "shape": list(t.shape),
            "dtype": t.dtype,
            "numel": t.numel,
            "bytes": t.nbytes,
            "device": t.device,
            "stride": list(t.stride),
            "storage_offset": t.storage_offset,
            "contiguous": t.is_contiguous,
            "storage_bytes": t.storage.size_bytes if t.storage is not None else None,
            "shares_storage_with": self.shares_storage_with,
            "shares_storage_count": self.shares_storage_count,
            "kind": self.kind,
            "requires_grad": t.requires_grad,
        }


@dataclass
class Listing:
    """The state dict of a checkpoint and what surrounds it."""

    file: str
    format: str
    size_bytes: int
    notes: list[str]
    metadata: dict[str, str]
    structure: list[dict[str, Any]]
    state_dict_key: str
    state_dict_how: str
    rows: list[TensorRow]
    non_tensors: list[dict[str, Any]]
    kinds_inferred: bool
    filtered_out: int = 0  # tensors a name filter left out
    details: dict[str, Any] = field(default_factory=dict)  # what the format says about the run

    def totals(self) -> dict[str, Any]:
        return totals(self.rows, self.kinds_inferred)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "format": self.format,
            "size_bytes": self.size_bytes,
            "notes": self.notes,
            **self.details,
            "metadata": self.metadata,
            "structure": self.structure,
            "state_dict": {"key": self.state_dict_key, "how": self.state_dict_how},
            "tensors": [row.to_dict() for row in self.rows],
            "non_tensors": self.non_tensors,
            "totals": self.totals(),
        }


def list_checkpoint(checkpoint: Checkpoint, *, key: str | None = "auto", name_filter: str | None = None) -> Listing:
    """List the state dict found at ``key`` (``auto``: searched) of an opened checkpoint.

    Args:
        checkpoint: from :func:`ptools.core.checkpoint.open_checkpoint`.
        key: dotted path to the state dict, or ``auto``.
        name_filter: keep only tensors whose name matches this regular expression (search).

    Raises:
        BadInputError: ``key`` names nothing, the filter is not a valid expression, or the
            file holds no tensors.
    """
    pattern = None
    if name_filter is not None:
        try:
            pattern = re.compile(name_filter)
        except re.error as failure:
            raise BadInputError(
                f"`name_filter` {name_filter!r} is not a valid regular expression ({failure})"
            ) from None
    root = checkpoint.root
    path, node, how = find_state_dict(root, key)
    structure = []
    if path != "" and isinstance(root, Mapping):
        structure = [{"key": str(k), "type": type_name(v), "summary": describe(v)} for k, v in root.items()]
    entries = flatten(node)
    known_parameters = checkpoint.parameter_names
    rows: list[TensorRow] = []
    non_tensors = []
    inferred = False
    filtered_out = 0
    for name, value in entries.items():
        if pattern is not None and not pattern.search(name):
            filtered_out += isinstance(value, TensorInfo)
            continue
        if isinstance(value, TensorInfo):
            if known_parameters is not None:
                kind = "parameter" if name in known_parameters else "buffer"
            elif value.is_parameter:
                kind = "parameter"
            else:
                inferred = True
                kind = "buffer" if is_buffer_name(name) else "parameter"
            rows.append(TensorRow(name=name, tensor=value, kind=kind))
        else:
            non_tensors.append({"name": name, "type": type_name(value), "value": plain(value)})
    _mark_shared_storages(rows)
    return Listing(
        file=checkpoint.path,
        format=checkpoint.format,
        size_bytes=checkpoint.size_bytes,
        notes=list(checkpoint.notes),
        metadata=dict(checkpoint.metadata),
        structure=structure,
        state_dict_key=path,
        state_dict_how=how,
        rows=rows,
        non_tensors=non_tensors,
        kinds_inferred=inferred,
        filtered_out=filtered_out,
        details=dict(checkpoint.details),
    )


SHARED_NAMES_SHOWN = 16  # a storage shared by 100k tensors must not cost 10^10 names


def _mark_shared_storages(rows: list[TensorRow]) -> None:
    """Name the other tensors on each row's storage: at most :data:`SHARED_NAMES_SHOWN` of them,
    with the full count, so that a storage shared by every tensor stays linear."""
    groups: dict[tuple[str, str | int], list[TensorRow]] = {}
    for row in rows:
        if row.tensor.has_data:
            key = storage_identity(row.tensor)
            group = groups.get(key)
            if group is None:
                groups[key] = [row]
            else:
                group.append(row)
    for members in groups.values():
        if len(members) > 1:
            head = members[: SHARED_NAMES_SHOWN + 1]
            for row in members:
                row.shares_storage_with = [other.name for other in head if other is not row][:SHARED_NAMES_SHOWN]
                row.shares_storage_count = len(members) - 1


def totals(rows: list[TensorRow], kinds_inferred: bool) -> dict[str, Any]:
    """Counts, elements and bytes overall, by dtype, and for parameters vs buffers.

    ``storage_bytes`` counts each shared storage once: what the data costs on disk.
    """
    by_dtype: dict[str, dict[str, int]] = {}
    storages: dict[tuple[str, str | int], int] = {}
    kinds = {"parameter": {"tensors": 0, "numel": 0}, "buffer": {"tensors": 0, "numel": 0}}
    for row in rows:
        t = row.tensor
        entry = by_dtype.setdefault(t.dtype, {"tensors": 0, "numel": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["numel"] += t.numel
        entry["bytes"] += t.nbytes
        kinds[row.kind]["tensors"] += 1
        kinds[row.kind]["numel"] += t.numel
        storages[storage_identity(t)] = t.storage.size_bytes if t.storage is not None else t.nbytes
    return {
        "tensors": len(rows),
        "numel": sum(row.tensor.numel for row in rows),
        "bytes": sum(row.tensor.nbytes for row in rows),
        "storage_bytes": sum(storages.values()),
        "by_dtype": dict(sorted(by_dtype.items())),
        "parameters": kinds["parameter"],
        "buffers": kinds["buffer"],
        "kinds_inferred_from_names": kinds_inferred,
    }


def group_by_prefix(rows: list[TensorRow], depth: int) -> list[dict[str, Any]]:
    """Subtotals by dotted module prefix, every level down to ``depth`` (1 = top modules)."""
    if depth < 1:
        raise BadInputError(f"`depth` must be 1 or more, not {depth}")
    groups: dict[str, dict[str, Any]] = {}
    for row in rows:
        parts = row.name.split(".")[:-1] or [row.name]
        for level in range(1, min(depth, len(parts)) + 1):
            prefix = ".".join(parts[:level])
            group = groups.setdefault(prefix, {"prefix": prefix, "depth": level, "tensors": 0, "numel": 0, "bytes": 0})
            group["tensors"] += 1
            group["numel"] += row.tensor.numel
            group["bytes"] += row.tensor.nbytes
    return list(groups.values())


def iter_stats(checkpoint: Checkpoint, rows: list[TensorRow]) -> Iterator[tuple[TensorRow, TensorStats | None]]:
    """Statistics per tensor, reading one tensor at a time; None for tensors without values."""
    for row in rows:
        if not row.tensor.has_data:
            yield row, None
            continue
        yield row, tensor_stats(read_tensor(checkpoint, row.tensor), row.tensor.dtype)
