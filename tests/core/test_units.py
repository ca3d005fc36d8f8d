import pytest

from ptools.core.units import format_bytes, parse_size
from ptools.errors import BadInputError


@pytest.mark.parametrize(("text", "size"), [
    ("1048576", 2**20), ("0", 0), ("20GiB", 20 * 2**30), ("20 gib", 20 * 2**30), ("8GB", 8 * 10**9),
    ("512M", 512 * 2**20), ("1.5G", 3 * 2**29), ("2TB", 2 * 10**12), ("100B", 100), (".5KiB", 512),
])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "-1GB", "12 parsecs", "1e9", "nan", "1,5G"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(BadInputError, match="invalid size"):
        parse_size(text)


@pytest.mark.parametrize("text", ["1" + "0" * 400 + "GiB", "9223372036854775808", "8388609TiB"])
def test_parse_size_refuses_sizes_beyond_any_machine(text: str) -> None:
    """A float would overflow to infinity (an OverflowError, a traceback) on the first."""
    with pytest.raises(BadInputError, match="invalid size|larger than any machine"):
        parse_size(text)


def test_parse_size_is_exact_for_long_numbers() -> None:
    assert parse_size("9223372036854775807") == 2**63 - 1
    assert parse_size("0.1KB") == 100


@pytest.mark.parametrize(("size", "binary", "text"), [
    (None, True, "-"), (0, True, "0 B"), (1023, True, "1023 B"), (1024, True, "1.0 KiB"),
    (80 * 2**30, True, "80.0 GiB"), (1_500_000, False, "1.5 MB"), (2**60, True, "1024.0 PiB"),
])
def test_format_bytes(size: int | None, binary: bool, text: str) -> None:
    assert format_bytes(size, binary=binary) == text


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90), ("90s", 90), ("10m", 600), ("10 min", 600), ("2h", 7200), ("1d", 86400), ("250ms", 0.25),
    ("0.5s", 0.5), (" 3M ", 180),
])
def test_parse_duration(text: str, seconds: float) -> None:
    from ptools.core.units import parse_duration

    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "-1s", "10 parsecs", "1e9", "nan", "367d", "1" + "0" * 400])
def test_parse_duration_rejects(text: str) -> None:
    from ptools.core.units import parse_duration

    with pytest.raises(BadInputError):
        parse_duration(text)
