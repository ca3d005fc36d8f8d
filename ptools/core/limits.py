"""Bounds on what a file from a stranger can make ptools allocate or walk.

Each limit has a default that no real checkpoint comes near, and an environment variable
that raises it (``PTOOLS_MAX_PICKLE_BYTES=1GiB``). They are read when used, so a training
script can change them with ``os.environ`` before calling the library.
"""

from __future__ import annotations

import os
import reprlib
from dataclasses import dataclass

from ptools.errors import BadInputError


@dataclass(frozen=True)
class Limit:
    """A named bound with its environment variable and default."""

    env: str
    default: int
    what: str

    @property
    def value(self) -> int:
        text = os.environ.get(self.env)
        if not text:
            return self.default
        from ptools.core.units import parse_size

        try:
            value = parse_size(text)
        except (BadInputError, ValueError):
            raise BadInputError(f"{self.env}={text!r} is not a size or count") from None
        if value <= 0:
            raise BadInputError(f"{self.env} must be positive, not {text!r}")
        return value

    def exceeded(self, subject: str) -> BadInputError:
        """The error for ``subject`` going past this limit, saying how to raise it."""
        return BadInputError(
            f"{subject}: more than the limit of {self.value:,} {self.what}",
            f"if the file is genuine, raise it with {self.env}=…",
        )


# A checkpoint's pickle describes tensors; its data are separate records. Real ones are a few MB.
PICKLE_BYTES = Limit("PTOOLS_MAX_PICKLE_BYTES", 256 << 20, "bytes of pickle")
# Deflate reaches ~1000:1 on zeros; torch never compresses, so a large ratio is a bomb.
INFLATION = Limit("PTOOLS_MAX_INFLATION", 100, "× inflation of a compressed zip member")
# Nesting of containers in a pickle or JSON document (orjson's own bound is 255).
DEPTH = Limit("PTOOLS_MAX_DEPTH", 100, "levels of nesting")
# Objects made by copying (sets, sizes, bytearrays) or reached through shared references,
# beyond what the pickle's own bytes hold.
OBJECTS = Limit("PTOOLS_MAX_OBJECTS", 2_000_000, "objects built or walked")
# JSON headers and indexes (safetensors' reference implementation bounds headers at 100 MB).
HEADER_BYTES = Limit("PTOOLS_MAX_HEADER_BYTES", 100_000_000, "bytes of JSON header")
# Byte runs a checkpoint's tensors are assembled from (ZeRO-3: ranks × parameters); each costs
# a read, so their count bounds the work a conversion does whatever the file's size.
PIECES = Limit("PTOOLS_MAX_PIECES", 16_000_000, "byte runs assembled from rank partitions")
# A stride-0 (expanded) tensor may claim this many elements per stored element.
EXPANSION = Limit("PTOOLS_MAX_EXPANSION", 64, "× elements over what is stored")

# Bytes inflated from compressed zip records over a command (torch never compresses them).
INFLATED_BYTES = Limit("PTOOLS_MAX_INFLATED_BYTES", 8 << 30, "bytes inflated from compressed records")
# What all of a checkpoint's expanded tensors together may claim beyond their storage, as one
# command materialises them (each alone is bounded by EXPANSION; several were not).
EXPANDED_BYTES = Limit("PTOOLS_MAX_EXPANDED_BYTES", 1 << 30, "bytes of expanded (stride-0) tensors")

_BRIEF = reprlib.Repr()
_BRIEF.maxstring = 60
_BRIEF.maxother = 60
_BRIEF.maxlong = 40
_BRIEF.maxlevel = 2
for _attribute in ("maxtuple", "maxlist", "maxdict", "maxset", "maxfrozenset", "maxdeque", "maxarray"):
    setattr(_BRIEF, _attribute, 6)


def brief_text(text: str, limit: int = 200) -> str:
    """File-controlled text (an error message quoting the file) for a message, bounded."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def brief(value: object) -> str:
    """A repr of file-controlled data for a message, bounded whatever its size."""
    try:
        text = _BRIEF.repr(value)
    except Exception:  # a hostile object's repr may fail; the message must not
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 120 else text[:119] + "…"
