"""The experiment from end to end: its results folder held and continued, the planned runs trained in worker
processes, and the results written; `main`, the command's errors as one line each."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time

import torch

from ... import files
from ...train import output
from ...train.errors import Diverged, TrainError
from .data import Images, load_data
from .one_run import describe_model, train_run
from .options import LABELS, SETTINGS, Run, chosen_lrs, lr_grid, parse_args, plan
from .report import markdown, plot
from .summary import summarise

# The experiment's args and data, set before the worker processes fork: they inherit them instead of a copy.
SHARED = {}


def write_json(path: str, value) -> None:
    """Atomically: a stopped experiment never leaves a half-written file."""
    files.write_text(path, json.dumps(value, indent=1))


def open_out(args) -> dict:
    """Create --out, or continue the experiment in it: {run name: result} of the runs already done there."""
    settings = {key: getattr(args, key) for key in SETTINGS}
    path = os.path.join(args.out, "settings.json")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise TrainError(f"--out {args.out!r} is a file: choose a folder")
    if os.path.isdir(args.out) and set(os.listdir(args.out)) - {output.LOCK}:
        try:
            with open(path) as f:
                recorded = json.load(f)
        except (OSError, ValueError):
            raise TrainError(
                f"--out {args.out!r} is not empty and holds no experiment of this kind: choose a new folder"
            ) from None
        changed = [key for key in SETTINGS if recorded.get(key) != settings[key]]
        if changed:
            raise TrainError(
                f"--out {args.out!r} holds an experiment with other settings ({', '.join(changed)}): "
                f"choose a new folder, or the same options to continue it"
            )
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    write_json(path, settings)
    done = read_records(args, lr_grid(args))
    lrs = chosen_lrs(args, done)
    return done | (read_records(args, plan(args, lrs)) if lrs is not None else {})


def read_records(args, runs: list) -> dict:
    """{run name: result} of the `runs` whose whole record is in --out/runs."""
    done = {}
    for run in runs:
        run_path = os.path.join(args.out, "runs", run.name + ".json")
        if os.path.exists(run_path):
            try:
                with open(run_path) as f:
                    done[run.name] = json.load(f)
            except (OSError, ValueError):  # cut short by a crash, or garbage: the run is not done
                print(f"warning: {run_path} is not a whole run's record: that run trains again", file=sys.stderr)
    return done


def work(run: Run) -> tuple:
    """Train one run and write its record: (its name, its result)."""
    args, data = SHARED["args"], SHARED["data"]
    print(f"{run.name}: {LABELS[run.kind]}, f = {run.ratio:g}, seed {run.seed}, lr {run.lr:g}: started", flush=True)
    result = train_run(args, data, run)
    write_json(os.path.join(args.out, "runs", run.name + ".json"), result)
    return run.name, result


def stop(signum, frame):
    raise KeyboardInterrupt


def start_worker() -> None:
    torch.set_num_threads(1)  # one process per core: these small ops do not pay for a thread pool's barriers
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the experiment in the parent, one line
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's pool.terminate()


def run(args) -> int:
    torch.set_num_threads(1)
    data = load_data(args)  # first: a missing data set is reported before anything is written
    if min(args.ratios + [args.lr_ratio, args.long_ratio]) * len(data.pool) / data.classes < 1:
        raise TrainError("a ratio keeps less than one image of a class: raise it")
    with output.lock(args.out, "--out"):  # one experiment per folder: a second would train the same runs
        return run_in(args, data)


def run_in(args, data: Images) -> int:
    """The experiment in its held --out: the lr grid, then the study at each arm's lr, the runs not done there
    trained; then the results of all written."""
    done = open_out(args)
    grid = [run for run in lr_grid(args) if run.name not in done]
    print(
        f"data: {data.name}, {len(data.pool)} train / {len(data.validation)} validation / "
        f"{data.scored(args.test_images)} test images, {data.classes} classes; the lr grid: {len(lr_grid(args))} runs "
        f"of {args.steps} steps ({len(lr_grid(args)) - len(grid)} done before in {args.out}), then the study",
        flush=True,
    )
    SHARED.update(args=args, data=data)
    try:
        if not args.summary_only:
            train_all(args, grid, done, stop_on_divergence=False)
        lrs = chosen_lrs(args, done)
        if lrs is not None:
            todo = [run for run in plan(args, lrs) if run.name not in done]
            print(f"lr per arm: {lrs}; the study: {len(plan(args, lrs))} runs, {len(todo)} to train", flush=True)
            if not args.summary_only:
                train_all(args, todo, done, stop_on_divergence=True)
    except KeyboardInterrupt:
        print(f"stopped: the {len(done)} runs done are kept in {args.out}; the same command continues", file=sys.stderr)
        return 130
    write_results(args, data, done)
    return 0


def train_all(args, todo: list, done: dict, stop_on_divergence: bool) -> None:
    """Train the runs of `todo`, args.jobs at once, adding each result to `done` as it comes; a diverged run
    stops the study (its lr was chosen), not the lr grid."""
    if not todo:
        return
    start = time.perf_counter()
    jobs = min(args.jobs, len(todo))
    pool = multiprocessing.get_context("fork").Pool(jobs, initializer=start_worker) if jobs > 1 else None
    # After the fork: a worker that inherited this handler would raise in its start-up when
    # pool.terminate() stops it, a traceback instead of the one line.
    previous = signal.signal(signal.SIGTERM, stop)  # as Ctrl-C: the workers stop with the experiment, one line
    try:
        for trained, (name, result) in enumerate(pool.imap_unordered(work, todo) if pool else map(work, todo), 1):
            done[name] = result
            if result["diverged"] and stop_on_divergence:
                raise Diverged(f"{result['diverged']} at the lr its arm's grid chose: give lower --lrs")
            elapsed = time.perf_counter() - start
            score = "diverged" if result["diverged"] else f"validation top-1 {result['val_top1']:.2f}%"
            print(
                f"[{trained}/{len(todo)}] {name}: {score}, {result['train_s']:.0f} s training; "
                f"elapsed {elapsed:.0f} s, about {elapsed / trained * (len(todo) - trained):.0f} s left",
                flush=True,
            )
    finally:
        if pool:
            pool.terminate()
        signal.signal(signal.SIGTERM, previous)


def write_results(args, data: Images, done: dict) -> None:
    """results.json, results.md and sample_efficiency.png of the runs done, the tables printed."""
    summary = summarise(args, done)
    lrs = chosen_lrs(args, done)
    study = {run.name for run in plan(args, lrs)} if lrs is not None else set()
    planned = {run.name for run in lr_grid(args)} | study
    summary.update(
        data=data.name,
        pool_images=len(data.pool),
        validation_images=len(data.validation),
        test_images=data.scored(args.test_images),
        model=describe_model(args, data),
        runs=sum(name in planned and not (r["diverged"] and name in study) for name, r in done.items()),
        runs_planned=len(planned),
        study_planned=lrs is not None,
        settings={key: getattr(args, key) for key in SETTINGS},
    )
    write_json(os.path.join(args.out, "results.json"), summary)
    table = markdown(args, summary)
    files.write_text(os.path.join(args.out, "results.md"), table)
    plot(args, summary, os.path.join(args.out, "sample_efficiency.png"))
    print("\n" + table)
    print(f"results: {args.out}/results.json, results.md, sample_efficiency.png; every run's log in {args.out}/runs/")


def main(argv=None, prog=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv, prog)
        return run(args)
    except Diverged as error:  # a TrainError of its own exit code: the runs done so far are kept
        print(f"error: {error}; the runs done are kept in {args.out}: the same command continues", file=sys.stderr)
        return error.exit_code
    except TrainError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
