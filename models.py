"""Networks used by the three papers, behind one interface.

Every network here has
    forward(x)  -> logits (B, num_classes)
    features(x) -> penultimate features (B, feat_dim), pooled
    classifier  -> the final nn.Linear, so forward(x) == classifier(features(x)) exactly
    feat_dim    -> int
and takes `in_channels` (1 or 3) and `num_classes` in its constructor. `build_model(name, ...)` is
the only way the rest of the code makes a network; `save_checkpoint` / `load_checkpoint` store it as
a plain dict {"arch", "num_classes", "in_channels", "state_dict", "args", "acc", ...}.

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
# The LeNet-5 / LeNet-5-half pair of DAFL, ZSKD and the balanced-transfer paper: three 5x5
# convolutions (6, 16, 120 channels; half: 3, 8, 60), then fc 84 (half: 42) and the classifier.


class LeNet5(Network):
    def __init__(self, num_classes=10, in_channels=1, width=1.0, feat_dim=None):
        super().__init__()
        c1, c2, c3, f1 = (int(round(c * width)) for c in (6, 16, 120, 84))
        f1 = feat_dim or f1  # feat_dim: the last hidden layer's width, whatever the conv widths
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # (B, c1, 14, 14)
            nn.Conv2d(c1, c2, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # (B, c2, 5, 5)
            nn.Conv2d(c2, c3, 5),
            nn.ReLU(inplace=True),  # (B, c3, 1, 1) at 32x32
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(c3, f1),
            nn.ReLU(inplace=True),
        )
        self.feat_dim = f1
        self.classifier = nn.Linear(f1, num_classes)

    def features(self, x):
        return self.body(x)


def lenet5(num_classes=10, in_channels=1):
    return LeNet5(num_classes, in_channels, width=1.0)


def lenet5_half(num_classes=10, in_channels=1):
    return LeNet5(num_classes, in_channels, width=0.5)


def lenet5_half_f84(num_classes=10, in_channels=1):
    """LeNet-5-half with LeNet-5's 84 features: a student whose features are as wide as the
    teacher's, as in the papers' ResNet34 -> ResNet18 pairs (512 -> 512)."""
    return LeNet5(num_classes, in_channels, width=0.5, feat_dim=84)


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
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(Network):
    def __init__(self, blocks_per_stage, num_classes=10, in_channels=3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
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
    "vgg16": (
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        "M",
    ),
}


class VGG(Network):
    def __init__(self, config, num_classes=10, in_channels=3):
        super().__init__()
        layers, c = [], in_channels
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [
                    nn.Conv2d(c, v, 3, padding=1, bias=False),
                    nn.BatchNorm2d(v),
                    nn.ReLU(inplace=True),
                ]
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
# Five convolutions (48, 128, 192, 192, 128 channels) with BatchNorm and three max-pools, then two
# hidden fully connected layers (512, 256); AlexNet-half halves every width. These are the widths of
# the CIFAR AlexNet in the zero-shot KD line of work that the balanced-transfer paper compares to.


class AlexNet(Network):
    def __init__(self, num_classes=10, in_channels=3, width=1.0):
        super().__init__()
        c1, c2, c3, c4, c5, f1, f2 = (
            int(round(c * width)) for c in (48, 128, 192, 192, 128, 512, 256)
        )

        def conv(cin, cout, k):
            return [
                nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        self.body = nn.Sequential(
            *conv(in_channels, c1, 5),
            nn.MaxPool2d(3, 2, 1),  # (B, c1, 16, 16)
            *conv(c1, c2, 5),
            nn.MaxPool2d(3, 2, 1),  # (B, c2, 8, 8)
            *conv(c2, c3, 3),
            *conv(c3, c4, 3),
            *conv(c4, c5, 3),
            nn.MaxPool2d(3, 2, 1),  # (B, c5, 4, 4)
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(c5 * 16, f1),
            nn.BatchNorm1d(f1),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(f1, f2),
            nn.BatchNorm1d(f2),
            nn.ReLU(inplace=True),
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
        layers += [
            nn.BatchNorm2d(in_planes),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        ]
        self.body = nn.Sequential(*layers)
        self.feat_dim = in_planes
        self.classifier = nn.Linear(in_planes, num_classes)

    def features(self, x):
        return self.body(x)


def wrn40_2(num_classes=10, in_channels=3):
    return WideResNet(40, 2, num_classes, in_channels)


def wrn16_2(num_classes=10, in_channels=3):
    return WideResNet(16, 2, num_classes, in_channels)


#### CIFAR ResNet of the CRD benchmark (depth 6n+2, three stages) ####
# The teacher/student ResNets of the contrastive-representation-distillation (CRD, Tian et al. 2020)
# benchmark that KD3 Table 3 and HiDFD Table 3 reuse: a 3x3 stem with widths[0] channels, then three
# stages of n = (depth - 2) / 6 basic blocks with widths[1:] channels (strides 1, 2, 2).
# resnet110/116 use (16, 16, 32, 64); "x2" doubles every width; "x4" is CRD's (32, 64, 128, 256),
# i.e. a 2x wider stem and 4x wider stages. With 10 classes these give 1.73 M (resnet110), 7.41 M
# (resnet32x4) etc. as KD3 prints.


class CifarResNet(Network):
    def __init__(self, depth, widths, num_classes=10, in_channels=3):
        super().__init__()
        assert (depth - 2) % 6 == 0, "CIFAR ResNet depth must be 6n+2"
        n = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )  # (B, w0, 32, 32)
        blocks, in_planes = [], widths[0]
        for i, planes in enumerate(widths[1:]):
            for j in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = planes
        self.stages = nn.Sequential(*blocks)  # (B, w3, 8, 8) at 32x32
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feat_dim = in_planes
        self.classifier = nn.Linear(in_planes, num_classes)

    def features(self, x):
        return self.pool(self.stages(self.stem(x)))  # (B, w3)


def resnet8x4(num_classes=10, in_channels=3):
    return CifarResNet(8, (32, 64, 128, 256), num_classes, in_channels)


def resnet32x4(num_classes=10, in_channels=3):
    return CifarResNet(32, (32, 64, 128, 256), num_classes, in_channels)


def resnet110(num_classes=10, in_channels=3):
    return CifarResNet(110, (16, 16, 32, 64), num_classes, in_channels)


def resnet116(num_classes=10, in_channels=3):
    return CifarResNet(116, (16, 16, 32, 64), num_classes, in_channels)


def resnet110x2(num_classes=10, in_channels=3):
    return CifarResNet(110, (32, 32, 64, 128), num_classes, in_channels)


#### MobileNetV2 for CIFAR (the CRD benchmark's "MobileNetV2", width 0.5) ####
# Sandler et al. 2018 inverted residuals (1x1 expand by t -> 3x3 depthwise -> 1x1 linear projection,
# identity shortcut when shape is kept), at the CRD benchmark's CIFAR setting: width multiplier 0.5,
# expansion t = 6, a stride-2 3x3 stem and stride 1 in the second stage (total stride 16: 2x2 maps
# at 32x32), 1280-d last conv. As in CRD, the t = 1 block keeps its 1x1 expansion conv.

# (expansion t, channels c, blocks n, first stride s), Sandler et al. Table 2
MOBILENETV2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def conv_bn_relu(cin, cout, kernel, stride=1, groups=1):
    """Conv (no bias, 'same' padding for odd kernels) -> BatchNorm -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expansion):
        super().__init__()
        hidden = cin * expansion
        self.body = nn.Sequential(
            conv_bn_relu(cin, hidden, 1),  # expand
            conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),  # linear bottleneck (no ReLU)
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(Network):
    def __init__(self, num_classes=10, in_channels=3, width=0.5, last_channels=1280):
        super().__init__()
        c = int(32 * width)
        layers = [conv_bn_relu(in_channels, c, 3, stride=2)]  # (B, 16, 16, 16) at 32x32
        for t, channels, n, s in MOBILENETV2_STAGES:
            for j in range(n):
                layers.append(InvertedResidual(c, int(channels * width), s if j == 0 else 1, t))
                c = int(channels * width)
        layers += [
            conv_bn_relu(c, last_channels, 1),  # (B, 1280, 2, 2) at 32x32
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        ]
        self.body = nn.Sequential(*layers)
        self.feat_dim = last_channels
        self.classifier = nn.Linear(last_channels, num_classes)

    def features(self, x):
        return self.body(x)


