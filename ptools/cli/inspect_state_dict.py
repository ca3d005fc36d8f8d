"""``ptools inspect-state-dict``: what is in a checkpoint, without loading it."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ptools.cli import output
from ptools.cli.help_format import command_help
from ptools.cli.options import JsonOption, NdjsonOption, TagOption, TrustOption, ZeroWeightsOption
from ptools.cli.wording import cli_words
from ptools.core.units import format_bytes
from ptools.errors import BadInputError

NAME = "inspect-state-dict"
SHORT_HELP = "List a checkpoint's tensors (names, shapes, dtypes, devices, sharing) without loading it; stats, diff."
DETAILS = "Reads PyTorch zip and legacy files, TorchScript archives, safetensors (single, or sharded through *.index.json), torch.distributed.checkpoint folders and DeepSpeed ZeRO run or step folders (the consolidated weights; --tag, --weights), by content. Listing reads metadata only, so it costs the same for 10 MB or 10 GB, and never runs code from the file (see --trust)."
EXAMPLES = [
    "ptools inspect-state-dict last.ckpt",
    "ptools inspect-state-dict model.safetensors --filter 'attn' --tree --depth 3",
    "ptools inspect-state-dict run/epoch_90.pth --key model_ema --stats",
    "ptools inspect-state-dict ckpt.pt --check-finite",
    "ptools inspect-state-dict ddp.pt --diff plain.pt --values",
    "ptools inspect-state-dict big.pt --ndjson | jq -r 'select(.dtype==\"float16\") | .name'",
]
HELP = command_help(SHORT_HELP, DETAILS, EXAMPLES)


def command(
    file: Annotated[
        str,
        typer.Argument(
            help="Checkpoint file, *.index.json, or a sharded, DCP or DeepSpeed ZeRO folder.", show_default=False
        ),
    ],
    key: Annotated[
        str,
        typer.Option(
            "--key",
            metavar="KEY",
            help="Dotted path to the state dict inside a training checkpoint (e.g. model_state_dict, "
            "state_dict_ema); 'auto' finds the model weights and says which key it picked.",
        ),
    ] = "auto",
    name_filter: Annotated[
        str | None, typer.Option("--filter", metavar="REGEX", help="Only tensors whose name matches REGEX (searched).")
    ] = None,
    tree: Annotated[bool, typer.Option("--tree", help="Group by dotted module prefix with subtotals.")] = False,
    depth: Annotated[int, typer.Option("--depth", min=1, metavar="N", help="Levels of prefixes shown by --tree.")] = 2,
    stats: Annotated[
        bool,
        typer.Option(
            "--stats",
            help="Read values: min, max, mean, std, NaN and Inf counts per tensor (one tensor in memory at a time).",
        ),
    ] = False,
    check_finite: Annotated[
        bool, typer.Option("--check-finite", help="Read values; exit 1 listing every tensor holding NaN or Inf.")
    ] = False,
    diff: Annotated[
        str | None,
        typer.Option(
            "--diff",
            metavar="OTHER",
            help="Compare with another checkpoint (any format): keys only in one side, shape and dtype "
            "mismatches, and whether each common tensor holds the same bytes; a constant prefix "
            "difference (module., _orig_mod., model.) is detected and its fix shown.",
        ),
    ] = None,
    values: Annotated[
        bool,
        typer.Option(
            "--values",
            help="With --diff: also the max absolute and relative difference per common tensor (dtypes may differ).",
        ),
    ] = False,
    keys_only: Annotated[
        bool,
        typer.Option("--keys-only", help="With --diff: compare names, shapes and dtypes only; read no tensor data."),
    ] = False,
    tag: TagOption = None,
    weights: ZeroWeightsOption = "master",
    trust: TrustOption = False,
    json_output: JsonOption = False,
    ndjson: NdjsonOption = False,
) -> None:
    from ptools.core import checkpoint as core

    if json_output and ndjson:
        raise BadInputError("choose one of --json and --ndjson")
    if (values or keys_only) and diff is None:
        raise BadInputError(f"{'--values' if values else '--keys-only'} needs --diff OTHER")
    if values and keys_only:
        raise BadInputError("choose one of --values and --keys-only")
    if diff is not None and (stats or check_finite or tree):
        raise BadInputError("--diff cannot be combined with --stats, --check-finite or --tree")

    checkpoint = core.open_checkpoint(file, trust=trust, tag=tag, weights=weights)
    listing = core.list_checkpoint(checkpoint, key=key, name_filter=name_filter)
    output.info(f"state dict: {listing.state_dict_key or '(top level)'} — {listing.state_dict_how}")
    listing.notes = [cli_words(note, NAME) for note in listing.notes]
    listing.state_dict_how = cli_words(listing.state_dict_how, NAME)
    for note in listing.notes:
        output.info(f"note: {note}")
    if name_filter is not None and not listing.rows:
        output.warn(
            f"--filter {name_filter!r} matches none of the {listing.filtered_out} tensor names "
            "(a Python regular expression, searched anywhere in each name)"
        )

    if diff is not None:
        other = core.open_checkpoint(diff, trust=trust)
        other_listing = core.list_checkpoint(other, key="auto", name_filter=name_filter)
        compare = "numbers" if values else "keys" if keys_only else "bytes"
        result = core.diff_state_dicts(listing, checkpoint, other_listing, other, compare=compare)
        data = result.to_dict()
        if data["prefix"]:  # the fix, as the command a person runs
            data["prefix"]["fix"] = (
                f"ptools convert-ckpt {data['prefix']['file']} OUT --strip-prefix {data['prefix']['prefix']}"
            )
        _emit_diff(data, json_output, ndjson)
        return

    want_values = stats or check_finite
    if ndjson and not tree:
        if not want_values:
            output.print_ndjson(row.to_dict() for row in listing.rows)
            return
        # Stream: each tensor's line is printed as soon as its statistics are known.
        bad = []
        for row, tensor_stats in core.iter_stats(checkpoint, listing.rows):
            line = row.to_dict()
            line["stats"] = tensor_stats.to_dict() if tensor_stats is not None else None
            bad += _non_finite(row.name, tensor_stats)
            output.print_ndjson([line])
        _finish_check(check_finite, bad, len(listing.rows))
        return
    data = listing.to_dict()
    if tree:
        data["tree"] = core.group_by_prefix(listing.rows, depth)

    bad = []
    if want_values:
        computed = output.progress(core.iter_stats(checkpoint, listing.rows), len(listing.rows), "reading values")
        for row_data, (row, tensor_stats) in zip(data["tensors"], computed):
            row_data["stats"] = tensor_stats.to_dict() if tensor_stats is not None else None
            bad += _non_finite(row.name, tensor_stats)
    if ndjson:
        output.print_ndjson(data["tree"])
    else:
        output.emit(data, json_output, lambda shown: render(shown, tree=tree, stats=want_values))
    _finish_check(check_finite, bad, len(listing.rows))


def _non_finite(name: str, tensor_stats: Any) -> list[str]:
    if tensor_stats is None or not (tensor_stats.nan or tensor_stats.inf):
        return []
    return [f"{name} ({tensor_stats.nan} NaN, {tensor_stats.inf} Inf)"]


def _finish_check(check_finite: bool, bad: list[str], count: int) -> None:
    if not check_finite:
        return
    if bad:
        raise BadInputError(f"{len(bad)} of {count} tensors hold NaN or Inf: {'; '.join(bad)}")
    output.info(f"all {count} tensors are finite")


def _number(value: float | None) -> str | None:
    return None if value is None else f"{value:.6g}"


def render(data: dict[str, Any], *, tree: bool, stats: bool) -> list[Any]:
    """Rich renderables for the listing dict (the same data ``--json`` prints)."""
    renderables: list[Any] = []
    renderables.append(f"[bold]{data['file']}[/bold]  {data['format']}, {format_bytes(data['size_bytes'])}")
    run = data.get("deepspeed")
    if run:
        renderables.append(
            f"DeepSpeed ZeRO-{run['zero_stage']} · world size {run['world_size']} · step {run['tag']} · "
            f"trained in {run['training_dtype']} · showing the {run['weights']} weights"
        )
    if data["structure"]:
        renderables.append(
            output.make_table(
                "Checkpoint structure",
                ["Key", "Type", "Contents"],
                [(s["key"], s["type"], s["summary"]) for s in data["structure"]],
            )
        )
    totals = data["totals"]
    if tree:
        groups, more_groups = _bounded(data["tree"])
        renderables.append(
            output.make_table(
                "Tensors by module prefix",
                ["Prefix", ("Tensors", "right"), ("Elements", "right"), ("Bytes", "right"), ("Share", "right")],
                [
                    (
                        "  " * (g["depth"] - 1) + g["prefix"],
                        g["tensors"],
                        f"{g['numel']:,}",
                        format_bytes(g["bytes"]),
                        f"{100 * g['bytes'] / totals['bytes']:.1f}%" if totals["bytes"] else "-",
                    )
                    for g in groups
                ],
            )
        )
        if more_groups:
            renderables.append(more_groups)
    if not tree or stats:
        columns: list[Any] = [
            "Name",
            "Shape",
            "Dtype",
            ("Elements", "right"),
            ("Bytes", "right"),
            "Device",
            "Kind",
            "Shares storage with",
        ]
        if stats:
            columns += [
                ("Min", "right"),
                ("Max", "right"),
                ("Mean", "right"),
                ("Std", "right"),
                ("NaN", "right"),
                ("Inf", "right"),
            ]
        rows = []
        for t in data["tensors"]:
            shared = t["shares_storage_with"]
            row = [
                t["name"],
                "×".join(map(str, t["shape"])) or "scalar",
                t["dtype"],
                f"{t['numel']:,}",
                format_bytes(t["bytes"]),
                t["device"],
                t["kind"],
                (shared[0] + (f" (+{t['shares_storage_count'] - 1})" if t["shares_storage_count"] > 1 else ""))
                if shared
                else "",
            ]
            if stats:
                s = t.get("stats") or {}
                row += [
                    _number(s.get("min")),
                    _number(s.get("max")),
                    _number(s.get("mean")),
                    _number(s.get("std")),
                    s.get("nan"),
                    s.get("inf"),
                ]
            rows.append(row)
        shown, more = _bounded(rows)
        renderables.append(
            output.make_table(
                f"State dict ({len(rows)} tensors)",
                columns,
                shown,
                optional=("Shares storage with", "Device", "Kind", "Elements", "Inf", "NaN", "Bytes"),
            )
        )
        if more:
            renderables.append(more)
    if data["non_tensors"]:
        entries, more_entries = _bounded(data["non_tensors"])
        renderables.append(
            output.make_table(
                "Other entries in the state dict",
                ["Name", "Type", "Value"],
                [(n["name"], n["type"], str(n["value"])[:80]) for n in entries],
            )
        )
        if more_entries:
            renderables.append(more_entries)
    dtype_rows = [
        (dtype, d["tensors"], f"{d['numel']:,}", format_bytes(d["bytes"])) for dtype, d in totals["by_dtype"].items()
    ]
    dtype_rows.append(("total", totals["tensors"], f"{totals['numel']:,}", format_bytes(totals["bytes"])))
    renderables.append(
        output.make_table(
            "Totals", ["Dtype", ("Tensors", "right"), ("Elements", "right"), ("Bytes", "right")], dtype_rows
        )
    )
    inferred = " (inferred from names)" if totals["kinds_inferred_from_names"] else ""
    shared = ""
    if totals["storage_bytes"] != totals["bytes"]:
        shared = f"; storages hold {format_bytes(totals['storage_bytes'])} (shared storages counted once)"
    renderables.append(
        f"parameters: {totals['parameters']['tensors']} tensors, {totals['parameters']['numel']:,} elements; "
        f"buffers: {totals['buffers']['tensors']} tensors, {totals['buffers']['numel']:,} elements"
        f"{inferred}{shared}"
    )
    return renderables


TABLE_ROWS = 500  # a terminal table of a million rows takes minutes to lay out and helps nobody


def _bounded(rows: list[Any]) -> tuple[list[Any], str | None]:
    """The first rows of a long table, and a line saying how to see the rest."""
    if len(rows) <= TABLE_ROWS:
        return rows, None
    return rows[:TABLE_ROWS], (
        f"… {len(rows) - TABLE_ROWS:,} more rows not shown: --filter REGEX narrows the "
        "listing, --json or --ndjson lists every row"
    )


def _emit_diff(data: dict[str, Any], json_output: bool, ndjson: bool) -> None:
    if ndjson:
        lines = [{"change": "only_in_a", "name": n} for n in data["only_in_a"]]
        lines += [{"change": "only_in_b", "name": n} for n in data["only_in_b"]]
        lines += [{"change": "shape", **m} for m in data["shape_mismatches"]]
        lines += [{"change": "dtype", **m} for m in data["dtype_mismatches"]]
        lines += [{"change": "values", **v} for v in data["values"] or [] if not v["equal"]]
        output.print_ndjson(lines)
        return
    output.emit(data, json_output, _diff_renderables)


def _diff_renderables(data: dict[str, Any]) -> list[Any]:
    """Rich renderables for a diff (the same data --json prints)."""
    from rich.text import Text

    prefix = data["prefix"]
    summary = [
        ("A", f"{data['a']['file']} ({data['a']['format']}, {data['a']['tensors']} tensors)"),
        ("B", f"{data['b']['file']} ({data['b']['format']}, {data['b']['tensors']} tensors)"),
        (
            "prefix",
            f"every key of {prefix['side'].upper()} starts with {prefix['prefix']!r}; compared without it"
            if prefix
            else "none",
        ),
        ("common keys", data["common"]),
        ("only in A", len(data["only_in_a"])),
        ("only in B", len(data["only_in_b"])),
        ("shape mismatches", len(data["shape_mismatches"])),
        ("dtype mismatches", len(data["dtype_mismatches"])),
    ]
    if data["values"] is not None:
        summary.append(("values differ", f"{data['values_differ']} of {len(data['values'])} compared tensors"))
    compared = {
        "keys": "keys, shapes and dtypes; no values read (--keys-only)",
        "bytes": "keys, shapes, dtypes and the bytes of every common tensor",
        "numbers": "keys, shapes, dtypes and values (bytes, max |A−B|, max relative)",
    }[data["compared"]]
    verdict = "yes" if data["identical"] else "no"
    if prefix and data["identical_after_prefix"]:
        verdict = f"after removing the prefix {prefix['prefix']!r} from {prefix['side'].upper()}"
    summary.append(("identical", f"{verdict} (compared: {compared})"))
    renderables: list[Any] = [output.make_table("Diff", ["", "value"], summary)]
    if prefix:
        renderables.append(Text(f"Fix: {prefix['fix']}"))
    for title, names in (("Only in A", data["only_in_a"]), ("Only in B", data["only_in_b"])):
        if names:
            renderables.append(output.make_table(title, ["Name"], [(n,) for n in names]))
    if data["shape_mismatches"] or data["dtype_mismatches"]:
        rows = [
            (m["name"], "shape", "×".join(map(str, m["a"])), "×".join(map(str, m["b"])))
            for m in data["shape_mismatches"]
        ]
        rows += [(m["name"], "dtype", m["a"], m["b"]) for m in data["dtype_mismatches"]]
        renderables.append(output.make_table("Mismatches", ["Name", "What", "A", "B"], rows))
    if data["compared"] == "bytes" and data["values_differ"]:
        renderables.append(
            output.make_table(
                f"Values differ in {data['values_differ']} of {len(data['values'])} compared tensors "
                "(--values shows by how much)",
                ["Name"],
                [(v["name"],) for v in data["values"] if not v["equal"]],
            )
        )
    elif data["compared"] == "numbers":
        differing = [
            (v["name"], _number(v["max_abs_diff"]), _number(v["max_rel_diff"]))
            for v in data["values"]
            if not v["equal"]
        ]
        renderables.append(
            output.make_table(
                f"Values: {len(differing)} of {len(data['values'])} compared tensors differ",
                ["Name", ("Max |A − B|", "right"), ("Max relative", "right")],
                differing,
            )
        )
    return renderables
