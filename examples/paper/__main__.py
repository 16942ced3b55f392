"""``python -m examples.paper``: the paper's comparison in miniature, each loss at its own
learning rate.

Trains the small DeepLab of ``model.py`` with softmax cross-entropy, center loss, focal loss and
the locally adaptive loss (K = 3, 5, 7 with the Minkowski mean, and K = 5 with loss max-pooling
and with top-k pooling of its costs), at every learning rate of a small grid, over several
seeds. Each of these losses gets the rate with the best mean IoU on a validation split (averaged
over the seeds), held apart from the test split; the tables give test mean IoU at that rate:
Table 2 (the losses), Table 1 (LAD's Minkowski exponent k = 1, 2, 3, 5 at K = 5, every k at the
rate chosen for k = 3) and the per-seed paired differences to cross-entropy (a seed fixes the
initialisation and the batches, so the runs of one seed differ only in the loss and the rate)
with their mean and 95 % t-interval.

Writes ``<data>-<date>.json`` (every run), the tables in markdown and, with matplotlib, a PNG to
``examples/paper/runs/`` (git-ignored), or with ``--save-reference`` to
``examples/paper/results/``, the committed results the README quotes. ``--report FILE.json``
prints the tables of saved results again.

    python -m examples.paper --threads 1          # procedural shapes, ~55 minutes on a CPU core
    python -m examples.paper --quick              # every step on tiny settings, seconds (CI)
    python -m examples.paper --voc ~/VOCdevkit/VOC2012 --size 321 --iterations 20000 --batch 2

Uses the GPU (and the fused Triton kernels) when there is one.
"""

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from .data import Shapes, VOCSegmentation
from .train import Run, train_and_evaluate

HERE = Path(__file__).resolve().parent

# name: (the loss, its keyword overrides, its row in Table 2, the row's hyper-parameters)
CONFIGS = {
    "ce": ("ce", {}, "SoftMax CE", "-"),
    "center": ("center", {}, "Center loss", "alpha = 0.5, lambda = 3e-4"),
    "focal": ("focal", {}, "Focal loss", "alpha = 0.25, gamma = 2"),
    "lad-k3": ("lad", dict(kernel_size=3), "L^AD (ours)", "kernel size (3, 3, C), k = 3"),
    "lad-k5": ("lad", dict(kernel_size=5), "L^AD (ours)", "kernel size (5, 5, C), k = 3"),
    "lad-k7": ("lad", dict(kernel_size=7), "L^AD (ours)", "kernel size (7, 7, C), k = 3"),
    "lad-k5-lmp": ("lad", dict(kernel_size=5, pooling="lmp"), "L^AD, loss max-pooling",
                   "kernel size (5, 5, C), ratio 0.3, p = 1.7"),
    "lad-k5-topk": ("lad", dict(kernel_size=5, pooling="topk"), "L^AD, top-k",
                    "kernel size (5, 5, C), top 20 %"),
    "lad-k5-p1": ("lad", dict(kernel_size=5, power=1.0), None, None),
    "lad-k5-p2": ("lad", dict(kernel_size=5, power=2.0), None, None),
    "lad-k5-p5": ("lad", dict(kernel_size=5, power=5.0), None, None),
}
TABLE2 = ["ce", "center", "focal", "lad-k3", "lad-k5", "lad-k7", "lad-k5-lmp", "lad-k5-topk"]
TABLE1 = [("lad-k5-p1", 1), ("lad-k5-p2", 2), ("lad-k5", 3), ("lad-k5-p5", 5)]
# Table 1's other exponents run at the rate chosen for this config, not at their own.
RATE_OF = {"lad-k5-p1": "lad-k5", "lad-k5-p2": "lad-k5", "lad-k5-p5": "lad-k5"}
BASELINE = "ce"

# One thread: on tensors this small, a second one only adds waiting (5x slower on a busy 2-core
# machine).
QUICK = dict(seeds=2, iterations=3, size=24, batch=2, width=8, train_count=8, val_count=4,
             test_count=4, lrs="0.01,0.1", threads=1)