def mobilenetv2(num_classes=10, in_channels=3):
    return MobileNetV2(num_classes, in_channels)


#### ShuffleNet V1 / V2 for CIFAR (the CRD benchmark's ShuffleV1 / ShuffleV2) ####
# Zhang et al. 2018 (V1: grouped 1x1 convs + channel shuffle, 3 groups, stages of 240/480/960
# channels with 4/8/4 units) and Ma et al. 2018 (V2: channel split + shuffle, 1.0x widths
# 116/232/464, 3/7/3 units, 1024-d last conv), at CRD's CIFAR setting: a 1x1 stem with 24 channels
# and no stem stride or max-pool, so the three stride-2 stages leave 4x4 maps at 32x32.


def channel_shuffle(x, groups):
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleV1Unit(nn.Module):
    """Bottleneck unit of ShuffleNet V1; a stride-2 unit concatenates an avg-pooled shortcut
    (Fig. 2c)."""

    def __init__(self, cin, cout, stride, groups, first_conv_groups):
        super().__init__()
        branch_out = cout - cin if stride == 2 else cout
        mid = branch_out // 4
        self.shuffle_groups = first_conv_groups
        self.conv1 = conv_bn_relu(cin, mid, 1, groups=first_conv_groups)
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid)
        )
        self.conv3 = nn.Sequential(
            nn.Conv2d(mid, branch_out, 1, groups=groups, bias=False), nn.BatchNorm2d(branch_out)
        )
        self.stride = stride

    def forward(self, x):
        out = self.conv3(self.conv2(channel_shuffle(self.conv1(x), self.shuffle_groups)))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(Network):
    def __init__(
        self,
        num_classes=10,
        in_channels=3,
        stage_channels=(240, 480, 960),
        units=(4, 8, 4),
        groups=3,
    ):
        super().__init__()
        layers, c = [conv_bn_relu(in_channels, 24, 1)], 24  # (B, 24, 32, 32)
        for i, (channels, n) in enumerate(zip(stage_channels, units)):
            for j in range(n):
                # Sec. 3.3: the very first pointwise conv is not grouped, its 24 input channels are
                # too few
                first_conv_groups = 1 if i == j == 0 else groups
                layers.append(
                    ShuffleV1Unit(c, channels, 2 if j == 0 else 1, groups, first_conv_groups)
                )
                c = channels
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]  # from (B, 960, 4, 4) at 32x32
        self.body = nn.Sequential(*layers)
        self.feat_dim = c
        self.classifier = nn.Linear(c, num_classes)

    def features(self, x):
        return self.body(x)


