"""``python -m examples.paper``: the paper's comparison in miniature.

Trains the small DeepLab of ``model.py`` with softmax cross-entropy, center loss, focal loss and
the locally adaptive loss (K = 3, 5, 7; and the Minkowski exponent k = 1, 2, 3, 5 at K = 5) over
several seeds, evaluates mean IoU on a held-out split, and prints tables shaped like the paper's
Table 1 (the exponent) and Table 2 (the losses), mean and spread over seeds. Writes
``<data>-<date>.json`` (every run), a markdown copy of the tables and, with matplotlib, a PNG to
``examples/paper/runs/`` (git-ignored), or with ``--save-reference`` to
``examples/paper/results/``, the committed results the README quotes.

    python -m examples.paper                      # procedural shapes, ~6 minutes on 2 CPU cores
    python -m examples.paper --voc ~/VOCdevkit/VOC2012 --size 321 --iterations 20000 --batch 2

Uses the GPU (and the fused Triton kernels) when there is one.
"""

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from .data import Shapes, VOCSegmentation
from .train import Run, train_and_evaluate

HERE = Path(__file__).resolve().parent

# name: (the loss, its keyword overrides, the row of Table 2 / Table 1 it fills)
CONFIGS = {
    "ce": ("ce", {}, "SoftMax CE", "-"),
    "center": ("center", {}, "Center loss", "alpha = 0.5, lambda = 3e-4"),
    "focal": ("focal", {}, "Focal loss", "alpha = 0.25, gamma = 2"),
    "lad-k3": ("lad", dict(kernel_size=3), "L^AD (ours)", "kernel size (3, 3, C), k = 3"),
    "lad-k5": ("lad", dict(kernel_size=5), "L^AD (ours)", "kernel size (5, 5, C), k = 3"),
    "lad-k7": ("lad", dict(kernel_size=7), "L^AD (ours)", "kernel size (7, 7, C), k = 3"),
    "lad-k5-p1": ("lad", dict(kernel_size=5, power=1.0), None, None),
    "lad-k5-p2": ("lad", dict(kernel_size=5, power=2.0), None, None),
    "lad-k5-p5": ("lad", dict(kernel_size=5, power=5.0), None, None),
}
TABLE1 = [("lad-k5-p1", 1), ("lad-k5-p2", 2), ("lad-k5", 3), ("lad-k5-p5", 5)]
TABLE2 = ["ce", "center", "focal", "lad-k3", "lad-k5", "lad-k7"]


def summary(runs, name):
    values = [100 * r["miou"] for r in runs if r["name"] == name]
    if not values:
        return None
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return dict(mean=statistics.fmean(values), std=spread, seeds=len(values), values=values)


def cell(stat):
    return "-" if stat is None else f"{stat['mean']:.1f} +- {stat['std']:.1f}"


def tables(runs, header):
    lines = [header, "", "Table 1. Minkowski exponent k of L^AD, kernel size (5, 5, C): mean IoU (%)",
             "", "| k | mIoU |", "|---|---|"]
    lines += [f"| {k} | {cell(summary(runs, name))} |" for name, k in TABLE1]
    lines += ["", "Table 2. Losses: mean IoU (%)", "",
              "| Training framework | Hyper Para. | mIoU |", "|---|---|---|"]
    for name in TABLE2:
        _, _, row, params = CONFIGS[name]
        lines.append(f"| {row} | {params} | {cell(summary(runs, name))} |")
    return "\n".join(lines)


def plot(runs, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw=dict(width_ratios=(3, 2)))
    for axis, names, labels in (
            (left, TABLE2, ["CE", "center", "focal", "LAD K=3", "LAD K=5", "LAD K=7"]),
            (right, [n for n, _ in TABLE1], [f"k={k}" for _, k in TABLE1])):
        stats = [summary(runs, n) for n in names]
        xs = [i for i, s in enumerate(stats) if s]
        axis.bar(xs, [stats[i]["mean"] for i in xs], yerr=[stats[i]["std"] for i in xs],
                 capsize=4, color=["tab:gray" if not names[i].startswith("lad") else "tab:blue"
                                   for i in xs])
        for i in xs:
            axis.scatter([i] * len(stats[i]["values"]), stats[i]["values"], color="k", s=8)
        axis.set_xticks(range(len(names)))
        axis.set_xticklabels(labels, rotation=20)
        axis.set_ylabel("mean IoU (%)")
    left.set_title("Table 2: losses")
    right.set_title("Table 1: LAD's exponent k (K=5)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--size", type=int, default=48, help="training and evaluation size")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=int, default=16, help="network width")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--train-count", type=int, default=4096, help="procedural train samples")
    parser.add_argument("--val-count", type=int, default=256, help="procedural held-out samples")
    parser.add_argument("--voc", help="a Pascal VOC directory (train.txt / val.txt splits)")
    parser.add_argument("--only", help="comma-separated configs, of: " + ", ".join(CONFIGS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", default=str(HERE / "runs"),
                       help="folder for the results (default examples/paper/runs, git-ignored)")
    where.add_argument("--save-reference", action="store_true",
                       help="write to examples/paper/results/, the results the README quotes")
    args = parser.parse_args(argv)
    if args.save_reference:
        args.out = str(HERE / "results")

    device = torch.device(args.device)
    if args.voc:
        train_set = VOCSegmentation(args.voc, "train", args.size)
        val_set = VOCSegmentation(args.voc, "val", args.size)
        data = "voc"
    else:
        train_set = Shapes(args.train_count, args.size, seed=1)
        val_set = Shapes(args.val_count, args.size, seed=2)
        data = "shapes"
    names = args.only.split(",") if args.only else list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")

    command = "python -m examples.paper " + " ".join(argv if argv is not None else sys.argv[1:])
    environment = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda"
                       else f"cpu ({torch.get_num_threads()} threads)", torch=torch.__version__,
                       python=platform.python_version(), date=datetime.date.today().isoformat(),
                       command=command.strip())
    print(", ".join(f"{k} {v}" for k, v in environment.items()), flush=True)
    start, runs = time.time(), []
    for seed in range(args.seeds):
        for name in names:
            loss, overrides, _, _ = CONFIGS[name]
            run = Run(loss, seed, iterations=args.iterations, batch=args.batch, lr=args.lr,
                      width=args.width, **overrides)
            result = dict(train_and_evaluate(run, train_set, val_set, device), name=name)
            runs.append(result)
            print(f"seed {seed} {name:10} mIoU {100 * result['miou']:5.1f}  "
                  f"({result['seconds']:.0f} s)", flush=True)

    header = (f"{data}: {len(train_set)} training / {len(val_set)} held-out samples of "
              f"{args.size}x{args.size}, {args.iterations} iterations of batch {args.batch}, "
              f"{args.seeds} seeds; {environment['device']}, torch {environment['torch']}; "
              f"`{environment['command']}`")
    text = tables(runs, header)
    print("\n" + text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{data}-{environment['date']}"
    summaries = {name: summary(runs, name) for name in names}
    stem.with_suffix(".json").write_text(json.dumps(
        dict(environment=environment, arguments=vars(args), summary=summaries, runs=runs,
             minutes=(time.time() - start) / 60), indent=1))
    stem.with_suffix(".md").write_text(text + "\n")
    png = plot(runs, stem.with_suffix(".png"))
    print(f"\n{(time.time() - start) / 60:.1f} minutes; wrote {stem.with_suffix('.json')}, "
          f"{stem.with_suffix('.md')}" + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
