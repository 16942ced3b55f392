"""``python -m examples.paper``: the paper's comparison in miniature, each loss at its own
learning rate, with the controls that say what LAD's gain is made of.

Trains the small DeepLab of ``model.py`` with softmax cross-entropy, center loss, focal loss and
the locally adaptive loss (K = 3, 5, 7 with the Minkowski mean, K = 5 with loss max-pooling and
with top-k pooling, k = 1, 2, 5), and per K the controls of Table 3: no neighbourhood at K's
temperature (K = 1, weight_base = s_K, docs/math.md) and z-scored cross-entropy at that
temperature (power 1). Each loss trains at every rate of its grid (the whole --lrs grid for
FINE, every other rate for the rest; a rate chosen on an edge grows the grid) over several
seeds and gets the rate with the best validation mIoU (mean over seeds), held apart from the
test split. The tables give test mIoU at the chosen rates (Table 2: the losses; Table 1: the
exponent k; Table 3: the controls), the per-seed paired differences to cross-entropy and the
other paired comparisons (LAD against focal loss and against its control) with 95 %
t-intervals, paired t-tests and Holm's correction over every comparison made, and per-class
IoU. ``--pilot N1,N2,...`` reports validation mIoU per iteration count instead, to find where
training plateaus; ``--jobs N`` trains N runs at once.

Writes ``<data>-<date>.json`` (every run), the tables in markdown and, with matplotlib, a PNG to
``examples/paper/runs/`` (git-ignored), or with ``--save-reference`` to
``examples/paper/results/``, the committed results examples/paper/README.md quotes.
``--report FILE.json`` prints the tables of saved results again (``--plot FILE.png``: and draws
their figure).

    python -m examples.paper --threads 1 --jobs 2  # procedural shapes, on two CPU cores
    python -m examples.paper --quick               # every step on tiny settings, seconds (CI)
    python -m examples.paper --pilot 600,1200,2400,3600 --only ce,lad-k5 --seeds 1
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
from .train import run_cell, setup_worker

HERE = Path(__file__).resolve().parent

def temperature(kernel_size, weight_base=2.0):
    """The scale s_K of LAD's pooled vector at a pixel whose whole K x K window shares its label
    (normalizer="count"): the window's weights summed over K^2, so that f = s_K z
    (docs/math.md, "The temperature K sets"). K = 1 with weight_base = s_K has K's scale and no
    neighbourhood."""
    r = kernel_size // 2
    total = weight_base + sum(8 * d * weight_base ** (1 - d) for d in range(1, r + 1))
    return total / kernel_size ** 2


# name: (the loss, its keyword overrides, its row in the tables, the row's hyper-parameters)
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
# The controls (issue 26): per K, no neighbourhood at K's temperature (K = 1, weight_base s_K),
# and the same as z-scored cross-entropy (power 1: a plain mean of the costs).
for _k in (3, 5, 7):
    _s = temperature(_k)
    CONFIGS[f"local0-k{_k}"] = ("lad", dict(kernel_size=1, weight_base=_s),
                                f"No locality, K = {_k}'s temperature",
                                f"kernel size (1, 1, C), weight_base {_s:.3f}, k = 3")
    CONFIGS[f"zce-k{_k}"] = ("lad", dict(kernel_size=1, weight_base=_s, power=1.0),
                             f"Z-scored CE, K = {_k}'s temperature",
                             f"kernel size (1, 1, C), weight_base {_s:.3f}, k = 1")
TABLE2 = ["ce", "center", "focal", "lad-k3", "lad-k5", "lad-k7", "lad-k5-lmp", "lad-k5-topk"]
TABLE1 = [("lad-k5-p1", 1), ("lad-k5-p2", 2), ("lad-k5", 3), ("lad-k5-p5", 5)]
# What the gain is made of, per K: LAD, its no-locality control, z-scored cross-entropy.
TABLE3 = [(k, f"lad-k{k}", f"local0-k{k}", f"zce-k{k}") for k in (3, 5, 7)]
# Table 1's exponents 2 and 5 run at the rate chosen for k = 3; k = 1 is tuned on its own.
RATE_OF = {"lad-k5-p2": "lad-k5", "lad-k5-p5": "lad-k5"}
BASELINE = "ce"
# The losses whose rates get the full grid (--lrs); the others every other rate of it.
FINE = ("ce", "focal", "lad-k5")
# The paired comparisons beside "minus cross-entropy": LAD against focal loss, and each LAD
# against its no-locality control at the same temperature.
VERSUS = ([(f"lad-k{k}", "focal") for k in (3, 5, 7)]
          + [(f"lad-k{k}", f"local0-k{k}") for k in (3, 5, 7)])

# One thread: on tensors this small, a second one only adds waiting (5x slower on a busy 2-core
# machine).
QUICK = dict(seeds=2, iterations=3, size=24, batch=2, width=8, train_count=8, val_count=4,
             test_count=4, lrs="0.01,0.03,0.1", threads=1, grow=1)


def t_cdf(x, df, steps=4000):
    """Student's t distribution's CDF with df degrees of freedom at x: the density integrated by
    Simpson's rule from 0 (accurate to ~1e-9 for |x| within the 0.999 quantile)."""
    if x < 0:
        return 1.0 - t_cdf(-x, df, steps)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    h = x / steps
    density = [math.exp(log_norm - (df + 1) / 2 * math.log1p((i * h) ** 2 / df))
               for i in range(steps + 1)]
    return 0.5 + h / 3 * (density[0] + density[-1] + 4 * sum(density[1:-1:2])
                          + 2 * sum(density[2:-1:2]))


