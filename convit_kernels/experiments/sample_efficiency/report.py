"""What the experiment shows: results.md's tables and sample_efficiency.png's four panels."""

from __future__ import annotations

from ... import files
from .options import ARMS, LABELS, LONG_ARMS, PAIRS, STAT_IMAGES, STUDY_ARMS


def interval(stat: dict | None, sign=False, unit="") -> str:
    if not stat:
        return "-"
    value = f"{stat['mean']:+.2f}" if sign else f"{stat['mean']:.2f}"
    return value + unit if stat["ci95"] is None else f"{value} ± {stat['ci95']:.2f}{unit}"


def pair_label(pair: str) -> str:
    a, b = pair.split("-")
    return f"{LABELS[a]} - {LABELS[b]}"


def layer_label(name: str) -> str:
    """'blocks.2.attn' -> 'block 2' (the GPSA layer of that block)."""
    parts = name.split(".")
    return f"block {parts[1]}" if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit() else name


def markdown(args, summary: dict) -> str:
    """results.md: the model and arms, the lr grid, the accuracy and gains, the trend, the long runs,
    time-to-accuracy, the gates and the nonlocality per block."""
    lines = []
    if summary["runs"] < summary["runs_planned"]:
        later = "" if summary["study_planned"] else " so far: the study's runs are planned once the lr grid is done"
        lines += [f"**Partial: {summary['runs']} of the {summary['runs_planned']} runs planned{later}.**", ""]
    sections = (
        model_section(summary),
        grid_section(summary),
        accuracy_section(args, summary),
        trend_section(summary),
        long_section(summary),
        time_section(summary),
        stock_section(summary),
        gate_section(summary["curves"]),
        nonlocality_section(summary["curves"]),
    )
    for section in sections:
        lines += section + [""] if section else []
    lines += [f"The runs took {summary['run_s']:.0f} s in all (training and evaluation, summed over runs)."]
    return "\n".join(lines) + "\n"


def model_section(summary: dict) -> list:
    m = summary["model"]
    lines = [
        f"Model `{m['name']}`: {m['image_side']} px images ({m['channels']} channel), patches of {m['patch']} px, "
        f"a {m['grid'][0]} x {m['grid'][1]} grid, {m['depth']} blocks of {m['heads']} heads x {m['head_dim']} "
        f"channels (embed dim {m['embed_dim']}), {m['classes']} classes. The arms:",
        "",
        "| arm | lr (chosen) | GPSA blocks | class token joins before block | parameters | what it is |",
        "|---|---:|---|---:|---:|---|",
    ]
    for kind, arm in summary["arms"].items():
        shape = m["arms"][kind]
        blocks = ", ".join(map(str, shape["gpsa_blocks"])) or "none"
        lr = f"{arm['lr']:g}" if arm["lr"] is not None else "-"
        lines.append(
            f"| {arm['label']} | {lr} | {blocks} | {shape['class_token_joins_before_block']} | "
            f"{shape['parameters']:,} | {arm['description']} |"
        )
    return lines


def grid_section(summary: dict) -> list:
    grid = summary["lr_grid"]
    lrs = list(next(iter(grid["val_top1"].values())))
    lines = [
        f"The lr of each arm: final validation top-1 (%) after {grid['steps']} steps at f = {grid['ratio']:g}, seed "
        f"{grid['seed']}, per peak lr (the test split is not used for the choice):",
        "",
        "| arm | " + " | ".join(f"lr {lr}" for lr in lrs) + " |",
        "|---|" + "---:|" * len(lrs),
    ]
    for kind, scores in grid["val_top1"].items():
        cells = [f"{v:.2f}" if v is not None else "-" for v in scores.values()]
        lines.append(f"| {LABELS[kind]} | " + " | ".join(cells) + " |")
    return lines


