"""What the experiment shows: results.md's tables and sample_efficiency.png's three panels."""

from __future__ import annotations

from ... import files
from .options import LABELS, MODELS, PAIRS, STAT_IMAGES


def interval(stat: dict, sign=False) -> str:
    value = f"{stat['mean']:+.2f}" if sign else f"{stat['mean']:.2f}"
    return value if stat["ci95"] is None else f"{value} ± {stat['ci95']:.2f}"


def layer_label(name: str) -> str:
    """'blocks.2.attn' -> 'block 2' (the GPSA layer of that block)."""
    parts = name.split(".")
    return f"block {parts[1]}" if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit() else name


def markdown(args, summary: dict) -> str:
    """results.md: the accuracy table, ConViT's gates, the nonlocality per block and time-to-accuracy."""
    lines = []
    if summary["runs"] < summary["runs_planned"]:
        lines += [f"**Partial: {summary['runs']} of the {summary['runs_planned']} runs planned.**", ""]
    lines += accuracy_table(args, summary)
    lines += gate_table(summary["curves"])
    lines += nonlocality_table(summary["curves"])
    lines += time_table(args, summary["time_to_accuracy"])
    lines += ["", f"The runs took {summary['run_s']:.0f} s in all (training and evaluation, summed over runs)."]
    return "\n".join(lines) + "\n"


def accuracy_table(args, summary: dict) -> list:
    seeds = ", ".join(str(s) for s in args.seeds)
    lines = [
        f"{summary['data']}: top-1 (%) on {summary['test_images']} test images after {args.steps} steps of "
        f"{args.batch_size} images, mean ± the 95% t interval's half-width over seeds {seeds}; the gains are "
        "paired per seed.",
        "",
        "| f | train images | epochs | ConViT | DeiT twin | control twin | ConViT - DeiT | ConViT - control "
        "| control - DeiT |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in (row for row in summary["table"] if row["epochs"] is not None):  # a partial run may lack a ratio
        cells = [interval(row[kind]) if kind in row else "-" for kind in MODELS]
        cells += [
            interval(row["gains"][f"{a}-{b}"], sign=True) if f"{a}-{b}" in row["gains"] else "-" for a, b in PAIRS
        ]
        lines.append(f"| {row['ratio']:g} | {row['train_images']} | {row['epochs']:g} | " + " | ".join(cells) + " |")
    return lines


def gate_table(curves: list) -> list:
    convit = [c for c in curves if c["gates"]]
    if not convit:
        return []
    layers = list(convit[0]["gates"])
    lines = [
        "",
        "ConViT's gate sigmoid(lambda) per GPSA layer (1 = positional attention only), mean over heads and seeds: "
        "at the start → half-way → the end:",
        "",
        "| f | " + " | ".join(layer_label(layer) for layer in layers) + " |",
        "|---:|" + "---:|" * len(layers),
    ]
    for c in convit:
        mid = len(c["step"]) // 2
        cells = [f"{v[0]:.3f} → {v[mid]:.3f} → {v[-1]:.3f}" for v in (c["gates"][layer] for layer in layers)]
        lines.append(f"| {c['ratio']:g} | " + " | ".join(cells) + " |")
    return lines


def nonlocality_table(curves: list) -> list:
    if not curves:
        return []
    blocks = sorted(curves[0]["nonlocality"], key=int)
    lines = [
        "",
        "Nonlocality (patches) per block, mean over heads and seeds (every block fed the patch embedding of "
        f"{STAT_IMAGES} test images, as ConViT's main.py): at the start → the end; GPSA blocks marked *:",
        "",
        "| model | f | " + " | ".join(f"block {b}" for b in blocks) + " |",
        "|---|---:|" + "---:|" * len(blocks),
    ]
    for c in curves:
        gpsa = {layer_label(layer) for layer in c["gates"]}
        cells = [
            f"{'*' if f'block {b}' in gpsa else ''}{c['nonlocality'][b][0]:.2f} → {c['nonlocality'][b][-1]:.2f}"
            for b in blocks
        ]
        lines.append(f"| {LABELS[c['model']]} | {c['ratio']:g} | " + " | ".join(cells) + " |")
    return lines


def time_table(args, tta: dict | None) -> list:
    if not tta:
        return []
    lines = [
        "",
        f"Time to the DeiT twin's final accuracy ({tta['target_top1']:.2f}% on the first {args.curve_images} test "
        f"images) at f = {tta['ratio']:g}, seed {tta['seed']}: training seconds, evaluation excluded, measured at "
        f"{args.curve_points} points of the run (on a shared machine: noisy):",
        "",
        "| model | reached at step | seconds to reach | seconds, whole run | steps/s | final top-1 (curve images) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kind, r in tta["runs"].items():
        step = r["step"] if r["step"] is not None else "not reached"
        seconds = f"{r['train_s']:.0f}" if r["train_s"] is not None else "-"
        lines.append(
            f"| {LABELS[kind]} | {step} | {seconds} | {r['total_train_s']:.0f} | {r['steps_per_s']:.2f} | "
            f"{r['final_top1']:.2f} |"
        )
    return lines


def plot(args, summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_gate, ax_nl) = plt.subplots(1, 3, figsize=(16, 4.5))
    for kind, marker in zip(MODELS, "osD"):
        rows = [r for r in summary["table"] if kind in r]
        ax_acc.errorbar(
            [r["ratio"] for r in rows],
            [r[kind]["mean"] for r in rows],
            yerr=[r[kind]["ci95"] or 0 for r in rows],
            marker=marker,
            capsize=3,
            label=LABELS[kind],
        )
    ax_acc.set(xscale="log", xlabel="sampling ratio f", ylabel="test top-1 (%), 95% interval", title="accuracy vs data")
    ax_acc.set_xticks(args.ratios, [f"{f:g}" for f in args.ratios])
    ax_acc.minorticks_off()
    ax_acc.legend()
    curves = {(c["model"], c["ratio"]): c for c in summary["curves"]}
    for ratio, style in zip(dict.fromkeys((args.ratios[0], args.ratios[-1])), ("-", ":")):
        c = curves.get(("convit", ratio))
        if c:
            for index, (layer, values) in enumerate(c["gates"].items()):
                colour = plt.cm.viridis(index / max(1, len(c["gates"]) - 1))
                ax_gate.plot(
                    c["step"], values, style, color=colour, marker=".", label=f"{layer_label(layer)}, f = {ratio:g}"
                )
    ax_gate.set(
        xlabel="optimiser step",
        ylabel="sigmoid(lambda), mean over heads and seeds",
        title="ConViT: gate per GPSA layer",
    )
    for kind, style in (("convit", "-"), ("control", ":"), ("deit", "--")):
        c = curves.get((kind, args.ratios[0]))
        if c:
            blocks = sorted(c["nonlocality"], key=int)
            for b in blocks:
                colour = plt.cm.plasma(int(b) / max(1, len(blocks)))
                ax_nl.plot(c["step"], c["nonlocality"][b], style, color=colour, label=f"{LABELS[kind]}, block {b}")
    ax_nl.set(
        xlabel="optimiser step",
        ylabel="nonlocality (patches), mean over heads and seeds",
        title=f"nonlocality per block, f = {args.ratios[0]:g}",
    )
    for ax in (ax_gate, ax_nl):
        if ax.lines:
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    with files.replacing(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
