"""Save/load: safetensors + JSON, identical outputs after reloading, checks, no pickle."""

from __future__ import annotations

import json

import pytest
import torch

from lmeye.errors import UserError
from lmeye.model import IPN, load_ipn
from lmeye.model.io import CONFIG_FILE, WEIGHTS_FILE
from lmeye.model.testing import QA, batch_of, features


@pytest.fixture
def trained(ipn_factory):
    ipn = ipn_factory("llama")
    torch.manual_seed(3)
    with torch.no_grad():
        for p in ipn.own_parameters().values():
            p.add_(torch.randn_like(p) * 0.3)  # weights that differ from a fresh IPN's
    return ipn


def test_save_load_gives_identical_outputs_and_no_pickle(trained, tmp_path):
    d = str(tmp_path / "ckpt")
    trained.save_pretrained(d)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    for f in (tmp_path / "ckpt").iterdir():
        assert not f.read_bytes().startswith(b"\x80")  # no pickle protocol header anywhere
    meta = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert meta["model"]["llm"] == trained.cfg.llm and meta["clip"]["model"] == "lingcloud-tiny-vit"
    assert meta["feature_dim"] == 32 and meta["patch_shape"] == [16, 64]
    assert not any(n.startswith(("llm.", "rvii.tower.")) for n in meta["weights"])  # referenced, not copied
    again = load_ipn(d)
    assert isinstance(again, IPN)
    batch = batch_of(trained)
    with torch.no_grad():
        a, b = trained(batch, return_logits=True), again(batch, return_logits=True)
    assert torch.equal(a.logits, b.logits)
    emb, patches = features(1)
    prompt = trained.collate([trained.encode(QA[0][0][:1], True, for_generation=True)], emb, patches)
    assert trained.generate(prompt, max_new_tokens=4) == again.generate(prompt, max_new_tokens=4)


def test_load_checks_names_and_shapes(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "ckpt"
    trained.save_pretrained(str(d))
    state = load_file(d / WEIGHTS_FILE)
    state["img_embed"] = torch.zeros(3, 3)
    save_file(state, d / WEIGHTS_FILE)
    with pytest.raises(UserError, match="img_embed"):
        load_ipn(str(d))
    meta = json.loads((d / CONFIG_FILE).read_text())
    meta["weights"]["img_embed"] = [3, 3]
    (d / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"img_embed: shape \(3, 3\) in the checkpoint"):
        load_ipn(str(d))
    with pytest.raises(UserError, match="not an IPN directory"):
        load_ipn(str(tmp_path / "nothing"))


def test_a_random_clip_text_tower_is_the_same_in_every_process():
    """The frozen tower is never saved: with no pretrained weights, a load after any use of the RNG
    (another worker, a later evaluation) must rebuild exactly the tower the IPN was trained with."""
    from lmeye.model.rvii import load_clip_text_tower

    first = load_clip_text_tower("lingcloud-tiny-vit", None, [], torch.float32)
    torch.randn(1000)  # what a training loop, a data shuffle or another model would consume
    again = load_clip_text_tower("lingcloud-tiny-vit", None, [], torch.float32)
    state = again.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in first.state_dict().items())
