"""Networks used by the three papers, behind one interface.

Every network here has
    forward(x)  -> logits (B, num_classes)
    features(x) -> penultimate features (B, feat_dim), pooled
    classifier  -> the final nn.Linear, so forward(x) == classifier(features(x)) exactly
    feat_dim    -> int
and takes `in_channels` (1 or 3) and `num_classes` in its constructor. `build_model(name, ...)` is the
only way the rest of the code makes a network; `save_checkpoint` / `load_checkpoint` store it as a
plain dict {"arch", "num_classes", "in_channels", "state_dict", "args", "acc", ...}.

Nothing here knows about distillation.
"""

import os
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F


class Network(nn.Module):
    """Base class: subclasses define `features` and set `self.classifier` and `self.feat_dim`."""

    def forward(self, x):
        return self.classifier(self.features(x))


#### LeNet-5 (MNIST family; 32x32 input) ####
# The LeNet-5 / LeNet-5-half pair of DAFL, ZSKD and the balanced-transfer paper: three 5x5 convolutions
# (6, 16, 120 channels; half: 3, 8, 60), then fc 84 (half: 42) and the classifier.

class LeNet5(Network):
    def __init__(self, num_classes=10, in_channels=1, width=1.0):
        super().__init__()
        c1, c2, c3, f1 = (int(round(c * width)) for c in (6, 16, 120, 84))
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # (B, c1, 14, 14)
            nn.Conv2d(c1, c2, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),           # (B, c2, 5, 5)
            nn.Conv2d(c2, c3, 5), nn.ReLU(inplace=True),                            # (B, c3, 1, 1) at 32x32
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(c3, f1), nn.ReLU(inplace=True),
        )
        self.feat_dim = f1
        self.classifier = nn.Linear(f1, num_classes)

    def features(self, x):
        return self.body(x)


def lenet5(num_classes=10, in_channels=1):
    return LeNet5(num_classes, in_channels, width=1.0)


def lenet5_half(num_classes=10, in_channels=1):
    return LeNet5(num_classes, in_channels, width=0.5)