class ShuffleV2Unit(nn.Module):
    """ShuffleNet V2 unit (Fig. 3c): half the channels pass through, the other half go through
    1x1 -> 3x3 depthwise -> 1x1, then the halves are concatenated and shuffled."""

    def __init__(self, channels):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            conv_bn_relu(half, half, 1),
            nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False),
            nn.BatchNorm2d(half),
            conv_bn_relu(half, half, 1),
        )

    def forward(self, x):
        kept, processed = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([kept, self.branch(processed)], 1), 2)


class ShuffleV2Down(nn.Module):
    """ShuffleNet V2 down-sampling unit (Fig. 3d): both branches see all channels and halve the
    resolution."""

    def __init__(self, cin, cout):
        super().__init__()
        half = cout // 2
        self.left = nn.Sequential(
            nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False),
            nn.BatchNorm2d(cin),
            conv_bn_relu(cin, half, 1),
        )
        self.right = nn.Sequential(
            conv_bn_relu(cin, half, 1),
            nn.Conv2d(half, half, 3, 2, 1, groups=half, bias=False),
            nn.BatchNorm2d(half),
            conv_bn_relu(half, half, 1),
        )

    def forward(self, x):
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


class ShuffleNetV2(Network):
    def __init__(
        self,
        num_classes=10,
        in_channels=3,
        stage_channels=(116, 232, 464),
        units=(3, 7, 3),
        last_channels=1024,
    ):
        super().__init__()
        layers, c = [conv_bn_relu(in_channels, 24, 1)], 24  # (B, 24, 32, 32)
        for channels, n in zip(stage_channels, units):
            layers.append(ShuffleV2Down(c, channels))
            layers += [ShuffleV2Unit(channels) for _ in range(n)]
            c = channels
        layers += [
            conv_bn_relu(c, last_channels, 1),  # (B, 1024, 4, 4) at 32x32
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        ]
        self.body = nn.Sequential(*layers)
        self.feat_dim = last_channels
        self.classifier = nn.Linear(last_channels, num_classes)

    def features(self, x):
        return self.body(x)


