"""The headless forward pass: features, pooling and the pre-logits head; class names for labels."""

from __future__ import annotations

from typing import Any

import torch

from indexer.errors import InputError, ModelError

FORWARD = "forward_head(forward_features(x), pre_logits=True)"


GEM_P = 3.0
GEM_EPS = 1e-6


def embed_forward(
    model: Any, x: torch.Tensor, pooling: str, stage: int | None, logits: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The embedding computation a recipe names (see forward_name), and, if asked, the
    classifier's logits from the same trunk pass."""
    if stage is not None:
        final, maps = model.forward_intermediates(x, indices=[stage], intermediates_only=False)
        embedding = pool(maps[0], pooling)
    else:
        final = model.forward_features(x)
        embedding = (
            model.forward_head(final, pre_logits=True)
            if pooling == "head"
            else pool(final, pooling)
        )
    return embedding, (model.forward_head(final) if logits else None)


def class_names(label_set: str | None) -> list[str] | None:
    """Short class names (e.g. 'tench') of a timm ImageNet subset, or None when unknown."""
    if not label_set:
        return None
    from timm.data import ImageNetInfo

    info = ImageNetInfo(label_set)
    return [info.index_to_description(i).split(",")[0] for i in range(info.num_classes())]


def label_set_of(model: Any) -> str | None:
    from timm.data import infer_imagenet_subset

    subset = infer_imagenet_subset(model)
    return str(subset) if subset else None


def check_labels(model: Any, k: int, weights: dict[str, Any]) -> None:
    """--labels needs a real classifier: the model has one, and a checkpoint carried it."""
    if not k:
        return
    classes = int(getattr(model, "num_classes", 0) or 0)
    if classes == 0:
        raise ModelError("--labels needs a model with a classifier: this one has none")
    if weights["kind"] == "checkpoint" and not weights.get("head"):
        raise ModelError(
            f"--labels: checkpoint {weights['path']} has no classifier head for this model; "
            "its predictions would be random: pass a checkpoint with its head, or drop --labels"
        )
    if k > classes:
        raise InputError(f"--labels {k}: the classifier has {classes} classes")


def pool(fmap: torch.Tensor, pooling: str) -> torch.Tensor:
    """avg, max or GeM (p=3) over a feature map's positions: NCHW maps, or NLC token sequences."""
    dims = (2, 3) if fmap.ndim == 4 else (1,)
    if pooling == "avg":
        return fmap.mean(dims)
    if pooling == "max":
        return fmap.amax(dims)
    return fmap.float().clamp(min=GEM_EPS).pow(GEM_P).mean(dims).pow(1.0 / GEM_P)


def forward_name(pooling: str, stage: int | None) -> str:
    if stage is not None:
        return f"{pooling}(forward_intermediates(x, indices=[{stage}]))"
    return FORWARD if pooling == "head" else f"{pooling}(forward_features(x))"


def check_pooling(model: Any, pooling: str, stage: int | None) -> None:
    """InputError for a stage the model does not have, or a stage with --pooling head."""
    if stage is None:
        return
    if pooling == "head":
        raise InputError("--feature-stage pools a feature map: add --pooling avg, max or gem")
    stages = len(getattr(model, "feature_info", []) or [])
    if not 0 <= stage < stages:
        raise InputError(
            f"--feature-stage {stage}: this model has feature stages 0 to {stages - 1}"
        )
