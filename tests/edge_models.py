"""Today's edge CNNs, written as their papers define them, for the frontend's tests: a user's
MobileNetV3-Small (Howard et al. 2019, table 2, torchvision's head), EfficientNet-B0 (Tan and
Le 2019, table 1), a RegNetY (Radosavovic et al. 2020: Y blocks with group width and SE) and
ShuffleNetV2 (Ma et al. 2018: channel split, concatenation, channel shuffle).
``width`` scales every channel count (rounded to 8, as MobileNet does) and ``depth`` every
stage's repeats, so that the tests run in seconds; the structure is the published one."""
from math import ceil

import torch
import torch.nn.functional as F
from torch import nn


def div8(v: float) -> int:
    """MobileNet's channel rounding: to a multiple of 8, at least 8, at most 10 % down."""
    rounded = max(8, int(v + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * v else rounded


def conv_bn(cin, cout, k, s=1, act=None, groups=1) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, s, (k - 1) // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([act] if act is not None else []))


class SqueezeExcitation(nn.Module):
    """pool -> 1x1 -> act -> 1x1 -> gate, times the input."""

    def __init__(self, channels, squeeze, act, gate):
        super().__init__()
        self.fc1, self.act = nn.Conv2d(channels, squeeze, 1), act
        self.fc2, self.gate = nn.Conv2d(squeeze, channels, 1), gate

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


# ---------------------------------------------------------------- MobileNetV3-Small

# kernel, expanded, out, SE, hardswish, stride (the paper's table 2)
MOBILENET_V3_SMALL = [(3, 16, 16, True, False, 2), (3, 72, 24, False, False, 2),
                      (3, 88, 24, False, False, 1), (5, 96, 40, True, True, 2),
                      (5, 240, 40, True, True, 1), (5, 240, 40, True, True, 1),
                      (5, 120, 48, True, True, 1), (5, 144, 48, True, True, 1),
                      (5, 288, 96, True, True, 2), (5, 576, 96, True, True, 1),
                      (5, 576, 96, True, True, 1)]


class InvertedResidualV3(nn.Module):
    def __init__(self, cin, k, exp, cout, se, hs, s):
        super().__init__()
        act = nn.Hardswish if hs else nn.ReLU
        layers = [conv_bn(cin, exp, 1, act=act())] if exp != cin else []
        layers.append(conv_bn(exp, exp, k, s, act(), groups=exp))
        if se:
            layers.append(SqueezeExcitation(exp, div8(exp / 4), nn.ReLU(), nn.Hardsigmoid()))
        layers.append(conv_bn(exp, cout, 1))
        self.block = nn.Sequential(*layers)
        self.residual = s == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetV3Small(nn.Module):
    def __init__(self, num_classes=10, width=1.0):
        super().__init__()
        cin = div8(16 * width)
        layers = [conv_bn(3, cin, 3, 2, nn.Hardswish())]
        for k, exp, out, se, hs, s in MOBILENET_V3_SMALL:
            cout = div8(out * width)
            layers.append(InvertedResidualV3(cin, k, div8(exp * width), cout, se, hs, s))
            cin = cout
        last = div8(576 * width)
        layers.append(conv_bn(cin, last, 1, act=nn.Hardswish()))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        hidden = div8(1024 * width)
        self.classifier = nn.Sequential(nn.Linear(last, hidden), nn.Hardswish(inplace=True),
                                        nn.Dropout(0.2, inplace=True),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ---------------------------------------------------------------- EfficientNet-B0

# expand ratio, kernel, stride, out, repeats (the paper's table 1)
EFFICIENTNET_B0 = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                   (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]


class MBConv(nn.Module):
    def __init__(self, cin, ratio, k, s, cout):
        super().__init__()
        exp = cin * ratio
        layers = [conv_bn(cin, exp, 1, act=nn.SiLU())] if ratio != 1 else []
        layers += [conv_bn(exp, exp, k, s, nn.SiLU(), groups=exp),
                   SqueezeExcitation(exp, max(1, cin // 4), nn.SiLU(), nn.Sigmoid()),
                   conv_bn(exp, cout, 1)]
        self.block = nn.Sequential(*layers)
        self.residual = s == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


class EfficientNetB0(nn.Module):
    def __init__(self, num_classes=10, width=1.0, depth=1.0):
        super().__init__()
        cin = div8(32 * width)
        layers = [conv_bn(3, cin, 3, 2, nn.SiLU())]
        for ratio, k, s, out, repeats in EFFICIENTNET_B0:
            cout = div8(out * width)
            for i in range(ceil(repeats * depth)):
                layers.append(MBConv(cin, ratio, k, s if i == 0 else 1, cout))
                cin = cout
        last = div8(1280 * width)
        layers.append(conv_bn(cin, last, 1, act=nn.SiLU()))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2, inplace=True), nn.Linear(last, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


# ---------------------------------------------------------------- RegNetY

class YBlock(nn.Module):
    """1x1 -> 3x3 group conv (stride) -> SE (a quarter of the block's input width) -> 1x1,
    plus the shortcut (a strided 1x1 projection when the shape changes), then ReLU."""

    def __init__(self, cin, cout, s, group_width):
        super().__init__()
        self.a = conv_bn(cin, cout, 1, act=nn.ReLU(inplace=True))
        self.b = conv_bn(cout, cout, 3, s, nn.ReLU(inplace=True), groups=cout // group_width)
        self.se = SqueezeExcitation(cout, max(1, cin // 4), nn.ReLU(inplace=True), nn.Sigmoid())
        self.c = conv_bn(cout, cout, 1)
        self.proj = conv_bn(cin, cout, 1, s) if s != 1 or cin != cout else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        shortcut = x if self.proj is None else self.proj(x)
        return self.relu(shortcut + self.c(self.se(self.b(self.a(x)))))


class RegNetY(nn.Module):
    """RegNetY-200MF's stages: widths 24, 56, 152, 368, depths 1, 1, 4, 7, group width 8."""

    def __init__(self, num_classes=10, width=1.0, depth=1.0):
        super().__init__()
        cin = 32
        self.stem = conv_bn(3, cin, 3, 2, nn.ReLU(inplace=True))
        stages = []
        for w, d in zip((24, 56, 152, 368), (1, 1, 4, 7)):
            cout = div8(w * width)
            blocks = [YBlock(cin if i == 0 else cout, cout, 2 if i == 0 else 1, 8)
                      for i in range(ceil(d * depth))]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.trunk = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.trunk(self.stem(x)).mean((2, 3)))


# ---------------------------------------------------------------- ShuffleNetV2

def channel_shuffle(x, groups: int):
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batch, -1, height, width)


class ShuffleUnit(nn.Module):
    """Ma et al. 2018, figure 3 (c) and, with stride 2, (d): split the channels in two, one
    half through 1x1 -> 3x3 depthwise -> 1x1, concatenate, shuffle."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        half = cout // 2
        self.stride = stride
        if stride > 1:
            self.branch1 = nn.Sequential(conv_bn(cin, cin, 3, stride, groups=cin),
                                         conv_bn(cin, half, 1, act=nn.ReLU(inplace=True)))
        self.branch2 = nn.Sequential(
            conv_bn(cin if stride > 1 else half, half, 1, act=nn.ReLU(inplace=True)),
            conv_bn(half, half, 3, stride, groups=half),
            conv_bn(half, half, 1, act=nn.ReLU(inplace=True)))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 1.0x: stages of 4, 8, 4 units, widths 116, 232, 464, then 1024."""

    def __init__(self, num_classes=10, width=1.0, depth=1.0):
        super().__init__()
        cin = 24
        self.conv1 = conv_bn(3, cin, 3, 2, nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages = []
        for out, repeats in zip((116, 232, 464), (4, 8, 4)):
            cout = 2 * div8(out * width / 2)
            units = [ShuffleUnit(cin if i == 0 else cout, cout, 2 if i == 0 else 1)
                     for i in range(ceil(repeats * depth))]
            stages.append(nn.Sequential(*units))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.conv5 = conv_bn(cin, div8(1024 * width), 1, act=nn.ReLU(inplace=True))
        self.fc = nn.Linear(div8(1024 * width), num_classes)

    def forward(self, x):
        x = self.stages(self.maxpool(self.conv1(x)))
        return self.fc(self.conv5(x).mean([2, 3]))


# the test sizes: a quarter of the width (EfficientNet a third of the depth, RegNetY and
# ShuffleNetV2 half), 10 classes, 32 px
SIZE, CLASSES = 32, 10
MODELS = {"mobilenet_v3_small": lambda: MobileNetV3Small(CLASSES, width=0.25),
          "efficientnet_b0": lambda: EfficientNetB0(CLASSES, width=0.25, depth=0.34),
          "regnety": lambda: RegNetY(CLASSES, width=0.25, depth=0.5),
          "shufflenet_v2": lambda: ShuffleNetV2(CLASSES, width=0.25, depth=0.5)}


def model(name: str) -> torch.nn.Module:
    """The model with seeded weights and BN statistics of random images (as after training:
    activations, and so gradients, of order 1 at every depth)."""
    torch.manual_seed(0)
    net = MODELS[name]()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a cumulative average
    with torch.no_grad():
        net.train()(torch.randn(16, 3, SIZE, SIZE))
    return net.eval()


class Activations(nn.Module):
    """Every smooth or gated activation, as a module and as a function, in place too."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.hswish = nn.Hardswish()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.leaky = nn.LeakyReLU(0.1, inplace=True)
        self.pw = nn.Conv2d(8, 12, 1)
        self.silu = nn.SiLU()
        self.mix = nn.Conv2d(12, 12, 3, padding=1, bias=False)
        self.gate = nn.Hardsigmoid()
        self.last = nn.Conv2d(12, 10, 1)
        self.fc = nn.Linear(10, 3)

    def forward(self, x):
        x = self.hswish(self.stem_bn(self.stem(x)))
        x = self.leaky(self.dw(x))
        x = F.hardswish(self.silu(self.pw(x)))
        x = self.gate(self.mix(x))
        x = F.leaky_relu(self.last(x), 0.2).sigmoid()
        return self.fc(F.silu(x).mean((2, 3)))
