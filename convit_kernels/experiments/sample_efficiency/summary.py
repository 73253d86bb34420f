"""The statistics over the experiment's runs: the lr grid, test top-1 per arm and ratio with 95% t intervals, the
paired gains and the paper's relative gap, the per-seed trend of the gains against log f, the long runs, and
time-to-accuracy on the validation curves."""

from __future__ import annotations

import math
import statistics

from .options import ARMS, LONG_ARMS, PAIRS, chosen_lrs, lr_grid, plan


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


def by_seed(values: dict) -> dict:
    """A t interval of {seed: value}, the values kept by seed."""
    return {**t_interval(list(values.values())), "by_seed": values}


def paired(a: dict, b: dict, difference=lambda x, y: x - y) -> dict | None:
    """The interval of difference(a[seed], b[seed]) over the seeds both have."""
    seeds = sorted(set(a) & set(b))
    return by_seed({s: difference(a[s], b[s]) for s in seeds}) if seeds else None


def slope(xs: list, ys: list) -> float:
    """The least-squares slope of ys against xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def select(results: dict, kind: str, ratio: float, steps: int, key: str = "top1") -> dict:
    """{seed: run[key]} of the study's runs of one arm, ratio and length (each arm has one lr there)."""
    return {r["seed"]: r[key] for r in results.values() if (r["model"], r["ratio"], r["steps"]) == (kind, ratio, steps)}


def accuracy_table(args, results: dict) -> list:
    """Per ratio: each arm's test top-1 (and final validation top-1), the paired gains, the relative gap."""
    table = []
    for ratio in args.ratios:
        row = {"ratio": ratio, "arms": {}, "gains": {}}
        some = [r for r in results.values() if r["ratio"] == ratio and r["steps"] == args.steps]
        if not some:
            continue
        row["train_images"], row["epochs"] = some[0]["train_images"], round(some[0]["epochs"], 2)
        top1 = {kind: select(results, kind, ratio, args.steps) for kind in ARMS}
        for kind in ARMS:
            if top1[kind]:
                row["arms"][kind] = {
                    **by_seed(top1[kind]),
                    "validation": t_interval(list(select(results, kind, ratio, args.steps, "val_top1").values())),
                }
        for a, b in PAIRS:
            gain = paired(top1[a], top1[b])
            if gain:
                row["gains"][f"{a}-{b}"] = gain
        # The paper's Table 2: ConViT's gain relative to DeiT's accuracy, in %.
        row["relative_gap"] = paired(top1["convit"], top1["deit"], lambda c, d: 100 * (c - d) / d)
        table.append(row)
    return table


def trends(args, results: dict) -> dict:
    """Per pair: each seed's least-squares slope of the gain against log10 f (points per decade of f), and the
    t interval of those slopes: below 0, the gain grows as the data shrink."""
    out = {}
    logs = {ratio: math.log10(ratio) for ratio in args.ratios}
    for a, b in PAIRS:
        gains = {f: paired(select(results, a, f, args.steps), select(results, b, f, args.steps)) for f in args.ratios}
        slopes = {}
        for seed in args.seeds:
            these = {f: gain["by_seed"][seed] for f, gain in gains.items() if gain and seed in gain["by_seed"]}
            if len(these) >= 2:
                slopes[seed] = slope([logs[f] for f in these], list(these.values()))
        if slopes:
            out[f"{a}-{b}"] = by_seed(slopes)
    return out


def full_data_check(args, results: dict) -> dict | None:
    """The DeiT twin's test top-1 at the largest ratio minus at the smallest, paired per seed: is it short of data
    at the smallest ratio?"""
    if len(args.ratios) < 2:
        return None
    low, high = args.ratios[0], args.ratios[-1]
    gap = paired(select(results, "deit", high, args.steps), select(results, "deit", low, args.steps))
    return gap and {"arm": "deit", "smallest": low, "largest": high, **gap}


def long_runs(args, results: dict) -> dict | None:
    """At --long-ratio: each long arm's test top-1 after --steps and after --long-factor times more, on the seeds
    of the long runs; the gain at both lengths and its change, paired per seed."""
    long_steps = args.steps * args.long_factor
    f = args.long_ratio
    seeds = set(args.seeds[: args.long_seeds])
    short = {k: {s: v for s, v in select(results, k, f, args.steps).items() if s in seeds} for k in LONG_ARMS}
    long = {k: select(results, k, f, long_steps) for k in LONG_ARMS}
    if not all(long.values()):
        return None
    a, b = LONG_ARMS
    gain_short, gain_long = paired(short[a], short[b]), paired(long[a], long[b])
    return {
        "ratio": f,
        "steps": args.steps,
        "long_steps": long_steps,
        "arms": {k: {"short": by_seed(short[k]) if short[k] else None, "long": by_seed(long[k])} for k in LONG_ARMS},
        "gain_short": gain_short,
        "gain_long": gain_long,
        "gain_change": paired(gain_long["by_seed"], gain_short["by_seed"]) if gain_short else None,
        # the twin trained longer against ConViT at the shorter length: 0 or more, it has caught up
        "twin_long_minus_convit_short": paired(long[b], short[a]),
    }


