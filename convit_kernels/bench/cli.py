"""`convit-kernels bench`: time the fused GPSA against timm, the SDPA decomposition and torch.compile.

    convit-kernels bench --quick                      # representative subset (the README says how long it takes)
    convit-kernels bench                              # every shape, dtype, level and pass
    convit-kernels bench --quick --threads 1 2        # thread scaling
    convit-kernels bench --models                     # whole-model images/s, stock vs patched

Writes bench.json, bench.md (the printed table) and bench.png to --out
(models: models.json, models.md, models.png).
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch
from tqdm import tqdm

from .. import files
from ..arguments import COUNT, POSITIVE_INT, SIZE, number
from ..backends import backend_names
from .implementations import BASELINES, FLOOR, fused_backends, implementations
from .models import default_model_batch, model_steps, run_models
from .report import (
    SCALING_COLUMNS,
    ensure_writable,
    markdown_table,
    microbench_columns,
    model_columns,
    plot,
    thread_scaling,
    write_json,
)
from .run import Microbench
from .workloads import CONVIT_SHAPES, DTYPES, LEVELS, PASSES, SHAPES, Workload, default_batch

QUICK = {"shapes": ["Ti-224"], "dtypes": ["fp32"], "warmup": 1, "repeats": 5}
FULL = {"shapes": list(CONVIT_SHAPES), "dtypes": list(DTYPES), "warmup": 2, "repeats": 10}


def by_preset(key: str) -> str:
    """The default of an option --quick changes, as the help states it."""

    def shown(value) -> str:
        return " ".join(value) if isinstance(value, list) else str(value)

    full = "every ConViT shape" if FULL[key] == list(CONVIT_SHAPES) else shown(FULL[key])
    return f"(default: {full}, {shown(QUICK[key])} with --quick)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convit-kernels bench",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument("--quick", action="store_true", help=f"shapes {' '.join(QUICK['shapes'])}, fp32, fewer repeats")
    parser.add_argument("--models", action="store_true", help="whole-model throughput instead of the microbenchmarks")
    parser.add_argument(
        "--shapes",
        nargs="+",
        metavar="SHAPE",
        help=f"of {', '.join(SHAPES)} {by_preset('shapes')}",
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        metavar="IMPL",
        help=f"implementations to time: fused backends ({', '.join(n for n in backend_names() if n != 'reference')}, "
        "or fused-NAME) "
        f"and baselines ({', '.join(BASELINES)}) (default: every one available)",
    )
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="dtypes to time " + by_preset("dtypes"))
    parser.add_argument(
        "--levels",
        nargs="+",
        choices=LEVELS,
        default=list(LEVELS),
        help=f"the attention core, the GPSA module (default: {' '.join(LEVELS)})",
    )
    parser.add_argument(
        "--passes",
        nargs="+",
        choices=PASSES,
        default=list(PASSES),
        help=f"forward, forward and backward (default: {' '.join(PASSES)})",
    )
    parser.add_argument(
        "--threads",
        nargs="+",
        type=number(int, low=1, high=1024),
        metavar="N",
        help="CPU thread counts (default: torch's)",
    )
    parser.add_argument("--batch", type=SIZE, help="batch size for every shape (default: chosen per device and shape)")
    parser.add_argument("--warmup", type=COUNT, help=f"untimed calls before timing {by_preset('warmup')}")
    parser.add_argument(
        "--repeats",
        type=POSITIVE_INT,
        help=f"timed calls per implementation (the median is reported) {by_preset('repeats')}",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak memory measurement")
    parser.add_argument("--out", default="bench-results", help="output folder (default: %(default)s)")
    return parser


def _select_implementations(parser, requested, device_type: str):
    """Implementation names to time, validated against what this device has."""
    fused = fused_backends(device_type)
    if requested is None:
        return [f"fused-{name}" for name, why in fused.items() if why is None] + list(BASELINES)
    names = []
    for name in requested:
        backend = name.removeprefix("fused-")
        if name in BASELINES:
            names.append(name)
        elif backend in fused:
            if fused[backend] is not None:
                parser.error(f"backend {backend!r} is not available here: {fused[backend]}")
            names.append(f"fused-{backend}")
        else:
            parser.error(f"unknown implementation {name!r}; choose from {', '.join(list(fused) + list(BASELINES))}")
    return names


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = args.shapes or preset["shapes"]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape {', '.join(map(repr, unknown))}; choose from {', '.join(SHAPES)}")
    names = _select_implementations(parser, args.backends, device.type)
    try:
        ensure_writable(args.out)
    except OSError as exc:
        parser.error(f"cannot write to the output folder {args.out!r}: {exc.strerror or exc}")

    dtypes = args.dtypes or preset["dtypes"]
    threads = args.threads or [torch.get_num_threads()]
    warmup = preset["warmup"] if args.warmup is None else args.warmup
    repeats = args.repeats or preset["repeats"]
    meta = {
        "command": "convit-kernels bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "warmup": warmup,
        "repeats": repeats,
    }
    if args.models:
        return _run_models(args, device, threads, meta)

    bench = Microbench(names, args.passes, threads, warmup, repeats, measure_memory=not args.no_memory)
    workloads = [
        Workload(level, SHAPES[s], args.batch or default_batch(SHAPES[s], device.type, DTYPES[d]), DTYPES[d], device)
        for level in args.levels
        for s in shapes
        for d in dtypes
    ]
    records = []
    with tqdm(total=sum(bench.steps(w) for w in workloads), file=sys.stderr, desc="bench", unit="step") as bar:
        for workload in workloads:
            bar.set_postfix_str(workload.label)
            records += bench.run(workload, bar.update)
    meta.update(
        {
            "flops": "fused form: forward 4 B H N^2 d; fwd+bwd 14 B H N^2 d (backward 10 B H N^2 d: q k^T recomputed, "
            "dO v^T, dv, dq, dk); module level adds the projections, 8 B N C^2 forward, 24 B N C^2 fwd+bwd. "
            "Every implementation is credited with the same FLOPs.",
            "implementations": {
                n: impl.description for n, impl in implementations(device.type, torch.float32).items() if n in names
            },
            "matmul_gflop_per_s": bench.matmul_rates,
            "spread": "interquartile range / median",
            "peak_memory": "memory held beyond what existed before the call; CPU: torch.profiler allocation events, "
            "GPU: torch.cuda.max_memory_allocated",
        }
    )
    scaling = thread_scaling(records)
    if scaling:
        meta["thread_scaling"] = scaling
    return _report(
        args.out,
        "bench",
        meta,
        records,
        microbench_columns([b for b in BASELINES if b != FLOOR]),
        extra_tables=[("Thread scaling", markdown_table(scaling, SCALING_COLUMNS))] if scaling else [],
        panel=lambda r: f"{r['level']} {r['pass']}",
        group=lambda r: f"{r['shape']} {r['dtype']}" + (f" t{r['threads']}" if len(threads) > 1 else ""),
        bar_key="implementation",
        **_plot_value(records),
    )


def _plot_value(records) -> dict:
    """Bar heights: speed-up over timm eager where timm was timed, else the time over the attention floor's."""
    if any(r.get("speedup", {}).get("timm") for r in records):
        return dict(value=lambda r: r.get("speedup", {}).get("timm"), ylabel="speed-up over timm eager", line_at=1.0)
    return dict(value=lambda r: r.get("floor_ratio"), ylabel="time / attention floor", line_at=1.0)


