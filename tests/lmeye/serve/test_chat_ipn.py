"""Chat with the real IPN (tiny LLaMA, tiny CLIP text tower) on a demo image: the Assistant's answer is
the model's answer for the features the table holds, streamed or not; beams, sampling, text-only."""

from __future__ import annotations

import pytest

from lmeye.serve.loader import load_assistant
from lmeye.store import FeatureStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ipn_checkpoint(tmp_path_factory):
    import torch

    from lmeye.model import build_ipn
    from lmeye.model.demo import build_tiny_llm
    from lmeye.model.testing import PATCH_SHAPE, FEATURE_DIM, tiny_clip_checkpoint, tiny_model_config, tiny_tokenizer

    root = tmp_path_factory.mktemp("ipn")
    llm = build_tiny_llm(str(root / "llm"), "llama", tiny_tokenizer())
    cfg = tiny_model_config(llm, tiny_clip_checkpoint(str(root / "clip.safetensors")))
    ipn = build_ipn(cfg, FEATURE_DIM, PATCH_SHAPE)
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero transmission: the answer depends on the image
        for p in ipn.own_parameters().values():
            p.normal_(0, 0.3)
    ipn.save_pretrained(str(root / "ckpt"))
    return str(root / "ckpt"), ipn


def test_chat_on_a_demo_image_with_the_ipn(served, ipn_checkpoint):
    ckpt, ipn = ipn_checkpoint
    ipn.eval()
    bot = load_assistant(ckpt, features=str(served["features"]))
    uid, path = next(iter(served["images"].items()))
    got = FeatureStore.open(str(served["features"])).get([uid], ["embedding", "patch_tokens"])
    question = "What colour is the shape?"
    conv = [{"role": "user", "content": question}]
    want = ipn.chat(conv, got["embedding"][0], got["patch_tokens"][0], max_new_tokens=12).strip()
    assert bot.ask(str(path), question, max_new_tokens=12) == want
    assert "".join(bot.ask(str(path), question, max_new_tokens=12, stream=True)).strip() == want
    beams = ipn.chat(conv, got["embedding"][0], got["patch_tokens"][0], max_new_tokens=12, num_beams=3).strip()
    assert bot.ask(str(path), question, max_new_tokens=12, num_beams=3) == beams
    assert list(bot.ask(str(path), question, max_new_tokens=12, num_beams=3, stream=True)) == [beams]
    assert isinstance(bot.ask(str(path), question, max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.9), str)
    assert bot.ask(None, question, max_new_tokens=12) == ipn.chat(conv, None, None, max_new_tokens=12).strip()


def test_eval_answers_with_the_features_tables_encoder_as_chat_does(served, ipn_checkpoint):
    """``lmeye eval``'s answerer encodes a benchmark image with the extractor of the model's features
    table (the one ``ipn_config.json`` names, or ``--features``): its answer is the IPN's answer for
    the features the table holds for that image."""
    import json

    from PIL import Image

    from lmeye.errors import UserError
    from lmeye.eval.ipn_answerer import build_answerer

    ckpt, ipn = ipn_checkpoint
    ipn.eval()
    with pytest.raises(UserError, match=r"ipn_config.json: names no features table; pass .*--features"):
        build_answerer(ckpt)
    named = json.loads(open(f"{ckpt}/ipn_config.json").read())
    assert named["features"] is None  # saved outside training: no table recorded
    answerer = build_answerer(ckpt, max_new_tokens=12, features=str(served["features"]))
    uid, path = next(iter(served["images"].items()))
    got = FeatureStore.open(str(served["features"])).get([uid], ["embedding", "patch_tokens"])
    question = "What colour is the shape?"
    want = ipn.chat([{"role": "user", "content": question}], got["embedding"][0], got["patch_tokens"][0],
                    max_new_tokens=12).strip()
    with Image.open(path) as image:
        assert answerer.answer([image.convert("RGB")], [question])[0].strip() == want
