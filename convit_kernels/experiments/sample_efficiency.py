"""ConViT against its DeiT twin on subsets of the training data: the sample-efficiency experiment of the paper.

    convit-kernels experiment sample-efficiency --out se-results         # the default: ~24 minutes on 2 CPU cores
    convit-kernels experiment sample-efficiency --out se-quick --quick   # ratios 0.3 1, 1 seed, 4 epochs: ~1 minute
    python python/sample_efficiency.py --out se-results                  # the same, as a script

Both models are the same ConViT (same width, depth and heads, `--model`); the DeiT twin has no GPSA layer
(`--local-up-to-layer 0`: every block is plain multi-head self-attention). Each trains on the first
int(n x f) images of every class (the train stack's `--sampling-ratio`, ConViT's datasets.py subsets) for
round(epochs / f) epochs, warm-up scaled alike, so every run sees about as many training images; same recipe,
same seeds. The default ratios are the paper's, 0.05 0.1 0.3 0.5 1. Without `--data-path` the data are
scikit-learn's embedded 8x8 digits (the `convit-kernels train` digits recipe: batches of 32, the last partial
batch dropped); with it, an ImageFolder tree and the DeiT/ConViT ImageNet recipe.

On the digits (139 to 146 training images per class), f = 0.05 keeps 6 or 7 images of every class, 69 in all:
2 steps an epoch for round(20 / 0.05) = 400 epochs (20 of warm-up), 91% of the images f = 1 sees (drop_last).
Its epochs are too short to be timed for images/s. Before any training, every ratio is checked on the digits
to keep at least one image per class and one batch: a ratio that does not is refused (exit 2, one line).

Time: every ratio trains on about as many images, but the per-epoch work besides training (evaluating the
360 validation images, the GPSA statistics, the checkpoint) dominates the 2-step epochs of the smallest
ratios, so a run at f = 0.05 costs about twice one at f = 1. The README gives the default run's wall time.

Writes into `--out` (refused when that folder is not empty, so no other run's results are overwritten):
  results.json           settings; every run (final and best top-1, final gates and nonlocality, images/s, and
                         `history`: per epoch, top-1, each GPSA layer's gate and each block's nonlocality);
                         `summary`: top-1 per model and ratio (mean, std over seeds), ConViT's gain and its
                         change with the ratio, `over_training` (the histories' mean over seeds per model and
                         ratio) and the fused/stock images/s
  results.md             top-1 per model and ratio (mean +- std over seeds), ConViT's gain, the gates and the
                         nonlocality after the first and the last epoch, images/s
  sample_efficiency.png  accuracy vs ratio; ConViT's gate per GPSA layer over training; nonlocality per block
                         over training (ConViT and the twin), both at the largest ratio (gates: the smallest too)
  runs/<name>/           each run's log.jsonl and checkpoints (`convit-kernels train`'s output folder)

Gates are sigmoid(lambda), the weight of the positional attention, and nonlocality is ConViT's main.py's (every
block fed the patch embedding of the same validation images), both the mean over heads. The first logged epoch
trains at the warm-up lr (1e-6), so its values are those of the initialisation to within noise.

The images/s: the train stack times the steps of an epoch after its first 5 (epochs of 5 steps or fewer are
not timed). Unless `--no-speed`, each model's run at the largest ratio and first seed is repeated with
`--no-fused` (timm's stock attention) for `--speed-epochs` epochs of the same schedule; the table compares
the two over those epochs. Options of `convit-kernels train` can follow a `--`; they apply to every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

MODELS = {"convit": None, "deit": 0}  # --local-up-to-layer: the model's own (ConViT) or 0 (its DeiT twin)
LABELS = {"convit": "ConViT", "deit": "DeiT twin"}
PAPER_RATIOS = [0.05, 0.1, 0.3, 0.5, 1.0]
QUICK = dict(ratios=[0.3, 1.0], seeds=[0], epochs=4)


class UsageError(Exception):
    """Bad input found before any training: one line on stderr, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def parse_args(argv, prog=None):
    train_args = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1 :]
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="results folder; must not exist or be empty")
    p.add_argument("--ratios", type=float, nargs="+", default=PAPER_RATIOS, help="sampling ratios f in (0, 1]")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=20, help="epochs at f = 1; a ratio f trains round(epochs / f)")
    p.add_argument("--warmup-epochs", type=int, default=1, help="warm-up epochs at f = 1, scaled like --epochs")
    p.add_argument("--model", default=None, help="a `convit-kernels train --model` (default convit_digits)")
    p.add_argument("--embed-dim", type=int, help="channels per head (the width); default the model's")
    p.add_argument("--local-up-to-layer", type=int, help="ConViT's GPSA blocks (default the model's)")
    p.add_argument("--data-path", help="ImageFolder root (train/, val/); default the embedded digits")
    p.add_argument("--no-speed", dest="speed", action="store_false", help="no stock-timm images/s runs")
    p.add_argument("--speed-epochs", type=int, default=2, help="epochs of each stock-timm images/s run")
    p.add_argument("--quick", action="store_true", help="ratios 0.3 1, seed 0, 4 epochs: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    bad = [f for f in args.ratios if not 0 < f <= 1]
    if bad:
        p.error(f"--ratios must be in (0, 1], got {' '.join(f'{f:g}' for f in bad)}")
    if args.epochs < 1 or args.speed_epochs < 1:
        p.error("--epochs and --speed-epochs must be at least 1")
    if args.warmup_epochs < 0:
        p.error("--warmup-epochs must be at least 0")
    args.ratios = sorted(set(args.ratios))
    args.seeds = list(dict.fromkeys(args.seeds))
    args.train_args = train_args
    return args


def check_out(folder: str) -> None:
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise UsageError(f"--out {folder!r} already exists and is not empty: choose a new folder (nothing was run)")


def scaled(epochs: int, ratio: float) -> int:
    return max(1, round(epochs / ratio))


def train_argv(args, kind: str, ratio: float, seed: int, folder: str, extra=()) -> list:
    argv = ["--output-dir", folder, "--no-progress", "--no-tensorboard", "--seed", str(seed)]
    argv += ["--sampling-ratio", repr(ratio), "--epochs", str(scaled(args.epochs, ratio))]
    argv += ["--warmup-epochs", str(round(args.warmup_epochs / ratio))]
    if args.model:
        argv += ["--model", args.model]
    if args.embed_dim:
        argv += ["--embed-dim", str(args.embed_dim)]
    if args.data_path:
        argv += ["--data-path", args.data_path]
    local = MODELS[kind] if MODELS[kind] is not None else args.local_up_to_layer
    if local is not None:
        argv += ["--local-up-to-layer", str(local)]
    return argv + list(args.train_args) + list(extra)


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def spread(values):
    return statistics.stdev(values) if len(values) > 1 else 0.0


def check_data(args) -> dict:
    """Before any training: every run's options parse and, on the digits, every ratio keeps an image of every
    class and one batch. {ratio: training images kept} (None with --data-path: an ImageFolder is slow to scan;
    the smallest ratio trains first, so an empty class stops the experiment in its first run)."""
    from convit_kernels.train import parse_config
    from convit_kernels.train.data import build_data
    from convit_kernels.train.errors import TrainError, message_of

    kept = {}
    try:
        for kind in MODELS:
            parse_config(train_argv(args, kind, args.ratios[0], args.seeds[0], os.devnull))
        for ratio in args.ratios:
            config = parse_config(train_argv(args, "convit", ratio, args.seeds[0], os.devnull))
            if config.data_path is not None:
                kept[ratio] = None
                continue
            try:
                kept[ratio] = len(build_data(config).train)
            except TrainError as error:  # a class left without an image
                raise TrainError(f"--ratios {ratio:g}: {message_of(error)}") from None
            if kept[ratio] < config.batch_size:
                raise TrainError(
                    f"--ratios {ratio:g} keeps {kept[ratio]} training images, fewer than one batch of "
                    f"{config.batch_size}"
                )
    except TrainError as error:
        raise UsageError(message_of(error)) from None
    return kept


def history_of(folder: str) -> dict:
    """Per epoch, from the run's log.jsonl: top-1, each GPSA layer's gate and each block's nonlocality (mean
    over heads; no GPSA layer, no gates)."""
    from convit_kernels.train import output
    from convit_kernels.train.report import JsonLog

    records = JsonLog(os.path.join(folder, output.LOG)).records()
    history = {
        "epoch": [r["epoch"] for r in records],
        "top1": [r["val_acc1"] for r in records],
        "train_loss": [r["train_loss"] for r in records],
        "gates": {},
        "nonlocality": {},
    }
    for r in records:
        for layer, stats in (r.get("gpsa") or {}).items():
            history["gates"].setdefault(layer, []).append(mean(stats["gating"]))
        for block, values in (r.get("nonlocality_convit") or {}).items():
            history["nonlocality"].setdefault(block, []).append(mean(values))
    return history


def run_one(args, kind, ratio, seed, name, train_images, extra=()):
    from convit_kernels.train import fit, parse_config

    folder = os.path.join(args.out, "runs", name)
    config = parse_config(train_argv(args, kind, ratio, seed, folder, extra))
    print(
        f"== {name}: {config.model}, local_up_to_layer {config.local_up_to_layer}, {config.epochs} epochs", flush=True
    )
    start = time.perf_counter()
    result = fit(config)
    history = history_of(folder)
    return {
        "model": kind,
        "ratio": ratio,
        "seed": seed,
        "fused": config.fused,
        "folder": folder,
        "epochs": config.epochs,
        "train_images": train_images,
        "top1": history["top1"][-1],
        "best_top1": result["best"]["val_acc1"],
        "images_per_s": result["images_per_s"],
        "images_per_s_by_epoch": [r["images_per_s"] for r in result["records"]],
        # the last epoch's: GPSA gates sigmoid(lambda) (ConViT only) and every block's nonlocality
        "gates": {layer: values[-1] for layer, values in history["gates"].items()},
        "nonlocality": {block: values[-1] for block, values in history["nonlocality"].items()},
        "history": history,
        "wall_s": time.perf_counter() - start,
    }


def seed_mean(histories, key, n) -> dict:
    """{layer or block: [mean over the histories, epoch by epoch]} for the first n epochs."""
    return {name: [mean([h[key][name][e] for h in histories]) for e in range(n)] for name in histories[0][key]}


def over_training(args, runs) -> list:
    """Per model and ratio, the histories' mean over seeds, epoch by epoch (fused runs only)."""
    entries = []
    for ratio in args.ratios:
        for kind in MODELS:
            these = [r["history"] for r in runs if r["model"] == kind and r["ratio"] == ratio and r["fused"]]
            if not these:
                continue
            n = min(len(h["epoch"]) for h in these)
            epochs = scaled(args.epochs, ratio)

            entries.append(
                {
                    "model": kind,
                    "ratio": ratio,
                    "n": len(these),
                    "epoch": these[0]["epoch"][:n],
                    "fraction": [e / epochs for e in these[0]["epoch"][:n]],
                    "top1": [mean([h["top1"][e] for h in these]) for e in range(n)],
                    "gates": seed_mean(these, "gates", n),
                    "nonlocality": seed_mean(these, "nonlocality", n),
                }
            )
    return entries


def summarise(args, runs):
    table = []
    for ratio in args.ratios:
        row = {"ratio": ratio, "epochs": scaled(args.epochs, ratio)}
        for kind in MODELS:
            these = [r for r in runs if r["model"] == kind and r["ratio"] == ratio and r["fused"]]
            top1 = [r["top1"] for r in these]
            row[kind] = {"mean": mean(top1), "std": spread(top1) if top1 else None, "n": len(top1)}
            row["train_images"] = row.get("train_images") or next((r["train_images"] for r in these), None)
        if row["convit"]["n"] and row["deit"]["n"]:
            row["gain"] = row["convit"]["mean"] - row["deit"]["mean"]
        table.append(row)
    gains = [row for row in table if "gain" in row]
    gain_change = None
    if len(gains) > 1:
        gain_change = {
            "from_ratio": gains[-1]["ratio"],
            "to_ratio": gains[0]["ratio"],
            "gain_at_from": gains[-1]["gain"],
            "gain_at_to": gains[0]["gain"],
            # > 0: the gain grows as the data shrink (the paper's finding)
            "change": gains[0]["gain"] - gains[-1]["gain"],
        }
    speed = []
    for kind in MODELS:
        stock = [r for r in runs if r["model"] == kind and not r["fused"]]
        if not stock:
            continue
        stock = stock[0]
        fused = next(
            r
            for r in runs
            if r["fused"] and (r["model"], r["ratio"], r["seed"]) == (kind, stock["ratio"], stock["seed"])
        )
        n = len(stock["images_per_s_by_epoch"])
        speed.append(
            {
                "model": kind,
                "ratio": stock["ratio"],
                "seed": stock["seed"],
                "epochs_compared": n,
                "fused": mean(fused["images_per_s_by_epoch"][:n]),
                "stock": mean(stock["images_per_s_by_epoch"]),
            }
        )
    return {"table": table, "gain_change": gain_change, "over_training": over_training(args, runs), "speed": speed}


def fmt(stat):
    if not stat["n"]:
        return "-"
    return f"{stat['mean']:.1f} ± {stat['std']:.1f} (n={stat['n']})"


def start_end(values, digits=3) -> str:
    """'first → last (change)'; a change that rounds to zero is written +0.000, not -0.000."""
    change = round(values[-1] - values[0], digits) + 0.0
    return f"{values[0]:.{digits}f} → {values[-1]:.{digits}f} ({change:+.{digits}f})"


def layer_label(name: str) -> str:
    """'blocks.2.attn' -> 'block 2' (the GPSA layer of that block)."""
    parts = name.split(".")
    return f"block {parts[1]}" if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit() else name


def markdown(args, summary) -> str:
    seeds = ", ".join(str(s) for s in args.seeds)
    lines = [
        f"Final top-1 (%) on the validation split, mean ± std over seeds {seeds}; "
        f"{args.epochs} epochs at f = 1, round({args.epochs} / f) at f.",
        "",
        "| sampling ratio f | train images | epochs | ConViT | DeiT twin | ConViT's gain |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary["table"]:
        gain = f"{row['gain']:+.1f}" if "gain" in row else "-"
        images = row["train_images"] if row["train_images"] is not None else "-"
        lines.append(
            f"| {row['ratio']:g} | {images} | {row['epochs']} | {fmt(row['convit'])} | {fmt(row['deit'])} | {gain} |"
        )
    change = summary["gain_change"]
    if change:
        trend = "grows" if change["change"] > 0 else "shrinks" if change["change"] < 0 else "stays"
        lines += [
            "",
            f"ConViT's gain: {change['gain_at_from']:+.1f} points at f = {change['from_ratio']:g}, "
            f"{change['gain_at_to']:+.1f} at f = {change['to_ratio']:g}: it {trend} by "
            f"{abs(change['change']):.1f} points as the data shrink (the paper: it grows).",
        ]
    entries = summary["over_training"]
    convit = [e for e in entries if e["model"] == "convit" and e["gates"]]
    if convit:
        layers = list(convit[0]["gates"])
        lines += [
            "",
            "ConViT's gates sigmoid(lambda) per GPSA layer (1 = positional attention only), mean over heads and "
            "seeds: after the first epoch (at the warm-up lr: the initialisation) → after the last (change):",
            "",
            "| f | epochs | " + " | ".join(layer_label(layer) for layer in layers) + " |",
            "|---:|---:|" + "---:|" * len(layers),
        ]
        for e in convit:
            cells = " | ".join(start_end(e["gates"][layer]) for layer in layers)
            lines.append(f"| {e['ratio']:g} | {len(e['epoch'])} | {cells} |")
    with_nl = [e for e in entries if e["nonlocality"]]
    if with_nl:
        blocks = sorted(with_nl[0]["nonlocality"], key=int)
        gpsa = {layer_label(layer) for layer in (convit[0]["gates"] if convit else ())}
        lines += [
            "",
            "Nonlocality (patches) per block, mean over heads and seeds, after the first epoch → after the last "
            "(change); ConViT's GPSA blocks marked *:",
            "",
            "| model | f | " + " | ".join(f"block {b}" for b in blocks) + " |",
            "|---|---:|" + "---:|" * len(blocks),
        ]
        for e in sorted(with_nl, key=lambda e: (list(MODELS).index(e["model"]), e["ratio"])):
            cells = []
            for b in blocks:
                star = "*" if e["model"] == "convit" and f"block {b}" in gpsa else ""
                cells.append(f"{star}{start_end(e['nonlocality'][b], 2)}")
            lines.append(f"| {LABELS[e['model']]} | {e['ratio']:g} | " + " | ".join(cells) + " |")
    if summary["speed"]:
        lines += [
            "",
            "Training images/s (after each epoch's first 5 steps), fused attention against timm's stock attention, "
            "same run repeated with `--no-fused`:",
            "",
            "| model | f, seed | epochs compared | fused | stock timm | speed-up |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for s in summary["speed"]:
            if s["fused"] and s["stock"]:
                rates = f"{s['fused']:.0f} | {s['stock']:.0f} | {s['fused'] / s['stock']:.2f}x"
            else:
                rates = "not timed (5 steps or fewer per epoch) | - | -"
            lines.append(f"| {LABELS[s['model']]} | {s['ratio']:g}, {s['seed']} | {s['epochs_compared']} | {rates} |")
    return "\n".join(lines) + "\n"


def dots(entry) -> dict:
    """Short histories get a dot per epoch (a few epochs would otherwise look like a measured curve)."""
    return {"marker": ".", "markersize": 4} if len(entry["fraction"]) <= 25 else {}


def plot(args, summary, path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_gate, ax_nl) = plt.subplots(1, 3, figsize=(16, 4.5))
    for kind, marker in (("convit", "o"), ("deit", "s")):
        rows = [r for r in summary["table"] if r[kind]["n"]]
        ax_acc.errorbar(
            [r["ratio"] for r in rows],
            [r[kind]["mean"] for r in rows],
            yerr=[r[kind]["std"] for r in rows],
            marker=marker,
            capsize=3,
            label=LABELS[kind],
        )
    ax_acc.set(xscale="log", xlabel="sampling ratio f", ylabel="final top-1 (%)", title="accuracy vs data")
    ax_acc.set_xticks(args.ratios, [f"{f:g}" for f in args.ratios])
    ax_acc.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax_acc.legend()

    entries = {(e["model"], e["ratio"]): e for e in summary["over_training"]}
    largest, smallest = args.ratios[-1], args.ratios[0]
    # Gates: ConViT, one colour per GPSA layer; the largest ratio solid, the smallest dotted.
    convit = [entries.get(("convit", f)) for f in dict.fromkeys((largest, smallest))]
    convit = [e for e in convit if e and e["gates"]]
    if convit:
        layers = list(convit[0]["gates"])
        colours = plt.cm.viridis([i / max(1, len(layers) - 1) for i in range(len(layers))])
        for e, style in zip(convit, ("-", ":")):
            for layer, colour in zip(layers, colours):
                ax_gate.plot(
                    e["fraction"],
                    e["gates"][layer],
                    style,
                    color=colour,
                    label=f"{layer_label(layer)}, f = {e['ratio']:g}",
                    **dots(e),
                )
    ax_gate.set(
        xlabel="fraction of training (epoch / epochs)",
        ylabel="sigmoid(lambda), mean over heads and seeds",
        title="ConViT: gate per GPSA layer over training (1 = positional)",
    )
    # Nonlocality at the largest ratio: one colour per block; ConViT solid, the twin dashed.
    for kind, style in (("convit", "-"), ("deit", "--")):
        e = entries.get((kind, largest))
        if not e or not e["nonlocality"]:
            continue
        blocks = sorted(e["nonlocality"], key=int)
        gpsa = {layer_label(layer) for layer in e["gates"]}
        colours = plt.cm.plasma([i / max(1, len(blocks)) for i in range(len(blocks))])
        for b, colour in zip(blocks, colours):
            label = f"{LABELS[kind]}, block {b}{' (GPSA)' if f'block {b}' in gpsa else ''}"
            ax_nl.plot(e["fraction"], e["nonlocality"][b], style, color=colour, label=label, **dots(e))
    ax_nl.set(
        xlabel="fraction of training (epoch / epochs)",
        ylabel="nonlocality (patches), mean over heads and seeds",
        title=f"nonlocality per block over training, f = {largest:g}",
    )
    for ax in (ax_gate, ax_nl):
        ax.set_xlim(0, 1)
        if ax.lines:
            ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> int:
    from convit_kernels.train.errors import TrainError, message_of

    kept = check_data(args)
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    json_path = os.path.join(args.out, "results.json")
    start = time.perf_counter()
    runs = []

    def save():
        summary = summarise(args, runs)
        with open(json_path, "w") as f:
            json.dump(
                {"settings": vars(args), "summary": summary, "runs": runs, "wall_s": time.perf_counter() - start},
                f,
                indent=1,
            )
        return summary

    try:
        for ratio in args.ratios:
            for seed in args.seeds:
                for kind in MODELS:
                    runs.append(run_one(args, kind, ratio, seed, f"{kind}_f{ratio:g}_s{seed}", kept[ratio]))
                    save()
        if args.speed:
            ratio, seed = args.ratios[-1], args.seeds[0]
            for kind in MODELS:
                extra = ["--no-fused", "--stop-after", str(min(args.speed_epochs, scaled(args.epochs, ratio)))]
                runs.append(run_one(args, kind, ratio, seed, f"{kind}_f{ratio:g}_s{seed}_stock", kept[ratio], extra))
                save()
    except TrainError as error:
        print(f"error: {message_of(error)} (the runs done so far are in {json_path})", file=sys.stderr)
        return error.exit_code
    summary = save()
    table = markdown(args, summary)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    plot(args, summary, os.path.join(args.out, "sample_efficiency.png"))
    print("\n" + table)
    print(f"results: {json_path}, results.md and sample_efficiency.png beside it")
    print(f"wall {time.perf_counter() - start:.0f} s")
    return 0


def main(argv=None, prog=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv, prog)
        check_out(args.out)
        return run(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
