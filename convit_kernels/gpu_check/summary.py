"""gpu-check's outputs: the bench's records as TFLOP/s, GB/s and fractions of peak, and the three files under DIR.

The bench records FLOPs but no bytes; for the attention core gpu-check credits every
implementation with the compulsory traffic (each input read once, each output written once, at
the record's dtype), as the bench credits each with the same FLOPs. Module-level rows get no GB/s.
"""

from __future__ import annotations

import json
import os
import tarfile

from .. import files

__all__ = ["summarise_bench", "summarise_models", "markdown", "write_outputs", "OUTPUTS", "NOMINAL_PEAKS"]

OUTPUTS = ("gpu-check.md", "gpu-check.json", "logs.tar.gz")
# Dense tensor-core TFLOP/s by dtype and memory TB/s, by device-name fragment, most specific first (datasheets).
NOMINAL_PEAKS = {
    "H200": ({"bf16": 989.0, "fp16": 989.0, "fp32": 494.0}, 4.8),
    "H100 NVL": ({"bf16": 835.0, "fp16": 835.0, "fp32": 418.0}, 3.9),
    "H100 PCIe": ({"bf16": 756.0, "fp16": 756.0, "fp32": 378.0}, 2.0),
    "H100": ({"bf16": 989.0, "fp16": 989.0, "fp32": 494.0}, 3.35),
    "A100": ({"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}, 2.0),
}
_ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# The attention core's distinct B H N d tensors, each read or written once: fwd q, k, v, out; fwd+bwd adds dO,
# dq, dk, dv.
_CORE_TENSORS = {"fwd": 4, "fwd+bwd": 8}


def _peaks(device_name: str) -> tuple[dict, float | None]:
    return next((p for fragment, p in NOMINAL_PEAKS.items() if fragment in device_name), ({}, None))


def summarise_bench(records: list[dict], device_name: str) -> list[dict]:
    """The bench's timed records with TFLOP/s, GB/s (core level) and fractions of the device's nominal peaks."""
    flops_peaks, bandwidth = _peaks(device_name)
    rows = []
    for r in records:
        if r.get("status") != "ok":
            continue
        tflops = r["gflop_per_s"] / 1e3
        gbytes = None
        if r["level"] == "core" and r["dtype"] in _ELEMENT_BYTES:
            size = _CORE_TENSORS[r["pass"]] * r["batch"] * r["heads"] * r["tokens"] * r["head_dim"]
            gbytes = size * _ELEMENT_BYTES[r["dtype"]] / r["median_ms"] / 1e6
        peak = flops_peaks.get(r["dtype"])
        rows.append(
            {
                "level": r["level"],
                "shape": r["shape"],
                "batch": r["batch"],
                "dtype": r["dtype"],
                "pass": r["pass"],
                "implementation": r["implementation"],
                "median_ms": r["median_ms"],
                "tflop_per_s": tflops,
                "gbyte_per_s": gbytes,
                "fraction_of_peak_flops": tflops / peak if peak else None,
                "fraction_of_peak_bandwidth": gbytes / (bandwidth * 1e3) if gbytes and bandwidth else None,
                "floor_ratio": r.get("floor_ratio"),
            }
        )
    return rows


def summarise_models(records: list[dict]) -> list[dict]:
    keys = ("model", "mode", "variant", "batch", "dtype", "status", "median_ms", "images_per_s")
    return [{**{k: r.get(k) for k in keys}, "speedup_over_stock": r.get("speedup", {}).get("stock")} for r in records]


def _cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    device, versions = report["device"], report["versions"]
    lines = [
        f"# gpu-check on {device['name']}" + (" (DRY RUN: nothing ran on a GPU)" if report["dry_run"] else ""),
        "",
        f"sm_{device['capability'].replace('.', '')}, {device['memory_gib']} GiB; "
        + ", ".join(f"{name} {version}" for name, version in versions.items())
        + f"; {report['cores']} CPU cores; caches at start: "
        + ", ".join(f"{name} {'cold' if c['cold'] else 'warm'}" for name, c in report["caches"].items()),
        "",
        "| step | status | seconds | limit (s) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']:.0f} | {s['limit_s']} |" for s in report["steps"]]
    lines += ["", f"Limits sum to {report['limits_s']} s of a {report['budget_s']} s budget.", "", "Cut to fit:"]
    lines += [f"- {cut}" for cut in report["cuts"]]
    if report.get("tests"):
        t = report["tests"]
        lines += ["", f"GPU tests: {t['passed']} passed, {t['failures']} failed, {t['errors']} errors, "
                  f"{t['skipped']} skipped ({t['shards_without_xml']} shards left no XML)"]  # fmt: skip
    if report["bench"]:
        lines += [
            "",
            "| level | shape | pass | implementation | ms | TFLOP/s | GB/s | of peak FLOP/s | of peak B/s | x floor |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['level']} | {r['shape']} | {r['pass']} | {r['implementation']} | {r['median_ms']:.3f} | "
            f"{r['tflop_per_s']:.1f} | {_cell(r['gbyte_per_s'], '.0f')} | {_cell(r['fraction_of_peak_flops'], '.1%')} "
            f"| {_cell(r['fraction_of_peak_bandwidth'], '.1%')} | {_cell(r['floor_ratio'], '.2f')} |"
            for r in report["bench"]
        ]
    if report["models"]:
        lines += ["", "| model | mode | variant | ms | images/s | vs stock |", "|---|---|---|---|---|---|"]
        lines += [
            f"| {r['model']} | {r['mode']} | {r['variant']} | {_cell(r['median_ms'], '.1f')} | "
            f"{_cell(r['images_per_s'], '.0f')} | {_cell(r['speedup_over_stock'], '.2f')} |"
            for r in report["models"]
        ]
    return "\n".join(lines) + "\n"


def _records(path: str) -> list[dict]:
    try:
        with open(path) as f:
            return json.load(f)["results"]
    except (OSError, ValueError, KeyError):  # the step did not run, or was stopped while writing
        return []


def write_outputs(out: str, report: dict, work: str, bench_dirs: list[str]) -> None:
    """gpu-check.json, gpu-check.md and logs.tar.gz (everything under ``work``) under ``out``, nothing else."""
    records = [r for d in bench_dirs for r in _records(os.path.join(work, d, "bench.json"))]
    report = {
        **report,
        "bench": summarise_bench(records, report["device"]["name"]),
        "models": summarise_models(_records(os.path.join(work, "models", "models.json"))),
    }
    os.makedirs(out, exist_ok=True)
    files.write_text(os.path.join(out, "gpu-check.json"), json.dumps(report, indent=1))
    files.write_text(os.path.join(out, "gpu-check.md"), markdown(report))
    with files.replacing(os.path.join(out, "logs.tar.gz")) as f, tarfile.open(fileobj=f, mode="w:gz") as archive:
        archive.add(work, arcname="logs")