def t_quantile(prob, df):
    """The prob-quantile (prob >= 0.5) of Student's t distribution: bisection on its CDF."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < prob:
        hi *= 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < prob else (lo, mid)
    return (lo + hi) / 2


def holm(pvalues):
    """Holm's step-down adjustment of ``pvalues`` (a dict name -> p): each adjusted p is the
    largest over the smaller ones of min(1, (m - rank) p), so that rejecting where it is below
    alpha holds the family-wise error at alpha over the m comparisons."""
    order = sorted(pvalues, key=pvalues.get)
    adjusted, running = {}, 0.0
    for rank, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pvalues[name]))
        adjusted[name] = running
    return adjusted


def describe(values):
    """Mean, standard deviation and the 95 % t-interval of the mean of ``values``."""
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else float("nan")
    half = (t_quantile(0.975, len(values) - 1) * spread / math.sqrt(len(values))
            if len(values) > 1 else float("nan"))
    out = dict(mean=mean, std=spread, low=mean - half, high=mean + half, seeds=len(values),
               values=values)
    if len(values) > 1:  # two-sided paired t-test of a zero mean
        t = mean / (spread / math.sqrt(len(values))) if spread > 0 else math.copysign(
            math.inf, mean) if mean else 0.0
        out["p"] = 1.0 if t == 0 else (0.0 if math.isinf(t)
                                       else 2 * (1 - t_cdf(abs(t), len(values) - 1)))
    return out


def analyse(runs, names, tune_seeds=None):
    """Learning-rate selection on the validation split (over the rates each config ran at, by
    the mean over seeds 0 .. tune_seeds - 1, default all), test scores at the chosen rates, the paired differences to the baseline and the other paired
    comparisons (VERSUS), each with a two-sided paired t-test and Holm's correction over all of
    them, and the per-class test IoU at the chosen rates."""
    def by_seed(name, lr, split):
        return {r["seed"]: 100 * r["miou"][split] for r in runs
                if r["name"] == name and r["lr"] == lr}

    def scores(name, lr, split, seeds=None):
        return [score for seed, score in sorted(by_seed(name, lr, split).items())
                if seeds is None or seed < seeds]

    selection = {name: {str(lr): dict(val=statistics.fmean(scores(name, lr, "val", tune_seeds)),
                                      test=statistics.fmean(scores(name, lr, "test", tune_seeds)))
                        for lr in sorted({r["lr"] for r in runs if r["name"] == name})}
                 for name in names if name not in RATE_OF}
    chosen = {}
    for name, by_rate in selection.items():  # the best mean; on a tie the smallest rate
        chosen[name] = float(max(by_rate, key=lambda lr: (by_rate[lr]["val"], -float(lr))))
    for name in names:
        if name in RATE_OF:
            chosen[name] = chosen[RATE_OF[name]]
    summary = {name: describe(scores(name, chosen[name], "test")) for name in names}

    def paired(name, other):
        own, base = (by_seed(n, chosen[n], "test") for n in (name, other))
        return describe([own[seed] - base[seed] for seed in sorted(own) if seed in base])

    differences = {name: paired(name, BASELINE) for name in names
                   if BASELINE in names and name != BASELINE}
    comparisons = {f"{a} - {b}": dict(paired(a, b), minus=b, name=a) for a, b in VERSUS
                   if a in names and b in names}
    tested = {**{f"{n} - {BASELINE}": d for n, d in differences.items()}, **comparisons}
    adjusted = holm({k: d["p"] for k, d in tested.items() if "p" in d})
    for key, d in tested.items():
        if key in adjusted:
            d["p_holm"] = adjusted[key]
    per_class = {}
    for name in names:
        tables = [r["per_class_iou"]["test"] for r in runs if r["name"] == name
                  and r["lr"] == chosen[name] and "per_class_iou" in r]
        if tables:  # classes absent from a split are NaN: averaged over the seeds that have them
            per_class[name] = [statistics.fmean(v) if v else float("nan") for v in
                               ([100 * t[c] for t in tables if t[c] == t[c]]
                                for c in range(len(tables[0])))]
    return dict(selection=selection, chosen_lr=chosen, summary=summary, differences=differences,
                comparisons=comparisons, comparisons_made=len(adjusted), per_class=per_class)


def row_of(name):
    """(framework, hyper-parameters) of a config's row; Table 1's exponents say their k."""
    _, _, row, params = CONFIGS[name]
    if row is None:
        row, params = "L^AD (ours)", f"kernel size (5, 5, C), k = {dict(TABLE1)[name]:g}"
    return row, params


def compared(differences):
    """The configs with a paired difference, in the order of Table 2, Table 1, Table 3."""
    order = TABLE2 + [name for name, _ in TABLE1 if name not in TABLE2] + [
        name for _, *names in TABLE3 for name in names if name not in TABLE2]
    return [name for name in order if name in differences]


def cell(stat):
    return "-" if stat is None else f"{stat['mean']:.1f} +- {stat['std']:.1f}"


def render(report):
    """The tables of a report (the JSON this command writes) in markdown."""
    summary, chosen = report["summary"], report["chosen_lr"]
    lrs = sorted({float(lr) for by_rate in report["selection"].values() for lr in by_rate})
    rate_of = report.get("rate_of", {name: "lad-k5" for name, _ in TABLE1 if name != "lad-k5"})
    lines = [report["header"], "",
             "Learning rates: mean IoU (%) on the validation split, "
             + _tuning_seeds(report) + "; the chosen rate (best) is the one every table below "
             "uses.", "",
             "| Training framework | Hyper Para. | " + " | ".join(f"lr {lr:g}" for lr in lrs)
             + " | chosen |", "|---|---|" + "---|" * (len(lrs) + 1)]
    for name, by_rate in report["selection"].items():
        row, params = row_of(name)
        values = [f"{by_rate[str(lr)]['val']:.1f}" if str(lr) in by_rate else "-" for lr in lrs]
        lines.append(f"| {row} | {params} | " + " | ".join(values) + f" | {chosen[name]:g} |")
    own = [f"{k:g}" for name, k in TABLE1 if name not in rate_of and name in summary]
    borrowed = [f"{k:g}" for name, k in TABLE1 if name in rate_of and name in summary]
    if not borrowed:
        rates = "each k at its own rate"
    elif len(own) == 1:
        rates = "every k at the rate chosen for k = 3"
    else:
        rates = (f"k = {' and '.join(borrowed)} at the rate chosen for k = 3, "
                 f"k = {', '.join(o for o in own if o != '3')} at its own")
    lines += ["", f"Table 1. Minkowski exponent k of L^AD, kernel size (5, 5, C), {rates}: test "
              "mean IoU (%), mean +- std over seeds", "", "| k | lr | mIoU |", "|---|---|---|"]
    lines += [f"| {k} | {chosen[name]:g} | {cell(summary[name])} |"
              for name, k in TABLE1 if name in summary]
    lines += ["", "Table 2. Losses, each at its chosen rate: test mean IoU (%), mean +- std over "
              "seeds", "", "| Training framework | Hyper Para. | lr | mIoU |", "|---|---|---|---|"]
    for name in TABLE2:
        if name in summary:
            row, params = row_of(name)
            lines.append(f"| {row} | {params} | {chosen[name]:g} | {cell(summary[name])} |")
    if any(name in summary for _, _, control, _ in TABLE3 for name in (control,)):
        lines += ["", "Table 3. What the gain is made of: LAD, the same temperature without a "
                  "neighbourhood (K = 1, weight_base = K's scale s_K) and z-scored cross-entropy "
                  "at that temperature (power 1), each at its chosen rate: test mean IoU (%), "
                  "mean +- std over seeds", "",
                  "| K | s_K | L^AD | no locality | z-scored CE |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {temperature(k):.3f} | " + " | ".join(
                  cell(summary.get(name)) for name in names) + " |"
                  for k, *names in TABLE3]
    differences = report["differences"]
    tested = any("p_holm" in d for d in differences.values())
    made = report.get("comparisons_made")
    holm_note = (f"; p: two-sided paired t-test, Holm: adjusted by Holm's method over the {made} "
                 "comparisons made (this table and the next)" if tested else "")
    if differences:
        seeds = max(d["seeds"] for d in differences.values())
        lines += ["", "Paired differences to softmax cross-entropy, seed by seed (same "
                  "initialisation and batches), in test mIoU points: each seed, the mean and "
                  "its 95 % t-interval" + holm_note, "",
                  "| Training framework | Hyper Para. | " +
                  " | ".join(f"seed {s}" for s in range(seeds)) + " | mean | 95 % interval |"
                  + (" p | Holm |" if tested else ""),
                  "|---|---|" + "---|" * (seeds + 2 + 2 * tested)]
        for name in compared(differences):
            row, params = row_of(name)
            lines.append(f"| {row} | {params} | " + _paired_cells(differences[name], tested))
    comparisons = report.get("comparisons") or {}
    if comparisons:
        seeds = max(d["seeds"] for d in comparisons.values())
        lines += ["", "Other paired comparisons, in test mIoU points: LAD against focal loss, "
                  "and each LAD against its no-locality control at the same temperature", "",
                  "| comparison | " + " | ".join(f"seed {s}" for s in range(seeds))
                  + " | mean | 95 % interval | p | Holm |", "|---|" + "---|" * (seeds + 4)]
        lines += [f"| {key} | " + _paired_cells(d, True) for key, d in comparisons.items()]
    per_class = report.get("per_class") or {}
    main = [n for n in ("ce", "focal", "lad-k5", "local0-k5") if n in per_class]
    if main and report.get("class_names"):
        names = report["class_names"]
        lines += ["", "Per-class test IoU (%) at the chosen rates, mean over seeds", "",
                  "| Training framework | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        lines += [f"| {name} | " + " | ".join(f"{v:.1f}" for v in per_class[name]) + " |"
                  for name in main]
    diverged = [r for r in report.get("runs", []) if r.get("diverged") is not None]
    if diverged:  # scored as they stood (train.py): a reader must see which
        lines += ["", "Runs whose loss stopped being finite, scored as they stood: " + "; ".join(
            f"{r['name']} lr {r['lr']:g} seed {r['seed']} at iteration {r['diverged']}"
            for r in diverged)]
    return "\n".join(lines)


def _tuning_seeds(report):
    """Which seeds chose the rates: every seed (older reports), or the first --tune-seeds."""
    tune, seeds = report.get("tune_seeds"), report.get("arguments", {}).get("seeds")
    if tune is None or tune == seeds:
        return "mean over seeds"
    first = "seed 0" if tune == 1 else f"mean over seeds 0 to {tune - 1}"
    return f"{first} (the other seeds train at the chosen rate only)"


def _paired_cells(d, tested):
    cells = " | ".join(f"{v:+.1f}" for v in d["values"]) + (
        f" | {d['mean']:+.1f} | [{d['low']:+.1f}, {d['high']:+.1f}] |")
    if tested:
        cells += f" {d.get('p', float('nan')):.3f} | {d.get('p_holm', float('nan')):.3f} |"
    return cells


def _zoom(axis, values):
    """Bars of scores some points apart: the axis from 10 below the lowest to 5 above the highest
    (within 0-100), not from 0."""
    if values:
        axis.set_ylim(max(0, min(values) - 10), min(100, max(values) + 5))


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
    labels.update({n: f"{kind} K={k}" for k, _, *controls in TABLE3
                   for n, kind in zip(controls, ("no loc.", "zCE"))})
    controls = [(k, names) for k, *names in TABLE3 if any(n in summary for n in names[1:])]
    panels = 4 if controls else 3
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), gridspec_kw=dict(
        width_ratios=(4, 2, 3, 4) if controls else (4, 2, 4)))
    if controls:  # Table 3: per K, LAD beside its controls at the same temperature
        axis, kinds = axes[2], ("L^AD", "no locality", "z-scored CE")
        for j, (kind, colour) in enumerate(zip(kinds, ("tab:blue", "tab:orange", "tab:green"))):
            xs = [i + (j - 1) * 0.27 for i, (_, names) in enumerate(controls)
                  if names[j] in summary]
            stats = [summary[names[j]] for _, names in controls if names[j] in summary]
            axis.bar(xs, [s["mean"] for s in stats], width=0.27, yerr=[s["std"] for s in stats],
                     capsize=3, color=colour, label=kind)
            for x, st in zip(xs, stats):
                axis.scatter([x] * len(st["values"]), st["values"], color="k", s=6)
        axis.set_xticks(range(len(controls)))
        axis.set_xticklabels([f"K={k}\ns_K={temperature(k):.2f}" for k, _ in controls],
                             fontsize=8)
        axis.set_ylabel("test mean IoU (%)")
        axis.set_title("Table 3: locality against temperature")
        axis.legend(fontsize=7, loc="lower right")
        _zoom(axis, [v for _, names in controls for n in names if n in summary
                     for v in summary[n]["values"]])
    for axis, names in ((axes[0], TABLE2), (axes[1], [n for n, _ in TABLE1])):
        names = [n for n in names if n in summary]
        stats = [summary[n] for n in names]
        axis.bar(range(len(names)), [s["mean"] for s in stats], yerr=[s["std"] for s in stats],
                 capsize=4, color=["tab:blue" if n.startswith("lad") else "tab:gray"
                                   for n in names])
        for i, s in enumerate(stats):
            axis.scatter([i] * len(s["values"]), s["values"], color="k", s=8)
        axis.set_xticks(range(len(names)))
        exponent = dict(TABLE1) if axis is axes[1] else {}
        axis.set_xticklabels([(f"k={exponent[n]:g}" if n in exponent else labels.get(n, n))
                              + f"\nlr {report['chosen_lr'][n]:g}" for n in names], fontsize=8)
        axis.set_ylabel("test mean IoU (%)")
        _zoom(axis, [v for st in stats for v in st["values"]])
    axes[0].set_title("Table 2: each loss at its chosen rate")
    axes[1].set_title("Table 1: LAD's exponent k (K=5)")
    names = compared(differences)
    for i, name in enumerate(names):
        d = differences[name]
        axes[-1].errorbar([i], [d["mean"]],
                          yerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]], fmt="o",
                          capsize=4, color="tab:blue" if name.startswith("lad") else "tab:gray")
        axes[-1].scatter([i] * len(d["values"]), d["values"], color="k", s=8)
    axes[-1].axhline(0, color="k", lw=0.8)
    axes[-1].set_xticks(range(len(names)))
    axes[-1].set_xticklabels([labels.get(n, "k=3") for n in names], fontsize=8, rotation=20)
    axes[-1].set_ylabel("minus CE, mIoU points")
    axes[-1].set_title("Paired differences to CE: mean, 95 % interval, seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def grid_of(name, lrs):
    """The rates ``name`` trains at: the whole grid for the losses of FINE, else every other
    rate of it (its ends included)."""
    if name in FINE or len(lrs) < 3:
        return list(lrs)
    coarse = lrs[::2]
    return coarse if coarse[-1] == lrs[-1] else coarse + [lrs[-1]]


def edge_step(grid, chosen):
    """The next rate beyond ``chosen`` where it is an end of ``grid`` (by the grid's ratio at
    that end), else None."""
    if len(grid) < 2 or grid[0] < chosen < grid[-1]:
        return None
    if chosen == grid[0]:
        return round(grid[0] * grid[0] / grid[1], 6)
    return round(grid[-1] * grid[-1] / grid[-2], 6)


class Runner:
    """Runs training cells (seed, config, rate), in this process or in ``--jobs`` worker
    processes of ``--threads`` torch threads each: every run is seeded, so the results do not
    depend on where or in which order it ran."""

    def __init__(self, args, train_set, splits, device):
        self.spec = (dict(iterations=args.iterations, batch=args.batch, width=args.width),
                     train_set, splits, str(device), args.threads)
        self.jobs = args.jobs

    def run(self, cells):
        """Results of (seed, config name, rate) cells, in the order they finish."""
        cells = [(seed, name, lr, *CONFIGS[name][:2]) for seed, name, lr in cells]
        if self.jobs <= 1:
            setup_worker(*self.spec)
            yield from map(run_cell, cells)
            return
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        with context.Pool(self.jobs, initializer=setup_worker, initargs=self.spec) as pool:
            yield from pool.imap_unordered(run_cell, cells)


def pilot(args, names, lrs, train_set, splits, device, data, environment):
    """--pilot N1,N2,...: each config at each rate of --lrs and each iteration count, seeds
    0 .. --seeds - 1, scored on the validation split only; reports each config's best
    validation mIoU per count and the first count after which no config gains a point."""
    counts = [int(v) for v in args.pilot.split(",")]
    best = {}
    for count in counts:
        args.iterations = count
        cells = [(seed, name, lr) for seed in range(args.seeds) for name in names for lr in lrs]
        runs = list(Runner(args, train_set, dict(val=splits["val"]), device).run(cells))
        for name in names:
            by_rate = {lr: statistics.fmean(100 * r["miou"]["val"] for r in runs
                                            if r["name"] == name and r["lr"] == lr) for lr in lrs}
            lr = max(by_rate, key=by_rate.get)
            best.setdefault(name, []).append((count, by_rate[lr], lr))
            print(f"pilot: {name} at {count} iterations: best validation mIoU {by_rate[lr]:.1f}"
                  f" (lr {lr:g})", flush=True)
    plateau = next((count for i, count in enumerate(counts[:-1])
                    if all(best[n][j][1] - best[n][i][1] < 1.0 for n in names
                           for j in range(i + 1, len(counts)))), None)
    lines = [f"Pilot ({data}, {args.seeds} seed(s), rates {', '.join(f'{v:g}' for v in lrs)}; "
             f"{environment['device']}, torch {environment['torch']}; "
             f"`{environment['command']}`): best validation mIoU (%) over the rates, and its rate",
             "", "| config | " + " | ".join(f"{c} it." for c in counts) + " |",
             "|---|" + "---|" * len(counts)]
    lines += [f"| {n} | " + " | ".join(f"{v:.1f} ({lr:g})" for _, v, lr in best[n]) + " |"
              for n in names]
    lines += ["", "Plateau: " + (f"{plateau} iterations (no config gains a point after)"
                                 if plateau else "not reached within the counts tried")]
    text = "\n".join(lines)
    print("\n" + text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem, n = out / f"pilot-{data}-{environment['date']}", 1
    while stem.with_suffix(".json").exists():  # a second pilot the same day keeps the first
        n += 1
        stem = out / f"pilot-{data}-{environment['date']}-{n}"
    stem.with_suffix(".json").write_text(json.dumps(dict(counts=counts, lrs=lrs, best=best,
                                                         plateau=plateau,
                                                         environment=environment), indent=1))
    stem.with_suffix(".md").write_text(text + "\n")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--tune-seeds", type=int,
                        help="seeds that train at every rate of a grid to choose it (the first "
                             "ones; default all); the other seeds train at the chosen rate only")
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--size", type=int, default=48, help="training and evaluation size")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=int, default=16, help="network width")
    parser.add_argument("--lrs", default="0.005,0.01,0.02,0.05,0.1,0.2,0.5",
                        help="comma-separated learning rates, each loss picks one (the losses "
                             "beside " + ", ".join(FINE) + " train at every other one)")
    parser.add_argument("--train-count", type=int, default=4096, help="procedural train samples")
    parser.add_argument("--val-count", type=int, default=256,
                        help="validation samples for the choice of rate (procedural; with --voc "
                             "the last ones of train.txt, held out of training)")
    parser.add_argument("--test-count", type=int, default=256, help="procedural test samples")
    parser.add_argument("--voc", help="a Pascal VOC directory (train.txt / val.txt splits)")
    parser.add_argument("--only", help="comma-separated configs, of: " + ", ".join(CONFIGS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="training runs at once, each in its own process of --threads")
    parser.add_argument("--grow", type=int, default=3,
                        help="steps a grid may grow by where a loss's chosen rate is on its edge")
    parser.add_argument("--pilot", metavar="N1,N2,...",
                        help="instead: the validation mIoU of each config at these iteration "
                             "counts, to find where training plateaus")
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings that run every step in seconds: "
                             + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--report", metavar="JSON", help="print the tables of saved results")
    parser.add_argument("--plot", metavar="PNG", help="with --report: draw its figure again")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", default=str(HERE / "runs"),
                       help="folder for the results (default examples/paper/runs, git-ignored)")
    where.add_argument("--save-reference", action="store_true",
                       help="write to examples/paper/results/, the results the README quotes")
    if "--quick" in argv:
        parser.set_defaults(**QUICK)  # flags given beside --quick still win
    args = parser.parse_args(argv)
    if args.plot and not args.report:
        parser.error("--plot draws the figure of --report's results: give --report JSON")
    if args.report:
        report = json.loads(Path(args.report).read_text())
        print(render(report))
        if args.plot:
            plot(report, args.plot)
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
    if args.pilot:
        return pilot(args, names, lrs, train_set, splits, device, data, environment)
    tune = args.seeds if args.tune_seeds is None else args.tune_seeds
    if not 1 <= tune <= args.seeds:
        parser.error(f"--tune-seeds must be in [1, --seeds = {args.seeds}], got {tune}")
    tuned = [n for n in names if n not in RATE_OF]
    grids = {name: grid_of(name, lrs) for name in tuned}
    start, runs = time.time(), []
    pool = Runner(args, train_set, splits, device)

    def run_all(cells):
        for result in pool.run(cells):
            runs.append(result)
            elapsed = time.time() - start
            print(f"[{len(runs)}] seed {result['seed']} {result['name']:12} lr {result['lr']:<6g} "
                  f"val {100 * result['miou']['val']:5.1f} test {100 * result['miou']['test']:5.1f}"
                  f"  ({result['seconds']:.0f} s; {elapsed / 60:.1f} min)", flush=True)

    run_all([(seed, name, lr) for seed in range(tune) for name in tuned for lr in grids[name]])
    # A rate chosen on an edge of its grid: the grid grows by one step that way, until it is not
    # (at most --grow steps per loss).
    for _ in range(args.grow):
        chosen = analyse(runs, tuned, tune)["chosen_lr"]
        grown = {name: edge_step(grids[name], chosen[name]) for name in tuned}
        grown = {name: lr for name, lr in grown.items() if lr is not None}
        if not grown:
            break
        for name, lr in grown.items():
            grids[name] = sorted(grids[name] + [lr])
            print(f"{name}: chosen rate {chosen[name]:g} on the edge of its grid, adding {lr:g}")
        run_all([(seed, name, lr) for seed in range(tune) for name, lr in grown.items()])
    chosen = analyse(runs, tuned, tune)["chosen_lr"]
    # The other seeds at the chosen rates, and the configs that borrow another's rate.
    run_all([(seed, name, chosen[name]) for seed in range(tune, args.seeds) for name in tuned]
            + [(seed, name, chosen[RATE_OF[name]]) for seed in range(args.seeds)
               for name in names if name in RATE_OF])
    runs.sort(key=lambda r: (r["seed"], names.index(r["name"]), r["lr"]))

    header = (f"{data}: {len(train_set)} training / {len(splits['val'])} validation / "
              f"{len(splits['test'])} test samples of {args.size}x{args.size}, {args.iterations} "
              f"iterations of batch {args.batch}, {args.seeds} seeds"
              + (f" (rates chosen on the first {tune})" if tune < args.seeds else "")
              + ", learning rates "
              f"{', '.join(f'{v:g}' for v in lrs)} (every other one for the losses beside "
              f"{', '.join(FINE)}); {environment['device']}, torch {environment['torch']}; "
              f"`{environment['command']}`")
    report = dict(header=header, environment=environment,
                  arguments={k: v for k, v in vars(args).items() if k != "out"},
                  lr_grid=lrs, lr_grids=grids, rate_of={n: RATE_OF[n] for n in names
                                                       if n in RATE_OF},
                  class_names=list(train_set.names), minutes=(time.time() - start) / 60,
                  tune_seeds=tune, **analyse(runs, names, tune), runs=runs)
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