def shufflenetv1(num_classes=10, in_channels=3):
    return ShuffleNetV1(num_classes, in_channels)


def shufflenetv2(num_classes=10, in_channels=3):
    return ShuffleNetV2(num_classes, in_channels)


#### Inception-v3 for 32x32 inputs (the balanced-transfer paper's CIFAR-100 teacher) ####
# Szegedy et al. 2016 (Fig. 5/6/7 modules, the widths of the reference ImageNet model:
# Mixed_5b..7c), adapted to 32x32 the way common CIFAR Inception-v3 implementations do: the stem
# keeps its five convolutions (32, 32, 64, 80, 192 channels) but drops both stride-2 steps and both
# max-pools, so only the two grid-reduction modules downsample (30 -> 14 -> 6). No auxiliary
# classifier, and no dropout before the classifier, so that features() is the deterministic pooled
# 2048-d vector in training as well.


class Concat(nn.Module):
    """Apply every branch to the same input and concatenate the results along channels."""

    def __init__(self, *branches):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        return torch.cat([branch(x) for branch in self.branches], 1)


def inception_conv(cin, cout, kernel, stride=1, padding=0):
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def inception_a(cin, pool_channels):
    """Fig. 5: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1; 224 + pool_channels outputs."""
    return Concat(
        inception_conv(cin, 64, 1),
        nn.Sequential(inception_conv(cin, 48, 1), inception_conv(48, 64, 5, padding=2)),
        nn.Sequential(
            inception_conv(cin, 64, 1),
            inception_conv(64, 96, 3, padding=1),
            inception_conv(96, 96, 3, padding=1),
        ),
        nn.Sequential(nn.AvgPool2d(3, 1, 1), inception_conv(cin, pool_channels, 1)),
    )


def inception_grid_reduction_a(cin):
    """Fig. 10 (35 -> 17 in the paper): stride-2 3x3 | 1x1-3x3-3x3/2 | maxpool; 480 + cin
    outputs."""
    return Concat(
        inception_conv(cin, 384, 3, stride=2),
        nn.Sequential(
            inception_conv(cin, 64, 1),
            inception_conv(64, 96, 3, padding=1),
            inception_conv(96, 96, 3, stride=2),
        ),
        nn.MaxPool2d(3, 2),
    )


def inception_c(cin, c7):
    """Fig. 6 with n = 7 (factorised 1x7 / 7x1 convolutions); 768 outputs."""
    return Concat(
        inception_conv(cin, 192, 1),
        nn.Sequential(
            inception_conv(cin, c7, 1),
            inception_conv(c7, c7, (1, 7), padding=(0, 3)),
            inception_conv(c7, 192, (7, 1), padding=(3, 0)),
        ),
        nn.Sequential(
            inception_conv(cin, c7, 1),
            inception_conv(c7, c7, (7, 1), padding=(3, 0)),
            inception_conv(c7, c7, (1, 7), padding=(0, 3)),
            inception_conv(c7, c7, (7, 1), padding=(3, 0)),
            inception_conv(c7, 192, (1, 7), padding=(0, 3)),
        ),
        nn.Sequential(nn.AvgPool2d(3, 1, 1), inception_conv(cin, 192, 1)),
    )


def inception_grid_reduction_b(cin):
    """The 17 -> 8 reduction of the reference model: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool; 512 +
    cin outputs."""
    return Concat(
        nn.Sequential(inception_conv(cin, 192, 1), inception_conv(192, 320, 3, stride=2)),
        nn.Sequential(
            inception_conv(cin, 192, 1),
            inception_conv(192, 192, (1, 7), padding=(0, 3)),
            inception_conv(192, 192, (7, 1), padding=(3, 0)),
            inception_conv(192, 192, 3, stride=2),
        ),
        nn.MaxPool2d(3, 2),
    )


def inception_e(cin):
    """Fig. 7 (expanded filter bank: parallel 1x3 and 3x1 after the 3x3 paths); 2048 outputs."""

    def split_1x3_3x1(c):
        return Concat(
            inception_conv(c, 384, (1, 3), padding=(0, 1)),
            inception_conv(c, 384, (3, 1), padding=(1, 0)),
        )

    return Concat(
        inception_conv(cin, 320, 1),
        nn.Sequential(inception_conv(cin, 384, 1), split_1x3_3x1(384)),
        nn.Sequential(
            inception_conv(cin, 448, 1), inception_conv(448, 384, 3, padding=1), split_1x3_3x1(384)
        ),
        nn.Sequential(nn.AvgPool2d(3, 1, 1), inception_conv(cin, 192, 1)),
    )


