"""Segmentation data for the comparison: a procedural data set shipped as code, and a reader for
a Pascal VOC directory.

The procedural set has five shape classes (disc, square, triangle, ring, cross) and background,
drawn on textured backgrounds, overlapping each other (later shapes occlude earlier ones), with
pixel noise and, as in VOC, a 255 "ignore" band on every boundary between labels. Each class has
a hue (72 degrees apart) jittered by +-30 degrees, with random saturation and brightness, so a
pixel's colour is a partial cue and its shape decides the rest: with random colours the small
network learned no shape but the disc in a CPU-minute of training. Sample i of a
set with seed s is a pure function of (s, i): the same data on every machine.
"""

import math
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = ("background", "disc", "square", "triangle", "ring", "cross")
IGNORE = 255
MEAN, STD = 0.5, 0.25


def _texture(gen, size, channels=3):
    """Smooth random texture in [0, 1]: noise at three scales, upsampled and summed."""
    out = torch.zeros(channels, size, size)
    for cells, amplitude in ((4, 0.5), (8, 0.3), (16, 0.2)):
        grid = torch.rand(1, channels, cells, cells, generator=gen)
        out += amplitude * F.interpolate(grid, size=(size, size), mode="bilinear",
                                         align_corners=False)[0]
    return out


def _hsv(hue, saturation, value):
    """An RGB colour (3, 1, 1) from hue in turns, saturation and value in [0, 1]."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + 6 * (hue % 1.0)) % 6
    rgb = value - value * saturation * torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return rgb.view(3, 1, 1)


def _shape_mask(kind, u, v):
    """Inside-test of a unit-size shape in its own rotated coordinates (u, v)."""
    r2 = u * u + v * v
    if kind == 1:
        return r2 < 1.0
    if kind == 2:
        return torch.maximum(u.abs(), v.abs()) < 0.8
    if kind == 3:
        return (v > -0.5) & (u.abs() < (1.0 - v) / math.sqrt(3.0))
    if kind == 4:
        return (r2 > 0.45) & (r2 < 1.0)
    return ((u.abs() < 0.3) & (v.abs() < 1.0)) | ((v.abs() < 0.3) & (u.abs() < 1.0))


def render(seed, size):
    """One sample: a normalised (3, size, size) float image and its (size, size) uint8 labels."""
    gen = torch.Generator().manual_seed(seed)
    colour = torch.rand(3, 1, 1, generator=gen)
    image = 0.6 * colour + 0.4 * _texture(gen, size)
    label = torch.zeros(size, size, dtype=torch.uint8)
    axis = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
        kind = int(torch.randint(1, len(SHAPES), (1,), generator=gen))
        cx, cy = (torch.rand(2, generator=gen) * 1.4 - 0.7).tolist()
        radius = 0.25 + 0.3 * float(torch.rand((), generator=gen))
        angle = 2 * math.pi * float(torch.rand((), generator=gen))
        dx, dy = (xx - cx) / radius, (yy - cy) / radius
        u = math.cos(angle) * dx + math.sin(angle) * dy
        v = -math.sin(angle) * dx + math.cos(angle) * dy
        mask = _shape_mask(kind, u, v)
        hue = (kind - 1) / (len(SHAPES) - 1) + (float(torch.rand((), generator=gen)) - 0.5) / 6
        saturation, value = (0.5 + 0.5 * torch.rand(2, generator=gen)).tolist()
        fill = 0.75 * _hsv(hue, saturation, value) + 0.25 * _texture(gen, size)
        image = torch.where(mask, fill, image)
        label[mask] = kind
    image = image + 0.05 * torch.randn(image.shape, generator=gen)
    boundary = torch.zeros_like(label, dtype=torch.bool)
    boundary[1:, :] |= label[1:, :] != label[:-1, :]
    boundary[:-1, :] |= label[1:, :] != label[:-1, :]
    boundary[:, 1:] |= label[:, 1:] != label[:, :-1]
    boundary[:, :-1] |= label[:, 1:] != label[:, :-1]
    label[boundary] = IGNORE
    return (image - MEAN) / STD, label


class Shapes:
    """``count`` procedural samples of ``size`` x ``size`` pixels; set ``seed`` apart for
    the training, validation and test splits. Each sample is rendered once and kept (about
    30 kB at 48 x 48), so that the many runs of one comparison do not render it again each
    time. Callers must not modify the tensors they get."""

    classes = len(SHAPES)
    names = SHAPES

    def __init__(self, count, size, seed):
        self.count, self.size, self.seed = count, size, seed
        self._rendered = {}

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        if index not in self._rendered:
            self._rendered[index] = render(self.seed * 1_000_003 + index, self.size)
        return self._rendered[index]


VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor")


class VOCSegmentation:
    """A Pascal VOC directory (``JPEGImages/``, ``SegmentationClass/`` palette PNGs,
    ``ImageSets/Segmentation/<split>.txt``), each sample centre-cropped (or padded: 0 for the
    image, 255 for the labels) to ``size`` x ``size``; ``ids`` takes a part of the split's
    images (a validation split held out of training). Needs Pillow."""

    classes = len(VOC_CLASSES)
    names = VOC_CLASSES

    def __init__(self, root, split, size, ids=None):
        self.root, self.size = Path(root), size
        self.ids = self.split_ids(root, split) if ids is None else list(ids)

    @staticmethod
    def split_ids(root, split):
        """The image names ``ImageSets/Segmentation/<split>.txt`` lists, in its order."""
        ids = (Path(root) / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        if not ids:
            raise ValueError(f"{root}: ImageSets/Segmentation/{split}.txt lists no image")
        return ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        from PIL import Image

        name = self.ids[index]
        rgb = Image.open(self.root / "JPEGImages" / f"{name}.jpg").convert("RGB")
        mask = Image.open(self.root / "SegmentationClass" / f"{name}.png")
        image = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        image = image.view(rgb.size[1], rgb.size[0], 3).permute(2, 0, 1).float() / 255
        label = torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8)
        label = label.view(mask.size[1], mask.size[0])
        return (fit(image, self.size, 0.0) - MEAN) / STD, fit(label, self.size, IGNORE)


def fit(tensor, size, fill):
    """Centre crop or pad the last two dimensions to size x size."""
    h, w = tensor.shape[-2:]
    out = torch.full(tensor.shape[:-2] + (size, size), fill, dtype=tensor.dtype)
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    oy, ox = max(0, (size - h) // 2), max(0, (size - w) // 2)
    ch, cw = min(h, size), min(w, size)
    out[..., oy:oy + ch, ox:ox + cw] = tensor[..., top:top + ch, left:left + cw]
    return out
