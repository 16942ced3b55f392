"""One training run and its evaluation: SGD with momentum 0.9 and poly learning-rate decay, as in
the paper, random scale (0.5-1.5) and horizontal flip augmentation, mean IoU on a held-out
split."""

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from lad_triton import CenterLoss, focal_loss, locally_adaptive_loss

from .data import IGNORE
from .model import TinyDeepLab


@dataclass(frozen=True)
class Run:
    """One cell of the comparison: a loss, its hyper-parameters and a seed."""
    loss: str                 # "ce", "focal", "center" or "lad"
    seed: int
    kernel_size: int = 5      # LAD's K
    power: float = 3.0        # LAD's Minkowski k
    pooling: str = "minkowski"  # LAD's pooling of the costs: "minkowski", "lmp" or "topk"
    weight_base: float = 2.0  # LAD's window weight base (with K = 1: the temperature alone)
    iterations: int = 300
    batch: int = 8
    lr: float = 0.02
    width: int = 24


def batches(dataset, run, generator):
    """Endless training batches drawn with replacement, augmented: random scale in [0.5, 1.5]
    (images bilinear, labels nearest), then random crop or pad (labels padded with 255) back to
    the training size, and random horizontal flip."""
    size = dataset.size
    while True:
        index = torch.randint(0, len(dataset), (run.batch,), generator=generator).tolist()
        images, labels = zip(*(dataset[i] for i in index))
        images, labels = torch.stack(images), torch.stack(labels)
        scale = 0.5 + float(torch.rand((), generator=generator))
        new = max(8, int(round(size * scale)))
        images = F.interpolate(images, size=(new, new), mode="bilinear", align_corners=False)
        labels = F.interpolate(labels[:, None].float(), size=(new, new), mode="nearest")[:, 0]
        if new >= size:
            top, left = torch.randint(0, new - size + 1, (2,), generator=generator).tolist()
            images = images[..., top:top + size, left:left + size]
            labels = labels[..., top:top + size, left:left + size]
        else:
            top, left = torch.randint(0, size - new + 1, (2,), generator=generator).tolist()
            pad = (left, size - new - left, top, size - new - top)
            images, labels = F.pad(images, pad), F.pad(labels, pad, value=IGNORE)
        if float(torch.rand((), generator=generator)) < 0.5:
            images, labels = images.flip(-1), labels.flip(-1)
        yield images.contiguous(), labels.to(torch.uint8).contiguous()


def criterion_for(run, model, classes, device):
    """(loss(logits, features, labels), after_step(features, labels))."""
    if run.loss == "ce":
        return lambda logits, feats, y: F.cross_entropy(logits, y.long(), ignore_index=IGNORE), None
    if run.loss == "focal":
        return lambda logits, feats, y: focal_loss(logits, y, alpha=0.25, gamma=2.0), None
    if run.loss == "center":
        center = CenterLoss(classes, model.feature_dim, alpha=0.5, lambda_c=3e-4).to(device)

        def small(y, feats):  # the labels at the features' resolution
            return F.interpolate(y[:, None].float(), size=feats.shape[-2:],
                                 mode="nearest")[:, 0].to(torch.uint8)

        def loss(logits, feats, y):
            return (F.cross_entropy(logits, y.long(), ignore_index=IGNORE)
                    + center(feats, small(y, feats)))

        return loss, lambda feats, y: center.update(feats, small(y, feats))
    if run.loss == "lad":
        return (lambda logits, feats, y: locally_adaptive_loss(
            logits, y, kernel_size=run.kernel_size, power=run.power, pooling=run.pooling,
            weight_base=run.weight_base, ignore_index=IGNORE)), None
    raise ValueError(f"loss must be one of ('ce', 'focal', 'center', 'lad'), got {run.loss!r}")


@torch.no_grad()
def mean_iou(model, dataset, classes, device, batch=16):
    """Mean over classes of TP / (TP + FP + FN) on every non-ignored pixel of ``dataset``
    (classes absent from both prediction and truth are left out), and the per-class IoU."""
    model.eval()
    confusion = torch.zeros(classes, classes, dtype=torch.int64)
    for start in range(0, len(dataset), batch):
        images, labels = zip(*(dataset[i] for i in range(start, min(len(dataset),
                                                                   start + batch))))
        logits, _ = model(torch.stack(images).to(device))
        pred = logits.argmax(1).cpu().reshape(-1)
        truth = torch.stack(labels).reshape(-1).long()
        keep = truth != IGNORE
        confusion += torch.bincount(truth[keep] * classes + pred[keep],
                                    minlength=classes * classes).view(classes, classes)
    model.train()
    tp = confusion.diag().double()
    union = confusion.sum(0).double() + confusion.sum(1).double() - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), float("nan"))
    return float(iou[~iou.isnan()].mean()), iou.tolist()


def train_and_evaluate(run, train_set, eval_sets, device):
    """Train one model; its mean IoU on each of ``eval_sets`` ({split name: data set})."""
    torch.manual_seed(run.seed)
    generator = torch.Generator().manual_seed(run.seed)
    classes = train_set.classes
    model = TinyDeepLab(classes, run.width).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=run.lr, momentum=0.9, weight_decay=5e-4)
    poly = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: (1 - it / run.iterations) ** 0.9)
    loss_fn, after_step = criterion_for(run, model, classes, device)
    start, losses, diverged = time.time(), [], None
    data = batches(train_set, run, generator)
    for iteration in range(run.iterations):
        images, labels = next(data)
        images, labels = images.to(device), labels.to(device)
        logits, features = model(images)
        loss = loss_fn(logits, features, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        poly.step()
        if after_step is not None:
            after_step(features.detach(), labels)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            # A rate too high for the loss: the run stops and is scored as it stands (its
            # weights are no longer finite, so it predicts one class), so that the rate loses
            # the choice instead of ending the whole comparison.
            diverged = iteration
            break
    scores = {split: mean_iou(model, data, classes, device) for split, data in eval_sets.items()}
    return dict(asdict(run), miou={split: miou for split, (miou, _) in scores.items()},
                per_class_iou={split: iou for split, (_, iou) in scores.items()},
                seconds=time.time() - start, first_loss=losses[0],
                last_loss=sum(losses[-10:]) / len(losses[-10:]), diverged=diverged)


# A worker's data sets and settings (examples.paper's --jobs runs cells in spawned processes).
_WORKER = {}


def setup_worker(settings, train_set, splits, device, threads):
    if threads:
        torch.set_num_threads(threads)
    _WORKER.update(settings=settings, train_set=train_set, splits=splits,
                   device=torch.device(device))


def run_cell(cell):
    """One (seed, config name, rate, loss, loss overrides) cell, trained and evaluated."""
    seed, name, lr, loss, overrides = cell
    run = Run(loss, seed, lr=lr, **_WORKER["settings"], **overrides)
    return dict(train_and_evaluate(run, _WORKER["train_set"], _WORKER["splits"],
                                   _WORKER["device"]), name=name)
