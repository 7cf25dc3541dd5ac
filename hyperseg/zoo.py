"""The model zoo: the five official HyperSeg configurations, held as data.

Each entry reproduces the hyper-parameters of one configuration of the official implementation
(``configs/train/*.py`` of github.com/YuvalNirkin/hyperseg). ``build`` in ``hyperseg.model`` turns
an entry into a module; nothing here constructs layers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

# The three architecture versions behind the released checkpoints.
ARCHITECTURES = ("v1_0", "v1_0_unify", "v0_1")

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
CAMVID_CLASSES = (
    "Sky", "Building", "Column-Pole", "Road", "Sidewalk", "Tree", "Sign-Symbol", "Fence", "Car",
    "Pedestrian", "Bicyclist", "Void",
)
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

# The nominal image size of each EfficientNet variant. The official backbone computes its
# TensorFlow-"SAME" paddings once, for this size, and applies them to every input.
BACKBONE_NOMINAL_SIZE = {"tf_efficientnet_b1": 240, "tf_efficientnet_b3": 300}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build one HyperSeg model.

    Attributes:
        name: the zoo name (``hyperseg-m-cityscapes``...).
        arch: the official architecture version, one of ``ARCHITECTURES``.
        backbone: the timm model name of the backbone: the official EfficientNet (a key of
            ``BACKBONE_NOMINAL_SIZE``, with the official static padding) or any timm model with
            ``features_only`` feature maps at strides 2..32 (see ``with_backbone``).
        num_classes: number of output classes.
        input_size: the official inference resolution (H, W).
        context_levels: levels of the context head (``levels`` of the official config); the input
            sides must be multiples of ``32 * 2 ** (context_levels - 1)``.
        out_feat_scale: per backbone stage (strides 2..32), the factor applied to its channels by
            a 1x1 conv + BN reducer (1.0: no reducer).
        kernel_sizes: per decoder level, 1 (``MetaConv``) or 3 (``MetaInvertedResidual``).
        level_channels: per decoder level, its output channels; None (v0_1): the channels of the
            backbone feature it consumes.
        expand_ratio: expansion of the inverted-residual blocks.
        weight_groups: groups of each weight generator's 1x1 conv (one entry per generator, or one
            int for all).
        unify_level: v1_0_unify only: from decoder level ``unify_level - 1`` on, one shared weight
            generator serves all remaining levels.
        decoder_groups: groups of the kernel-1 patch-wise convolutions.
        mean, std: input normalisation of the dataset the model was trained on.
        class_names: names of the classes, when the class count is the dataset's (or those of the
            folder dataset the model was trained on).
        palette: one (R, G, B) colour per class, from a folder dataset's ``classes.json``;
            empty: the dataset's standard palette (``hyperseg.palettes.palette``).
        tta_hflip: flip test-time augmentation for pyramid (list) inputs, as the official model.
        tta_gather: how pyramid levels are merged, "mean" or "max".
        context_global_pool: v0_1 only: replace the coarsest context map by its global mean.
        coords_res: resolutions for which the official model caches coordinate buffers.
        official_config: the official configuration file this entry reproduces.
    """

    name: str
    arch: str
    backbone: str
    num_classes: int
    input_size: Tuple[int, int]
    dataset: str
    context_levels: int
    kernel_sizes: Tuple[int, ...]
    expand_ratio: float
    weight_groups: Union[int, Tuple[int, ...]]
    out_feat_scale: Tuple[float, ...] = (0.25, 0.25, 0.25, 0.25, 0.25)
    level_channels: Optional[Tuple[int, ...]] = None
    unify_level: Optional[int] = None
    decoder_groups: int = 1
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    class_names: Tuple[str, ...] = field(default=(), repr=False)
    palette: Tuple[Tuple[int, int, int], ...] = field(default=(), repr=False)
    tta_hflip: bool = True
    tta_gather: str = "mean"
    context_global_pool: bool = True
    coords_res: Tuple[Tuple[int, int], ...] = ()
    official_config: str = ""

    @property
    def levels(self) -> int:
        """Number of decoder levels."""
        return len(self.kernel_sizes)

    @property
    def size_divisor(self) -> int:
        """Input sides must be multiples of this (inputs are padded up to it)."""
        return 32 * 2 ** (self.context_levels - 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config fields: {unknown}")
        values = dict(data)
        for key in ("input_size", "kernel_sizes", "out_feat_scale", "level_channels", "mean", "std",
                    "class_names", "weight_groups"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        for key in ("coords_res", "palette"):
            if key in values:
                values[key] = tuple(tuple(r) for r in values[key])
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ValueError if the configuration cannot describe a model."""
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; expected one of {ARCHITECTURES}")
        if not isinstance(self.backbone, str) or not self.backbone:
            raise ValueError(f"backbone must be a timm model name, got {self.backbone!r}")
        if not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool) \
                or self.num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {self.num_classes!r}")
        if not 1 <= self.levels <= 6:
            raise ValueError(f"the decoder needs 1 to 6 levels, got {self.levels}")
        if any(k not in (1, 3) for k in self.kernel_sizes):
            raise ValueError(f"kernel_sizes must be 1 or 3, got {self.kernel_sizes}")
        if self.level_channels is not None and len(self.level_channels) != self.levels:
            raise ValueError("level_channels must have one entry per decoder level")
        if len(self.out_feat_scale) != 5:
            raise ValueError("out_feat_scale must have one entry per backbone stage (5)")
        groups = self.weight_groups if isinstance(self.weight_groups, tuple) else (self.weight_groups,)
        if not groups or any(not isinstance(g, int) or isinstance(g, bool) or g < 1 for g in groups):
            raise ValueError(f"weight_groups must be a positive int or a non-empty tuple of them, "
                             f"got {self.weight_groups!r}")
        needed = {"v1_0": self.levels, "v1_0_unify": self.unify_level or 1, "v0_1": 1}[self.arch]
        if isinstance(self.weight_groups, tuple) and len(groups) < needed:
            raise ValueError(f"weight_groups needs at least {needed} entries, got {self.weight_groups!r}")
        if self.tta_gather not in ("mean", "max"):
            raise ValueError(f"tta_gather must be 'mean' or 'max', got {self.tta_gather!r}")
        if self.context_levels < 1:
            raise ValueError("context_levels must be >= 1")
        if self.arch == "v0_1" and self.expand_ratio == 1 and 3 in self.kernel_sizes:
            raise ValueError("v0_1 inverted residuals without expansion (expand_ratio 1) are not supported")
        if self.arch == "v1_0_unify" and not (self.unify_level and 1 <= self.unify_level <= self.levels):
            raise ValueError("v1_0_unify needs 1 <= unify_level <= number of decoder levels")
        if self.palette and (len(self.palette) != self.num_classes or any(
                len(c) != 3 or any(not isinstance(v, int) or not 0 <= v <= 255 for v in c)
                for c in self.palette)):
            raise ValueError(f"palette must hold one (R, G, B) colour of 0..255 integers per "
                             f"class ({self.num_classes}), got {self.palette!r}")


_ZOO = {
    "hyperseg-m-cityscapes": ModelConfig(
        name="hyperseg-m-cityscapes", arch="v1_0", backbone="tf_efficientnet_b1", num_classes=19,
        input_size=(512, 1024), dataset="cityscapes", context_levels=2,
        out_feat_scale=(1.0, 0.25, 0.25, 0.25, 0.25), kernel_sizes=(1, 1, 1, 3, 3),
        level_channels=(64, 32, 16, 16, 16), expand_ratio=2, weight_groups=(32, 16, 8, 16, 4),
        class_names=CITYSCAPES_CLASSES, coords_res=((512, 512), (512, 1024)),
        official_config="cityscapes_efficientnet_b1_hyperseg-m"),
    "hyperseg-s-cityscapes": ModelConfig(
        name="hyperseg-s-cityscapes", arch="v1_0_unify", backbone="tf_efficientnet_b1",
        num_classes=19, input_size=(768, 1536), dataset="cityscapes", context_levels=2,
        out_feat_scale=(1.0, 0.166, 0.2, 0.25, 0.4), kernel_sizes=(1, 1, 1, 3, 3),
        level_channels=(32, 16, 8, 8, 8), expand_ratio=2, weight_groups=(32, 16, 8, 16, 4),
        unify_level=4, class_names=CITYSCAPES_CLASSES, coords_res=((768, 768), (768, 1536)),
        official_config="cityscapes_efficientnet_b1_hyperseg-s"),
    "hyperseg-s-camvid": ModelConfig(
        name="hyperseg-s-camvid", arch="v1_0", backbone="tf_efficientnet_b1", num_classes=12,
        input_size=(576, 768), dataset="camvid", context_levels=2, kernel_sizes=(1, 1, 1, 3, 3),
        level_channels=(64, 32, 16, 16, 16), expand_ratio=2, weight_groups=(64, 32, 32, 16, 8),
        class_names=CAMVID_CLASSES, coords_res=((576, 576), (576, 768)),
        official_config="camvid_efficientnet_b1_hyperseg-s"),
    "hyperseg-l-camvid": ModelConfig(
        name="hyperseg-l-camvid", arch="v1_0", backbone="tf_efficientnet_b1", num_classes=12,
        input_size=(768, 1024), dataset="camvid", context_levels=2,
        kernel_sizes=(1, 1, 1, 3, 3, 3), level_channels=(64, 32, 16, 16, 16, 16), expand_ratio=2,
        weight_groups=(64, 32, 32, 16, 8, 8), class_names=CAMVID_CLASSES,
        coords_res=((768, 768), (768, 1024)), official_config="camvid_efficientnet_b1_hyperseg-l"),
    "hyperseg-l-voc": ModelConfig(
        name="hyperseg-l-voc", arch="v0_1", backbone="tf_efficientnet_b3", num_classes=21,
        input_size=(512, 512), dataset="voc", context_levels=3, kernel_sizes=(1, 1, 3, 3, 3, 3),
        expand_ratio=2, weight_groups=16, mean=HALF, std=HALF, class_names=VOC_CLASSES,
        official_config="vocsbd_efficientnet_b3_hyperseg-l"),
}

# The official checkpoints: release v1.0 of github.com/YuvalNirkin/hyperseg publishes these files
# (hyperseg-l-camvid has none). HYPERSEG_WEIGHTS_URL replaces the base URL (a mirror, or a local
# server in the tests).
WEIGHTS_BASE_URL = "https://github.com/YuvalNirkin/hyperseg/releases/download/v1.0"
WEIGHTS_URL_ENV = "HYPERSEG_WEIGHTS_URL"


@dataclass(frozen=True)
class PretrainedWeights:
    """One official checkpoint: its file name in the release, and its SHA-256 once it has been
    seen (None: not yet recorded, so the download is not verified)."""
    file: str
    sha256: Optional[str] = None


PRETRAINED = {
    "hyperseg-m-cityscapes": PretrainedWeights("cityscapes_efficientnet_b1_hyperseg-m.pth"),
    "hyperseg-s-cityscapes": PretrainedWeights("cityscapes_efficientnet_b1_hyperseg-s.pth"),
    "hyperseg-s-camvid": PretrainedWeights("camvid_efficientnet_b1_hyperseg-s.pth"),
    "hyperseg-l-voc": PretrainedWeights("vocsbd_efficientnet_b3_hyperseg-l.pth"),
}

ALIASES = {
    "hyperseg-m": "hyperseg-m-cityscapes",
    "hyperseg-s": "hyperseg-s-cityscapes",
    "hyperseg-l": "hyperseg-l-voc",
}


def list_models(include_aliases: bool = True, pretrained: bool = False) -> list:
    """Names accepted by ``hyperseg.build``: the five zoo models, then the aliases; with
    ``pretrained=True`` only those with official weights (``build(name, pretrained=True)``)."""
    names = list(_ZOO)
    if include_aliases:
        names += list(ALIASES)
    if pretrained:
        names = [n for n in names if ALIASES.get(n, n) in PRETRAINED]
    return names


def pretrained_weights(name: str) -> PretrainedWeights:
    """The official checkpoint of the zoo model ``name`` (or an alias); ValueError when the model
    has none."""
    key = get_config(name).name
    if key not in PRETRAINED:
        have = ", ".join(list_models(include_aliases=False, pretrained=True))
        raise ValueError(f"{key} has no official pretrained weights (models that have: {have}); "
                         f"train it (hyperseg train) and pass the checkpoint with --weights PATH "
                         f"(hyperseg.build(name, weights=PATH))")
    return PRETRAINED[key]


def get_config(name: str, num_classes: Optional[int] = None) -> ModelConfig:
    """The zoo entry called ``name`` (or an alias), optionally with another class count."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    key = ALIASES.get(name, name)
    if key not in _ZOO:
        raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(list_models())}")
    config = _ZOO[key]
    if num_classes is not None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool):
            raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if num_classes != config.num_classes:
            config = dataclasses.replace(config, num_classes=num_classes, class_names=())
    return config


