"""The statistics over the experiment's runs: accuracy per model and ratio with 95% t intervals, the paired gains,
the mean curves of gates and nonlocality, and time-to-accuracy."""

from __future__ import annotations

import math
import statistics

from .data import Images
from .options import MODELS, PAIRS, run_name


def t_interval(values: list) -> dict:
    """Mean, sample std and the half-width of the 95% t interval of the mean (None with fewer than 2 values)."""
    from scipy import stats

    mean = sum(values) / len(values)
    if len(values) < 2:
        return {"mean": mean, "std": None, "ci95": None, "n": len(values)}
    std = statistics.stdev(values)
    return {
        "mean": mean,
        "std": std,
        "ci95": stats.t.ppf(0.975, len(values) - 1) * std / math.sqrt(len(values)),
        "n": len(values),
    }


def time_to_accuracy(runs: list) -> dict | None:
    """Training seconds (evaluation excluded) for each curve-recording run to first reach the DeiT twin's final
    accuracy on the curve images, measured at the curve points."""
    curves = {r["model"]: r for r in runs if r["history"]["top1"]}
    if "deit" not in curves:
        return None
    target = curves["deit"]["history"]["top1"][-1]
    reached = {}
    for kind, r in curves.items():
        h = r["history"]
        first = next((i for i, top1 in enumerate(h["top1"]) if top1 >= target), None)
        reached[kind] = {
            "step": h["step"][first] if first is not None else None,
            "train_s": h["train_s"][first] if first is not None else None,
            "total_train_s": r["train_s"],
            "final_top1": h["top1"][-1],
            "steps_per_s": h["step"][-1] / r["train_s"],
        }
    return {"target_top1": target, "ratio": runs[0]["ratio"], "seed": runs[0]["seed"], "runs": reached}


def mean_curves(runs: list, key: str) -> dict:
    """{layer or block: [mean over the runs, point by point]}."""
    names = runs[0]["history"][key]
    return {
        name: [
            sum(r["history"][key][name][i] for r in runs) / len(runs) for i in range(len(runs[0]["history"]["step"]))
        ]
        for name in names
    }


def summarise(args, data: Images, results: dict, run_s: float) -> dict:
    table = []
    for ratio in args.ratios:
        these = {
            kind: {r["seed"]: r for r in results.values() if r["model"] == kind and r["ratio"] == ratio}
            for kind in MODELS
        }
        row = {"ratio": ratio, "train_images": None, "epochs": None}
        for kind, by_seed in these.items():
            if by_seed:
                some = next(iter(by_seed.values()))
                row["train_images"], row["epochs"] = some["train_images"], round(some["epochs"], 2)
                row[kind] = {
                    **t_interval([r["top1"] for r in by_seed.values()]),
                    "by_seed": {s: r["top1"] for s, r in by_seed.items()},
                }
        row["gains"] = {}
        for a, b in PAIRS:
            seeds = sorted(set(these[a]) & set(these[b]))
            if seeds:
                diffs = [these[a][s]["top1"] - these[b][s]["top1"] for s in seeds]
                row["gains"][f"{a}-{b}"] = {**t_interval(diffs), "by_seed": dict(zip(seeds, diffs))}
        table.append(row)
    curves = []
    for ratio in args.ratios:
        for kind in MODELS:
            these = [r for r in results.values() if r["model"] == kind and r["ratio"] == ratio]
            if these:
                curves.append(
                    {
                        "model": kind,
                        "ratio": ratio,
                        "n": len(these),
                        "step": these[0]["history"]["step"],
                        "gates": mean_curves(these, "gates"),
                        "nonlocality": mean_curves(these, "nonlocality"),
                    }
                )
    timed = [r for r in results.values() if r["history"]["top1"]]
    return {
        "data": data.name,
        "train_images": len(data.train_y),
        "test_images": data.scored(args.test_images),
        "seeds_complete": [
            seed for seed in args.seeds if all(run_name(k, f, seed) in results for k in MODELS for f in args.ratios)
        ],
        "table": table,
        "curves": curves,
        "time_to_accuracy": time_to_accuracy(timed) if timed else None,
        "run_s": run_s,
    }
