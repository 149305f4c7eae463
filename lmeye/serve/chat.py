"""Asking the IPN about an image: the Python API behind `lmeye chat`, the web demo and batch prediction.

    from lmeye.serve.loader import load_assistant
    bot = load_assistant("runs/demo/stage2/final")
    bot.ask("cat.png", "What colour is the shape?")                   # -> str
    for piece in bot.ask("https://host/cat.png", "Where?", stream=True):  # token by token
        print(piece, end="", flush=True)
    bot.ask(None, "Say hello")                                          # text only

Greedy by default; ``do_sample`` (with ``temperature``/``top_p``) samples, ``num_beams > 1`` runs beam
search (which transformers cannot stream: the answer then arrives in one piece).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from lmeye.errors import UserError
from lmeye.serve.images import ImageInput

ROLE_USER, ROLE_ASSISTANT = "user", "assistant"


@dataclass(frozen=True)
class Generation:
    """Decoding settings of one answer."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.num_beams < 1:
            raise UserError("max_new_tokens and num_beams must be at least 1")
        if self.do_sample and (self.temperature <= 0 or not 0 < self.top_p <= 1):
            raise UserError("sampling needs temperature > 0 and 0 < top_p <= 1")

    def kwargs(self) -> dict[str, Any]:
        """Arguments for ``ipn.generate``: sampling knobs only when sampling (transformers warns otherwise)."""
        out = asdict(self)
        if not self.do_sample:
            out.pop("temperature"), out.pop("top_p")
        return out


def prepare_batch(ipn, conversations: Sequence[list[dict]], embeddings: Optional[np.ndarray],
                  patch_tokens: Optional[np.ndarray], has_image: Sequence[bool]):
    """``ipn.encode`` each conversation for generation and collate them. Returns (batch, kept indices);
    a conversation too long for the model's budget is left out (its index is missing)."""
    encs, kept = [], []
    for i, (conv, img) in enumerate(zip(conversations, has_image)):
        enc = ipn.encode(list(conv), bool(img), for_generation=True)
        if enc is not None:
            encs.append(enc)
            kept.append(i)
    if not encs:
        return None, kept
    idx = np.asarray(kept)
    emb = None if embeddings is None else np.asarray(embeddings)[idx]
    tok = None if patch_tokens is None else np.asarray(patch_tokens)[idx]
    return ipn.collate(encs, emb, tok), kept


class Assistant:
    """An IPN plus the image encoder of its features table."""

    def __init__(self, ipn, encoder=None, checkpoint: str = ""):
        self.ipn = ipn
        self.encoder = encoder
        self.checkpoint = checkpoint

    def features(self, image: ImageInput) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """(1, D) embedding and (1, T, D') patch tokens of one image, as the features table holds them."""
        if self.encoder is None:
            raise UserError(f"{self.checkpoint or 'this assistant'}: loaded without an image encoder; ask text-only questions")
        return self.encoder.encode([image])

    def _batch(self, image: Optional[ImageInput], question: str, history: Sequence[dict] = ()):
        if not question or not question.strip():
            raise UserError("the question is empty")
        conv = [*history, {"role": ROLE_USER, "content": question.strip()}]
        if image is None:
            emb = np.zeros((1, self.encoder.dim), np.float32) if self.encoder is not None else None
            tokens = None
        else:
            emb, tokens = self.features(image)
        batch, kept = prepare_batch(self.ipn, [conv], emb, tokens, [image is not None])
        if not kept:
            raise UserError("the question is too long for the model's max_length")
        return batch

    def ask(
        self,
        image: Optional[ImageInput],
        question: str,
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        num_beams: int = 1,
        stream: bool = False,
        history: Sequence[dict] = (),
    ) -> Union[str, Iterator[str]]:
        """The answer to ``question`` about ``image`` (None: text only); ``stream=True`` yields pieces."""
        gen = Generation(max_new_tokens, do_sample, temperature, top_p, num_beams)
        batch = self._batch(image, question, history)  # bad input fails here, before any streaming
        if stream:
            return self._stream(batch, gen)
        import torch

        with torch.inference_mode():
            return self.ipn.generate(batch, **gen.kwargs())[0].strip()

    def _stream(self, batch, gen: Generation) -> Iterator[str]:
        import torch

        if gen.num_beams > 1:  # transformers refuses a streamer with beam search
            with torch.inference_mode():
                yield self.ipn.generate(batch, **gen.kwargs())[0].strip()
            return
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.ipn.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def work() -> None:
            try:
                with torch.inference_mode():
                    self.ipn.generate(batch, streamer=streamer, **gen.kwargs())
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread below
                failure.append(err)
                streamer.end()  # unblock the reader

        thread = threading.Thread(target=work, daemon=True, name="lmeye-generate")
        thread.start()
        started = False
        for piece in streamer:
            if not started:
                piece = piece.lstrip()
                started = bool(piece)
            if piece:
                yield piece
        thread.join()
        if failure:
            raise failure[0]
