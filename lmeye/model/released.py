"""Tiny stand-ins for LLMs as released: a tokenizer in each family's style, built locally with the
``tokenizers`` library and saved with a ``tokenizer_config.json`` shaped as the hub ships it, next
to a random tiny model of the family's class and its ``generation_config.json``.

The styles differ where the IPN's text handling can go wrong:

* SentencePiece-style BPE (LLaMA-1/2, Mistral, Vicuna): byte fallback (``<0x0A>``), ``▁`` for a
  space and a ``▁`` prepended to the start of every encode call, a BOS the tokenizer adds itself;
* byte-level BPE whose end of turn is not EOS (Qwen2's ``<|im_end|>``, Llama-3's ``<|eot_id|>``),
  with the stop list in ``generation_config.json`` as those models ship it;
* base models without a chat template (LLaMA-1, Vicuna's tokenizer, OPT, BLOOMZ);
* T5 / FlanT5: an encoder-decoder whose SentencePiece tokenizer closes every text with ``</s>``.

Nothing is downloaded; the vocabularies are learnt from the demo corpus in well under a second.
Tests and ``lmeye model describe`` examples use them; the model code never imports this module.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

SP = "sentencepiece"
UNIGRAM = "unigram"  # SentencePiece's unigram model, as T5 ships it
BYTE = "bytelevel"

LLAMA2_TEMPLATE = (  # meta-llama/Llama-2-7b-chat-hf's, without its role-alternation checks
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
MISTRAL_TEMPLATE = (  # mistralai/Mistral-7B-Instruct-v0.2's (system turns folded into the first user turn)
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set sys = message['content'] + '\\n\\n' %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + (sys if sys is defined and loop.index0 == 1 else '') + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
QWEN2_TEMPLATE = (  # Qwen/Qwen2-7B-Instruct's
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (  # meta-llama/Meta-Llama-3-8B-Instruct's
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    model_type: str  # transformers model_type of the tiny LLM
    style: str  # SP or BYTE
    tokenizer_class: str  # as the hub's tokenizer_config.json names it
    tokens: dict[str, Optional[str]]  # bos/eos/unk/pad token strings (None: the family has none)
    special: tuple[str, ...] = ()  # further special tokens (chat markers)
    add_bos: bool = False  # the tokenizer puts BOS before every text it encodes
    chat_template: Optional[str] = None  # None: a base model
    generation_eos: tuple[str, ...] = ()  # generation_config.json's eos_token_id list; () -> the EOS
    needs_template: Optional[str] = None  # model.chat_template the family needs (base models)
    add_eos: bool = False  # the tokenizer closes every text it encodes with EOS (T5)
    extra: dict[str, Any] = field(default_factory=dict)  # more tokenizer_config.json keys


_SP_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": None}  # LLaMA's id order
_SP_EXTRA = {"legacy": False, "sp_model_kwargs": {}, "add_eos_token": False, "clean_up_tokenization_spaces": False}

FAMILIES: dict[str, Family] = {
    "llama2": Family("llama", SP, "LlamaTokenizer", _SP_TOKENS, add_bos=True, chat_template=LLAMA2_TEMPLATE, extra=_SP_EXTRA),
    "mistral": Family("mistral", SP, "LlamaTokenizer", _SP_TOKENS, add_bos=True, chat_template=MISTRAL_TEMPLATE, extra=_SP_EXTRA),
    "vicuna": Family("llama", SP, "LlamaTokenizer", _SP_TOKENS, add_bos=True, needs_template="vicuna_v1", extra=_SP_EXTRA),
    "llama1": Family("llama", SP, "LlamaTokenizer", _SP_TOKENS, add_bos=True, needs_template="plain", extra=_SP_EXTRA),
    "qwen2": Family(
        "qwen2", BYTE, "Qwen2Tokenizer", {"bos_token": None, "eos_token": "<|endoftext|>", "unk_token": None, "pad_token": "<|endoftext|>"},
        special=("<|im_start|>", "<|im_end|>"), chat_template=QWEN2_TEMPLATE, generation_eos=("<|im_end|>", "<|endoftext|>"),
    ),
    "llama3": Family(
        "llama", BYTE, "PreTrainedTokenizerFast",
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "unk_token": None, "pad_token": None},
        special=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), chat_template=LLAMA3_TEMPLATE,
        generation_eos=("<|end_of_text|>", "<|eot_id|>"),
    ),
    "opt": Family(
        "opt", BYTE, "GPT2Tokenizer", {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"},
        special=("<s>",), add_bos=True, needs_template="plain",
    ),
    "t5": Family(  # T5 / FlanT5: ids pad 0, </s> 1, <unk> 2; "text</s>"; no template
        "t5", UNIGRAM, "T5Tokenizer", {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", "bos_token": None},
        add_eos=True, needs_template="plain", extra={"extra_ids": 0, "clean_up_tokenization_spaces": False},
    ),
    "bloomz": Family(
        "bloom", BYTE, "BloomTokenizerFast", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
        needs_template="plain",
    ),
}
TINY_MISTRAL = {"model_type": "mistral", "sliding_window": None}  # over lmeye.model.demo's tiny llama sizes
TINY_T5 = {"model_type": "t5", "d_model": 32, "d_ff": 64, "d_kv": 8, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4,
           "relative_attention_num_buckets": 8, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}


def _texts(num_images: int) -> list[str]:
    from lmeye.model.demo import demo_conversations

    words = "Human: Assistant: USER: ASSISTANT: INST SYS system user assistant helpful"
    return [words] + ["\n".join(t["content"] for t in c) for c in demo_conversations(num_images=num_images)]


def _specials(fam: Family) -> list[str]:
    out: list[str] = []
    for t in list(fam.tokens.values()) + list(fam.special):  # in the family's id order
        if t and t not in out:
            out.append(t)
    return out


def _sentencepiece(fam: Family, texts: list[str], vocab_size: int):
    """LLaMA's layout: <unk> <s> </s>, then the 256 byte-fallback pieces <0x00>..<0xFF>, then BPE pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    specials = _specials(fam)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials, show_progress=False)
    trainer_tok.train_from_iterator(texts, trainer=trainer)
    model = json.loads(trainer_tok.to_str())["model"]
    learnt = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for t, _ in learnt:
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return tok


