"""ConViT against its DeiT twin on subsets of the training data: the sample-efficiency experiment of the paper.

    python python/sample_efficiency.py --out se-results           # the default: ~20 minutes on 2 CPU cores
    python python/sample_efficiency.py --out se-quick --quick     # 2 ratios, 1 seed, 4 epochs: ~1 minute

Both models are the same ConViT (same width, depth and heads, `--model`); the DeiT twin has no GPSA layer
(`--local-up-to-layer 0`: every block is plain multi-head self-attention). Each trains on the first
int(n x f) images of every class (the train stack's `--sampling-ratio`, ConViT's datasets.py subsets) for
round(epochs / f) epochs, warm-up scaled alike, so every run sees as many training images; same recipe,
same seeds. Without `--data-path` the data are scikit-learn's embedded 8x8 digits (the `convit-kernels
train` digits recipe); with it, an ImageFolder tree and the DeiT/ConViT ImageNet recipe.

Writes into `--out` (refused when that folder is not empty, so no other run's results are overwritten):
  results.json           every run (final and best top-1, final gates and nonlocality, images/s) and the summary
  results.md             top-1 per model and ratio (mean +- std over seeds), ConViT's gain, images/s
  sample_efficiency.png  accuracy vs ratio; final gate sigmoid(lambda) per GPSA layer; nonlocality per block
  runs/<name>/           each run's log.jsonl and checkpoints (`convit-kernels train`'s output folder)

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


def parse_args(argv):
    train_args = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", required=True, help="results folder; must not exist or be empty")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0], help="sampling ratios f")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=20, help="epochs at f = 1; a ratio f trains round(epochs / f)")
    p.add_argument("--warmup-epochs", type=int, default=1, help="warm-up epochs at f = 1, scaled like --epochs")
    p.add_argument("--model", default=None, help="a `convit-kernels train --model` (default convit_digits)")
    p.add_argument("--embed-dim", type=int, help="channels per head (the width); default the model's")
    p.add_argument("--local-up-to-layer", type=int, help="ConViT's GPSA blocks (default the model's)")
    p.add_argument("--data-path", help="ImageFolder root (train/, val/); default the embedded digits")
    p.add_argument("--no-speed", dest="speed", action="store_false", help="no stock-timm images/s runs")
    p.add_argument("--speed-epochs", type=int, default=2, help="epochs of each stock-timm images/s run")
    p.add_argument("--quick", action="store_true", help="ratios 0.25 1, seed 0, 4 epochs: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.ratios, args.seeds, args.epochs = [0.25, 1.0], [0], 4
    bad = [f for f in args.ratios if not 0 < f <= 1]
    if bad:
        p.error(f"--ratios must be in (0, 1], got {bad}")
    if args.epochs < 1 or args.speed_epochs < 1:
        p.error("--epochs and --speed-epochs must be at least 1")
    args.ratios = sorted(set(args.ratios))
    args.train_args = train_args
    return args


def check_out(folder: str) -> None:
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        sys.exit(f"error: --out {folder!r} already exists and is not empty: choose a new folder (nothing was run)")


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


def train_images(config) -> int | None:
    """The training images a config keeps (digits only: building an ImageFolder just to count is slow)."""
    if config.data_path is not None:
        return None
    from convit_kernels.train.data import build_data

    return len(build_data(config).train)


def run_one(args, kind, ratio, seed, name, extra=()):
    from convit_kernels.train import fit, parse_config

    folder = os.path.join(args.out, "runs", name)
    config = parse_config(train_argv(args, kind, ratio, seed, folder, extra))
    print(
        f"== {name}: {config.model}, local_up_to_layer {config.local_up_to_layer}, {config.epochs} epochs", flush=True
    )
    start = time.perf_counter()
    result = fit(config)
    records = result["records"]
    last = records[-1]
    return {
        "model": kind,
        "ratio": ratio,
        "seed": seed,
        "fused": config.fused,
        "folder": folder,
        "epochs": config.epochs,
        "train_images": train_images(config),
        "top1": last["val_acc1"],
        "best_top1": result["best"]["val_acc1"],
        "images_per_s": result["images_per_s"],
        "images_per_s_by_epoch": [r["images_per_s"] for r in records],
        # mean over heads, per layer: GPSA gates sigmoid(lambda) (ConViT only), every block's nonlocality
        "gates": {layer: mean(s["gating"]) for layer, s in (last.get("gpsa") or {}).items()},
        "nonlocality": {block: mean(v) for block, v in (last.get("nonlocality_convit") or {}).items()},
        "wall_s": time.perf_counter() - start,
    }


def spread(values):
    return statistics.stdev(values) if len(values) > 1 else 0.0


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
    return {"table": table, "speed": speed}


def fmt(stat):
    if not stat["n"]:
        return "-"
    return f"{stat['mean']:.1f} ± {stat['std']:.1f} (n={stat['n']})"


def markdown(args, summary) -> str:
    lines = [
        f"Final top-1 (%) on the validation split, mean ± std over seeds {args.seeds}; "
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


def plot(args, runs, summary, path) -> None:
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
    colours = plt.cm.viridis([i / max(1, len(args.ratios) - 1) for i in range(len(args.ratios))])
    for ratio, colour in zip(args.ratios, colours):
        convit = [r for r in runs if r["model"] == "convit" and r["ratio"] == ratio and r["fused"]]
        if convit and convit[0]["gates"]:
            layers = list(convit[0]["gates"])
            values = [mean([r["gates"][layer] for r in convit]) for layer in layers]
            ax_gate.plot(range(len(layers)), values, "o-", color=colour, label=f"f = {ratio:g}")
        for kind, style in (("convit", "-"), ("deit", "--")):
            these = [r for r in runs if r["model"] == kind and r["ratio"] == ratio and r["fused"]]
            if these and these[0]["nonlocality"]:
                blocks = sorted(these[0]["nonlocality"], key=int)
                values = [mean([r["nonlocality"][b] for r in these]) for b in blocks]
                ax_nl.plot(
                    [int(b) for b in blocks],
                    values,
                    style,
                    marker="o",
                    color=colour,
                    label=f"{LABELS[kind]}, f = {ratio:g}",
                )
    ax_gate.set(
        xlabel="GPSA layer", ylabel="sigmoid(lambda), mean over heads", title="ConViT: final gate (1 = positional)"
    )
    ax_gate.set_ylim(0, 1)
    for ax in (ax_gate, ax_nl):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax_nl.set(xlabel="block", ylabel="nonlocality (patches)", title="final nonlocality per block (mean over heads)")
    for ax in (ax_gate, ax_nl):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv) -> int:
    args = parse_args(argv)
    check_out(args.out)
    # Checked before any training: every run's options parse (a bad `--` option fails here, not after an hour).
    from convit_kernels.train import parse_config
    from convit_kernels.train.errors import TrainError, message_of

    try:
        for kind in MODELS:
            parse_config(train_argv(args, kind, args.ratios[0], args.seeds[0], os.devnull))
    except TrainError as error:
        sys.exit(f"error: {message_of(error)}")
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    json_path = os.path.join(args.out, "results.json")
    start = time.perf_counter()
    runs = []

    def save():
        summary = summarise(args, runs)
        settings = {k: v for k, v in vars(args).items()}
        with open(json_path, "w") as f:
            json.dump(
                {"settings": settings, "summary": summary, "runs": runs, "wall_s": time.perf_counter() - start},
                f,
                indent=1,
            )
        return summary

    try:
        for ratio in args.ratios:
            for seed in args.seeds:
                for kind in MODELS:
                    runs.append(run_one(args, kind, ratio, seed, f"{kind}_f{ratio:g}_s{seed}"))
                    save()
        if args.speed:
            ratio, seed = args.ratios[-1], args.seeds[0]
            for kind in MODELS:
                extra = ["--no-fused", "--stop-after", str(min(args.speed_epochs, scaled(args.epochs, ratio)))]
                runs.append(run_one(args, kind, ratio, seed, f"{kind}_f{ratio:g}_s{seed}_stock", extra))
                save()
    except TrainError as error:
        sys.exit(f"error: {message_of(error)} (the runs done so far are in {json_path})")
    summary = save()
    table = markdown(args, summary)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    plot(args, runs, summary, os.path.join(args.out, "sample_efficiency.png"))
    print("\n" + table)
    print(f"results: {json_path}, results.md and sample_efficiency.png beside it")
    print(f"wall {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
