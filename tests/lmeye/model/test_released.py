"""LLMs as released (issue 20): SentencePiece-style, byte-level with end-of-turn tokens, base models.

Each family's tokenizer is built locally in its released style (lmeye.model.released) with a
random tiny LLM of its class; the IPN must give the ids the LLM would see for the rendered
conversation tokenised in one call, train the answer through its end-of-turn token, and stop there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmeye.errors import UserError
from lmeye.model.released import FAMILIES
from lmeye.model.templates import BUILTIN
from lmeye.model.testing import FEATURE_DIM, PATCH_SHAPE, QA, batch_of, features, tiny_model_config
from lmeye.model.text import IGNORE, IMG, IMG_D, IMG_Q, TextCodec

CONV = [
    {"role": "user", "content": "What colour is the circle?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "And the\nbackground? é"},
    {"role": "assistant", "content": "white, with a star"},
]
END_OF_TURN = {"qwen2": "<|im_end|>", "llama3": "<|eot_id|>"}  # the others end a turn with EOS


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _codec(tok, name, **kw) -> TextCodec:
    template = FAMILIES[name].needs_template
    extra = {"chat_template": template} if template else {}
    return TextCodec(tok, num_img=2, num_img_d=3, max_length=256, **extra, **kw)


def _one_call_ids(tok, name, conv, generation_prompt=False) -> list[int]:
    """The reference: the conversation rendered by its template and tokenised in one call."""
    template = FAMILIES[name].needs_template
    kwargs = {}
    if template:  # a built-in writes the BOS where the tokenizer itself would
        kwargs = {"chat_template": BUILTIN[template], "add_bos_token": FAMILIES[name].add_bos}
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_ids_equal_the_one_call_tokenisation_at_every_boundary(released, name):
    tok = _tokenizer(released[name])
    codec = _codec(tok, name)
    for conv, has_image, gen in ((CONV, True, False), (CONV, False, False), (CONV[:3], True, True), (CONV[:1], True, True)):
        enc = codec.encode(conv, has_image, for_generation=gen)
        prefix, suffix = enc["prefix_ids"], enc["suffix_ids"]
        if has_image:
            assert prefix.count(IMG) == 2 and prefix[-1] == IMG_Q and suffix[:3] == [IMG_D] * 3
        joined = [i for i in prefix + suffix if i >= 0]
        assert joined == _one_call_ids(tok, name, conv, gen), (name, has_image, gen)
        # the image precedes the user's text and the request follows it
        text = tok.decode([i for i in prefix if i >= 0])
        assert text.rstrip().endswith("What colour is the circle?"), text
        if has_image:
            after_img = tok.decode(prefix[prefix.index(IMG) + 2 : -1])
            assert after_img.strip() == "What colour is the circle?", after_img


def _answers(tok, enc) -> list[list[int]]:
    out, run = [], []
    for i, lab in zip(enc["suffix_ids"], enc["labels"]):
        if lab != IGNORE:
            run.append(i)
        elif run:
            out, run = out + [run], []
    return out + ([run] if run else [])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_loss_covers_each_answer_through_its_end_of_turn_token(released, name):
    tok = _tokenizer(released[name])
    codec = _codec(tok, name)
    end = tok.convert_tokens_to_ids(END_OF_TURN.get(name, tok.eos_token))
    assert codec.end_of_turn_ids == [end]
    answers = _answers(tok, codec.encode(CONV, True))
    assert len(answers) == 2
    for run, want in zip(answers, ("red", "white, with a star")):
        assert run[-1] == end  # the end-of-turn token is trained, nothing after it (the newline) is
        assert tok.decode(run, skip_special_tokens=True).strip() == want


def test_stop_list_joins_end_of_turn_eos_and_the_generation_config(released):
    from transformers import GenerationConfig

    for name, stops in (("qwen2", ("<|im_end|>", "<|endoftext|>")), ("llama3", ("<|eot_id|>", "<|end_of_text|>")), ("llama2", ("</s>",))):
        tok = _tokenizer(released[name])
        want = sorted(tok.convert_tokens_to_ids(list(stops)))
        assert _codec(tok, name).stop_ids(GenerationConfig.from_pretrained(released[name])) == want, name


def test_a_base_model_without_a_template_is_one_error_naming_the_key(released, clip_checkpoint):
    from lmeye.model import build_ipn
    from lmeye.train.preflight import check_llm, check_tokenizer

    tok = _tokenizer(released["llama1"])
    with pytest.raises(UserError, match=r"model\.chat_template: not set and tokenizer .* has no chat template"):
        TextCodec(tok, num_img=1, num_img_d=2, max_length=64)
    cfg = tiny_model_config(released["llama1"], clip_checkpoint)
    with pytest.raises(UserError, match=r"model\.chat_template"):
        build_ipn(cfg, FEATURE_DIM, PATCH_SHAPE)
    with pytest.raises(UserError, match=r"model\.chat_template") as err:  # the driver's preflight, before Ray
        check_tokenizer(cfg, check_llm(cfg))
    assert len(str(err.value).splitlines()) == 1
    plain = tiny_model_config(released["llama1"], clip_checkpoint, chat_template="plain")
    check_tokenizer(plain, check_llm(plain))


def test_templates_by_name_file_and_their_errors(released, tmp_path):
    tok = _tokenizer(released["bloomz"])
    jinja = tmp_path / "mine.jinja"
    jinja.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
                     "{% if add_generation_prompt %}[assistant] {% endif %}")
    enc = TextCodec(tok, num_img=1, num_img_d=2, max_length=128, chat_template=str(jinja)).encode(CONV[:2], True)
    assert tok.decode([i for i in enc["prefix_ids"] if i >= 0]) == "[user] What colour is the circle?"
    assert tok.decode([i for i, lab in zip(enc["suffix_ids"], enc["labels"]) if lab != IGNORE]) == " red</s>"  # Ġred: the space is the token's
    vic = TextCodec(tok, num_img=1, num_img_d=2, max_length=128, chat_template="vicuna_v1")
    assert vic.render(CONV[:2], False).endswith(" USER: What colour is the circle? ASSISTANT: red</s>")
    for bad, match in (("chatml", r"model\.chat_template: 'chatml' needs <\|im_start\|>"),
                       ("alpaca", r"model\.chat_template: 'alpaca' is neither"),
                       (str(tmp_path / "none.jinja"), r"model\.chat_template: .*none\.jinja': no such file")):
        with pytest.raises(UserError, match=match):
            TextCodec(tok, num_img=1, num_img_d=2, max_length=128, chat_template=bad)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_trains_saves_loads_and_answers(released, clip_checkpoint, tmp_path, name):
    from lmeye.model import build_ipn, load_ipn

    cfg = tiny_model_config(released[name], clip_checkpoint, chat_template=FAMILIES[name].needs_template, num_img_d=3,
                             rvii="transformer", rvii_width=32, rvii_heads=2, rvii_layers=1)  # CLIP-free: the LLM is under test
    ipn = build_ipn(cfg, FEATURE_DIM, PATCH_SHAPE)
    batch = batch_of(ipn)
    opt = torch.optim.Adam(ipn.trainable_parameters(), lr=1e-2)
    ipn.train()
    losses = []
    for _ in range(2):
        opt.zero_grad()
        loss = ipn(batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[0] != losses[1]
    ipn.save_pretrained(str(tmp_path / "ipn"))
    back = load_ipn(str(tmp_path / "ipn"))
    for n, t in ipn.trainable_state_dict().items():
        assert torch.equal(back.trainable_state_dict()[n], t), n
    emb, patches = features(1)
    ipn.eval()
    conv = QA[0][0][:1]
    answer = back.chat(conv, emb[0], patches[0], max_new_tokens=4)
    assert isinstance(answer, str) and answer == ipn.chat(conv, emb[0], patches[0], max_new_tokens=4)


def test_generation_stops_at_the_end_of_turn_token(released, clip_checkpoint):
    """Qwen2's turn ends with <|im_end|>, not its EOS: forced to emit it, generation must stop there."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from lmeye.model import build_ipn

    ipn = build_ipn(tiny_model_config(released["qwen2"], clip_checkpoint), FEATURE_DIM, PATCH_SHAPE)
    end = ipn.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end != ipn.tokenizer.eos_token_id

    class OnlyEnd(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores = torch.full_like(scores, -1e9)
            scores[:, end] = 0
            return scores

    seen = []
    generate = ipn.llm.generate

    def spy(*a, **kw):
        out = generate(*a, **kw)
        seen.append(out.shape[1])
        return out

    ipn.llm.generate = spy
    emb, patches = features(1)
    # generate() returns the new tokens only (inputs_embeds): one, <|im_end|>, where it must stop
    ipn.chat(QA[0][0][:1], emb[0], patches[0], max_new_tokens=8, logits_processor=LogitsProcessorList([OnlyEnd()]))
    assert seen == [1]