def _unigram(fam: Family, texts: list[str], vocab_size: int):
    """T5's layout: <pad> </s> <unk>, then unigram pieces; split on whitespace, ``▁`` before every word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=_specials(fam), unk_token=fam.tokens["unk_token"], show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _bytelevel(fam: Family, texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=_specials(fam), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def build_tokenizer(directory: str, name: str, num_images: int = 24, vocab_size: int = 700) -> str:
    """Write ``tokenizer.json`` and a hub-shaped ``tokenizer_config.json`` of family ``name`` to ``directory``."""
    from tokenizers import AddedToken, processors

    fam = FAMILIES[name]
    texts = _texts(num_images)
    tok = {SP: _sentencepiece, UNIGRAM: _unigram, BYTE: _bytelevel}[fam.style](fam, texts, vocab_size)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _specials(fam)])
    bos = fam.tokens["bos_token"]
    if fam.add_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    elif fam.add_eos:
        eos = fam.tokens["eos_token"]
        tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tok.token_to_id(eos))])
    elif fam.style == BYTE:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": fam.tokenizer_class,
        **fam.tokens,
        "add_bos_token": fam.add_bos,
        **({"add_eos_token": True} if fam.add_eos else {}),
        "model_max_length": 256,
        "added_tokens_decoder": {
            str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
            for t in _specials(fam)
        },
        **fam.extra,
    }
    if fam.special:
        config["additional_special_tokens"] = list(fam.special)
    if fam.chat_template:
        config["chat_template"] = fam.chat_template
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return directory


def build_family(directory: str, name: str, seed: int = 0) -> str:
    """Family ``name``'s tokenizer and a random tiny LLM of its class in ``directory``, loadable as released."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig

    from lmeye.model.demo import TINY_FAMILIES

    import torch

    fam = FAMILIES[name]
    build_tokenizer(directory, name)
    tok = AutoTokenizer.from_pretrained(directory)
    base = {"mistral": {**TINY_FAMILIES["llama"], **TINY_MISTRAL}, "t5": TINY_T5}
    spec = base.get(fam.model_type) or TINY_FAMILIES[fam.model_type]
    ids = {k: tok.convert_tokens_to_ids(fam.tokens[t]) if fam.tokens[t] else None
           for k, t in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token"), ("pad_token_id", "pad_token"))}
    if fam.model_type == "t5":
        ids["decoder_start_token_id"] = ids["pad_token_id"]  # T5 starts decoding from <pad>
    config = AutoConfig.for_model(**spec, vocab_size=len(tok), **ids)
    torch.manual_seed(seed)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_config(config)
    model.save_pretrained(directory)
    eos = [tok.convert_tokens_to_ids(t) for t in fam.generation_eos] or ids["eos_token_id"]
    extra = {"decoder_start_token_id": ids["decoder_start_token_id"]} if "decoder_start_token_id" in ids else {}
    GenerationConfig(bos_token_id=ids["bos_token_id"], eos_token_id=eos, pad_token_id=ids["pad_token_id"], **extra).save_pretrained(directory)
    return directory
