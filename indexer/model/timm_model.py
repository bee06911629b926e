"""The timm model: create it, load its weights, resolve its data config, embed uint8 batches."""

from __future__ import annotations

import copy
import hashlib
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from indexer.config import PRECISIONS, DataConfig, ModelConfig, file_sha256
from indexer.errors import InputError, ModelError, WeightsUnavailableError
from indexer.hub import WEIGHTS_HINT, hub_unreachable_reason
from indexer.model.forward import (
    check_labels,
    check_pooling,
    class_names,
    embed_forward,
    forward_name,
    label_set_of,
)
from indexer.model.portable import Exported

log = logging.getLogger(__name__)
CACHE_FILENAMES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


class Embedder:
    """A headless model on a device that turns uint8 image batches into float32 embeddings."""

    name = "torch"  # the runtime, as run records name it

    def __init__(self, model: Any, recipe: dict[str, Any], device: torch.device) -> None:
        self.model = model.eval().to(device, memory_format=torch.channels_last)
        self.recipe = recipe
        self.device = device
        self.on_cuda = device.type == "cuda"
        self.data_config = DataConfig.from_dict(recipe["data_config"])
        self.normalize = bool(recipe["normalize"])
        self.pooling = str(recipe.get("pooling", "head"))
        self.stage: int | None = recipe.get("feature_stage")
        self.labels = int(recipe.get("labels") or 0)
        self._names = class_names(recipe.get("label_set"))
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(self.data_config.mean, device=device).view(shape) * 255.0
        self._std = torch.tensor(self.data_config.std, device=device).view(shape) * 255.0

    @property
    def dim(self) -> int:
        return int(self.recipe["embedding_dim"])

    def embed(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """uint8 [N,H,W,3] -> float32 [N,dim]: ToTensor+Normalize as timm does, then the forward.

        The NHWC batch is viewed as NCHW with channels-last strides, the layout the model runs.
        """
        return self.embed_with_labels(images, labels=False)[0]

    def embed_with_labels(
        self, images: torch.Tensor | np.ndarray, labels: bool = True
    ) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Embeddings and, per image, the classifier's top-K (label_index, label_name,
        label_prob), from the same forward pass (the head applied to the same features)."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = (x - self._mean) / self._std
        amp = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self.recipe["precision"] == "bf16"
            else nullcontext()
        )
        want = labels and self.labels > 0
        with torch.inference_mode(), amp:
            out, logits = embed_forward(self.model, x, self.pooling, self.stage, want)
        out = out.float().flatten(1)
        if self.normalize:
            out = torch.nn.functional.normalize(out, dim=1)
        rows = self._top(logits) if logits is not None else []
        return out.cpu().numpy(), rows

    def at_precision(self, precision: str) -> Embedder:
        """The same model (shared, not copied) computing in another precision."""
        other = copy.copy(self)
        other.recipe = {**self.recipe, "precision": precision}
        return other

    def portable_model(self, sample: np.ndarray | None, folder: Path) -> Exported:
        """This computation exported to folder/model.onnx, if it reproduces torch fp32 on the
        sample images; else nothing stored and the reason."""
        from indexer.model.export import export_portable

        return export_portable(self, sample, folder)

    def _top(self, logits: torch.Tensor) -> list[dict[str, Any]]:
        probs, indices = logits.float().softmax(-1).topk(self.labels, dim=-1)
        rows = []
        for p, i in zip(probs.cpu().tolist(), indices.cpu().tolist(), strict=True):
            names = [self._names[n] for n in i] if self._names else None
            rows.append({"label_index": i, "label_name": names, "label_prob": p})
        return rows


def load_embedder(cfg: ModelConfig) -> Embedder:
    """Create the model as configured and describe how its vectors are made (the recipe)."""
    device = resolve_device(cfg.device)
    model, weights = create_model(cfg)
    recipe = make_recipe(cfg, model, weights, resolve_precision(cfg.precision, device))
    return Embedder(model, recipe, device)


