"""The demo CLIP with its heads aligned on demo image-caption pairs and its trunks left random.

The demo's CLIP (``lingcloud-small-vit``) has random weights, and must keep them where the IPN
reads: a contrastively pretrained demo CLIP blurred its patch tokens' local detail (a linear probe of
a shape from its patch tokens, 0.81 random against 0.55 pretrained; README, "The learning check").
But with random heads an image-caption cosine says nothing, and the curate stage's CLIP-score filter
cannot find a caption that does not fit its image.

So only the *heads* learn (``demo.clip_heads``): the visual projection ``visual.proj``, the text
projection ``text_projection`` and the logit scale, with CLIP's own symmetric contrastive loss, on the
trunks' frozen outputs. In open_clip's ViT the patch tokens are returned before ``visual.proj``, so
they are bit-identical to the random model's; the pooled embedding is the same pooled token through
another linear map. RVII's frozen text tower keeps the random ``text_projection`` (``ensure_rvii_clip``).
The model stays a plain open_clip model saved as a checkpoint, loaded through the same path as real weights.

The pairs come from a demo corpus drawn with another seed (``demo.seed + ALIGNMENT_SEED_OFFSET``), and
leave out the scenes of the held-out benchmark images: the alignment never sees the corpus the demo
trains and curates, its planted cases, or the benchmarks' scenes. Both trunks run once over the pairs;
the heads then train on those fixed features on one thread (seconds), so the result is the same on
every run, and it is cached with the checkpoint (``lmeye.clip.ensure_demo_model``'s recipe stamp).
"""

from __future__ import annotations

import io
import math

import torch
import torch.nn.functional as F

from lmeye.config.base import Section

ALIGNMENT_SEED_OFFSET = 1_000_003  # the alignment corpus's seed, past the demo's: never the corpus it curates
LOGIT_SCALE_MAX = 100.0  # CLIP's clamp of the learned temperature
RECIPE_VERSION = 1  # bump when the alignment's procedure changes, so cached checkpoints are rebuilt


def pre_projection_features(model, tokenizer, images: list[bytes], captions: list[str], batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The trunks' outputs just before the heads: (N, visual width) pooled image tokens after the final
    norm, (N, text width) the captions' pooled text tokens. Images are JPEG/PNG bytes, preprocessed by the
    model's own inference transform, captions tokenized by ``tokenizer`` (open_clip's for the model), as
    the extract stage does."""
    from PIL import Image

    from lmeye.clip import build_transform

    transform = build_transform(dict(model.visual.preprocess_cfg))
    visual_proj, text_proj = model.visual.proj, model.text_projection
    model.visual.proj, model.text_projection = None, None  # open_clip skips a head that is None
    try:
        with torch.no_grad():
            img, txt = [], []
            for i in range(0, len(images), batch):
                x = torch.stack([transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in images[i:i + batch]])
                out = model.visual(x)
                img.append(out[0] if isinstance(out, tuple) else out)
                txt.append(model.encode_text(tokenizer(captions[i:i + batch])))
    finally:
        model.visual.proj, model.text_projection = visual_proj, text_proj
    return torch.cat(img).float(), torch.cat(txt).float()


def head_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters the alignment trains: visual projection, text projection, logit scale."""
    params = [model.visual.proj, model.text_projection, model.logit_scale]
    if any(not isinstance(p, torch.nn.Parameter) for p in params):
        raise ValueError(f"{type(model).__name__}: head alignment needs open_clip's CLIP with a ViT (visual.proj, "
                         "text_projection and logit_scale parameters)")
    return params


def align_heads(model, image_features: torch.Tensor, text_features: torch.Tensor, settings: Section, seed: int) -> list[float]:
    """Train ``model``'s heads in place on pre-projection features of matching pairs (row i of each is
    one pair), with CLIP's symmetric InfoNCE loss over random batches; the trunks are not touched.
    ``settings``: a ``demo.clip_heads`` section. Returns the loss of each step. One thread and a seeded
    generator: the same heads on every run. Each projection ends at the Frobenius norm it started with."""
    n = len(image_features)
    if n < 2 or len(text_features) != n:
        raise ValueError(f"head alignment needs at least 2 matching pairs, got {n} images and {len(text_features)} captions")
    visual_proj, text_proj, logit_scale = head_parameters(model)
    batch = min(settings.batch_size, n)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([visual_proj, text_proj, logit_scale], lr=settings.lr)
    labels = torch.arange(batch)
    threads, flags = torch.get_num_threads(), [p.requires_grad for p in (visual_proj, text_proj, logit_scale)]
    scales = [float(torch.linalg.norm(p.detach())) for p in (visual_proj, text_proj)]
    torch.set_num_threads(1)  # a few KB of work per step: one thread is faster here, and the same everywhere
    losses = []
    try:
        for p in (visual_proj, text_proj, logit_scale):
            p.requires_grad_(True)
        for _ in range(settings.steps):
            idx = torch.randperm(n, generator=generator)[:batch]
            img = F.normalize(image_features[idx] @ visual_proj, dim=-1)
            txt = F.normalize(text_features[idx] @ text_proj, dim=-1)
            logits = logit_scale.exp().clamp(max=LOGIT_SCALE_MAX) * img @ txt.T
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        torch.set_num_threads(threads)
        for p, flag in zip((visual_proj, text_proj, logit_scale), flags):
            p.requires_grad_(flag)
        with torch.no_grad():
            logit_scale.clamp_(max=math.log(LOGIT_SCALE_MAX))  # CLIP's clamp, kept in the saved weights too
            # Each head back to its random norm: a cosine does not see a head's scale, but a model that reads
            # the text tower's outputs unnormalised would (RVII does; 1,500 steps had grown it 2.8x).
            for p, scale in zip((visual_proj, text_proj), scales):
                p.mul_(scale / float(torch.linalg.norm(p)))
    return losses


