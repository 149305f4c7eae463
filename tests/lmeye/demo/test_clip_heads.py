"""The demo CLIP's head alignment (lmeye.demo.clip_heads): patch tokens untouched, captions told apart, cached."""

from __future__ import annotations

import copy
import io
import os

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from lmeye import clip
from lmeye.config import load_config
from lmeye.demo.benchsets import heldout_items
from lmeye.demo.clip_heads import alignment_items, align_heads, ensure_demo_clip, ensure_rvii_clip, pre_projection_features
from lmeye.demo.corpus import generate_items, render

MODEL = "lingcloud-small-vit"  # the demo's CLIP architecture (configs/models/), 64 px
SIZE = 64


def _random_clip():
    clip.register_model_configs()
    torch.manual_seed(0)
    with clip.quiet_open_clip():
        return open_clip.create_model(MODEL, pretrained=None).eval()


def _pixels(model, images: list[bytes]) -> torch.Tensor:
    transform = clip.build_transform(dict(model.visual.preprocess_cfg))
    return torch.stack([transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])


def _scores(model, images: list[bytes], captions: list[str]) -> np.ndarray:
    """open_clip's own image-caption cosine (encode_image / encode_text, normalised), as extract + curate compute it."""
    with torch.no_grad():
        a = model.encode_image(_pixels(model, images), normalize=True)
        b = model.encode_text(open_clip.get_tokenizer(MODEL)(captions), normalize=True)
    return (a * b).sum(-1).numpy()


def test_aligned_heads_keep_patch_tokens_and_score_true_captions_above_mismatched():
    """Heads-only alignment on 600 pairs: the patch tokens (what the IPN learns from) are bit-identical to
    the random model's, the trunks' weights are untouched, and on unseen images of another seed a true
    caption scores above another scene's caption (with random heads the two are indistinguishable)."""
    random_model = _random_clip()
    model = copy.deepcopy(random_model)
    train = generate_items(600, seed=11, max_objects=1)
    image, text = pre_projection_features(model, open_clip.get_tokenizer(MODEL), [render(i, SIZE) for i in train],
                                          [i.caption for i in train])
    settings = load_config(None, {"demo.clip_heads.pairs": 600, "demo.clip_heads.steps": 300,
                                  "demo.clip_heads.batch_size": 256}).demo.clip_heads
    losses = align_heads(model, image, text, settings, seed=0)
    assert len(losses) == 300 and np.mean(losses[-20:]) < 0.6 * np.mean(losses[:20])

    before, after = random_model.state_dict(), model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"visual.proj", "text_projection", "logit_scale"}
    assert all(p.requires_grad for p in model.parameters())  # as the caller left them
    for k in ("visual.proj", "text_projection"):  # the random heads' scale (RVII's outputs leave through text_projection)
        assert torch.linalg.norm(after[k]).item() == pytest.approx(torch.linalg.norm(before[k]).item(), rel=1e-5)

    test = generate_items(120, seed=12, max_objects=1)
    images = [render(i, SIZE) for i in test]
    x = _pixels(model, images)
    for m in (model, random_model):
        m.visual.output_tokens = True
    with torch.no_grad():
        (_, aligned_tokens), (_, random_tokens) = model.visual(x), random_model.visual(x)
    assert aligned_tokens.shape == (120, 64, 128) and torch.equal(aligned_tokens, random_tokens)

    # each image's caption against the caption of an image of another scene
    others = [next(o for o in test[k + 1:] + test[:k] if (o.objects, o.background) != (i.objects, i.background))
              for k, i in enumerate(test)]
    for m in (model, random_model):
        m.visual.output_tokens = False
    true, wrong = _scores(model, images, [i.caption for i in test]), _scores(model, images, [o.caption for o in others])
    auc = (true[:, None] > wrong[None, :]).mean()
    assert auc > 0.9 and np.mean(true > wrong) > 0.85, (auc, np.mean(true > wrong))
    r_true, r_wrong = _scores(random_model, images, [i.caption for i in test]), _scores(random_model, images, [o.caption for o in others])
    assert (r_true[:, None] > r_wrong[None, :]).mean() < 0.7  # random heads: about chance