def accuracy_section(args, summary: dict) -> list:
    seeds = ", ".join(str(s) for s in args.seeds)
    ablation = ", ".join(LABELS[kind] for kind in ARMS if kind not in STUDY_ARMS)
    ablation_seeds = ", ".join(str(s) for s in args.seeds[: args.ablation_seeds])
    ablation_ratios = ", ".join(f"{f:g}" for f in args.ablation_ratios)
    lines = [
        f"Test top-1 (%) on {summary['test_images']} test images after {args.steps} steps of {args.batch_size} "
        f"images, mean ± the 95% t interval's half-width over seeds {seeds} ({ablation}: seeds {ablation_seeds} "
        f"at f = {ablation_ratios}):",
        "",
        "| f | train images | epochs | " + " | ".join(LABELS[k] for k in ARMS) + " |",
        "|---:|---:|---:|" + "---:|" * len(ARMS),
    ]
    for row in summary["table"]:
        cells = [interval(row["arms"].get(kind)) for kind in ARMS]
        lines.append(f"| {row['ratio']:g} | {row['train_images']} | {row['epochs']:g} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Gains in test top-1 (points), paired per seed; the last column is the paper's Table 2 gap, "
        "(ConViT - DeiT) / DeiT:",
        "",
        "| f | " + " | ".join(pair_label(f"{a}-{b}") for a, b in PAIRS) + " | relative gap |",
        "|---:|" + "---:|" * (len(PAIRS) + 1),
    ]
    for row in summary["table"]:
        cells = [interval(row["gains"].get(f"{a}-{b}"), sign=True) for a, b in PAIRS]
        lines.append(f"| {row['ratio']:g} | " + " | ".join(cells) + f" | {interval(row['relative_gap'], True, '%')} |")
    check = summary["full_data_check"]
    if check:
        lines += [
            "",
            f"The DeiT twin's test top-1 at f = {check['largest']:g} minus at f = {check['smallest']:g}, paired "
            f"per seed: {interval(check, sign=True)} points (above 0: short of data at f = {check['smallest']:g}).",
        ]
    return lines


def trend_section(summary: dict) -> list:
    if not summary["trends"]:
        return []
    lines = [
        "The trend of each gain against log10 f: every seed's least-squares slope over the ratios (points per "
        "decade of f), mean ± 95% t interval over seeds. Below 0 with the interval: the gain grows as the data "
        "shrink; an interval across 0: no trend shown.",
        "",
        "| gain | slope (points per decade of f) | seed: slope |",
        "|---|---:|---|",
    ]
    for pair, stat in summary["trends"].items():
        seeds = ", ".join(f"{seed}: {value:+.2f}" for seed, value in sorted(stat["by_seed"].items()))
        lines.append(f"| {pair_label(pair)} | {interval(stat, sign=True)} | {seeds} |")
    return lines


def long_section(summary: dict) -> list:
    long = summary["long"]
    if not long:
        return []
    a, b = LONG_ARMS
    lines = [
        f"Longer training at f = {long['ratio']:g}: test top-1 (%) after {long['steps']} and {long['long_steps']} "
        f"steps, on the seeds of the long runs ({len(long['arms'][a]['long']['by_seed'])}):",
        "",
        f"| arm | {long['steps']} steps | {long['long_steps']} steps |",
        "|---|---:|---:|",
    ]
    for kind, stats in long["arms"].items():
        lines.append(f"| {LABELS[kind]} | {interval(stats['short'])} | {interval(stats['long'])} |")
    lines += [
        "",
        f"{LABELS[a]} - {LABELS[b]}: {interval(long['gain_short'], sign=True)} after {long['steps']} steps, "
        f"{interval(long['gain_long'], sign=True)} after {long['long_steps']}; the change "
        f"{interval(long['gain_change'], sign=True)} (paired per seed). The {LABELS[b]} after {long['long_steps']} "
        f"steps minus {LABELS[a]} after {long['steps']}: {interval(long['twin_long_minus_convit_short'], sign=True)} "
        "(0 or more: the twin catches up with more steps, the gain is speed).",
    ]
    return lines


def stock_section(summary: dict) -> list:
    """--stock: ConViT with timm's layers beside the fused ConViT of the same ratio, seed and lr."""
    lines = []
    for stock in summary["stock"]:
        fused = summary["stock_twins"].get(f"{stock['ratio']:g}_{stock['seed']}")
        seconds = (
            f"; training {stock['train_s']:.0f} s against {fused['train_s']:.0f} s, both timed alone"
            if fused and stock["timed_alone"] and fused["timed_alone"]
            else "; seconds not compared (not timed alone)"
        )
        theirs = f"{fused['top1']:.2f}" if fused else "not run"
        lines.append(
            f"ConViT with timm's layers at f = {stock['ratio']:g}, seed {stock['seed']}: test top-1 "
            f"{stock['top1']:.2f}, with the package's layers {theirs}{seconds}."
        )
    return lines


def time_section(summary: dict) -> list:
    rows = summary["time_to_accuracy"]
    if not rows:
        return []
    lines = [
        "Time to accuracy: the optimiser step at which the seed-mean validation curve first reaches the DeiT twin's "
        "final validation top-1 at that ratio (mean over seeds), and each seed's own step (-: not reached). "
        "Seconds only from runs timed alone (--jobs 1).",
        "",
        "| f | target (%) | arm | step (mean curve) | seed: step | seconds |",
        "|---:|---:|---|---:|---|---:|",
    ]
    for row in rows:
        for kind, r in row["arms"].items():
            step = r["step"] if r["step"] is not None else "not reached"
            seeds = ", ".join(f"{seed}: {'-' if s is None else s}" for seed, s in sorted(r["steps_by_seed"].items()))
            seconds = f"{r['train_s']:.0f}" if r["train_s"] is not None else "not timed alone"
            lines.append(f"| {row['ratio']:g} | {row['target']:.2f} | {LABELS[kind]} | {step} | {seeds} | {seconds} |")
    return lines