def alignment_items(cfg) -> list:
    """The demo items the heads align on: ``demo.clip_heads.pairs`` of a corpus drawn with another seed,
    without the scenes of the held-out benchmark images (``lmeye.demo.benchsets.heldout_items``)."""
    from lmeye.demo.benchsets import heldout_items
    from lmeye.demo.corpus import generate_items

    d = cfg.demo
    corpus = generate_items(d.num_images, d.seed, d.max_objects)
    held_out = {(i.objects, i.background) for i in heldout_items(d.eval_images, d.seed, exclude=corpus, max_objects=d.max_objects)}
    items, drawn = [], 0
    while len(items) < d.clip_heads.pairs:
        batch = generate_items(drawn + 2 * d.clip_heads.pairs, d.seed + ALIGNMENT_SEED_OFFSET, d.max_objects)[drawn:]
        drawn += len(batch)
        items += [i for i in batch if (i.objects, i.background) not in held_out][: d.clip_heads.pairs - len(items)]
    return items


def ensure_demo_clip(cfg) -> str:
    """The demo CLIP checkpoint (``lmeye.clip.ensure_demo_model``), its heads aligned when
    ``demo.clip_heads.pairs`` > 0; built once and cached with its recipe. Returns its path."""
    from lmeye.clip import ensure_demo_model

    heads = cfg.demo.clip_heads
    if heads.pairs == 0:
        return ensure_demo_model(cfg.extract)
    d = cfg.demo
    recipe = {"version": RECIPE_VERSION, "clip_heads": heads.model_dump(mode="json"), "corpus_seed": d.seed + ALIGNMENT_SEED_OFFSET, "image_size": d.image_size,
              "max_objects": d.max_objects, "without_heldout_of": [d.num_images, d.seed, d.eval_images]}

    def prepare(model) -> None:
        import open_clip

        from lmeye.clip import default_checkpoint_path, save_checkpoint
        from lmeye.demo.corpus import render

        # the model as initialised, for RVII (ensure_rvii_clip), rewritten whenever the aligned one is
        save_checkpoint(model, random_heads_path(cfg.extract.pretrained or default_checkpoint_path(cfg.extract)))

        items = alignment_items(cfg)
        image, text = pre_projection_features(model, open_clip.get_tokenizer(cfg.extract.model),
                                              [render(i, d.image_size) for i in items], [i.caption for i in items])
        align_heads(model, image, text, heads, seed=cfg.extract.seed)

    return ensure_demo_model(cfg.extract, prepare=prepare, recipe=recipe)


def ensure_rvii_clip(cfg) -> str:
    """The checkpoint RVII's frozen text tower loads in the demo: the demo CLIP with its heads as initialised.

    Its text transformer is the one of the CLIP that made the features (the trunks are never trained);
    only ``text_projection``, through which RVII's outputs leave, stays random. With the aligned one, the
    learning check's held-out position answers fell from 0.57 to 0.36 (seed 0, the same features and
    tables; README, "Curation in the demo"): alignment made it strongly anisotropic, tuned to captions'
    end tokens. With ``demo.clip_heads.pairs`` 0 it is the demo CLIP itself."""
    import os

    from lmeye.clip import default_checkpoint_path, ensure_demo_model

    path = ensure_demo_clip(cfg)
    random_heads = random_heads_path(path)
    if cfg.demo.clip_heads.pairs == 0 or (not os.path.isfile(random_heads) and path != default_checkpoint_path(cfg.extract)):
        return path  # no alignment, or weights the demo did not build (a tag, a user's checkpoint): RVII runs them as they are
    # written beside the aligned one by its build; if it went missing, the same seed builds the same random model again
    return ensure_demo_model(cfg.extract.model_copy(update={"pretrained": random_heads}))


def random_heads_path(aligned: str) -> str:
    """Where the demo CLIP with its heads as initialised is kept, beside the aligned checkpoint."""
    return aligned.removesuffix(".safetensors") + ".random-heads.safetensors"
