"""Sharded safetensors output: packing tensors into shards, deciding what an existing output
folder may lose, and writing shards plus ``model.safetensors.index.json`` so that nothing
replaces anything until the whole output is written (and verified)."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ptools.core.checkpoint.writers import SafetensorsEntry, write_safetensors
from ptools.core.files import fsync_folder, is_one_of, temporary_path, write_file
from ptools.errors import BadInputError

_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
INDEX_NAME = "model.safetensors.index.json"


def pack_shards(entries: list[SafetensorsEntry], shard_size: int | None) -> list[list[SafetensorsEntry]]:
    """Greedy packing in order; a tensor larger than the limit gets a shard of its own."""
    if not shard_size or shard_size <= 0:
        raise BadInputError("`shard_size` must be a positive size, e.g. 2GB")
    groups: list[list[SafetensorsEntry]] = [[]]
    size = 0
    for entry in entries:
        if groups[-1] and size + entry.nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry.nbytes
    return groups


@dataclass
class ShardedTarget:
    """Where a sharded output goes, and the only files an existing OUT may lose: the index
    ptools wrote there before and the shards it names (by ptools' own naming)."""

    folder: str
    names: list[str]  # the new shards, then the index
    stale: list[str]  # shards of the old index that the new output no longer has

    @classmethod
    def plan(cls, folder: str, count: int, force: bool, inputs: set[str]) -> ShardedTarget:
        names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)] + [INDEX_NAME]
        ours = cls._files_of_old_index(folder)
        replaced = [name for name in names if os.path.lexists(os.path.join(folder, name))]
        stale = sorted(set(ours) - set(names))
        for name in replaced:
            if name not in ours:
                raise BadInputError(
                    f"{os.path.join(folder, name)} exists and is not part of a sharded output "
                    "ptools can recognise; ptools never replaces it",
                    "write to another folder",
                )
        for name in replaced + stale:
            path = os.path.join(folder, name)
            if is_one_of(path, inputs):
                raise BadInputError(
                    f"{folder} holds the input ({name}); writing there would replace it",
                    "write the shards to another folder",
                )
            if os.path.islink(path) or not os.path.isfile(path):
                raise BadInputError(f"{path} is not a regular file; ptools never replaces it")
        if (replaced or stale) and not force:
            raise BadInputError(
                f"{folder} already holds a sharded output ({len(ours) - 1} shard(s))", "pass `force=True` to replace it"
            )
        return cls(folder=folder, names=names, stale=stale)

    @staticmethod
    def _files_of_old_index(folder: str) -> list[str]:
        index_path = os.path.join(folder, INDEX_NAME)
        if not os.path.isfile(index_path):
            return []
        try:
            with open(index_path, "rb") as handle:
                weight_map = json.loads(handle.read(64 << 20)).get("weight_map")
        except (OSError, ValueError, RecursionError, AttributeError):
            return []
        if not isinstance(weight_map, dict):
            return []
        shards = {name for name in weight_map.values() if isinstance(name, str) and _SHARD_NAME.match(name)}
        return sorted(shards) + [INDEX_NAME]


def write_sharded(
    target: ShardedTarget,
    groups: list[list[SafetensorsEntry]],
    metadata: dict[str, str],
    aliases: set[str],
    total_size: int,
    on_bytes: Callable[[int], None] | None = None,
    verify: Callable[[str, list[list[SafetensorsEntry]]], None] | None = None,
) -> None:
    """Shards and the index into a temporary folder; ``verify(index_path, groups)`` there (it
    raises to abort); then moved into place (the whole folder when OUT is new, file by file
    with the index last otherwise). ``aliases``: metadata keys naming tied tensors, kept only
    in the shard that holds their target."""
    destination = target.folder
    exists = os.path.isdir(destination)
    temporary = temporary_path(os.path.join(destination, "shards") if exists else destination, directory=True)
    try:
        weight_map: dict[str, str] = {}
        for group, shard in zip(groups, target.names):
            kept = {e.name for e in group}
            shard_metadata = {k: v for k, v in metadata.items() if k not in aliases or v in kept}

            def write_shard(handle: Any, g: list[SafetensorsEntry] = group, m: dict[str, str] = shard_metadata) -> None:
                write_safetensors(handle, g, m, on_bytes)

            write_file(os.path.join(temporary, shard), write_shard)
            weight_map.update({e.name: shard for e in group})
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        write_file(
            os.path.join(temporary, INDEX_NAME), lambda handle: handle.write(json.dumps(index, indent=2).encode())
        )
        if verify is not None:
            verify(os.path.join(temporary, INDEX_NAME), groups)
        if not exists:
            os.chmod(temporary, 0o755)
            os.replace(temporary, destination)
            fsync_folder(os.path.dirname(os.path.abspath(destination)))
            return
        for name in target.names:  # the index last: until then the old index stays whole
            os.chmod(os.path.join(temporary, name), 0o644)
            os.replace(os.path.join(temporary, name), os.path.join(destination, name))
        for name in target.stale:
            os.unlink(os.path.join(destination, name))
        fsync_folder(destination)
        os.rmdir(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