def embedder_from_recipe(recipe: dict[str, Any], device: str = "auto") -> Embedder:
    """Recreate exactly the model a collection was built with, or raise if it cannot be done."""
    from indexer.errors import RecipeMismatchError

    weights = recipe["weights"]
    kind = weights["kind"]
    checkpoint = Path(weights["path"]) if kind == "checkpoint" else None
    if checkpoint is not None:
        if not checkpoint.is_file():
            raise RecipeMismatchError(
                f"the collection was built with checkpoint {checkpoint}, which is gone: "
                "put it back at that path, or rebuild the collection"
            )
        if file_sha256(checkpoint) != weights["sha256"]:
            raise RecipeMismatchError(
                f"checkpoint {checkpoint} has changed since the collection was built "
                "(sha256 differs): restore the original file, or rebuild the collection"
            )
    cfg = ModelConfig(
        name=recipe["name"],
        pretrained=kind == "pretrained",
        checkpoint=checkpoint,
        seed=int(weights.get("seed", 0)),
        normalize=bool(recipe["normalize"]),
        device=device,
        pooling=recipe.get("pooling", "head"),
        feature_stage=recipe.get("feature_stage"),
        labels=int(recipe.get("labels") or 0),
    )
    model, _ = create_model(cfg)
    if state_sha256(model) != recipe["state_sha256"]:
        raise RecipeMismatchError(
            f"the weights of {recipe['name']} created here differ from those the collection "
            f"was built with (timm {recipe.get('timm_version')}, torch "
            f"{recipe.get('torch_version')}): install those versions, or rebuild the collection"
        )
    return Embedder(model, recipe, resolve_device(device))


def resolve_precision(name: str, device: torch.device) -> str:
    """auto: bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX), else float32."""
    if name not in PRECISIONS:
        raise InputError(f"unknown precision '{name}': use one of {', '.join(PRECISIONS)}")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16"
    from indexer.model.runtime_choice import cpu_has_native_bf16

    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"unknown device '{name}': use auto, cpu or cuda[:N]") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    return device


def create_model(cfg: ModelConfig) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model with its weights, and the weights' identity for the manifest."""
    import timm

    if not timm.is_model(cfg.name):
        raise InputError(
            f"unknown timm model '{cfg.name}': pick a name from timm.list_models(), "
            "e.g. --model resnet50.a1_in1k"
        )
    torch.manual_seed(cfg.seed)  # the classifier (and --no-pretrained) init is reproducible
    if cfg.checkpoint is not None:
        model = _timm_create(cfg.name, pretrained=False)
        head = load_checkpoint(model, cfg.checkpoint)
        weights: dict[str, Any] = {
            "kind": "checkpoint",
            "path": str(cfg.checkpoint.resolve()),
            "sha256": file_sha256(cfg.checkpoint),
            "head": head,
        }
    elif cfg.pretrained:
        model = create_pretrained(cfg.name)
        pcfg: dict[str, Any] = getattr(model, "pretrained_cfg", {})
        tag = f"{pcfg.get('architecture')}.{pcfg.get('tag')}" if pcfg.get("tag") else cfg.name
        weights = {"kind": "pretrained", "tag": tag, "hf_hub_id": pcfg.get("hf_hub_id")}
    else:
        model = _timm_create(cfg.name, pretrained=False)
        weights = {"kind": "random", "seed": cfg.seed}
    return model.eval(), weights


def _timm_create(name: str, pretrained: bool, **kwargs: Any) -> torch.nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as exc:
        raise ModelError(f"cannot create model '{name}': {type(exc).__name__}: {exc}") from exc


def create_pretrained(name: str) -> torch.nn.Module:
    """timm's normal pretrained path; offline, the local HF cache; else fail fast and say how."""
    from timm.models import get_pretrained_cfg

    pcfg = get_pretrained_cfg(name, allow_unregistered=False)
    if pcfg is None or not (pcfg.hf_hub_id or pcfg.url or pcfg.file):
        raise WeightsUnavailableError(
            f"timm has no pretrained weights for '{name}': pass --checkpoint FILE "
            "or --no-pretrained"
        )
    hint = WEIGHTS_HINT
    reason = (
        None if pcfg.file else hub_unreachable_reason(None if pcfg.hf_hub_id else str(pcfg.url))
    )
    if reason:
        cached = _cached_weights(pcfg.hf_hub_id)
        if cached is None:
            raise WeightsUnavailableError(
                f"pretrained weights for '{name}' cannot be fetched ({reason}): {hint}"
            )
        log.info("hub unreachable; using cached weights %s", cached)
        return _timm_create(name, pretrained=True, pretrained_cfg_overlay={"file": str(cached)})
    try:
        import timm

        return timm.create_model(name, pretrained=True)
    except Exception as exc:
        raise WeightsUnavailableError(
            f"pretrained weights for '{name}' cannot be fetched ({type(exc).__name__}): {hint}"
        ) from exc