def with_backbone(config: ModelConfig, backbone: Optional[str]) -> ModelConfig:
    """``config`` over another timm backbone (None or the config's own: ``config`` itself).

    The HyperSeg context head and decoder are kept; the backbone's stage channels come from timm
    when the model is built. The result is named ``<zoo name>+<backbone>``.
    """
    if backbone is None or backbone == config.backbone:
        return config
    if not isinstance(backbone, str) or not backbone.strip():
        raise ValueError(f"backbone must be a timm model name, got {backbone!r}")
    base = config.name.split("+", 1)[0]
    return dataclasses.replace(config, backbone=backbone, name=f"{base}+{backbone}")


# Fields that define the network; two configs with equal fields build interchangeable models.
ARCHITECTURE_FIELDS = ("arch", "backbone", "num_classes", "context_levels", "out_feat_scale",
                       "kernel_sizes", "level_channels", "expand_ratio", "weight_groups",
                       "unify_level", "decoder_groups", "context_global_pool")


def architecture_differences(a: ModelConfig, b: ModelConfig, ignore=()) -> List[str]:
    """Names and values of the architecture fields in which ``a`` and ``b`` differ."""
    def norm(field, value):
        if field == "weight_groups" and not isinstance(value, (list, tuple)):
            return value
        if isinstance(value, (list, tuple)):
            return tuple(value)
        return value
    out = []
    for field in ARCHITECTURE_FIELDS:
        if field in ignore:
            continue
        va, vb = norm(field, getattr(a, field)), norm(field, getattr(b, field))
        if va != vb:
            out.append(f"{field}: {va!r} vs {vb!r}")
    return out
