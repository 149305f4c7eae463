"""open_clip models for feature extraction: resolving, probing, loading, and the demo's tiny model.

Every model goes through ``open_clip.create_model_and_transforms(name, pretrained=TAG_OR_PATH)``,
the path real weights take: ``ViT-L-14-quickgelu`` with ``openai`` (LMEye's default), any other
built-in architecture with a pretrained tag or a checkpoint file, or an architecture from a JSON
config in ``configs/models/`` (or a directory named in ``extract.model_config_dirs``).
``pretrained: null`` builds the architecture with random weights from a fixed seed (benchmarks).

**Where weights come from.** The driver never downloads a tag's weights: it reads the tag's
entry in open_clip's table (preprocessing, activation) and builds the model on the meta device.
Each model actor resolves the tag itself, through open_clip, into a cache on its own node
(``extract.weights_cache_dir``, else ``$LINGCLOUD_WEIGHTS_CACHE`` on that node, else open_clip's
default), so workers on other machines never see a path that exists only on the driver. A
checkpoint *file* must be readable at the same path on every node (shared storage); the driver
records its sha256 and every actor checks it before loading.

**Preprocessing and activation.** A tag brings its own preprocessing (mean/std, resize mode,
interpolation): open_clip applies it when the tag is passed as the tag, which is what both the
driver's probe and the actors do. A tag trained with QuickGELU on an architecture built with
GELU (``ViT-L-14`` + ``openai``) gives wrong features without an error: ``check_activation``
refuses it and names the ``-quickgelu`` architecture to use.

The model's own inference preprocessing is split in two at its ``ToTensor`` step: the PIL part
(resize, crop, RGB) runs in CPU tasks and ships ``uint8`` pixels, four times smaller than
float tensors; the tensor part (scale to [0, 1], normalise) runs next to the model. Both halves
are the model's own transforms, so the result is bit-identical to calling ``preprocess(img)``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np

TINY_MODEL = "lingcloud-tiny-vit"
DEMO_SEED = 0
REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_CONFIG_DIR = REPO_ROOT / "configs" / "models"

# extract.precision -> (open_clip create precision, autocast dtype name or None, input dtype name)
PRECISIONS = {
    "fp32": ("fp32", None, "float32"),
    "amp_bf16": ("fp32", "bfloat16", "float32"),
    "amp_fp16": ("fp32", "float16", "float32"),
    "bf16": ("bf16", None, "bfloat16"),
    "fp16": ("fp16", None, "float16"),
}

_registered: set[str] = set()


class ModelError(ValueError):
    """The configured model cannot be resolved; the message names the model and what to fix."""


def register_model_configs(extra_dirs: Iterable[str] = ()) -> None:
    """Make open_clip know the architectures in ``configs/models/`` and any extra directories."""
    import open_clip

    for d in [str(MODEL_CONFIG_DIR), *extra_dirs]:
        if d in _registered:
            continue
        if os.path.isdir(d) or os.path.isfile(d):
            open_clip.add_model_config(d)
        _registered.add(d)


def resolve_precision(precision: str, device: str) -> str:
    """``auto``: bf16 mixed precision on a GPU, fp32 on the CPU."""
    if precision == "auto":
        return "amp_bf16" if device.startswith("cuda") else "fp32"
    if precision not in PRECISIONS:
        raise ModelError(f"unknown precision {precision!r}; one of auto, {', '.join(PRECISIONS)}")
    return precision


WEIGHTS_CACHE_ENV = "LINGCLOUD_WEIGHTS_CACHE"


def tag_cfg(model: str, pretrained: Optional[str]) -> dict[str, Any]:
    """open_clip's table entry for (model, tag), or {} when ``pretrained`` is not a tag of ``model``."""
    if not pretrained:
        return {}
    import open_clip

    return dict(open_clip.get_pretrained_cfg(model.replace("/", "-"), pretrained))


def weights_cache_dir(configured: Optional[str] = None) -> Optional[str]:
    """Where this node caches a tag's weights: the config, else $LINGCLOUD_WEIGHTS_CACHE here, else None
    (open_clip's default: ~/.cache/clip, or the HF hub cache). Evaluated on the node that loads."""
    return configured or os.environ.get(WEIGHTS_CACHE_ENV) or None


def resolve_checkpoint(model: str, pretrained: Optional[str]) -> Optional[str]:
    """The checkpoint file ``pretrained`` names, or None for a tag or random init (nothing is downloaded)."""
    if not pretrained:
        return None
    if tag_cfg(model, pretrained):
        return None
    if os.path.isfile(pretrained):
        return pretrained
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(model.replace("/", "-"))
    raise ModelError(
        f"extract.pretrained {pretrained!r} is neither a file nor a pretrained tag of {model}"
        + (f" (tags: {', '.join(tags)})" if tags else "")
    )


