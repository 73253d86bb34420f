"""The bench's one reporter: records -> markdown table, JSON and a PNG plot in the output folder."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence

from .. import files

# (header, record -> cell text). Records are flat dicts; a missing figure prints as "-".
Column = tuple[str, Callable[[dict], str]]


def _fmt(key: str, spec: str, scale: float = 1.0) -> Callable[[dict], str]:
    def cell(record: dict) -> str:
        value = record.get(key)
        return "-" if value is None else format(value * scale, spec)

    return cell


def _speedup(baseline: str) -> Callable[[dict], str]:
    def cell(record: dict) -> str:
        value = record.get("speedup", {}).get(baseline)
        return "-" if value is None else f"{value:.2f}x"

    return cell


def microbench_columns(baselines: Sequence[str]) -> list[Column]:
    return (
        [
            ("level", lambda r: r["level"]),
            ("shape", lambda r: r["shape"]),
            ("B", lambda r: str(r["batch"])),
            ("dtype", lambda r: r["dtype"]),
            ("pass", lambda r: r["pass"]),
            ("threads", lambda r: str(r["threads"])),
            ("implementation", lambda r: r["implementation"]),
            ("median ms", _fmt("median_ms", ".2f")),
            ("spread", _fmt("spread", ".0%")),
            ("GFLOP/s", _fmt("gflop_per_s", ".1f")),
            ("of matmul", _fmt("matmul_fraction", ".0%")),
            ("peak MiB", _fmt("peak_memory_mib", ".1f")),
            ("x floor", _fmt("floor_ratio", ".2f")),
        ]
        + [(f"vs {b}", _speedup(b)) for b in baselines]
        + [("status", lambda r: r["status"])]
    )


def model_columns() -> list[Column]:
    return [
        ("model", lambda r: r["model"]),
        ("variant", lambda r: r["variant"]),
        ("mode", lambda r: r["mode"]),
        ("B", lambda r: str(r["batch"])),
        ("dtype", lambda r: r["dtype"]),
        ("threads", lambda r: str(r["threads"])),
        ("median ms", _fmt("median_ms", ".1f")),
        ("spread", _fmt("spread", ".0%")),
        ("images/s", _fmt("images_per_s", ".1f")),
        ("vs stock", _speedup("stock")),
        ("status", lambda r: r["status"]),
    ]


def thread_scaling(records: Sequence[dict]) -> list[dict]:
    """One row per (workload, pass, implementation) timed at several thread counts: medians and speed-up."""
    rows: dict = {}
    for r in records:
        if r.get("median_ms") is not None:
            key = tuple(r[k] for k in ("level", "shape", "batch", "dtype", "pass", "implementation"))
            rows.setdefault(key, {})[r["threads"]] = r["median_ms"]
    result = []
    for (level, shape, batch, dtype, pass_, impl), by_threads in rows.items():
        if len(by_threads) > 1:
            fewest, most = min(by_threads), max(by_threads)
            result.append(
                {
                    "level": level,
                    "shape": shape,
                    "batch": batch,
                    "dtype": dtype,
                    "pass": pass_,
                    "implementation": impl,
                    "median_ms": by_threads,
                    "scaling": by_threads[fewest] / by_threads[most],
                    "threads": f"{fewest} -> {most}",
                }
            )
    return result


SCALING_COLUMNS: list[Column] = [
    ("level", lambda r: r["level"]),
    ("shape", lambda r: r["shape"]),
    ("B", lambda r: str(r["batch"])),
    ("dtype", lambda r: r["dtype"]),
    ("pass", lambda r: r["pass"]),
    ("implementation", lambda r: r["implementation"]),
    ("median ms by threads", lambda r: ", ".join(f"{t}: {ms:.2f}" for t, ms in sorted(r["median_ms"].items()))),
    ("speed-up", lambda r: f"{r['scaling']:.2f}x ({r['threads']} threads)"),
]


def markdown_table(records: Sequence[dict], columns: Sequence[Column]) -> str:
    rows = [[header for header, _ in columns], ["---"] * len(columns)]
    rows += [[cell(r) for _, cell in columns] for r in records]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def ensure_writable(folder: str) -> None:
    """Create ``folder`` and prove a file can be written there; raises OSError with the reason."""
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".bench-write-test."):  # O_EXCL: a name of its own
        pass


def write_json(path: str, meta: dict, records: Sequence[dict]) -> None:
    files.write_text(path, json.dumps({"meta": meta, "results": list(records)}, indent=2))


def plot(
    path: str,
    records: Sequence[dict],
    panel: Callable[[dict], str],
    group: Callable[[dict], str],
    bar_key: str,
    value: Callable[[dict], float | None],
    ylabel: str,
    line_at: float | None = None,
) -> None:
    """Grouped bar chart: one panel per ``panel(r)``, groups ``group(r)`` along x, one bar per ``r[bar_key]``,
    height ``value(r)``; ``line_at`` draws a horizontal reference line (1.0 for speed-ups)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in records if value(r) is not None]
    panels = list(dict.fromkeys(panel(r) for r in records)) or ["(nothing measured)"]
    bars = list(dict.fromkeys(r[bar_key] for r in records))
    width = 0.8 / max(1, len(bars))
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(max(6, 1.2 * len(records) / len(panels)), 3.2 * len(panels)), squeeze=False
    )
    for ax, name in zip(axes[:, 0], panels):
        mine = [r for r in records if panel(r) == name]
        groups = list(dict.fromkeys(group(r) for r in mine))
        for i, bar in enumerate(bars):
            values = {group(r): value(r) for r in mine if r[bar_key] == bar}
            xs = [j + i * width for j, g in enumerate(groups) if g in values]
            ax.bar(xs, [values[g] for g in groups if g in values], width, label=bar)
        if line_at is not None:
            ax.axhline(line_at, color="gray", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups, fontsize=8)
        ax.set_ylim(0, 1.25 * max((value(r) for r in mine), default=1.0))
        ax.set_title(name, fontsize=10)
        ax.set_ylabel(ylabel)
        if bars:
            ax.legend(fontsize=7, ncol=min(5, len(bars)), loc="upper left")
    fig.tight_layout()
    with files.replacing(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