def test_alignment_items_come_from_another_seed_without_the_heldout_scenes():
    cfg = load_config(None, {"demo.num_images": 300, "demo.max_objects": 1, "demo.eval_images": 12, "demo.clip_heads.pairs": 400})
    items = alignment_items(cfg)
    corpus = generate_items(300, 0, 1)
    heldout = {(i.objects, i.background) for i in heldout_items(12, 0, exclude=corpus, max_objects=1)}
    assert len(items) == 400 and not heldout & {(i.objects, i.background) for i in items}
    assert not {(i.jitter, i.caption) for i in items} & {(i.jitter, i.caption) for i in corpus}
    assert alignment_items(cfg) == items  # deterministic


def test_ensure_demo_clip_is_cached_and_rebuilt_when_its_recipe_changes(tmp_path):
    sets = {"data.root": str(tmp_path), "extract.pretrained": None, "demo.num_images": 40, "demo.max_objects": 1, "demo.clip_heads.pairs": 64,
            "demo.clip_heads.steps": 5, "demo.clip_heads.batch_size": 16}
    cfg = load_config(None, sets | {"extract.model": clip.TINY_MODEL})
    path = ensure_demo_clip(cfg)
    assert path == f"{tmp_path}/models/{clip.TINY_MODEL}.safetensors" and cfg.extract.pretrained == path
    stamp = f"{path}.json"
    assert os.path.isfile(stamp)
    aligned, mtime = clip.file_sha256(path), os.stat(path).st_mtime_ns
    again = load_config(None, sets | {"extract.model": clip.TINY_MODEL})
    assert ensure_demo_clip(again) == path and os.stat(path).st_mtime_ns == mtime  # cached
    assert clip.file_sha256(ensure_demo_clip(load_config(None, sets | {"extract.model": clip.TINY_MODEL,
                                                                      "data.root": str(tmp_path / "b")}))) == aligned  # deterministic
    more = load_config(None, sets | {"extract.model": clip.TINY_MODEL, "demo.clip_heads.steps": 6})
    assert clip.file_sha256(ensure_demo_clip(more)) != aligned  # another recipe: rebuilt
    # RVII's text tower: the same CLIP with its heads as initialised (the random model, file for file)
    rvii = ensure_rvii_clip(load_config(None, sets | {"extract.model": clip.TINY_MODEL, "demo.clip_heads.steps": 6}))
    assert rvii != path and ensure_demo_clip(more) == path
    plain = load_config(None, sets | {"extract.model": clip.TINY_MODEL, "demo.clip_heads.pairs": 0})
    random_path = ensure_demo_clip(plain)  # no alignment: the random model, as before
    assert ensure_rvii_clip(plain) == random_path
    random_sha = clip.file_sha256(clip.ensure_demo_model(load_config(None, {
        "data.root": str(tmp_path / "r"), "extract.model": clip.TINY_MODEL, "extract.pretrained": None}).extract))
    assert clip.file_sha256(random_path) == random_sha == clip.file_sha256(rvii)


def test_a_named_checkpoint_is_never_overwritten(tmp_path):
    own = tmp_path / "mine.safetensors"
    own.write_bytes(b"not rebuilt")
    cfg = load_config(None, {"data.root": str(tmp_path), "extract.model": clip.TINY_MODEL, "extract.pretrained": str(own),
                             "demo.clip_heads.pairs": 8, "demo.clip_heads.steps": 1})
    assert ensure_demo_clip(cfg) == str(own) and own.read_bytes() == b"not rebuilt"


def test_real_weights_by_tag_are_used_as_they_are_and_nothing_is_written(tmp_path, monkeypatch):
    # ensure_demo_model once saved random weights to a file named after the tag (./openai) in the working
    # directory, and RVII was then pointed at that file: real weights must work by changing the config alone
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, {"data.root": str(tmp_path / "out"), "extract.model": "ViT-B-32", "extract.pretrained": "openai",
                             "model.clip_model": "ViT-B-32", "demo.clip_heads.pairs": 8, "demo.clip_heads.steps": 1})
    assert ensure_demo_clip(cfg) == "openai" and ensure_rvii_clip(cfg) == "openai"
    assert cfg.extract.pretrained == "openai" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key,value", [("pairs", -1), ("steps", 0), ("batch_size", 1), ("lr", 0), ("nope", 1)])
def test_clip_heads_settings_are_checked_at_load(key, value):
    from lmeye.config import ConfigError

    with pytest.raises(ConfigError, match=f"clip_heads.{key}"):
        load_config(None, {f"demo.clip_heads.{key}": value})