def check_activation(model: str, pretrained: Optional[str], key: str = "extract.model") -> None:
    """Refuse a tag whose weights were trained with another activation than the architecture's.

    open_clip only warns (``QuickGELU mismatch``) and the features are silently wrong: the
    ``openai`` weights were trained with QuickGELU, plain ``ViT-L-14`` is built with GELU.
    ``key`` is the config key the message names (the extract stage's, or the IPN's ``model.clip_model``).
    """
    import open_clip

    cfg = tag_cfg(model, pretrained)
    arch = open_clip.get_model_config(model.replace("/", "-")) or {}
    if not cfg or bool(cfg.get("quick_gelu", False)) == bool(arch.get("quick_gelu", False)):
        return
    name = model.replace("/", "-")
    if cfg.get("quick_gelu"):
        fix = f"{name}-quickgelu"
        why = f"the {pretrained!r} weights were trained with QuickGELU, {name} is built with GELU"
    else:
        fix = name.removesuffix("-quickgelu")
        why = f"the {pretrained!r} weights were trained with GELU, {name} is built with QuickGELU"
    raise ModelError(f"{key} {model!r} with pretrained {pretrained!r}: {why}; use {key}={fix}")


RANDOM_INIT = "none (random init"  # how a features table records random weights (pipelines.extract)


def table_clip(metadata: dict[str, str]) -> tuple[Optional[str], Optional[str]]:
    """(open_clip model, pretrained tag or checkpoint file, None for random weights) of the CLIP
    that made a features table, as its metadata records them; (None, None) when it names none."""
    model = metadata.get("model") or None
    pretrained = metadata.get("pretrained") or None
    if pretrained is not None and pretrained.startswith(RANDOM_INIT):
        pretrained = None
    return model, pretrained


def text_context_length(model: str) -> int:
    """Tokens the text tower of ``model`` takes (its config's ``text_cfg.context_length``; open_clip's default 77)."""
    import open_clip

    cfg = open_clip.get_model_config(model.replace("/", "-")) or {}
    return int(cfg.get("text_cfg", {}).get("context_length", 77))


def weights_id(model: str, pretrained: Optional[str], checkpoint_sha256: str, seed: int) -> str:
    """What identifies the weights in the table's content config: a file's sha256, or the tag and its source."""
    if checkpoint_sha256:
        return f"sha256:{checkpoint_sha256}"
    cfg = tag_cfg(model, pretrained)
    if cfg:
        return f"open_clip:{model}/{pretrained} ({cfg.get('hf_hub') or cfg.get('url') or cfg.get('file', '')})"
    return f"random-init:seed={seed}"


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    import fsspec

    h = hashlib.sha256()
    with fsspec.open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class ModelSpec:
    """What the driver knows about the model before any worker loads it."""

    model: str
    pretrained: Optional[str]  # tag or path as configured (None: random init)
    checkpoint: Optional[str]  # the checkpoint file (every node reads it); None for a tag or random init
    checkpoint_sha256: str  # "" for a tag (resolved on each node) or random init
    seed: int
    image_size: tuple[int, int]
    embed_dim: int
    token_shape: Optional[tuple[int, int]]  # (tokens, width) of the visual tower's token output
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tag_preprocess(model: str, pretrained: Optional[str]) -> dict[str, Any]:
    """The preprocessing a tag brings (mean, std, interpolation, resize mode, ...), as open_clip applies it."""
    from open_clip.transform import PreprocessCfg

    keys = set(PreprocessCfg.__dataclass_fields__) - {"size"}
    return {k: v for k, v in tag_cfg(model, pretrained).items() if k in keys and v is not None}


def probe_model(
    model: str,
    pretrained: Optional[str] = None,
    *,
    seed: int = 0,
    config_dirs: Iterable[str] = (),
    with_checksum: bool = True,
) -> ModelSpec:
    """Shapes and preprocessing of a model without materialising weights (built on the meta device)."""
    import open_clip
    import torch

    register_model_configs(config_dirs)
    if open_clip.get_model_config(model.replace("/", "-")) is None and not model.startswith(("hf-hub:", "local-dir:")):
        raise ModelError(
            f"extract.model {model!r}: no such open_clip architecture (add its JSON to configs/models/ "
            f"or extract.model_config_dirs); e.g. ViT-L-14, ViT-B-32, {TINY_MODEL}"
        )
    checkpoint = resolve_checkpoint(model, pretrained)
    check_activation(model, pretrained)
    sha = file_sha256(checkpoint) if checkpoint and with_checksum else ""
    with torch.device("meta"), quiet_open_clip():
        m = open_clip.create_model(model, pretrained=None, device="meta", force_preprocess_cfg=tag_preprocess(model, pretrained))
    visual = m.visual
    size = tuple(visual.preprocess_cfg["size"]) if isinstance(visual.preprocess_cfg["size"], (tuple, list)) else (visual.preprocess_cfg["size"],) * 2
    token_shape = None
    x = torch.zeros(1, 3, *size, device="meta")
    with torch.no_grad():
        if hasattr(visual, "output_tokens"):
            visual.output_tokens = True
            out = visual(x)
            if isinstance(out, tuple) and out[1] is not None and out[1].dim() == 3:
                token_shape = (int(out[1].shape[1]), int(out[1].shape[2]))
            pooled = out[0] if isinstance(out, tuple) else out
        else:
            pooled = visual(x)
    return ModelSpec(
        model=model,
        pretrained=pretrained,
        checkpoint=checkpoint,
        checkpoint_sha256=sha,
        seed=seed,
        image_size=(int(size[0]), int(size[1])),
        embed_dim=int(pooled.shape[-1]),
        token_shape=token_shape,
        preprocess_cfg=dict(visual.preprocess_cfg),
    )