def gate_section(curves: list) -> list:
    gated = [c for c in curves if c["gates"] and c["model"] == "convit"]
    if not gated:
        return []
    layers = list(gated[0]["gates"])
    lines = [
        "ConViT's gate sigmoid(lambda) per GPSA layer (1 = positional attention only), mean over heads and seeds: "
        "at the start → half-way → the end:",
        "",
        "| f | " + " | ".join(layer_label(layer) for layer in layers) + " |",
        "|---:|" + "---:|" * len(layers),
    ]
    for c in gated:
        mid = len(c["step"]) // 2
        cells = [f"{v[0]:.3f} → {v[mid]:.3f} → {v[-1]:.3f}" for v in (c["gates"][layer] for layer in layers)]
        lines.append(f"| {c['ratio']:g} | " + " | ".join(cells) + " |")
    return lines


def nonlocality_section(curves: list) -> list:
    if not curves:
        return []
    blocks = sorted(curves[0]["nonlocality"], key=int)
    lines = [
        "Nonlocality (patches) per block, mean over heads and seeds (every block fed the patch embedding of "
        f"{STAT_IMAGES} test images, as ConViT's main.py): at the start → the end; GPSA blocks marked *:",
        "",
        "| arm | f | " + " | ".join(f"block {b}" for b in blocks) + " |",
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


def plot(args, summary: dict, path: str) -> None:
    """Four panels: test top-1 against f; validation top-1 over training at the smallest f; ConViT's gates;
    nonlocality per block at the smallest f."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_val, ax_gate, ax_nl) = plt.subplots(1, 4, figsize=(21, 4.5))
    for kind, marker in zip(ARMS, "osDv"):
        rows = [r for r in summary["table"] if kind in r["arms"]]
        ax_acc.errorbar(
            [r["ratio"] for r in rows],
            [r["arms"][kind]["mean"] for r in rows],
            yerr=[r["arms"][kind]["ci95"] or 0 for r in rows],
            marker=marker,
            capsize=3,
            label=LABELS[kind],
        )
    ax_acc.set(xscale="log", xlabel="sampling ratio f", ylabel="test top-1 (%), 95% interval", title="accuracy vs data")
    ax_acc.set_xticks(args.ratios, [f"{f:g}" for f in args.ratios])
    ax_acc.minorticks_off()
    ax_acc.legend()
    curves = {(c["model"], c["ratio"]): c for c in summary["curves"]}
    smallest = args.ratios[0]
    for kind in ARMS:
        c = curves.get((kind, smallest))
        if c:
            ax_val.plot(c["step"], c["val_top1"], marker=".", label=LABELS[kind])
    ax_val.set(
        xlabel="optimiser step", ylabel="validation top-1 (%), mean over seeds", title=f"learning, f = {smallest:g}"
    )
    for ratio, style in zip(dict.fromkeys((smallest, args.ratios[-1])), ("-", ":")):
        c = curves.get(("convit", ratio))
        if c:
            for index, (layer, values) in enumerate(c["gates"].items()):
                colour = plt.cm.viridis(index / max(1, len(c["gates"]) - 1))
                ax_gate.plot(c["step"], values, style, color=colour, label=f"{layer_label(layer)}, f = {ratio:g}")
    ax_gate.set(
        xlabel="optimiser step",
        ylabel="sigmoid(lambda), mean over heads and seeds",
        title="ConViT: gate per GPSA layer",
    )
    for kind, style in zip(ARMS, ("-", "--", ":", "-.")):
        c = curves.get((kind, smallest))
        if c:
            blocks = sorted(c["nonlocality"], key=int)
            for b in blocks:
                colour = plt.cm.plasma(int(b) / max(1, len(blocks)))
                ax_nl.plot(c["step"], c["nonlocality"][b], style, color=colour, label=f"{LABELS[kind]}, block {b}")
    ax_nl.set(
        xlabel="optimiser step",
        ylabel="nonlocality (patches), mean over heads and seeds",
        title=f"nonlocality per block, f = {smallest:g}",
    )
    for ax in (ax_val, ax_gate, ax_nl):
        if ax.lines:
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    with files.replacing(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