def _run_models(args, device, threads, meta) -> int:
    # Whole models on a CPU: float32 only (its bf16 matmuls take a slow path) and fewer calls, unless asked.
    dtypes = args.dtypes or (list(DTYPES) if device.type == "cuda" else ["fp32"])
    batch = args.batch or default_model_batch(device.type)
    warmup = 1 if args.warmup is None else args.warmup
    repeats = args.repeats or 3
    meta.update(warmup=warmup, repeats=repeats)
    with tqdm(total=model_steps(dtypes, args.passes, threads), file=sys.stderr, desc="models", unit="step") as bar:
        records = run_models(device, dtypes, args.passes, threads, batch, warmup, repeats, bar.update)
    return _report(
        args.out,
        "models",
        meta,
        records,
        model_columns(),
        panel=lambda r: r["mode"],
        group=lambda r: r["model"] + (f" t{r['threads']}" if len(threads) > 1 else ""),
        bar_key="variant",
        value=lambda r: r.get("images_per_s"),
        ylabel="images/s",
    )


def _report(out: str, stem: str, meta: dict, records, columns, extra_tables=(), **plot_args) -> int:
    table = "\n\n".join([markdown_table(records, columns)] + [f"{title}\n\n{t}" for title, t in extra_tables])
    print(table)
    files.write_text(f"{out}/{stem}.md", table + "\n")
    write_json(f"{out}/{stem}.json", meta, records)
    plot(f"{out}/{stem}.png", records, **plot_args)
    print(f"\nwrote {out}/{stem}.json, {stem}.md, {stem}.png", file=sys.stderr)
    refused = sorted({r.get("implementation", r.get("variant")) for r in records if r["status"].startswith("refused")})
    if refused:
        print(f"refused to time (wrong results): {', '.join(refused)}", file=sys.stderr)
        return 1
    return 0