class quiet_open_clip:
    """open_clip logs a WARNING for every random init; that is intended here, so hide it."""

    def __enter__(self):
        self.logger = logging.getLogger()
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def build_transform(preprocess_cfg: dict[str, Any]) -> Callable:
    """The model's inference transform from its preprocess config (what create_model_and_transforms returns)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)


def split_transform(transform: Callable) -> tuple[Callable, list[Callable]]:
    """Split a torchvision Compose at its ToTensor step: (PIL part, tensor-part transforms).

    The tensor part expects a float tensor scaled to [0, 1]; every step in it must accept a batch
    (NCHW), which holds for torchvision's Normalize. Raises ModelError for a transform that
    cannot be split (then the whole transform has to run in the CPU tasks).
    """
    from torchvision.transforms import Compose, Normalize, ToTensor

    steps = list(getattr(transform, "transforms", []))
    at = next((i for i, t in enumerate(steps) if isinstance(t, ToTensor)), None)
    if at is None or not all(isinstance(t, Normalize) for t in steps[at + 1 :]):
        raise ModelError(f"cannot split preprocessing {transform!r} at ToTensor")
    return Compose(steps[:at]), steps[at + 1 :]


def to_pixels(pil_part: Callable, img, size: tuple[int, int]) -> np.ndarray:
    """Run the PIL half of the transform; returns HxWx3 uint8 (the input of ToTensor)."""
    out = pil_part(img)
    arr = np.asarray(out)
    if arr.dtype != np.uint8 or arr.shape != (size[0], size[1], 3):
        raise ValueError(f"preprocessing gave {arr.dtype} {arr.shape}, expected uint8 {(size[0], size[1], 3)}")
    return arr


def pixels_to_tensor(pixels, tensor_steps: list[Callable], device: str = "cpu"):
    """NHWC uint8 (numpy or torch) -> normalised NCHW float32, exactly as ToTensor + Normalize would."""
    import warnings

    import torch

    with warnings.catch_warnings():  # read-only Arrow memory: it is only read (converted) here
        warnings.simplefilter("ignore", UserWarning)
        x = torch.as_tensor(pixels)
    x = x.to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).to(torch.float32).div(255)
    for step in tensor_steps:
        x = step(x)
    return x


class TextTower:
    """A CLIP model's text tower and its tokenizer (extract.text_embeddings): captions ->
    L2-normalised embeddings, exactly as open_clip's ``encode_text(normalize=True)``."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def __call__(self, captions: list[str], device: str = "cpu"):
        return self.model.encode_text(self.tokenizer(captions).to(device), normalize=True)


def load_towers(
    model: str,
    pretrained: Optional[str],
    *,
    device: str = "cpu",
    precision: str = "fp32",
    seed: int = 0,
    config_dirs: Iterable[str] = (),
    output_tokens: bool = False,
    cache_dir: Optional[str] = None,
    text: bool = False,
):
    """Load a model through open_clip: (visual tower, preprocess, TextTower or None).

    The text tower is kept only with ``text=True``. ``pretrained`` is passed as given: a tag is
    resolved by open_clip here, into ``cache_dir`` (None: open_clip's default), with the tag's own
    preprocessing; a file is loaded from its path.
    """
    import open_clip
    import torch

    register_model_configs(config_dirs)
    check_activation(model, pretrained)
    create_precision = PRECISIONS[precision][0]
    torch.manual_seed(seed)  # random init (pretrained: null) is the same on every worker
    with quiet_open_clip():
        m, _, preprocess = open_clip.create_model_and_transforms(
            model, pretrained=pretrained or None, device=device, precision=create_precision, cache_dir=cache_dir
        )
    m.eval()
    visual = m.visual
    if output_tokens:
        if not hasattr(visual, "output_tokens"):
            raise ModelError(f"{model}: its visual tower cannot return token features (extract.patch_tokens)")
        visual.output_tokens = True
    for p in m.parameters():
        p.requires_grad_(False)
    tower = TextTower(m, open_clip.get_tokenizer(model)) if text else None
    del m
    return visual, preprocess, tower


