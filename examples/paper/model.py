"""A small DeepLab-style network: a strided backbone with atrous (dilated) convolutions, an
atrous spatial pyramid pooling head, and logits upsampled to the input, as the paper's
DeepLabV2 in miniature (output stride 4 instead of 8, no pretrained weights)."""

import torch
import torch.nn.functional as F
from torch import nn


def conv(cin, cout, kernel=3, stride=1, dilation=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding=dilation * (kernel // 2), dilation=dilation,
                  bias=False),
        nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """Parallel 1x1, three dilated 3x3 and an image-pooling branch, concatenated and projected."""

    def __init__(self, cin, cout, rates=(2, 4, 6)):
        super().__init__()
        self.branches = nn.ModuleList([conv(cin, cout, 1)] + [conv(cin, cout, 3, dilation=r)
                                                              for r in rates])
        self.pool = conv(cin, cout, 1)
        self.project = conv(cout * (len(rates) + 2), cout, 1)

    def forward(self, x):
        pooled = self.pool(F.adaptive_avg_pool2d(x, 1)).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class TinyDeepLab(nn.Module):
    """``forward(images) -> (logits, features)``: logits at the images' resolution; features
    are the ASPP head's output (stride 4), the layer before the classifier, for center loss."""

    def __init__(self, classes, width=24):
        super().__init__()
        self.backbone = nn.Sequential(
            conv(3, width, stride=2), conv(width, width),
            conv(width, 2 * width, stride=2), conv(2 * width, 2 * width),
            conv(2 * width, 2 * width, dilation=2), conv(2 * width, 2 * width, dilation=4))
        self.head = ASPP(2 * width, 2 * width)
        self.classifier = nn.Conv2d(2 * width, classes, 1)
        self.feature_dim = 2 * width

    def forward(self, images):
        features = self.head(self.backbone(images))
        logits = F.interpolate(self.classifier(features), size=images.shape[-2:],
                               mode="bilinear", align_corners=False)
        return logits, features