def time_to_accuracy(args, results: dict) -> list:
    """Per ratio: the target is the DeiT twin's final validation top-1, mean over seeds; for each arm, the step at
    which the seed-mean validation curve first reaches it, and each seed's own first step (None: not reached).
    Training seconds only where every run of the arm was timed alone (--jobs 1)."""
    out = []
    for ratio in args.ratios:
        runs = {
            kind: [r for r in results.values() if (r["model"], r["ratio"], r["steps"]) == (kind, ratio, args.steps)]
            for kind in ARMS
        }
        if not runs["deit"]:
            continue
        target = sum(r["val_top1"] for r in runs["deit"]) / len(runs["deit"])
        row = {"ratio": ratio, "target": target, "arms": {}}
        for kind, these in runs.items():
            if not these:
                continue
            steps = these[0]["history"]["step"]
            mean_curve = [sum(r["history"]["val_top1"][i] for r in these) / len(these) for i in range(len(steps))]
            first = next((i for i, v in enumerate(mean_curve) if v >= target), None)
            per_seed = {r["seed"]: first_reached(r["history"], target) for r in these}
            timed = all(r["timed_alone"] for r in these)
            row["arms"][kind] = {
                "step": steps[first] if first is not None else None,
                "train_s": (
                    sum(r["history"]["train_s"][first] for r in these) / len(these)
                    if timed and first is not None
                    else None
                ),
                "steps_by_seed": {s: steps[i] if i is not None else None for s, i in per_seed.items()},
                "timed_alone": timed,
            }
        out.append(row)
    return out


def first_reached(history: dict, target: float):
    return next((i for i, v in enumerate(history["val_top1"]) if v >= target), None)


def mean_curves(runs: list, key: str) -> dict:
    """{layer or block: [mean over the runs, point by point]}."""
    names = runs[0]["history"][key]
    count = len(runs[0]["history"]["step"])
    return {name: [sum(r["history"][key][name][i] for r in runs) / len(runs) for i in range(count)] for name in names}


def curves(args, results: dict) -> list:
    """Per arm and ratio, the seed-mean validation top-1, gates and nonlocality over training."""
    out = []
    for ratio in args.ratios:
        for kind in ARMS:
            these = [r for r in results.values() if (r["model"], r["ratio"], r["steps"]) == (kind, ratio, args.steps)]
            if these:
                count = len(these[0]["history"]["step"])
                out.append(
                    {
                        "model": kind,
                        "ratio": ratio,
                        "n": len(these),
                        "step": these[0]["history"]["step"],
                        "val_top1": [
                            sum(r["history"]["val_top1"][i] for r in these) / len(these) for i in range(count)
                        ],
                        "gates": mean_curves(these, "gates"),
                        "nonlocality": mean_curves(these, "nonlocality"),
                    }
                )
    return out


def brief(run: dict) -> dict:
    """A run's record without its curves."""
    return {key: run[key] for key in ("ratio", "seed", "steps", "lr", "top1", "val_top1", "train_s", "timed_alone")}


def grid_table(args, done: dict) -> dict:
    """The lr grid's final validation top-1 per arm and lr (None: diverged or not run yet), and the choice."""
    scores = {kind: {} for kind in ARMS}
    for run in lr_grid(args):
        record = done.get(run.name)
        scores[run.kind][f"{run.lr:g}"] = record["val_top1"] if record else None
    return {"ratio": args.lr_ratio, "seed": args.seeds[0], "steps": args.steps, "val_top1": scores}


def summarise(args, done: dict) -> dict:
    """The statistics of the study's runs done, each arm at its chosen lr (a diverged run counts as not done: the
    results say partial); the lr grid's other runs only in its own table."""
    lrs = chosen_lrs(args, done)
    study = {run.name for run in plan(args, lrs)} if lrs is not None else set()
    results = {name: r for name, r in done.items() if name in study and not r["diverged"]}
    return {
        "arms": {
            kind: {"label": arm.label, "description": arm.description, "lr": (lrs or {}).get(kind)}
            for kind, arm in ARMS.items()
        },
        "lr_grid": grid_table(args, done),
        "seeds_complete": [
            seed
            for seed in args.seeds
            if lrs is not None and all(run.name in results for run in plan(args, lrs) if run.seed == seed)
        ],
        "table": accuracy_table(args, results),
        "full_data_check": full_data_check(args, results),
        "trends": trends(args, results),
        "long": long_runs(args, results),
        "time_to_accuracy": time_to_accuracy(args, results),
        "curves": curves(args, results),
        "stock": [brief(r) for r in results.values() if r["model"] == "stock"],
        # the fused ConViT of each stock run's ratio and seed, which it is compared with
        "stock_twins": {
            f"{r['ratio']:g}_{r['seed']}": brief(r)
            for r in results.values()
            if r["model"] == "convit"
            and r["steps"] == args.steps
            and any(
                (s["ratio"], s["seed"]) == (r["ratio"], r["seed"]) for s in results.values() if s["model"] == "stock"
            )
        },
        "run_s": sum(r["wall_s"] for r in done.values()),
    }