def _cached_weights(hf_hub_id: str | None) -> Path | None:
    if not hf_hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    repo_id = hf_hub_id.split("@")[0]
    for filename in CACHE_FILENAMES:
        found = try_to_load_from_cache(repo_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors: .safetensors, or .pth/.bin/.pt loaded with weights_only=True."""
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist: check the path")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's refusal of pickled code is a paragraph: keep its gist
        gist = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        raise ModelError(
            f"cannot read checkpoint {path} ({type(exc).__name__}: {gist}): "
            "pass a .safetensors file or a .pth/.bin state dict of tensors"
        ) from exc
    for wrapper in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"checkpoint {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def classifier_prefix(model: torch.nn.Module) -> str | None:
    """The dotted name of the classifier module ('head.fc'), or None when there is none."""
    get_classifier = getattr(model, "get_classifier", None)
    classifier = get_classifier() if callable(get_classifier) else None
    if classifier is None or not any(True for _ in classifier.parameters()):
        return None
    for name, module in model.named_modules():
        if module is classifier:
            return name
    return None


def _is_classifier_key(key: str, prefix: str | None) -> bool:
    return prefix is not None and (key == prefix or key.startswith(prefix + "."))


def load_checkpoint(model: torch.nn.Module, path: Path) -> bool:
    """Load weights; the classifier may be absent or of another class count, nothing else may.
    Whether the classifier was loaded."""
    state = read_state_dict(path)
    prefix = classifier_prefix(model)
    own = model.state_dict()
    for key in [k for k in state if _is_classifier_key(k, prefix)]:
        if key in own and own[key].shape != state[key].shape:
            del state[key]  # a head for another number of classes: unused by embeddings
    unexpected = sorted(set(state) - set(own))
    missing = sorted(k for k in set(own) - set(state) if not _is_classifier_key(k, prefix))
    mismatched = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    if unexpected or missing or mismatched:
        bad = (missing or unexpected or mismatched)[:3]
        raise ModelError(
            f"checkpoint {path} does not fit model '{type(model).__name__}' "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} wrong-shape "
            f"keys, e.g. {bad}): pass the --model it was trained for"
        )
    model.load_state_dict(state, strict=False)
    return prefix is not None and any(_is_classifier_key(k, prefix) for k in state)


def make_recipe(
    cfg: ModelConfig, model: torch.nn.Module, weights: dict[str, Any], precision: str
) -> dict[str, Any]:
    """How every vector of a collection is made; query reproduces exactly this."""
    import timm
    from timm.data import resolve_model_data_config

    data_config = DataConfig.from_dict(resolve_model_data_config(model))
    check_pooling(model, cfg.pooling, cfg.feature_stage)
    check_labels(model, cfg.labels, weights)
    return {
        "name": cfg.name,
        "weights": weights,
        "state_sha256": state_sha256(model),
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
        "forward": forward_name(cfg.pooling, cfg.feature_stage),
        "pooling": cfg.pooling,
        "feature_stage": cfg.feature_stage,
        "labels": cfg.labels,
        "label_set": label_set_of(model) if cfg.labels else None,
        "precision": precision,
        "embedding_dim": _probe_dim(model, data_config, cfg.pooling, cfg.feature_stage),
        "normalize": cfg.normalize,
        "data_config": data_config.to_dict(),
    }


def _probe_dim(model: Any, data_config: DataConfig, pooling: str, stage: int | None) -> int:
    x = torch.zeros((1, *data_config.input_size))
    with torch.inference_mode():
        return int(embed_forward(model, x, pooling, stage)[0].flatten(1).shape[1])


def state_sha256(model: torch.nn.Module) -> str:
    """A fingerprint of the weights that shape embeddings (the classifier is left out)."""
    prefix = classifier_prefix(model)
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        if _is_classifier_key(key, prefix):
            continue
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