def load_visual(model: str, pretrained: Optional[str], **kwargs):
    """Load the visual tower through open_clip (the text tower is dropped). Returns (visual, preprocess);
    keyword arguments as ``load_towers``."""
    visual, preprocess, _ = load_towers(model, pretrained, **kwargs)
    return visual, preprocess


def encode_image(model_or_visual, images, normalize: bool = True):
    """Reference path: open_clip's ``encode_image`` on already-preprocessed images (tests, benchmarks)."""
    if hasattr(model_or_visual, "encode_image"):
        return model_or_visual.encode_image(images, normalize=normalize)
    import torch.nn.functional as F

    out = model_or_visual(images)
    out = out[0] if isinstance(out, tuple) else out
    return F.normalize(out, dim=-1) if normalize else out


def build_tiny_model(seed: int = DEMO_SEED):
    """The demo's tiny open_clip model (configs/models/lingcloud-tiny-vit.json), random weights from ``seed``."""
    import open_clip
    import torch

    register_model_configs()
    torch.manual_seed(seed)
    with quiet_open_clip():
        return open_clip.create_model(TINY_MODEL, pretrained=None)


def default_checkpoint_path(extract_cfg) -> str:
    """Where the demo's checkpoint goes when ``extract.pretrained`` is null: beside the features table."""
    out = (extract_cfg.output or "./lingcloud_data/features").rstrip("/")
    parent = out.rsplit("/", 1)[0] if "/" in out else "."
    return f"{parent}/models/{extract_cfg.model}.safetensors"


def save_checkpoint(model, path: str) -> str:
    """Write ``model.state_dict()`` as safetensors atomically (no pickles); returns the path."""
    import fsspec
    from safetensors.torch import save

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    blob = save(state)
    fs, p = fsspec.core.url_to_fs(path)
    fs.makedirs(os.path.dirname(p) or ".", exist_ok=True)
    tmp = f"{p}.tmp-{os.getpid()}"
    fs.pipe_file(tmp, blob)
    fs.mv(tmp, p)
    return path


def ensure_demo_model(extract_cfg, prepare: Optional[Callable[[Any], None]] = None, recipe: Optional[dict] = None) -> str:
    """Make sure the demo's tiny model checkpoint exists; returns its path.

    ``extract_cfg.model`` must be an architecture known to open_clip (normally
    ``lingcloud-tiny-vit``). When ``extract_cfg.pretrained`` is null it is set to
    ``{dir of extract.output}/models/<model>.safetensors``. The file is built from the
    architecture with the fixed seed ``extract_cfg.seed``, then handed to ``prepare`` (which may
    train parts of it in place, e.g. the demo's head alignment) before it is saved; ``recipe``
    describes what ``prepare`` does. Reruns keep the file: it is rebuilt only when absent, or when
    it is the default checkpoint and the recipe its stamp (``<path>.json``) records differs. A file
    ``extract.pretrained`` names is never overwritten.
    """
    import open_clip
    import torch

    register_model_configs(extract_cfg.model_config_dirs)
    if extract_cfg.pretrained and tag_cfg(extract_cfg.model, extract_cfg.pretrained):
        return extract_cfg.pretrained  # real weights by tag (ViT-L-14-quickgelu + openai): nothing to build, no file named after the tag
    path = extract_cfg.pretrained or default_checkpoint_path(extract_cfg)
    stamp = f"{path}.json"
    want = {"model": extract_cfg.model, "seed": extract_cfg.seed, "recipe": recipe}
    owned = path == default_checkpoint_path(extract_cfg)
    if not os.path.isfile(path) or (owned and _read_stamp(stamp) != want):
        if open_clip.get_model_config(extract_cfg.model) is None:
            raise ModelError(f"extract.model {extract_cfg.model!r}: no such open_clip architecture")
        torch.manual_seed(extract_cfg.seed)
        with quiet_open_clip():
            model = open_clip.create_model(extract_cfg.model, pretrained=None)
        if prepare is not None:
            prepare(model)
        save_checkpoint(model, path)
        if owned:
            import json

            import fsspec

            with fsspec.open(stamp, "w") as f:
                f.write(json.dumps(want, sort_keys=True) + "\n")
    if extract_cfg.pretrained != path:
        extract_cfg.pretrained = path
    return path


def _read_stamp(path: str) -> Optional[dict]:
    """What ``ensure_demo_model`` recorded beside a checkpoint it built; None when nothing (readable) is there."""
    import json

    import fsspec

    try:
        with fsspec.open(path, "r") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None
