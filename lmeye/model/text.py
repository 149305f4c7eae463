"""Conversations -> token ids for the IPN: where the image slots go, which tokens carry the loss,
where generation stops, and what happens to a sample that is too long.

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

Exact ids: the rendered conversation is tokenised in ONE call, and the slots are put between its
tokens. Tokenising piece by piece (template text, user text, answer) gives other ids than the
text the LLM was trained on: a SentencePiece-style tokenizer (LLaMA, Mistral, Vicuna) puts a
``▁`` at the start of every call, and BPE merges differ at the cuts. So the ids here, without the
slots, are exactly ``tokenizer(rendered, add_special_tokens=False)`` (tests/lmeye/model/
test_released.py checks every tokenizer style). A slot that falls inside a token goes beside the
whole token: ``<img>`` before it, ``<img-q>`` after it.

Template: ``model.chat_template`` (lmeye.model.templates): the tokenizer's own by default, a
built-in (``plain`` for base models, ``vicuna_v1``, ``llama2``, ``chatml``) or a Jinja file.

Loss mask: the assistant turns only (LLaVA masks everything else the same way), each through
the last special token its template puts after it: the end-of-turn token (``</s>``,
``<|im_end|>``, ``<|eot_id|>``, ...), which is what teaches the LLM to stop. Template text after
that token (a newline) carries no loss. An assistant turn's text is what the template adds
between "the conversation so far + generation prompt" and "the conversation including that
turn", so any chat template that renders prefixes consistently works; one that does not is an
error naming the tokenizer. Generation stops at those end-of-turn tokens, at the LLM's own
``generation_config`` stop list and at EOS (``TextCodec.stop_ids``).

Truncation (``max_length``, capped by the LLM's context): the sequence is cut from the end (later
turns first, then the tail of the last kept answer). A sample that would lose its *first* answer
token (or a prompt that does not fit, for generation) is not truncated but skipped: ``encode``
returns None and ``TextCodec.counts`` counts it as ``too_long``; cut samples count as ``truncated``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

from lmeye.errors import UserError
from lmeye.model.templates import resolve_chat_template

IGNORE = -100  # label of tokens without loss (the value torch's cross_entropy ignores)
IMG, IMG_Q, IMG_D = -1, -2, -3  # slot ids, filled with embeddings by the IPN
_MARK = {IMG: "\x00lmeye-img\x00", IMG_Q: "\x00lmeye-img-q\x00"}
_PROBE = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]

__all__ = ["IGNORE", "IMG", "IMG_D", "IMG_Q", "Layout", "TextCodec", "check_template", "resolve_chat_template"]


@dataclass
class Layout:
    """One rendered conversation: its text (without slot markers), the one-call token ids with their
    character offsets, which tokens carry the loss, and where the slots go (token indices)."""

    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]
    trained: list[bool]
    img_at: Optional[int]  # <img> x num_img go before token img_at (None: text-only)
    q_at: int  # the prefix ends before token q_at (<img-q> goes there for an image sample)

    def trained_spans(self) -> list[tuple[int, int]]:
        """Character spans of the text that carry the loss, merged."""
        spans: list[tuple[int, int]] = []
        for (a, b), t in zip(self.offsets, self.trained):
            if not t:
                continue
            if spans and a <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(b, spans[-1][1]))
            else:
                spans.append((a, b))
        return spans


class TextCodec:
    """Tokenises conversations for one tokenizer, chat template and IPN layout."""

    def __init__(
        self, tokenizer, *, num_img: int, num_img_d: int, max_length: int, system_prompt: Optional[str] = None,
        chat_template: Optional[str] = None,
    ):
        self.tokenizer = tokenizer
        self.template = resolve_chat_template(tokenizer, chat_template)
        self.chat_template = chat_template
        self.num_img = num_img
        self.num_img_d = num_img_d
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.add_bos = _adds_bos(tokenizer)
        self.special_ids = _special_ids(tokenizer)
        probe = self.layout(_PROBE, has_image=False)
        # the special tokens the template closes an answer with (what the loss teaches the LLM to emit)
        self.end_of_turn_ids = sorted({i for i, t in zip(probe.ids, probe.trained) if t and i in self.special_ids})
        self.counts: Counter = Counter()

    @property
    def name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__

    # -- rendering ---------------------------------------------------------------------------
    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt, add_bos_token=self.add_bos,
        )

    def ids_and_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The text's ids in one call, no special tokens added, with each token's character span. A
        fast tokenizer's own (Rust) tokenizer is called directly: the ``transformers`` wrapper around
        it cost 5 times as much as the tokenising itself. Same ids (tests/lmeye/model/test_text.py)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            enc = backend.encode(text, add_special_tokens=False)
            return enc.ids, enc.offsets
        try:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:
            raise UserError(f"tokenizer {self.name!r} gives no character offsets; use a fast (tokenizers-backed) tokenizer") from None
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def _answer_regions(self, messages: list[dict], for_generation: bool) -> tuple[str, list[tuple[int, int]]]:
        """(the whole rendered text, the character span of every assistant turn in it)."""
        regions: list[tuple[int, int]] = []
        done = ""
        for i, turn in enumerate(messages):
            if turn["role"] != "assistant":
                continue
            before = self.render(messages[:i], True)
            through = self.render(messages[: i + 1], False)
            if not before.startswith(done) or not through.startswith(before):
                raise UserError(
                    f"tokenizer {self.name!r}: its chat template does not render conversations "
                    "prefix-consistently, so assistant turns cannot be located for the loss mask"
                )
            regions.append((len(before), len(through)))
            done = through
        if for_generation:
            full = self.render(messages, True)
            if not full.startswith(done):
                raise UserError(f"tokenizer {self.name!r}: its chat template renders the generation prompt inconsistently")
            return full, regions
        return done, regions

    def layout(self, conversation: list[dict], has_image: bool, for_generation: bool = False) -> Layout:
        """The conversation rendered and tokenised in one call, with the loss mask and slot places."""
        turns = [{"role": t["role"], "content": t["content"]} for t in conversation]
        if not turns or turns[0]["role"] != "user":
            raise UserError("a conversation must start with a user turn")
        if not for_generation and turns[-1]["role"] != "assistant":
            raise UserError("a training conversation must end with an assistant turn")
        first = turns[0]["content"]
        turns[0] = {"role": "user", "content": (_MARK[IMG] if has_image else "") + first + _MARK[IMG_Q]}
        if self.system_prompt:
            turns.insert(0, {"role": "system", "content": self.system_prompt})
        marked, regions = self._answer_regions(turns, for_generation)
        text, marks = _strip_marks(marked)
        if IMG_Q not in marks or (has_image and IMG not in marks):
            raise UserError(f"tokenizer {self.name!r}: its chat template does not render the first user turn's text")
        regions = [(_shift(a, marked, marks), _shift(b, marked, marks)) for a, b in regions]
        ids, offsets = self.ids_and_offsets(text)
        trained = [False] * len(ids)
        for a, b in regions:
            inside = [j for j, (s, e) in enumerate(offsets) if s < b and e > a]
            closing = [j for j in inside if ids[j] in self.special_ids]
            for j in inside[: inside.index(closing[-1]) + 1] if closing else inside:
                trained[j] = True
        q = marks[IMG_Q]
        q_at = max((j + 1 for j, (s, _) in enumerate(offsets) if s < q), default=0)
        img_at = None
        if has_image:
            img_at = next((j for j, (_, e) in enumerate(offsets) if e > marks[IMG]), len(ids))
            img_at = min(img_at, q_at)
        return Layout(text, list(ids), [tuple(o) for o in offsets], trained, img_at, q_at)

    # -- the public step -----------------------------------------------------------------------
    def encode(self, conversation: list[dict], has_image: bool, for_generation: bool = False) -> Optional[dict[str, Any]]:
        """Token ids of one sample (see the module docstring), or None when it is too long."""
        lay = self.layout(conversation, has_image, for_generation)
        labels = [i if t else IGNORE for i, t in zip(lay.ids, lay.trained)]
        q = lay.q_at
        if has_image:
            prefix = lay.ids[: lay.img_at] + [IMG] * self.num_img + lay.ids[lay.img_at : q] + [IMG_Q]
            suffix, suffix_labels = [IMG_D] * self.num_img_d + lay.ids[q:], [IGNORE] * self.num_img_d + labels[q:]
        else:  # text-only: no slots at all, the same split point
            prefix, suffix, suffix_labels = lay.ids[:q], lay.ids[q:], labels[q:]
        if any(x != IGNORE for x in labels[:q]):
            raise UserError(f"tokenizer {self.name!r}: an answer token falls inside the first user turn")
        return self._fit(prefix, suffix, suffix_labels, for_generation)

    def stop_ids(self, generation_config=None) -> list[int]:
        """Where generation stops: the template's end-of-turn tokens, EOS, and the LLM's own
        ``generation_config.eos_token_id`` list (passing one id to ``generate`` would replace it)."""
        ids = set(self.end_of_turn_ids)
        own = getattr(generation_config, "eos_token_id", None)
        ids.update([own] if isinstance(own, int) else (own or []))
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

    def _fit(self, prefix, suffix, labels, for_generation) -> Optional[dict[str, Any]]:
        if labels and labels[0] != IGNORE:  # nothing would predict it: the loss starts inside the suffix
            raise UserError(f"tokenizer {self.name!r}: its chat template puts no text between the user's turn and the answer")
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
            "has_image": IMG in prefix,  # an image sample: its <img> slots
            "for_generation": bool(for_generation),
        }


# A two-turn conversation with an image: what every training row looks like to the template.
PROBE = [{"role": "user", "content": "What colour is the circle?"}, {"role": "assistant", "content": "red"},
         {"role": "user", "content": "And the square?"}, {"role": "assistant", "content": "blue"}]


def check_template(tokenizer, *, num_img: int = 1, num_img_d: int = 1, max_length: int = 1 << 30,
                   system_prompt: Optional[str] = None, chat_template: Optional[str] = None) -> None:
    """Raise one UserError naming the tokenizer unless its chat template can lay out a training
    sample (present, renders, prefix-consistent, text between the user's turn and the answer) and
    such a sample, with its slots, fits ``max_length``.

    ``chat_template``: ``model.chat_template`` (lmeye.model.templates); a tokenizer without a template
    and no key set is one UserError naming the key. The train stage's preflight runs it on the
    driver, before any worker loads the LLM."""
    name = getattr(tokenizer, "name_or_path", tokenizer)
    try:  # the codec renders a probe conversation as it is built: inside the try too
        codec = TextCodec(tokenizer, num_img=num_img, num_img_d=num_img_d, max_length=max_length, system_prompt=system_prompt,
                          chat_template=chat_template)
        enc = codec.encode(PROBE, has_image=True)
    except UserError:
        raise
    except Exception as err:  # the template is the tokenizer's own Jinja code: any error is the template's
        raise UserError(f"tokenizer {name!r}: its chat template fails on a two-turn conversation "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if enc is None:
        raise UserError(f"model.max_length {max_length}: a two-turn conversation with one-word answers does not fit "
                        f"with tokenizer {name!r} and {num_img} + {num_img_d} image slots; raise it")


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS before a text it encodes (LLaMA, OPT do; Qwen2, BLOOM don't)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    return tokenizer("a")["input_ids"][:1] == [bos] and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos]


def _special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def _strip_marks(marked: str) -> tuple[str, dict[int, int]]:
    """The text without slot markers, and each marker's position in it (the first user turn's)."""
    text, marks, i = [], {}, 0
    found = sorted((marked.find(m), slot) for slot, m in _MARK.items() if m in marked)
    for pos, slot in found:
        text.append(marked[i:pos])
        marks[slot] = sum(len(t) for t in text)
        i = pos + len(_MARK[slot])
    text.append(marked[i:])
    joined = "".join(text)
    if any(m in joined for m in _MARK.values()):
        raise UserError("the chat template renders the first user turn more than once")
    return joined, marks


def _shift(pos: int, marked: str, marks: dict[int, int]) -> int:
    """A position in the marked text -> the same position in the text without markers."""
    return pos - sum(len(_MARK[s]) for s in marks if marked.find(_MARK[s]) < pos)
