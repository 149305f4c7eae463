"""Chat: features on the fly equal the features table's, answers streamed, bad input named."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from lmeye.cli import main
from lmeye.errors import UserError
from lmeye.serve.images import ImageError, fetch
from lmeye.serve.loader import CheckpointError, load_assistant
from lmeye.serve.testing import fake_answer
from lmeye.store import FeatureStore

pytestmark = pytest.mark.slow


def test_image_features_equal_the_features_table(served, assistant):
    store = FeatureStore.open(str(served["features"]))
    uids = list(served["images"])
    want = store.get(uids, ["embedding", "patch_tokens"])
    for i, uid in enumerate(uids):
        emb, tokens = assistant.features(str(served["images"][uid]))
        assert emb.dtype == want["embedding"].dtype == np.float16
        np.testing.assert_array_equal(emb[0], want["embedding"][i])
        np.testing.assert_array_equal(tokens[0], want["patch_tokens"][i])
    from PIL import Image  # a PIL image goes through the same preprocessing

    with Image.open(served["images"][uids[0]]) as img:
        np.testing.assert_array_equal(assistant.features(img)[0][0], want["embedding"][0])


def test_ask_streams_the_answer_of_the_image(served, assistant):
    uid, path = next(iter(served["images"].items()))
    emb = FeatureStore.open(str(served["features"])).get([uid])["embedding"][0]
    want = fake_answer("What colour is it?", emb)
    assert assistant.ask(str(path), "What colour is it?") == want
    pieces = list(assistant.ask(str(path), "What colour is it?", stream=True))
    assert len(pieces) > 1 and "".join(pieces).strip() == want
    assert assistant.ask(str(path), "What colour is it?", num_beams=2, stream=True).__next__() == want
    assert assistant.ask(None, "Say hello") == fake_answer("Say hello", None)
    assert assistant.ask(None, "Say hello", max_new_tokens=5) == want_prefix("Say hello", 5)


def want_prefix(question: str, n: int) -> str:
    return fake_answer(question, None)[:n].strip()


def test_bad_images_and_checkpoints_are_named(served, assistant, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ImageError, match="broken.png"):
        assistant.ask(str(bad), "what?")
    with pytest.raises(ImageError, match="nowhere.png"):
        assistant.ask(str(tmp_path / "nowhere.png"), "what?")
    with pytest.raises(ImageError, match="file:///etc/passwd: only http"):
        fetch("file:///etc/passwd")
    with pytest.raises(ImageError, match=r"http://127\.0\.0\.1:9/x\.png: cannot fetch"):
        assistant.ask("http://127.0.0.1:9/x.png", "what?")
    with pytest.raises(UserError, match="empty"):
        assistant.ask(None, "  ")
    ckpt = tmp_path / "ckpt"
    with pytest.raises(CheckpointError, match=f"{ckpt}: checkpoint folder not found"):
        load_assistant(str(ckpt))
    ckpt.mkdir()
    (ckpt / "ipn_config.json").write_text(json.dumps({"kind": "lingcloud-fake-ipn"}))
    with pytest.raises(CheckpointError, match=f"{ckpt}: missing the IPN weights"):
        load_assistant(str(ckpt))


def test_url_images_are_fetched_with_a_cap(assistant, demo_corpus, demo_server):
    name = demo_corpus.good_names()[0]
    url = f"{demo_server.base_url}/images/{name}"
    data = fetch(url)
    assert data == (demo_corpus.root / "images" / name).read_bytes()
    np.testing.assert_array_equal(assistant.features(url)[0], assistant.features(data)[0])
    with pytest.raises(ImageError, match="over the 10-byte limit"):
        fetch(url, max_bytes=10)


def test_chat_command_one_question_and_interactive(served, capsys):
    uid, path = next(iter(served["images"].items()))
    emb = FeatureStore.open(str(served["features"])).get([uid])["embedding"][0]
    assert main(["chat", "--checkpoint", served["checkpoint"], "--image", str(path), "What", "shape?"]) == 0
    assert capsys.readouterr().out.strip() == fake_answer("What shape?", emb)
    assert main(["chat", "--checkpoint", served["checkpoint"], "--image", str(served["root"] / "nope.png"), "x"]) == 2
    assert "nope.png" in capsys.readouterr().err
    lines = f"hello there\n/image {path}\nwhich colour\n\n"
    proc = subprocess.run([sys.executable, "-m", "lmeye.cli", "chat", "--checkpoint", served["checkpoint"]],
                          input=lines, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [fake_answer("hello there", None), fake_answer("which colour", emb)]
