"""A stand-in IPN for tests of the serving code (chat, batch prediction, the web demo, evaluation).

It honours the IPN contract's interface (``encode``, ``collate``, ``generate`` with a streamer,
``tokenizer``) without a language model: its answer is a fixed function of the question and of
the image features it was given, so a test can tell that the right features reached the model.
A checkpoint folder written by ``write_fake_checkpoint`` loads through ``lmeye.serve.loader``
like a real one (also inside Ray workers, which cannot see a test's monkeypatching).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

FAKE_KIND = "lingcloud-fake-ipn"


class FakeTokenizer:
    """One token per character (ids are code points); enough for TextIteratorStreamer."""

    eos_token_id = 0

    def encode(self, text: str, **_: object) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens: bool = False, **_: object) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return "".join(chr(i) for i in ids if i)


def fake_answer(question: str, embedding: Optional[np.ndarray]) -> str:
    """What the fake model says: it echoes the question and the first two feature values."""
    if embedding is None:
        return f"no image; you asked: {question}"
    e = np.asarray(embedding, dtype=np.float32).reshape(-1)
    return f"image {e[0]:+.4f} {e[1]:+.4f}; you asked: {question}"


class FakeIPN:
    def __init__(self, max_length: int = 400):
        self.max_length = max_length
        self.tokenizer = FakeTokenizer()

    def encode(self, conversation: list[dict], has_image: bool, for_generation: bool = False) -> Optional[dict]:
        text = "\n".join(f"{t['role']}: {t['content']}" for t in conversation)
        if len(text) > self.max_length:
            return None
        question = [t["content"] for t in conversation if t["role"] == "user"][-1]
        return {"question": question, "has_image": has_image}

    def collate(self, encs: list[dict], embeddings: Optional[np.ndarray], patch_tokens: Optional[np.ndarray]) -> dict:
        import torch

        n = len(encs)
        emb = np.zeros((n, 2), np.float32) if embeddings is None else np.asarray(embeddings, np.float32)
        return {
            "question": [e["question"] for e in encs],
            "has_image": torch.tensor([e["has_image"] for e in encs]),
            "embeddings": torch.as_tensor(emb),
        }

    def generate(self, batch: dict, max_new_tokens: int = 32, do_sample: bool = False, num_beams: int = 1,
                 streamer=None, **_: object) -> list[str]:
        import torch

        texts = []
        for q, has, emb in zip(batch["question"], batch["has_image"].tolist(), batch["embeddings"].numpy()):
            texts.append(fake_answer(q, emb if has else None)[:max_new_tokens])
        if streamer is not None:
            if len(texts) != 1:
                raise ValueError("a streamer takes a batch of one")
            streamer.put(torch.zeros((1, 0), dtype=torch.long))  # the prompt, as generate() sends it first
            for c in texts[0]:
                streamer.put(torch.tensor([ord(c)]))
            streamer.end()
        return texts


def write_fake_checkpoint(directory: str, features: Optional[str] = None) -> str:
    """A checkpoint folder that ``lmeye.serve.loader`` loads as a FakeIPN; returns the folder."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "ipn_config.json"), "w") as f:
        json.dump({"kind": FAKE_KIND, "features": features}, f, indent=1)
    save_file({"unused": np.zeros(1, np.float32)}, os.path.join(directory, "ipn.safetensors"))
    return directory
