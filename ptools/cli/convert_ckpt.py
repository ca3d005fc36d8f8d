"""``ptools convert-ckpt``: remap, rename, extract, cast and convert checkpoints safely."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer

from ptools.cli import output
from ptools.cli.help_format import command_help
from ptools.cli.options import JsonOption, TagOption, TrustOption, ZeroWeightsOption, usage_check
from ptools.cli.wording import cli_words
from ptools.core.choices import CastDtype, CastScope, CheckpointOutputFormat
from ptools.core.units import format_bytes, parse_size
from ptools.errors import BadInputError

NAME = "convert-ckpt"
SHORT_HELP = "Remap devices, strip/rename/select keys, extract, cast and convert checkpoints (torch ⇄ safetensors)."
DETAILS = "Reads any format inspect-state-dict reads (DeepSpeed ZeRO run folders too: --tag, --weights), with the same safety rules, and streams tensor data storage by storage. Never overwrites the input; OUT is written to a temporary file beside it and renamed into place only when complete (and verified, with --verify)."
EXAMPLES = [
    "ptools convert-ckpt gpu_run.pt laptop.pt --map-location cpu",
    "ptools convert-ckpt ddp.ckpt weights.safetensors --extract auto --strip-prefix auto --dtype bf16 --keep-dtype norm",
    "ptools convert-ckpt last.ckpt slim.ckpt --drop-optimizer --verify",
    "ptools convert-ckpt model.pt out --shard-size 2GB",
    "ptools convert-ckpt old.pt new.pt --rename '^backbone\\.=encoder.' --drop '^head\\.' --dry-run",
    "ptools convert-ckpt ds_run/ consolidated.safetensors --verify",
    "ptools convert-ckpt epoch_8.pt epoch_9.pt epoch_10.pt --average -o soup.safetensors",
]
HELP = command_help(SHORT_HELP, DETAILS, EXAMPLES)


def _parse_map_location(text: str) -> Any:
    from ptools.core.keys import parse_map_location

    return parse_map_location(text)


@contextmanager
def _progress(expected: int) -> Iterator[tuple[Any, Any]]:
    """``(on_bytes, on_total)`` driving a byte progress bar on stderr, for large files on a
    terminal; ``(None, None)`` otherwise."""
    import sys

    if not sys.stderr.isatty() or expected < (256 << 20):
        yield None, None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=output.stderr_console(),
        transient=True,
    ) as progress:
        task = progress.add_task("writing", total=expected)
        yield (lambda count: progress.advance(task, count)), (lambda total: progress.update(task, total=total))


def command(
    paths: Annotated[
        list[str],
        typer.Argument(
            metavar="IN OUT",
            help="Checkpoint to read (any supported format) and the file to write (a folder with --shard-size "
            "or --format dcp); with --average, the checkpoints to average (OUT given with -o).",
            show_default=False,
        ),
    ],
    output_path: Annotated[
        str | None, typer.Option("-o", "--output", metavar="OUT", help="The output, instead of the last argument.")
    ] = None,
    map_location: Annotated[
        str | None,
        typer.Option(
            "--map-location",
            metavar="DEVICE",
            callback=usage_check(_parse_map_location),
            help="New device tags, as torch.load's map_location: cpu, cuda, cuda:N, or 'cuda:1=cuda:0,cuda:2=cuda:0'. "
            "The written file loads with a plain torch.load on a machine without those devices.",
        ),
    ] = None,
    strip_prefix: Annotated[
        str | None,
        typer.Option(
            "--strip-prefix",
            metavar="PREFIX",
            help="Remove PREFIX from the keys that start with it; 'auto' removes module. (DataParallel/DDP) and "
            "_orig_mod. (torch.compile) when every key has it.",
        ),
    ] = None,
    add_prefix: Annotated[
        str | None, typer.Option("--add-prefix", metavar="PREFIX", help="Put PREFIX in front of every key.")
    ] = None,
    rename: Annotated[
        list[str] | None,
        typer.Option(
            "--rename",
            metavar="REGEX=REPLACEMENT",
            help="re.sub on every key; repeatable, applied in order. Two keys becoming one is an error.",
        ),
    ] = None,
    keep: Annotated[
        str | None, typer.Option("--keep", metavar="REGEX", help="Keep only the keys matching REGEX (searched).")
    ] = None,
    drop: Annotated[str | None, typer.Option("--drop", metavar="REGEX", help="Remove the keys matching REGEX.")] = None,
    extract: Annotated[
        str | None,
        typer.Option(
            "--extract",
            metavar="KEY",
            help="Write only the state dict at KEY; 'auto' finds the model weights and says which key it picked.",
        ),
    ] = None,
    flatten: Annotated[
        bool,
        typer.Option(
            "--flatten",
            help="For safetensors output: flatten nested dicts into dotted keys, leaving out non-tensor values.",
        ),
    ] = False,
    drop_optimizer: Annotated[
        bool,
        typer.Option(
            "--drop-optimizer", help="Keep the training checkpoint but remove optimizer, scheduler and scaler state."
        ),
    ] = False,
    dtype: Annotated[
        CastDtype | None,
        typer.Option("--dtype", help="Cast floating tensors (never integers, booleans or num_batches_tracked)."),
    ] = None,
    keep_dtype: Annotated[
        str | None,
        typer.Option("--keep-dtype", metavar="REGEX", help="Keys matching REGEX keep their dtype (e.g. 'norm|bn')."),
    ] = None,
    cast_scope: Annotated[
        CastScope,
        typer.Option(
            "--cast-scope",
            help="What --dtype casts: the model weights (the state dict --extract auto finds), or all "
            "floating tensors, optimizer state included.",
        ),
    ] = "weights",
    output_format: Annotated[
        CheckpointOutputFormat | None,
        typer.Option(
            "--format", help="Output format; default from OUT's extension (.pt .pth .bin .ckpt / .safetensors)."
        ),
    ] = None,
    shard_size: Annotated[
        str | None,
        typer.Option(
            "--shard-size",
            metavar="SIZE",
            callback=usage_check(parse_size),
            help="Write sharded safetensors of at most SIZE each (e.g. 2GB) and model.safetensors.index.json "
            "into the folder OUT.",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the plan (old key → new key, dtypes, devices, bytes) and write nothing."),
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Re-read the output before putting it in place and check every tensor against the "
            "input (bit-exact, or exact after the requested cast).",
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists (never the input).")] = False,
    tag: TagOption = None,
    weights: ZeroWeightsOption = "master",
    average: Annotated[
        bool,
        typer.Option(
            "--average",
            help="Write the element-wise average of the inputs' model weights (any formats, same keys): floating "
            "tensors averaged in float64 and cast back, one tensor at a time.",
        ),
    ] = False,
    take_last: Annotated[
        bool,
        typer.Option("--take-last", help="With --average: integer/boolean tensors that differ take the last input's."),
    ] = False,
    trust: TrustOption = False,
    json_output: JsonOption = False,
) -> None:
    from ptools.core.convert import convert_checkpoint
    from ptools.core.files import size_on_disk

    sources, destination = _inputs_and_output(paths, output_path, average)

    shard_bytes = parse_size(shard_size) if shard_size is not None else None
    if shard_bytes is not None and shard_bytes <= 0:
        raise BadInputError("--shard-size must be larger than 0")
    with _progress(sum(size_on_disk(source) for source in sources)) as (on_bytes, on_total):
        report = convert_checkpoint(
            sources if average else sources[0],
            destination,
            map_location=map_location,
            strip=strip_prefix,
            add=add_prefix,
            rename=rename or (),
            keep=keep,
            drop=drop,
            extract=extract,
            flatten=flatten,
            drop_optimizer=drop_optimizer,
            dtype=dtype,
            keep_dtype=keep_dtype,
            cast_scope=cast_scope,
            format=output_format,
            tag=tag,
            weights=weights,
            average=average,
            take_last=take_last,
            shard_size=shard_bytes,
            force=force,
            trust=trust,
            dry_run=dry_run,
            verify=verify,
            on_bytes=on_bytes,
            on_total=on_total,
        )
    data = report.to_dict()
    data["notes"] = [cli_words(note, NAME) for note in data["notes"]]
    data["state_dict_how"] = cli_words(data["state_dict_how"], NAME)
    if not dry_run:
        data.pop("plan")
    output.emit(
        data,
        json_output,
        lambda shown: (
            [
                output.make_table(
                    f"Plan: {report.input} → {report.output} ({report.output_format}); nothing written",
                    ["From", "To", "Dtype", "Device", "Shape"],
                    [_plan_row(row) for row in shown["plan"]],
                    optional=("Device", "Shape"),
                )
            ]
            if dry_run
            else []
        ),
    )
    if not json_output:
        _summary(data)


def _inputs_and_output(paths: list[str], output_path: str | None, average: bool) -> tuple[list[str], str]:
    """IN OUT, IN -o OUT, or (averaging) IN IN… -o OUT. Averaging insists on -o: a last
    argument taken for OUT would otherwise be a checkpoint meant as an input."""
    if output_path is None and average:
        raise typer.BadParameter("--average takes every argument as an input: name the output with -o OUT")
    if output_path is None:
        if len(paths) < 2:
            raise typer.BadParameter("give the output: IN OUT, or -o OUT", param_hint="OUT")
        paths, output_path = paths[:-1], paths[-1]
    if average and len(paths) < 2:
        raise typer.BadParameter("--average needs at least two checkpoints to average", param_hint="IN")
    if not average and len(paths) > 1:
        raise typer.BadParameter(
            f"{len(paths)} inputs: pass --average to average them, or one IN and its OUT", param_hint="IN"
        )
    return paths, output_path


def _plan_row(row: dict[str, Any]) -> tuple[str, ...]:
    def change(old: str, new: str | None) -> str:
        return old if new in (None, old) else f"{old} → {new}"

    target = "(dropped)" if row["to"] is None else "=" if row["to"] == row["from"] else row["to"]
    return (
        row["from"],
        target,
        change(row["dtype"], row["new_dtype"]),
        change(row["device"], row["new_device"]),
        "×".join(map(str, row["shape"])) or "scalar",
    )


def _summary(data: dict[str, Any]) -> None:
    """The one-paragraph account on stderr."""
    verb = "would write" if data["dry_run"] else "wrote"
    where = f"state dict {data['state_dict_key']!r}" if data["state_dict_key"] else "top-level state dict"
    lines = [
        f"{verb} {data['output']} ({data['output_format']}): {data['tensors']} tensors, "
        f"{format_bytes(data['bytes_in'])} in, {format_bytes(data['bytes_out'])} out"
        f"{' (estimated)' if data['dry_run'] else ''}, {data['seconds']:.2f} s",
        f"  {where} ({data['state_dict_how']})",
    ]
    if data["stripped_prefix"]:
        lines.append(f"  stripped prefix {data['stripped_prefix']!r}")
    if data["renamed"]:
        lines.append(f"  {data['renamed']} key(s) renamed")
    if data["dropped_keys"]:
        lines.append(f"  {len(data['dropped_keys'])} key(s) dropped")
    if data["dropped_entries"]:
        lines.append(f"  removed training state: {', '.join(data['dropped_entries'])}")
    if data["cast"] or data["kept_dtype"] or data["outside_cast_scope"]:
        lines.append(
            f"  {data['cast']} tensor(s) cast; {len(data['kept_dtype'])} kept their dtype (--keep-dtype)"
            + (
                f"; {data['outside_cast_scope']} outside the model weights not cast (--cast-scope all casts them)"
                if data["outside_cast_scope"]
                else ""
            )
        )
    for old, new in data["devices"].items():
        lines.append(f"  device {old} → {new}")
    if data["aliases"]:
        first = next(iter(data["aliases"]))
        lines.append(
            f"  {len(data['aliases'])} tied name(s) stored once, recorded in __metadata__; "
            f"note: safetensors' load_file does not restore them ({first} is missing from what it returns): "
            "load with strict=False and tie the weights again, as transformers does"
        )
    if data["shards"]:
        lines.append(f"  {data['shards']} shard(s) + model.safetensors.index.json")
    if data["verified"]:
        lines.append("  verified: every tensor matches the input")
    lines += [f"  note: {note}" for note in data["notes"]]
    output.info("\n".join(lines))
    losses = data["cast_losses"]
    if losses:
        to_zero = sum(loss["to_zero"] for loss in losses)
        to_inf = sum(loss["to_inf"] for loss in losses)
        worst = max(losses, key=lambda loss: loss["to_zero"] + loss["to_inf"])
        output.warn(
            f"the cast lost values in {len(losses)} of {data['cast']} cast tensor(s): {to_zero:,} non-zero "
            f"value(s) became 0 and {to_inf:,} finite value(s) became ±inf (most in {worst['names'][0]}: "
            f"{worst['to_zero']:,} to 0, {worst['to_inf']:,} to inf of {worst['numel']:,}); per tensor in "
            "--json cast_losses; --keep-dtype REGEX keeps such tensors as they are"
        )
