"""YOLOv8-seg, the instance segmenter of FastSAM (Zhao et al., 2023; Jocher et al., YOLOv8).

    image (B, 3, H, W)
      -> backbone: Conv/C2f stages down to strides 8, 16, 32, then SPPF
      -> PAN neck: top-down (upsample + concat + C2f), bottom-up (strided Conv + concat + C2f)
      -> Segment head per level: box distribution (4 x 16 bins), class logits, 32 mask coefficients;
         Proto on the stride-8 map -> 32 prototypes at stride 4
    returns prediction (B, 4 + nc + 32, N) (cx, cy, w, h in input pixels, class scores, coefficients)
    and prototypes (B, 32, H/4, W/4); N = sum over strides s of (H/s)(W/s), levels in order 8, 16, 32.

Module names follow the released state dict (`model.<layer index>....`, as the layer list of
yolov8-seg numbers them), so a released checkpoint loads strictly. The definition is plain float32 math;
fused conv-BN, channels-last and reduced precision live in `segany.engine.fastsam`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

import torch
from torch import nn

# YOLOv8 sets these on every BatchNorm (they are module attributes, not in the state dict).
BN_EPS = 1e-3
BN_MOMENTUM = 0.03
STRIDES = (8, 16, 32)


@dataclass
class YoloSegConfig:
    """Channel widths and block depths of one YOLOv8-seg scale.

    widths: output channels of the stem convs and the stride-8/16/32 stages (layers 0, 1, 3, 5, 7).
    depths: bottlenecks in the C2f layers 2, 4, 6, 8 (backbone) and 12, 15, 18, 21 (neck).
    """

    widths: Tuple[int, int, int, int, int]
    depths: Tuple[int, int, int, int, int, int, int, int]
    num_classes: int = 1
    num_masks: int = 32
    proto_channels: int = 0  # 0: the P3 width (yolov8's rule)
    reg_max: int = 16
    name: str = ""

    @property
    def p3(self) -> int:
        return self.widths[2]

    @property
    def p4(self) -> int:
        return self.widths[3]

    @property
    def p5(self) -> int:
        return self.widths[4]

    @property
    def box_channels(self) -> int:
        return max(16, self.p3 // 4, self.reg_max * 4)

    @property
    def class_channels(self) -> int:
        return max(self.p3, min(self.num_classes, 100))

    @property
    def coef_channels(self) -> int:
        return max(self.p3 // 4, self.num_masks)

    @property
    def protos(self) -> int:
        return self.proto_channels or self.p3


# yolov8{n,s,m,l,x}-seg: width multiple x (64, 128, 256, 512, 1024) capped at max_channels,
# depth multiple x (3, 6, 6, 3; 3, 3, 3, 3) rounded up, at least 1.
def yolov8_seg_config(scale: str, num_classes: int = 1) -> YoloSegConfig:
    depth, width, max_channels = {
        "n": (0.33, 0.25, 1024),
        "s": (0.33, 0.50, 1024),
        "m": (0.67, 0.75, 768),
        "l": (1.00, 1.00, 512),
        "x": (1.00, 1.25, 512),
    }[scale]

    def w(c: int) -> int:
        c = min(c, max_channels) * width
        return int(-(-c // 8) * 8)  # round up to a multiple of 8

    def d(n: int) -> int:
        return max(round(n * depth), 1)

    return YoloSegConfig(
        widths=(w(64), w(128), w(256), w(512), w(1024)),
        depths=(d(3), d(6), d(6), d(3), d(3), d(3), d(3), d(3)),
        num_classes=num_classes,
        name=f"yolov8{scale}-seg",
    )


FASTSAM_CONFIGS: Dict[str, YoloSegConfig] = {
    "fastsam-s": yolov8_seg_config("s"),  # FastSAM-s.pt: yolov8s-seg, one class
    "fastsam-x": yolov8_seg_config("x"),  # FastSAM-x.pt: yolov8x-seg, one class
}


# ---------------------------------------------------------------------------------------- blocks


class Conv(nn.Module):
    """Conv2d (no bias, 'same' padding) -> BatchNorm -> SiLU."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Two 3x3 Convs, with a residual connection in the backbone (shortcut=True)."""

    def __init__(self, c: int, shortcut: bool) -> None:
        super().__init__()
        self.cv1 = Conv(c, c, 3)
        self.cv2 = Conv(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP block with two convolutions: split the 1x1 projection in halves, chain n bottlenecks on
    the second half, concatenate every intermediate output, project back with a 1x1 Conv."""

    def __init__(self, c_in: int, c_out: int, n: int, shortcut: bool) -> None:
        super().__init__()
        self.c = c_out // 2
        self.cv1 = Conv(c_in, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c_out, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ys = list(self.cv1(x).chunk(2, 1))  # 2 x (B, c, h, w)
        for block in self.m:
            ys.append(block(ys[-1]))
        return self.cv2(torch.cat(ys, 1))  # (B, (2 + n) c, h, w) -> (B, c_out, h, w)


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max-pools (receptive fields 5, 9, 13)."""

    def __init__(self, c_in: int, c_out: int, k: int = 5) -> None:
        super().__init__()
        hidden = c_in // 2
        self.cv1 = Conv(c_in, hidden, 1)
        self.cv2 = Conv(hidden * 4, c_out, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y0 = self.cv1(x)
        y1 = self.m(y0)
        y2 = self.m(y1)
        return self.cv2(torch.cat((y0, y1, y2, self.m(y2)), 1))


class Upsample(nn.Upsample):
    def __init__(self) -> None:
        super().__init__(scale_factor=2.0, mode="nearest")


class Concat(nn.Module):
    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(xs), 1)


class DFL(nn.Module):
    """Distribution focal loss integral: the expected bin (0..reg_max-1) of a softmax per box side.

    The weight is the fixed arange, stored in the state dict as a 1x1 conv (`dfl.conv.weight`)."""

    def __init__(self, reg_max: int = 16) -> None:
        super().__init__()
        self.reg_max = reg_max
        self.conv = nn.Conv2d(reg_max, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(reg_max, dtype=torch.float32).view(1, reg_max, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape  # (B, 4 * reg_max, A)
        probs = x.view(b, 4, self.reg_max, a).transpose(2, 1).softmax(1)  # (B, reg_max, 4, A)
        return self.conv(probs).view(b, 4, a)  # (B, 4, A): left, top, right, bottom in grid units


class Proto(nn.Module):
    """Mask prototypes: Conv 3x3, transposed-conv x2 upsample, Conv 3x3, Conv 1x1 -> num_masks maps."""

    def __init__(self, c_in: int, hidden: int, num_masks: int) -> None:
        super().__init__()
        self.cv1 = Conv(c_in, hidden, 3)
        self.upsample = nn.ConvTranspose2d(hidden, hidden, 2, 2, 0, bias=True)
        self.cv2 = Conv(hidden, hidden, 3)
        self.cv3 = Conv(hidden, num_masks, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(self.cv2(self.upsample(self.cv1(x))))


def _branch(c_in: int, hidden: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(Conv(c_in, hidden, 3), Conv(hidden, hidden, 3), nn.Conv2d(hidden, c_out, 1))


def make_anchors(shapes: Sequence[Tuple[int, int]], strides: Sequence[int], device, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Anchor points at cell centres (col + 0.5, row + 0.5), row-major per level: (A, 2), strides (A, 1)."""
    points, stride_list = [], []
    for (h, w), s in zip(shapes, strides):
        sx = torch.arange(w, device=device, dtype=dtype) + 0.5
        sy = torch.arange(h, device=device, dtype=dtype) + 0.5
        yy, xx = torch.meshgrid(sy, sx, indexing="ij")
        points.append(torch.stack((xx, yy), -1).view(-1, 2))
        stride_list.append(torch.full((h * w, 1), s, dtype=dtype, device=device))
    return torch.cat(points), torch.cat(stride_list)


def distances_to_xywh(dist: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(B, 4, A) left/top/right/bottom distances around (2, A) anchor points -> (B, 4, A) cx, cy, w, h."""
    lt, rb = dist.chunk(2, 1)
    x1y1 = anchors - lt
    x2y2 = anchors + rb
    return torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1)


class Segment(nn.Module):
    """Decoupled, anchor-free head: per level a box branch (cv2), a class branch (cv3) and a
    mask-coefficient branch (cv4); Proto on the stride-8 features."""

    def __init__(self, cfg: YoloSegConfig, channels: Sequence[int]) -> None:
        super().__init__()
        self.nc = cfg.num_classes
        self.nm = cfg.num_masks
        self.reg_max = cfg.reg_max
        self.strides = STRIDES
        self.cv2 = nn.ModuleList(_branch(c, cfg.box_channels, 4 * cfg.reg_max) for c in channels)
        self.cv3 = nn.ModuleList(_branch(c, cfg.class_channels, cfg.num_classes) for c in channels)
        self.dfl = DFL(cfg.reg_max)
        self.proto = Proto(channels[0], cfg.protos, cfg.num_masks)
        self.cv4 = nn.ModuleList(_branch(c, cfg.coef_channels, cfg.num_masks) for c in channels)

    def forward(self, feats: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.decode(*self.branches(feats))

    def branches(self, feats: List[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor], torch.Tensor]:
        """Per level: box + class maps (B, 4 * reg_max + nc, h, w) and coefficient maps (B, nm, h, w);
        prototypes (B, nm, H/4, W/4)."""
        raw = [torch.cat((self.cv2[i](f), self.cv3[i](f)), 1) for i, f in enumerate(feats)]
        coefs = [self.cv4[i](f) for i, f in enumerate(feats)]
        return raw, coefs, self.proto(feats[0])

    def decode(
        self, raw: List[torch.Tensor], coefs: List[torch.Tensor], protos: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Anchor-free decoding: DFL distances around cell centres, times the stride -> cx, cy, w, h."""
        b = raw[0].shape[0]
        shapes = [r.shape[2:] for r in raw]
        raw_all = torch.cat([r.reshape(b, 4 * self.reg_max + self.nc, -1) for r in raw], 2)  # (B, 4 * 16 + nc, A)
        coef_all = torch.cat([c.reshape(b, self.nm, -1) for c in coefs], 2)  # (B, nm, A)
        box, cls = raw_all.split((4 * self.reg_max, self.nc), 1)
        anchors, strides = make_anchors(shapes, self.strides, raw_all.device, raw_all.dtype)
        xywh = distances_to_xywh(self.dfl(box), anchors.transpose(0, 1).unsqueeze(0)) * strides.transpose(0, 1)
        return torch.cat((xywh, cls.sigmoid(), coef_all), 1), protos


class YoloV8Seg(nn.Module):
    """The 23-layer YOLOv8-seg network, layers named by their index as in the released files."""

    def __init__(self, cfg: YoloSegConfig) -> None:
        super().__init__()
        self.config = cfg
        c1, c2, c3, c4, c5 = cfg.widths
        n = cfg.depths
        self.model = nn.ModuleList(
            [
                Conv(3, c1, 3, 2),  # 0  P1/2
                Conv(c1, c2, 3, 2),  # 1  P2/4
                C2f(c2, c2, n[0], True),  # 2
                Conv(c2, c3, 3, 2),  # 3  P3/8
                C2f(c3, c3, n[1], True),  # 4
                Conv(c3, c4, 3, 2),  # 5  P4/16
                C2f(c4, c4, n[2], True),  # 6
                Conv(c4, c5, 3, 2),  # 7  P5/32
                C2f(c5, c5, n[3], True),  # 8
                SPPF(c5, c5),  # 9
                Upsample(),  # 10
                Concat(),  # 11 [10, 6]
                C2f(c5 + c4, c4, n[4], False),  # 12
                Upsample(),  # 13
                Concat(),  # 14 [13, 4]
                C2f(c4 + c3, c3, n[5], False),  # 15 out P3
                Conv(c3, c3, 3, 2),  # 16
                Concat(),  # 17 [16, 12]
                C2f(c3 + c4, c4, n[6], False),  # 18 out P4
                Conv(c4, c4, 3, 2),  # 19
                Concat(),  # 20 [19, 9]
                C2f(c4 + c5, c5, n[7], False),  # 21 out P5
                Segment(cfg, (c3, c4, c5)),  # 22
            ]
        )

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) RGB in [0, 1], H and W multiples of 32 -> prediction (B, 4+nc+nm, N), protos."""
        return self.model[22](self.features(x))

    def features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Backbone and PAN neck: the stride-8, 16 and 32 maps the head reads."""
        m = self.model
        x = m[1](m[0](x))
        p3 = m[4](m[3](m[2](x)))
        p4 = m[6](m[5](p3))
        p5 = m[9](m[8](m[7](p4)))
        top4 = m[12](m[11]([m[10](p5), p4]))  # top-down
        out3 = m[15](m[14]([m[13](top4), p3]))
        out4 = m[18](m[17]([m[16](out3), top4]))  # bottom-up
        out5 = m[21](m[20]([m[19](out4), p5]))
        return [out3, out4, out5]


# ------------------------------------------------------------------------- config from weights

_C2F_LAYERS = (2, 4, 6, 8, 12, 15, 18, 21)


def config_from_state_dict(sd: Mapping[str, torch.Tensor], name: str = "") -> YoloSegConfig:
    """The scale of a YOLOv8-seg state dict (released key names), read from its shapes."""
    try:
        widths = tuple(int(sd[f"model.{i}.conv.weight"].shape[0]) for i in (0, 1, 3, 5, 7))
        depths = []
        for layer in _C2F_LAYERS:
            prefix = f"model.{layer}.m."
            blocks = {k[len(prefix):].split(".", 1)[0] for k in sd if k.startswith(prefix)}
            depths.append(len(blocks))
        num_classes = int(sd["model.22.cv3.0.2.weight"].shape[0])
        num_masks = int(sd["model.22.proto.cv3.conv.weight"].shape[0])
        protos = int(sd["model.22.proto.cv1.conv.weight"].shape[0])
        reg_max = int(sd["model.22.dfl.conv.weight"].shape[1])
    except KeyError as exc:
        raise ValueError(f"not a YOLOv8-seg state dict: key {exc.args[0]!r} is missing") from None
    cfg = YoloSegConfig(
        widths=widths, depths=tuple(depths), num_classes=num_classes, num_masks=num_masks,
        proto_channels=protos, reg_max=reg_max,
    )
    cfg.name = name or scale_name(cfg)
    return cfg


def scale_name(cfg: YoloSegConfig) -> str:
    """'yolov8s-seg' etc. when the widths and depths are those of a standard scale, else 'custom'."""
    for scale in "nsmlx":
        ref = yolov8_seg_config(scale, cfg.num_classes)
        if ref.widths == cfg.widths and ref.depths == cfg.depths:
            return ref.name
    return "custom"


def build_yolov8_seg(cfg: YoloSegConfig) -> YoloV8Seg:
    return YoloV8Seg(cfg).eval()