class InceptionV3(Network):
    def __init__(self, num_classes=100, in_channels=3):
        super().__init__()
        self.body = nn.Sequential(
            inception_conv(in_channels, 32, 3, padding=1),
            inception_conv(32, 32, 3, padding=1),
            inception_conv(32, 64, 3, padding=1),
            inception_conv(64, 80, 1),
            inception_conv(80, 192, 3),  # (B, 192, 30, 30)
            inception_a(192, 32),
            inception_a(256, 64),
            inception_a(288, 64),  # (B, 288, 30, 30)
            inception_grid_reduction_a(288),  # (B, 768, 14, 14)
            inception_c(768, 128),
            inception_c(768, 160),
            inception_c(768, 160),
            inception_c(768, 192),
            inception_grid_reduction_b(768),  # (B, 1280, 6, 6)
            inception_e(1280),
            inception_e(2048),  # (B, 2048, 6, 6)
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.feat_dim = 2048
        self.classifier = nn.Linear(2048, num_classes)

    def features(self, x):
        return self.body(x)


def inception_v3(num_classes=100, in_channels=3):
    return InceptionV3(num_classes, in_channels)


#### Registry and checkpoints ####

MODELS = {
    "lenet5": lenet5,
    "lenet5_half": lenet5_half,
    "lenet5_half_f84": lenet5_half_f84,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "vgg13": vgg13,
    "vgg16": vgg16,
    "alexnet": alexnet,
    "alexnet_half": alexnet_half,
    "wrn40_2": wrn40_2,
    "wrn16_2": wrn16_2,
    "wrn40x2": wrn40_2,  # HiDFD Table 3's name for WRN-40-2
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "resnet110": resnet110,
    "resnet116": resnet116,
    "resnet110x2": resnet110x2,
    "mobilenetv2": mobilenetv2,
    "shufflenetv1": shufflenetv1,
    "shufflenetv2": shufflenetv2,
    "inception_v3": inception_v3,
}


def build_model(name, num_classes, in_channels):
    if name not in MODELS:
        raise ValueError(f"unknown architecture {name!r}; valid names: {', '.join(sorted(MODELS))}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels)


def he_init(module):
    """He (Kaiming) initialisation of every convolution and linear layer of `module`, biases zero:
    each layer keeps the variance of its (ReLU) input, so features vary across images from the first
    step."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def _plain(value):
    """Make argparse values storable under torch.load(weights_only=True): only plain Python
    types."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def atomic_save(obj, path):
    """torch.save to a temporary file next to `path`, then rename: readers (and a run killed
    mid-write) see the old file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a checkpoint is meant to be shared
        os.replace(tmp, path)  # atomic on POSIX
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_checkpoint(path, model, arch, num_classes, in_channels, args, acc, **extra):
    """Write {"arch", "num_classes", "in_channels", "state_dict", "args", "acc", **extra}
    atomically."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    args = vars(args) if hasattr(args, "__dict__") else (args or {})
    ckpt = {
        "arch": arch,
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "state_dict": state,
        "args": _plain(args),
        "acc": None if acc is None else float(acc),
        **_plain(extra),
    }
    return atomic_save(ckpt, path)


def load_checkpoint(path, map_location="cpu"):
    """Rebuild the network stored by `save_checkpoint`. Returns (model, checkpoint dict)."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a dfkd-lab checkpoint (torch.load failed: {e})") from e
    missing = [
        k
        for k in ("arch", "num_classes", "in_channels", "state_dict")
        if not isinstance(ckpt, dict) or k not in ckpt
    ]
    if missing:
        raise ValueError(
            f"{path} is not a dfkd-lab checkpoint: missing keys {missing} "
            f"(expected a dict written by models.save_checkpoint)"
        )
    try:
        model = build_model(ckpt["arch"], ckpt["num_classes"], ckpt["in_channels"])
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, ValueError) as e:
        raise ValueError(
            f"{path}: its weights do not fit its header ({ckpt['arch']}, "
            f"{ckpt['num_classes']} classes, {ckpt['in_channels']} channels): "
            f"{str(e).splitlines()[0][:150]} — the file is damaged or "
            f"was not written by models.save_checkpoint"
        ) from None
    return model, ckpt
