"""Chat templates: the tokenizer's own, a named built-in, or a Jinja file (``model.chat_template``).

A chat model is trained on one exact text format; its tokenizer usually ships that format as a
Jinja ``chat_template``, and that is the default. Base models (LLaMA-1, OPT, BLOOMZ, Vicuna's
released tokenizer) ship none, so the format must be named:

* ``plain``: LMEye's own "Human: ... Assistant: ..." text, each answer closed by the EOS token
  (a base model has no other end-of-turn token, and EOS is what it already stops on);
* ``vicuna_v1``: LLaVA's ``conv_vicuna_v1`` ("SYSTEM USER: q ASSISTANT: a</s>USER: ...");
* ``llama2``: Meta's Llama-2-chat format ("<s>[INST] q [/INST] a </s>");
* ``chatml``: "<|im_start|>role\\ncontent<|im_end|>\\n" (Qwen); needs ``<|im_end|>`` in the vocabulary;
* a path to a ``.jinja`` file: any template in the Hugging Face format.

Every template is rendered by ``tokenizer.apply_chat_template`` (the same sandboxed Jinja the hub
templates run in), with one extra variable, ``add_bos_token``: whether the tokenizer itself puts
a BOS before a text it encodes. The built-ins write the BOS only then, so a built-in template over
a tokenizer gives the ids that tokenizer gives a plain text.
"""

from __future__ import annotations

import os
from typing import Optional

from lmeye.errors import UserError

KEY = "model.chat_template"

_BOS = "{% if add_bos_token and bos_token %}{{ bos_token }}{% endif %}"
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

BUILTIN: dict[str, str] = {
    "plain": (
        _BOS
        + "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
        "{% elif m['role'] == 'user' %}Human: {{ m['content'] }}\n"
        "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
    ),
    "vicuna_v1": (
        _BOS
        + "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% else %}" + VICUNA_SYSTEM + "{% endif %} "
        "{% for m in messages if m['role'] != 'system' %}"
        "{% if m['role'] == 'user' %}USER: {{ m['content'] }} {% else %}ASSISTANT: {{ m['content'] }}{{ eos_token }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    ),
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set sys = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
        "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
        "{% for m in msgs %}"
        "{% if m['role'] == 'user' %}{{ bos_token or '' }}[INST] {{ (sys if loop.first else '') + m['content'] | trim }} [/INST]"
        "{% else %} {{ m['content'] | trim }} {{ eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}
# what each built-in needs from the tokenizer, checked on the driver
_NEEDS = {"plain": ("eos_token",), "vicuna_v1": ("eos_token",), "llama2": ("eos_token",), "chatml": ()}
_NEEDS_TOKENS = {"chatml": ("<|im_start|>", "<|im_end|>")}


def choices() -> str:
    return ", ".join(BUILTIN) + " or a .jinja file"


def resolve_chat_template(tokenizer, chat_template: Optional[str] = None) -> str:
    """The Jinja text of the template in use for ``tokenizer`` and the ``model.chat_template`` value
    (None: the tokenizer's own). One UserError naming the key when there is none or it is unusable;
    cheap (no model is loaded), so a driver can call it before any worker starts."""
    name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    if chat_template is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the hub convention is "default"
            own = own.get("default")
        if not own:
            raise UserError(f"{KEY}: not set and tokenizer {name!r} has no chat template (a base model); set it to {choices()}")
        return own
    if chat_template in BUILTIN:
        missing = [k for k in _NEEDS[chat_template] if not getattr(tokenizer, k, None)]
        vocab = tokenizer.get_vocab()
        missing += [t for t in _NEEDS_TOKENS.get(chat_template, ()) if t not in vocab]
        if missing:
            raise UserError(f"{KEY}: {chat_template!r} needs {', '.join(missing)}, which tokenizer {name!r} lacks; choose another of {choices()}")
        return BUILTIN[chat_template]
    if not chat_template.endswith(".jinja"):
        raise UserError(f"{KEY}: {chat_template!r} is neither a built-in template nor a .jinja file; one of {choices()}")
    if not os.path.isfile(chat_template):
        raise UserError(f"{KEY}: {chat_template!r}: no such file")
    with open(chat_template, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise UserError(f"{KEY}: {chat_template!r} is empty")
    return text


def template_label(tokenizer, chat_template: Optional[str]) -> str:
    """How a user would name the template in use (for ``lmeye model describe``)."""
    if chat_template is None:
        return "the tokenizer's own"
    return chat_template if chat_template in BUILTIN else f"file {chat_template}"