def t_quantile(prob, df):
    """The prob-quantile of Student's t distribution with df degrees of freedom: bisection on
    its CDF, the density integrated by Simpson's rule (accurate to ~1e-9 for prob <= 0.999)."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x, steps=4000):
        h = x / steps
        density = [math.exp(log_norm - (df + 1) / 2 * math.log1p((i * h) ** 2 / df))
                   for i in range(steps + 1)]
        return 0.5 + h / 3 * (density[0] + density[-1] + 4 * sum(density[1:-1:2])
                              + 2 * sum(density[2:-1:2]))

    lo, hi = 0.0, 1.0
    while cdf(hi) < prob:
        hi *= 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < prob else (lo, mid)
    return (lo + hi) / 2


def describe(values):
    """Mean, standard deviation and the 95 % t-interval of the mean of ``values``."""
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else float("nan")
    half = (t_quantile(0.975, len(values) - 1) * spread / math.sqrt(len(values))
            if len(values) > 1 else float("nan"))
    return dict(mean=mean, std=spread, low=mean - half, high=mean + half, seeds=len(values),
                values=values)


def analyse(runs, names, lrs):
    """Learning-rate selection on the validation split, test scores at the chosen rates and
    the paired differences to the baseline, from the list of runs."""
    def by_seed(name, lr, split):
        return {r["seed"]: 100 * r["miou"][split] for r in runs
                if r["name"] == name and r["lr"] == lr}

    def scores(name, lr, split):
        return [score for _, score in sorted(by_seed(name, lr, split).items())]

    selection = {name: {str(lr): dict(val=statistics.fmean(scores(name, lr, "val")),
                                      test=statistics.fmean(scores(name, lr, "test")))
                        for lr in lrs if scores(name, lr, "val")}
                 for name in names if name not in RATE_OF}
    chosen = {}
    for name, by_rate in selection.items():  # the best mean; on a tie the first of the grid
        chosen[name] = float(max(by_rate, key=lambda lr: (by_rate[lr]["val"],
                                                          -lrs.index(float(lr)))))
    for name in names:
        if name in RATE_OF:
            chosen[name] = chosen[RATE_OF[name]]
    summary = {name: describe(scores(name, chosen[name], "test")) for name in names}
    differences = {}
    if BASELINE in names:
        base = by_seed(BASELINE, chosen[BASELINE], "test")
        for name in names:
            if name != BASELINE:
                own = by_seed(name, chosen[name], "test")
                differences[name] = describe([own[seed] - base[seed] for seed in sorted(own)
                                              if seed in base])
    return dict(selection=selection, chosen_lr=chosen, summary=summary, differences=differences)


def row_of(name):
    """(framework, hyper-parameters) of a config's row; Table 1's exponents say their k."""
    _, _, row, params = CONFIGS[name]
    if row is None:
        row, params = "L^AD (ours)", f"kernel size (5, 5, C), k = {dict(TABLE1)[name]:g}"
    return row, params


def compared(differences):
    """The configs with a paired difference, in the order of Table 2, then Table 1."""
    order = TABLE2 + [name for name, _ in TABLE1 if name not in TABLE2]
    return [name for name in order if name in differences]


def cell(stat):
    return "-" if stat is None else f"{stat['mean']:.1f} +- {stat['std']:.1f}"


def render(report):
    """The tables of a report (the JSON this command writes) in markdown."""
    summary, chosen = report["summary"], report["chosen_lr"]
    lrs = report["lr_grid"]
    lines = [report["header"], "",
             "Learning rates: mean IoU (%) on the validation split, mean over seeds; the chosen "
             "rate (best) is the one every table below uses.", "",
             "| Training framework | Hyper Para. | " + " | ".join(f"lr {lr:g}" for lr in lrs)
             + " | chosen |", "|---|---|" + "---|" * (len(lrs) + 1)]
    for name, by_rate in report["selection"].items():
        row, params = row_of(name)
        values = [f"{by_rate[str(lr)]['val']:.1f}" if str(lr) in by_rate else "-" for lr in lrs]
        lines.append(f"| {row} | {params} | " + " | ".join(values) + f" | {chosen[name]:g} |")
    lines += ["", "Table 1. Minkowski exponent k of L^AD, kernel size (5, 5, C), every k at the "
              "rate chosen for k = 3: test mean IoU (%), mean +- std over seeds", "",
              "| k | lr | mIoU |", "|---|---|---|"]
    lines += [f"| {k} | {chosen[name]:g} | {cell(summary[name])} |"
              for name, k in TABLE1 if name in summary]
    lines += ["", "Table 2. Losses, each at its chosen rate: test mean IoU (%), mean +- std over "
              "seeds", "", "| Training framework | Hyper Para. | lr | mIoU |", "|---|---|---|---|"]
    for name in TABLE2:
        if name in summary:
            row, params = row_of(name)
            lines.append(f"| {row} | {params} | {chosen[name]:g} | {cell(summary[name])} |")
    differences = report["differences"]
    if differences:
        seeds = max(d["seeds"] for d in differences.values())
        lines += ["", "Paired differences to softmax cross-entropy, seed by seed (same "
                  "initialisation and batches), in test mIoU points: each seed, the mean and "
                  "its 95 % t-interval", "",
                  "| Training framework | Hyper Para. | " +
                  " | ".join(f"seed {s}" for s in range(seeds)) + " | mean | 95 % interval |",
                  "|---|---|" + "---|" * (seeds + 2)]
        for name in compared(differences):
            row, params = row_of(name)
            d = differences[name]
            lines.append(f"| {row} | {params} | " + " | ".join(f"{v:+.1f}" for v in d["values"])
                         + f" | {d['mean']:+.1f} | [{d['low']:+.1f}, {d['high']:+.1f}] |")
    return "\n".join(lines)


def plot(report, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    summary, differences = report["summary"], report["differences"]
    labels = {"ce": "CE", "center": "center", "focal": "focal", "lad-k3": "LAD K=3",
              "lad-k5": "LAD K=5", "lad-k7": "LAD K=7", "lad-k5-lmp": "LAD LMP",
              "lad-k5-topk": "LAD top-k"}
    labels.update({name: f"k={k}" for name, k in TABLE1 if name != "lad-k5"})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw=dict(width_ratios=(4, 2, 4)))
    for axis, names in ((axes[0], TABLE2), (axes[1], [n for n, _ in TABLE1])):
        names = [n for n in names if n in summary]
        stats = [summary[n] for n in names]
        axis.bar(range(len(names)), [s["mean"] for s in stats], yerr=[s["std"] for s in stats],
                 capsize=4, color=["tab:blue" if n.startswith("lad") else "tab:gray"
                                   for n in names])
        for i, s in enumerate(stats):
            axis.scatter([i] * len(s["values"]), s["values"], color="k", s=8)
        axis.set_xticks(range(len(names)))
        axis.set_xticklabels([f"{labels.get(n, 'k=3')}\nlr {report['chosen_lr'][n]:g}"
                              for n in names], fontsize=8)
        axis.set_ylabel("test mean IoU (%)")
    axes[0].set_title("Table 2: each loss at its chosen rate")
    axes[1].set_title("Table 1: LAD's exponent k (K=5)")
    names = compared(differences)
    for i, name in enumerate(names):
        d = differences[name]
        axes[2].errorbar([i], [d["mean"]], yerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]],
                         fmt="o", capsize=4, color="tab:blue" if name.startswith("lad")
                         else "tab:gray")
        axes[2].scatter([i] * len(d["values"]), d["values"], color="k", s=8)
    axes[2].axhline(0, color="k", lw=0.8)
    axes[2].set_xticks(range(len(names)))
    axes[2].set_xticklabels([labels.get(n, "k=3") for n in names], fontsize=8, rotation=20)
    axes[2].set_ylabel("minus CE, mIoU points")
    axes[2].set_title("Paired differences to CE: mean, 95 % interval, seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--size", type=int, default=48, help="training and evaluation size")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=int, default=16, help="network width")
    parser.add_argument("--lrs", default="0.015,0.05,0.15",
                        help="comma-separated learning rates, each loss picks one")
    parser.add_argument("--train-count", type=int, default=4096, help="procedural train samples")
    parser.add_argument("--val-count", type=int, default=256,
                        help="validation samples for the choice of rate (procedural; with --voc "
                             "the last ones of train.txt, held out of training)")
    parser.add_argument("--test-count", type=int, default=256, help="procedural test samples")
    parser.add_argument("--voc", help="a Pascal VOC directory (train.txt / val.txt splits)")
    parser.add_argument("--only", help="comma-separated configs, of: " + ", ".join(CONFIGS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings that run every step in seconds: "
                             + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--report", metavar="JSON", help="print the tables of saved results")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", default=str(HERE / "runs"),
                       help="folder for the results (default examples/paper/runs, git-ignored)")
    where.add_argument("--save-reference", action="store_true",
                       help="write to examples/paper/results/, the results the README quotes")
    if "--quick" in argv:
        parser.set_defaults(**QUICK)  # flags given beside --quick still win
    args = parser.parse_args(argv)
    if args.report:
        print(render(json.loads(Path(args.report).read_text())))
        return 0
    if args.save_reference:
        args.out = str(HERE / "results")
    if args.threads:
        torch.set_num_threads(args.threads)
    lrs = [float(v) for v in args.lrs.split(",")]
    names = args.only.split(",") if args.only else list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    orphans = [n for n in names if n in RATE_OF and RATE_OF[n] not in names]
    if orphans:
        parser.error(f"{orphans} run at the rate chosen for {sorted({RATE_OF[n] for n in orphans})}"
                     ": add it to --only")

    device = torch.device(args.device)
    if args.voc:
        ids = VOCSegmentation.split_ids(args.voc, "train")
        if not 0 < args.val_count < len(ids):
            parser.error(f"--val-count must be in [1, {len(ids) - 1}] to hold images of "
                         f"train.txt ({len(ids)}) out of training, got {args.val_count}")
        train_set = VOCSegmentation(args.voc, "train", args.size, ids[:-args.val_count])
        val_set = VOCSegmentation(args.voc, "train", args.size, ids[-args.val_count:])
        test_set = VOCSegmentation(args.voc, "val", args.size)
        data = "voc"
    else:
        train_set = Shapes(args.train_count, args.size, seed=1)
        val_set = Shapes(args.val_count, args.size, seed=3)
        test_set = Shapes(args.test_count, args.size, seed=2)
        data = "shapes"
    splits = dict(val=val_set, test=test_set)

    command = "python -m examples.paper " + " ".join(argv)
    environment = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda"
                       else f"cpu ({torch.get_num_threads()} threads)", torch=torch.__version__,
                       python=platform.python_version(), date=datetime.date.today().isoformat(),
                       command=command.strip())
    print(", ".join(f"{k} {v}" for k, v in environment.items()), flush=True)
    tuned = [n for n in names if n not in RATE_OF]
    plan = [(seed, name, lr) for seed in range(args.seeds) for name in tuned for lr in lrs]
    total = len(plan) + args.seeds * (len(names) - len(tuned))
    start, runs = time.time(), []

    def run_one(seed, name, lr):
        loss, overrides, _, _ = CONFIGS[name]
        run = Run(loss, seed, iterations=args.iterations, batch=args.batch, lr=lr,
                  width=args.width, **overrides)
        result = dict(train_and_evaluate(run, train_set, splits, device), name=name)
        runs.append(result)
        elapsed = time.time() - start
        print(f"[{len(runs)}/{total}] seed {seed} {name:12} lr {lr:<6g} val "
              f"{100 * result['miou']['val']:5.1f} test {100 * result['miou']['test']:5.1f}  "
              f"({result['seconds']:.0f} s; {elapsed / 60:.0f} of ~"
              f"{elapsed / len(runs) * total / 60:.0f} min)", flush=True)

    for seed, name, lr in plan:
        run_one(seed, name, lr)
    chosen = analyse(runs, tuned, lrs)["chosen_lr"]
    for seed in range(args.seeds):
        for name in names:
            if name in RATE_OF:
                run_one(seed, name, chosen[RATE_OF[name]])

    header = (f"{data}: {len(train_set)} training / {len(val_set)} validation / {len(test_set)} "
              f"test samples of {args.size}x{args.size}, {args.iterations} iterations of batch "
              f"{args.batch}, {args.seeds} seeds, learning rates {', '.join(f'{v:g}' for v in lrs)}"
              f"; {environment['device']}, torch {environment['torch']}; "
              f"`{environment['command']}`")
    report = dict(header=header, environment=environment,
                  arguments={k: v for k, v in vars(args).items() if k != "out"},
                  lr_grid=lrs, minutes=(time.time() - start) / 60,
                  **analyse(runs, names, lrs), runs=runs)
    text = render(report)
    print("\n" + text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{data}-{environment['date']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(text + "\n")
    png = plot(report, stem.with_suffix(".png"))
    print(f"\n{report['minutes']:.1f} minutes; wrote {stem.with_suffix('.json')}, "
          f"{stem.with_suffix('.md')}" + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
