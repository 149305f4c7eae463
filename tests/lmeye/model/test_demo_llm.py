"""The demo's tiny LLM: built from the corpus text, deterministic, cached, loads like real weights."""

from __future__ import annotations

import json
import os

from lmeye.config import load_config
from lmeye.model.demo import NAME, ensure_demo_llm


def test_demo_llm_is_deterministic_cached_and_loads_with_auto_classes(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    cfg = load_config("configs/demo.yaml", {"data.root": str(tmp_path / "a"), "model.llm": None, "demo.llm_family": "llama"})
    path = ensure_demo_llm(cfg, steps=2)
    assert path == f"{tmp_path}/a/models/{NAME}" and cfg.model.llm == path
    assert cfg.model.clip_pretrained and os.path.isfile(cfg.model.clip_pretrained)  # the extract stage's tiny CLIP
    files = sorted(os.listdir(path))
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    mtime = os.path.getmtime(f"{path}/model.safetensors")
    assert ensure_demo_llm(cfg, steps=2) == path and os.path.getmtime(f"{path}/model.safetensors") == mtime  # cached

    other = load_config("configs/demo.yaml", {"data.root": str(tmp_path / "b"), "model.llm": None, "demo.llm_family": "llama"})
    again = ensure_demo_llm(other, steps=2)
    for name in ("tokenizer.json", "model.safetensors"):
        assert open(f"{path}/{name}", "rb").read() == open(f"{again}/{name}", "rb").read(), name

    tok = AutoTokenizer.from_pretrained(path)
    assert isinstance(AutoModelForCausalLM.from_pretrained(path), LlamaForCausalLM)
    text = tok.apply_chat_template([{"role": "user", "content": "What colour is the circle?"}], tokenize=False, add_generation_prompt=True)
    assert text == "<s><|user|>\nWhat colour is the circle?<|end|>\n<|assistant|>\n"
    assert tok.unk_token_id is None or tok.unk_token_id not in tok(text)["input_ids"]


def test_the_demo_llm_also_learns_to_answer_from_the_fact_after_the_question():
    from lmeye.model.demo import demo_conversations

    users = [c[0]["content"] for c in demo_conversations(num_images=4)]
    read = [u for u in users if "? " in u]
    assert len(read) > 10 and all(u.split("? ")[0] + "?" in users for u in read)  # each question alone, and followed by its fact
    assert any(u.startswith("What colour is the background? a") and u.endswith("background") for u in read)
    pairs = {(c[0]["content"], c[1]["content"]) for c in demo_conversations(num_images=4)}
    copied = [(u, a) for u, a in pairs if u.endswith("? " + a)]  # ... and followed by the bare answer, to copy
    assert len(copied) > 10 and all((u[: -len(a) - 1], a) in pairs for u, a in copied)


def test_the_demo_tokenizer_has_the_bare_answer_words(tmp_path):
    """An answer starts its own line in the chat template, so it is tokenized without a leading
    space: the tokenizer is trained on turns one per line, and every answer word is one token."""
    from lmeye.demo.corpus import COLOURS, SHAPES
    from lmeye.model.demo import build_tokenizer, demo_conversations, tokenizer_texts

    tok = build_tokenizer(tokenizer_texts(demo_conversations(num_images=200)), 512)
    for word in [*SHAPES, *COLOURS, "top", "bottom", "centre"]:
        assert len(tok.tokenize(word)) == 1, (word, tok.tokenize(word))


def test_the_demo_llm_learns_the_benchmark_forms_by_comparing_with_what_answers_them():
    """demo.llm_formats: each question also asked as yes/no and multiple choice, the prompt carrying no loss,
    and always followed by the caption phrase or the bare answer (what the <img-d> slots stand in for), never
    alone or by its own reply: the LLM must compare its candidate or options with that, as with the slots;
    plain alone is the text as before."""
    from lmeye.demo.corpus import generate_items, qa_pairs
    from lmeye.model.demo import FORMATS, demo_conversations

    plain = demo_conversations(num_images=4)
    convs = demo_conversations(num_images=4, formats=FORMATS)
    assert all("loss" not in c[0] for c in plain) and [c for c in convs if "loss" not in c[0]] == plain
    forms = [c for c in convs if c[0].get("loss") is False]
    yes_no = [c for c in forms if "Please answer yes or no." in c[0]["content"]]
    letters = [c for c in forms if "Answer with the option's letter" in c[0]["content"]]
    assert yes_no and letters and len(yes_no) + len(letters) == len(forms)
    assert {c[1]["content"] for c in yes_no} == {"Yes", "No"} and {c[1]["content"] for c in letters} <= set("ABCD")
    answers = {x for item in generate_items(4, 0) for qa in qa_pairs(item, with_facts=True) for x in (qa["fact"], qa["answer"])}
    for c in forms:
        user = c[0]["content"]
        assert not user.endswith(("yes or no.", "directly.")) and not user.endswith(" " + c[1]["content"]), user
        assert any(user.endswith(" " + a) for a in answers), user


def test_the_demo_llm_reads_multiple_choice_text_as_the_option_it_answers_with():
    """demo.llm_formats: multiple_choice_text asks MMBench's prompt and replies with the right option's text,
    after what answers it, so the LLM's reply is the option the <img-d> slots name (VLMEvalKit reads its letter)."""
    from lmeye.eval.mmbench import extract_choice
    from lmeye.model.demo import demo_conversations

    convs = [c for c in demo_conversations(num_images=4, formats=("plain", "multiple_choice_text")) if c[0].get("loss") is False]
    assert convs
    for c in convs:
        user, reply = c[0]["content"], c[1]["content"]
        options = tuple((line[0], line[3:]) for line in user.splitlines() if line[1:3] == ". ")
        assert "Answer with the option's letter" in user and len(options) >= 2 and reply in dict(options).values()
        assert extract_choice(reply, options) == next(k for k, v in options if v == reply)


def test_the_demo_t5_shares_the_text_and_tokenizer_is_cached_and_loads_as_an_encoder_decoder(tmp_path):
    """demo.llm_family: t5 builds lingcloud-tiny-t5 beside (not over) the LLaMA, with the same tokenizer."""
    from transformers import AutoModelForSeq2SeqLM, T5ForConditionalGeneration

    from lmeye.model.demo import NAMES

    t5 = load_config("configs/demo.yaml", {"data.root": str(tmp_path), "model.llm": None, "demo.llm_family": "t5"})
    path = ensure_demo_llm(t5, steps=2)
    assert path == f"{tmp_path}/models/{NAMES['t5']}" and t5.model.llm == path
    model = AutoModelForSeq2SeqLM.from_pretrained(path)
    assert isinstance(model, T5ForConditionalGeneration) and model.config.decoder_start_token_id == model.config.pad_token_id
    mtime = os.path.getmtime(f"{path}/model.safetensors")
    assert ensure_demo_llm(t5, steps=2) == path and os.path.getmtime(f"{path}/model.safetensors") == mtime  # cached

    llama = load_config("configs/demo.yaml", {"data.root": str(tmp_path), "model.llm": None, "demo.llm_family": "llama"})
    other = ensure_demo_llm(llama, steps=2)
    assert other == f"{tmp_path}/models/{NAME}" != path
    assert open(f"{path}/tokenizer.json", "rb").read() == open(f"{other}/tokenizer.json", "rb").read()
    stamps = [json.loads(open(f"{p}/lingcloud_demo.json").read())["fingerprint"] for p in (path, other)]
    assert stamps[0] != stamps[1]  # its own fingerprint: neither cache is taken for the other
    assert os.path.getmtime(f"{path}/model.safetensors") == mtime  # and building the LLaMA left the T5 alone


def test_the_demo_t5_is_pretrained_on_the_very_ids_the_seq2seq_ipn_feeds_it(tmp_path):
    """Its pretraining pairs (user turn -> reply) are, id for id, the Seq2SeqIPN's encoder input (with
    the slots taken out) and decoder target for the same conversation: what it learns to read and
    answer is what the IPN gives it."""
    from transformers import AutoTokenizer

    from lmeye.model import build_ipn
    from lmeye.model.demo import build_demo_llm, demo_conversations, seq2seq_examples
    from lmeye.model.testing import FEATURE_DIM, PATCH_SHAPE, tiny_clip_checkpoint, tiny_model_config
    from lmeye.model.text import IMG, IMG_D, IMG_Q

    path = build_demo_llm(str(tmp_path / "t5"), 0, family="t5")
    clip = tiny_clip_checkpoint(str(tmp_path / "clip.safetensors"))
    ipn = build_ipn(tiny_model_config(path, clip, num_img_d=2, rvii="transformer", rvii_width=32, rvii_heads=2,
                                      rvii_layers=1), FEATURE_DIM, PATCH_SHAPE)
    convs = demo_conversations(num_images=3)
    enc, tgt = seq2seq_examples(AutoTokenizer.from_pretrained(path), convs)
    plain = [i for i, c in enumerate(convs) if "? " in c[0]["content"]][:3] + [0]  # questions with context, a caption
    for i in plain:
        got = ipn.encode(convs[i], has_image=True)
        ids = [t for t in got["prefix_ids"] + got["suffix_ids"] if t not in (IMG, IMG_Q, IMG_D)]
        assert ids == enc[i] and got["target_ids"] == tgt[i], convs[i]
        assert IMG_D in got["suffix_ids"] and tgt[i][-1] == ipn.tokenizer.eos_token_id


def test_the_demo_llm_built_in_its_own_process_is_the_one_built_here_and_is_not_built_again(tmp_path):
    """lmeye demo starts the build beside the download (start_demo_llm); ensure_demo_llm waits for it."""
    from lmeye.model.demo import start_demo_llm

    quick = {"model.llm": None, "demo.llm_steps": 2, "demo.clip_heads.pairs": 0}  # the CLIP's heads: not what this tests
    cfg = load_config("configs/demo.yaml", {"data.root": str(tmp_path / "a")} | quick)
    proc = start_demo_llm(cfg)
    assert proc is not None and proc.name == "demo-llm"
    path = ensure_demo_llm(cfg, pending=proc)
    assert proc.exitcode == 0 and cfg.model.llm == path
    mtime = os.path.getmtime(f"{path}/model.safetensors")
    assert start_demo_llm(cfg) is None and ensure_demo_llm(cfg) == path  # built: nothing to start, nothing rebuilt
    assert os.path.getmtime(f"{path}/model.safetensors") == mtime
    here = load_config("configs/demo.yaml", {"data.root": str(tmp_path / "b")} | quick)
    again = ensure_demo_llm(here)
    for name in ("tokenizer.json", "model.safetensors"):
        assert open(f"{path}/{name}", "rb").read() == open(f"{again}/{name}", "rb").read(), name


def test_a_user_llm_named_in_model_llm_is_used_as_it_is_never_built_over(tmp_path):
    """model.llm naming a directory without the demo's stamp, or a hub id, is the user's: building the demo
    LLM there would replace it."""
    from lmeye.model.demo import start_demo_llm

    mine = tmp_path / "my-llm"
    mine.mkdir()
    (mine / "config.json").write_text('{"model_type": "llama"}')
    for llm in (str(mine), "someone/some-7b-model"):
        cfg = load_config("configs/demo.yaml", {"data.root": str(tmp_path / "root"), "model.llm": llm, "demo.clip_heads.pairs": 0})
        assert start_demo_llm(cfg) is None and ensure_demo_llm(cfg) == llm and cfg.model.llm == llm
    assert os.listdir(mine) == ["config.json"] and not (tmp_path / "root" / "models" / "lingcloud-tiny-t5").exists()
    assert not os.path.exists("someone")
