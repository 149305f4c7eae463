"""Conversations -> token ids for the IPN: where the image slots go, which tokens carry the loss,
and what happens to a sample that is too long.

Layout of one sample (the chat template's own text, with the IPN's slots inserted)::

    prefix: <template start> [<img> x num_img] <first user text> [<img-q>]
    suffix: [<img-d> x k] <rest of the template: end of the user turn, assistant turns, later turns>

The slots sit inside the *first* user turn: the image comes before the user's text, the request
token right after it, and the k ``<img-d>`` embeddings right after that, as in LMEye's
"Human: <img> {question} <img-q> <img-d>x5 Assistant:". The prefix ends at ``<img-q>``, so the
LLM's state there (the request) depends on the prefix only, and the prefix's keys and values are
reused by the second pass. A text-only sample has no slots (its prefix ends after the first
user text) and goes through the LLM alone.

Slots are negative ids (never real tokens): the vocabulary and the embedding matrix are never
resized; the model fills these positions with embeddings.

Loss mask: only the assistant turns, each through its end-of-turn (eos) token (LLaVA masks
everything else the same way); template text after that token (a newline) carries no loss. An assistant turn's text is what the template adds between "the conversation
so far + generation prompt" and "the conversation including that turn", so any chat template that
renders prefixes consistently works; one that does not is an error naming the tokenizer.

Truncation (``max_length``, capped by the LLM's context): the sequence is cut from the end (later
turns first, then the tail of the last kept answer). A sample that would lose its *first* answer
token (or a prompt that does not fit, for generation) is not truncated but skipped: ``encode``
returns None and ``TextCodec.counts`` counts it as ``too_long``; cut samples count as ``truncated``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional

from lmeye.errors import UserError

IGNORE = -100  # label of tokens without loss (the value torch's cross_entropy ignores)
IMG, IMG_Q, IMG_D = -1, -2, -3  # slot ids, filled with embeddings by the IPN
_MARK = {IMG: "\x00lmeye-img\x00", IMG_Q: "\x00lmeye-img-q\x00"}


class TextCodec:
    """Tokenises conversations for one tokenizer and IPN layout."""

    def __init__(self, tokenizer, *, num_img: int, num_img_d: int, max_length: int, system_prompt: Optional[str] = None):
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no chat template")
        self.tokenizer = tokenizer
        self.num_img = num_img
        self.num_img_d = num_img_d
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.counts: Counter = Counter()

    # -- rendering ---------------------------------------------------------------------------
    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added. A fast tokenizer's own (Rust) tokenizer
        is called directly: the ``transformers`` wrapper around it cost 5 times as much as the
        tokenising itself (about 40 us against 8 a piece, 5 pieces a sample), and so does its
        ``encode_batch``, whose thread pool is all overhead at a few short pieces. Same ids
        (tests/lmeye/model/test_text.py)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return [backend.encode(t, add_special_tokens=False).ids for t in texts]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def _segments(self, messages: list[dict], for_generation: bool) -> list[tuple[str, bool]]:
        """The rendered conversation as consecutive (text, is_answer) pieces."""
        out: list[tuple[str, bool]] = []
        done = ""
        for i, turn in enumerate(messages):
            if turn["role"] != "assistant":
                continue
            before = self._render(messages[:i], True)
            through = self._render(messages[: i + 1], False)
            if not before.startswith(done) or not through.startswith(before):
                raise UserError(
                    f"tokenizer {self.tokenizer.name_or_path!r}: its chat template does not render conversations "
                    "prefix-consistently, so assistant turns cannot be located for the loss mask"
                )
            answer = through[len(before):]
            eos = self.tokenizer.eos_token or ""
            end = answer.rfind(eos) + len(eos) if eos and eos in answer else len(answer)
            # the turn through its end-of-turn token carries the loss; what the template puts after it does not
            out += [(before[len(done):], False), (answer[:end], True), (answer[end:], False)]
            done = through
        if for_generation:
            full = self._render(messages, True)
            out.append((full[len(done):], False))
        return out

    def _tokenise(self, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
        parts = [(part, answer) for text, answer in pieces for part in _split_marks(text)]
        texts = iter(self._ids([p for p, _ in parts if isinstance(p, str)]))
        ids: list[int] = []
        labels: list[int] = []
        for part, answer in parts:
            toks = [part] * (self.num_img if part == IMG else 1) if isinstance(part, int) else next(texts)
            ids += toks
            labels += toks if answer else [IGNORE] * len(toks)
        return ids, labels

    # -- the public step -----------------------------------------------------------------------
    def encode(self, conversation: list[dict], has_image: bool, for_generation: bool = False) -> Optional[dict[str, Any]]:
        """Token ids of one sample (see the module docstring), or None when it is too long."""
        turns = [{"role": t["role"], "content": t["content"]} for t in conversation]
        if not turns or turns[0]["role"] != "user":
            raise UserError("a conversation must start with a user turn")
        if not for_generation and turns[-1]["role"] != "assistant":
            raise UserError("a training conversation must end with an assistant turn")
        first = turns[0]["content"]
        turns[0] = {"role": "user", "content": (_MARK[IMG] + first + _MARK[IMG_Q]) if has_image else first + _MARK[IMG_Q]}
        if self.system_prompt:
            turns.insert(0, {"role": "system", "content": self.system_prompt})
        pieces = self._segments(turns, for_generation)
        ids, labels = self._tokenise(pieces)
        cut = ids.index(IMG_Q)  # the request slot ends the prefix
        if has_image:
            prefix_ids, suffix_ids = ids[: cut + 1], [IMG_D] * self.num_img_d + ids[cut + 1 :]
            suffix_labels = [IGNORE] * self.num_img_d + labels[cut + 1 :]
        else:  # text-only: no slots at all, the same split point
            prefix_ids, suffix_ids, suffix_labels = ids[:cut], ids[cut + 1 :], labels[cut + 1 :]
        return self._fit(prefix_ids, suffix_ids, suffix_labels, has_image, for_generation)

    def _fit(self, prefix, suffix, labels, has_image, for_generation) -> Optional[dict[str, Any]]:
        if labels and labels[0] != IGNORE:  # nothing would predict it: the loss starts inside the suffix
            raise UserError(f"tokenizer {self.tokenizer.name_or_path!r}: its chat template puts no text between the user's turn and the answer")
        budget = self.max_length - len(prefix)
        first_answer = next((i for i, x in enumerate(labels) if x != IGNORE), None)
        if for_generation:
            if budget < len(suffix) + 1:  # the prompt plus at least one new token
                self.counts["too_long"] += 1
                return None
        elif first_answer is None:
            raise UserError("a training conversation has no assistant tokens to learn from")
        elif len(suffix) > budget:
            if first_answer + 1 > budget:
                self.counts["too_long"] += 1
                return None
            suffix, labels = suffix[:budget], labels[:budget]
            self.counts["truncated"] += 1
        self.counts["encoded"] += 1
        return {
            "prefix_ids": prefix,
            "suffix_ids": suffix,
            "labels": labels,
            "has_image": bool(has_image),
            "for_generation": bool(for_generation),
        }


# A two-turn conversation with an image: what every training row looks like to the template.
PROBE = [{"role": "user", "content": "What colour is the circle?"}, {"role": "assistant", "content": "red"},
         {"role": "user", "content": "And the square?"}, {"role": "assistant", "content": "blue"}]


def check_template(tokenizer, *, num_img: int = 1, num_img_d: int = 1, max_length: int = 1 << 30,
                   system_prompt: Optional[str] = None) -> None:
    """Raise one UserError naming the tokenizer unless its chat template can lay out a training
    sample (present, renders, prefix-consistent, text between the user's turn and the answer) and
    such a sample, with its slots, fits ``max_length``.

    The train stage's preflight runs it on the driver, before any worker loads the LLM."""
    name = getattr(tokenizer, "name_or_path", tokenizer)
    codec = TextCodec(tokenizer, num_img=num_img, num_img_d=num_img_d, max_length=max_length, system_prompt=system_prompt)
    try:
        enc = codec.encode(PROBE, has_image=True)
    except UserError:
        raise
    except Exception as err:  # the template is the tokenizer's own Jinja code: any error is the template's
        raise UserError(f"tokenizer {name!r}: its chat template fails on a two-turn conversation "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if enc is None:
        raise UserError(f"model.max_length {max_length}: a two-turn conversation with one-word answers does not fit "
                        f"with tokenizer {name!r} and {num_img} + {num_img_d} image slots; raise it")


def _split_marks(text: str) -> list:
    """Text with slot markers -> [str | slot id, ...]."""
    parts: list = [text]
    for slot, mark in _MARK.items():
        nxt: list = []
        for p in parts:
            if isinstance(p, int) or mark not in p:
                nxt.append(p)
                continue
            chunks = p.split(mark)
            for j, c in enumerate(chunks):
                if j:
                    nxt.append(slot)
                if c:
                    nxt.append(c)
        parts = nxt
    return parts