#### CIFAR-style ResNet (3x3 stem, no max-pool; any input size via adaptive pooling) ####

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(Network):
    def __init__(self, blocks_per_stage, num_classes=10, in_channels=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        stages, in_planes = [], 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks_per_stage)):
            for j in range(n):
                stages.append(BasicBlock(in_planes, planes, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feat_dim = 512
        self.classifier = nn.Linear(512, num_classes)

    def features(self, x):
        return self.pool(self.stages(self.stem(x)))  # (B, 512)


def resnet18(num_classes=10, in_channels=3):
    return ResNet((2, 2, 2, 2), num_classes, in_channels)


def resnet34(num_classes=10, in_channels=3):
    return ResNet((3, 4, 6, 3), num_classes, in_channels)


#### VGG with BatchNorm (CIFAR-style: one linear classifier on the pooled 512-d feature) ####

VGG_CONFIGS = {
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class VGG(Network):
    def __init__(self, config, num_classes=10, in_channels=3):
        super().__init__()
        layers, c = [], in_channels
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.feat_dim = c
        self.classifier = nn.Linear(c, num_classes)

    def features(self, x):
        return self.body(x)


def vgg13(num_classes=10, in_channels=3):
    return VGG(VGG_CONFIGS["vgg13"], num_classes, in_channels)


def vgg16(num_classes=10, in_channels=3):
    return VGG(VGG_CONFIGS["vgg16"], num_classes, in_channels)


#### AlexNet for 32x32 inputs (the ZSKD / DeGAN / balanced-transfer CIFAR-10 pair) ####
# Five convolutions (48, 128, 192, 192, 128 channels) with BatchNorm and three max-pools, then two hidden
# fully connected layers (512, 256); AlexNet-half halves every width. These are the widths of the
# CIFAR AlexNet in the zero-shot KD line of work that the balanced-transfer paper compares to.

class AlexNet(Network):
    def __init__(self, num_classes=10, in_channels=3, width=1.0):
        super().__init__()
        c1, c2, c3, c4, c5, f1, f2 = (int(round(c * width)) for c in (48, 128, 192, 192, 128, 512, 256))

        def conv(cin, cout, k):
            return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *conv(in_channels, c1, 5), nn.MaxPool2d(3, 2, 1),    # (B, c1, 16, 16)
            *conv(c1, c2, 5), nn.MaxPool2d(3, 2, 1),             # (B, c2, 8, 8)
            *conv(c2, c3, 3), *conv(c3, c4, 3), *conv(c4, c5, 3),
            nn.MaxPool2d(3, 2, 1),                               # (B, c5, 4, 4)
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(c5 * 16, f1), nn.BatchNorm1d(f1), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(f1, f2), nn.BatchNorm1d(f2), nn.ReLU(inplace=True),
        )
        self.feat_dim = f2
        self.classifier = nn.Linear(f2, num_classes)

    def features(self, x):
        return self.body(x)


def alexnet(num_classes=10, in_channels=3):
    return AlexNet(num_classes, in_channels, width=1.0)


def alexnet_half(num_classes=10, in_channels=3):
    return AlexNet(num_classes, in_channels, width=0.5)


#### Wide ResNet (depth, widen factor), pre-activation blocks ####

class WideBlock(nn.Module):
    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(F.relu(self.bn2(y)))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(Network):
    def __init__(self, depth, widen, num_classes=10, in_channels=3):
        super().__init__()
        assert (depth - 4) % 6 == 0, "WRN depth must be 6n+4"
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        layers, in_planes = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)], widths[0]
        for i, planes in enumerate(widths[1:]):
            for j in range(n):
                layers.append(WideBlock(in_planes, planes, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = planes
        layers += [nn.BatchNorm2d(in_planes), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.feat_dim = in_planes
        self.classifier = nn.Linear(in_planes, num_classes)

    def features(self, x):
        return self.body(x)


def wrn40_2(num_classes=10, in_channels=3):
    return WideResNet(40, 2, num_classes, in_channels)


def wrn16_2(num_classes=10, in_channels=3):
    return WideResNet(16, 2, num_classes, in_channels)


#### Registry and checkpoints ####

MODELS = {
    "lenet5": lenet5, "lenet5_half": lenet5_half,
    "resnet18": resnet18, "resnet34": resnet34,
    "vgg13": vgg13, "vgg16": vgg16,
    "alexnet": alexnet, "alexnet_half": alexnet_half,
    "wrn40_2": wrn40_2, "wrn16_2": wrn16_2,
}


def build_model(name, num_classes, in_channels):
    if name not in MODELS:
        raise ValueError(f"unknown architecture {name!r}; valid names: {', '.join(sorted(MODELS))}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels)


def _plain(value):
    """Make argparse values storable under torch.load(weights_only=True): only plain Python types."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def save_checkpoint(path, model, arch, num_classes, in_channels, args, acc, **extra):
    """Write {"arch", "num_classes", "in_channels", "state_dict", "args", "acc", **extra} atomically."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    args = vars(args) if hasattr(args, "__dict__") else (args or {})
    ckpt = {"arch": arch, "num_classes": int(num_classes), "in_channels": int(in_channels), "state_dict": state,
            "args": _plain(args), "acc": None if acc is None else float(acc), **_plain(extra)}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(ckpt, tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a checkpoint is meant to be shared
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half of one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_checkpoint(path, map_location="cpu"):
    """Rebuild the network stored by `save_checkpoint`. Returns (model, checkpoint dict)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a dfkd-lab checkpoint (torch.load failed: {e})") from e
    missing = [k for k in ("arch", "num_classes", "in_channels", "state_dict") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a dfkd-lab checkpoint: missing keys {missing} "
                         f"(expected a dict written by models.save_checkpoint)")
    model = build_model(ckpt["arch"], ckpt["num_classes"], ckpt["in_channels"])
    model.load_state_dict(ckpt["state_dict"])
    return model, ckpt
