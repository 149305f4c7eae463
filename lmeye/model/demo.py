"""The offline demo's tiny LLM: a LLaMA-family model and a tokenizer, both trained on the demo
corpus's own text and saved with ``save_pretrained``, so they load like real weights
(``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(dir)``).

Steps, all deterministic (fixed seeds, one fixed corpus):
1. text: conversations built from the synthetic corpus (captions with the instruct stage's caption
   templates, and the question/answer pairs), rendered with the chat template below;
2. tokenizer: byte-level BPE trained with the ``tokenizers`` library, plus the chat's special tokens;
3. model: ``configs/models/lingcloud-tiny-llm.json`` (a ``LlamaConfig``), trained briefly as a plain
   language model on that text so it stands in for a pretrained LLM: it knows the words and the
   chat format, and it answers a question from what its context says. Besides each question
   alone (without the image it can only guess), it sees the question followed by the caption's
   phrase that answers it ("What colour is the circle? a red circle at the top left" -> "red"),
   so, like a real LLM, it reads what follows the question; the IPN's ``<img-d>`` embeddings sit
   exactly there. Without this a 2-layer model trained on the bare questions learns the answer
   priors only, and no embedding placed after the question moves its answer (the learning check
   stayed at 0.33 held-out exact match with such a model; see the README).
The result is cached in ``{data.root}/models/lingcloud-tiny-llm/`` with a stamp of everything it was
built from; a matching stamp means it is reused as is.

``demo.llm_family: t5`` (``configs/demo.yaml``'s) builds an encoder-decoder instead
(``configs/models/lingcloud-tiny-t5.json``, a ``T5Config``, cached in ``{data.root}/models/lingcloud-tiny-t5/``):
the same text and tokenizer, trained as T5 is, on each conversation's user turn rendered by the chat
template (the encoder input, as ``lmeye.model.seq2seq`` feeds it) -> the reply and EOS (the decoder target,
where the loss is), at its own learning rate. With ``demo.llm_formats`` it learns to compare a yes/no
candidate with what follows the prompt, which the causal LLaMA does not (README, "The learning check").
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

from lmeye.clip import MODEL_CONFIG_DIR

NAME = "lingcloud-tiny-llm"
CONFIG_JSON = MODEL_CONFIG_DIR / f"{NAME}.json"
NAMES = {"llama": NAME, "t5": "lingcloud-tiny-t5"}  # demo.llm_family -> its model name (configs/models/{name}.json)
STAMP = "lingcloud_demo.json"
CORPUS_IMAGES = 512  # more than the demo renders: the LM sees more sentences than the pipeline has images
SEED = 0
BATCH = 32
LR = 3e-3
# the encoder-decoder's own (learning rate, warm-up steps): at 3e-3 from the first step the demo T5 compared a
# yes/no candidate with what follows the prompt 0.68-0.81 of the time after 1,000 steps and 0.85-0.97 after 2,000;
# at 1e-3 after 50 warm-up steps, 0.90-1.00 after 1,000 and 1.00 after 2,000 (README, "The learning check")
SEQ2SEQ_LR, SEQ2SEQ_WARMUP = 1e-3, 50
SPECIAL = ["<pad>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


# The answer formats the demo LLM can learn (``demo.llm_formats``; pipelines.instruct.formats): each
# one as text, with the image's answer after the prompt, so that an IPN can answer a yes/no or a
# multiple-choice question by putting that information in the <img-d> slots. A frozen LLM that never
# saw "Please answer yes or no." answered none of the demo's 192 MME questions with yes or no.
FORMATS = ("plain", "yes_no", "multiple_choice")  # demo.llm_formats also takes multiple_choice_text (the option's text as the reply)


def demo_conversations(num_images: int = CORPUS_IMAGES, seed: int = SEED, formats: Sequence[str] = ("plain",)) -> list[list[dict[str, str]]]:
    """User/assistant pairs about the synthetic images: caption tasks and question/answer pairs, the
    questions in each of ``formats`` (of FORMATS)."""
    import yaml

    from lmeye.demo.corpus import generate_items, qa_pairs
    from lmeye.templates import CAPTIONS
    from pipelines.instruct.formats import NEEDS_POOL, AnswerPool, Formatter

    # the plain caption tasks (grounded QA is nested per fact kind; the corpus's own QA covers it)
    tasks = {k: v for k, v in yaml.safe_load(CAPTIONS.read_text()).items() if "responses" in v}
    rng = random.Random(seed)
    items = generate_items(num_images, seed)
    pool = (AnswerPool(((qa["question"], qa["answer"]) for item in items for qa in qa_pairs(item)), words=3)
            if set(formats) & set(NEEDS_POOL) else None)  # plain needs no other answers
    formatters = [Formatter({f: 1.0}, pool, seed, f"demo-llm-{f}") for f in formats]
    convs = []
    for i, item in enumerate(items):
        task = tasks[rng.choice(sorted(tasks))]
        clause = item.caption[0].lower() + item.caption[1:].rstrip(".")
        answer = rng.choice(task["responses"]).format(caption=item.caption, caption_clause=clause)
        convs.append([{"role": "user", "content": rng.choice(task["prompts"])}, {"role": "assistant", "content": answer}])
        for j, qa in enumerate(qa_pairs(item, with_facts=True)):
            for formatter in formatters:
                _, turns = formatter.apply(qa["question"], qa["answer"], "vqa", f"{i}-{j}", ("user", "assistant"))
                (_, prompt), (_, reply) = turns
                # the prompt alone (a prior), then followed by what answers it: the caption phrase
                # to read the answer from, and the bare answer to copy. Without the copying examples
                # the LLM read a position ("at the top left") from the phrase only 61% of the time, and
                # an IPN trained on it never moved its "Where is ..." answers off "bottom ...".
                # A yes/no or multiple-choice prompt is followed only by what answers it, so the LLM
                # must *compare* its candidate or options with that, as it must with the <img-d> slots;
                # the prompt alone (a coin flip) and the reply itself (a copy) gave it shortcuts: with
                # them the demo T5 compared a candidate with the phrase 0.77 of the time, without them
                # 0.98-1.00 on colour, shape and position (2,000 steps; README, "The learning check").
                # Their prompts carry no loss ("loss": False; see build_demo_llm).
                plain = prompt == qa["question"]
                contexts = ("", qa["fact"], qa["answer"]) if plain else (qa["fact"], qa["answer"])
                for context in dict.fromkeys(contexts):
                    user = {"role": "user", "content": f"{prompt} {context}".strip()} | ({} if plain else {"loss": False})
                    convs.append([user, {"role": "assistant", "content": reply}])
    return convs


def tokenizer_texts(convs: list[list[dict[str, str]]]) -> list[str]:
    """The text the demo tokenizer learns from: each turn on its own line, as the chat template puts
    it. An answer starts a line there, so the tokenizer must learn the bare word ("circle", not only
    " circle"), or answers are spelt in 3-4 fragments ("c", "ir", "cle") and the LLM has to keep the
    image in mind over all of them."""
    return ["\n".join(t["content"] for t in c) for c in convs]


def build_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE over ``texts`` with the chat's special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>", chat_template=CHAT_TEMPLATE,
        model_max_length=256,
    )


RECIPE_VERSION = 4  # bump when the text, tokenizer or training recipe changes in a way the constants don't show


def _fingerprint(model_json: dict[str, Any], formats: Sequence[str]) -> str:
    recipe = [RECIPE_VERSION, model_json, CORPUS_IMAGES, SEED, BATCH, LR, SPECIAL, CHAT_TEMPLATE]
    if model_json["model_type"] == "t5":
        recipe += [SEQ2SEQ_LR, SEQ2SEQ_WARMUP]
    if list(formats) != ["plain"]:  # plain alone is the recipe from before formats: its cached LLMs stay valid
        recipe.append(list(formats))
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def config_json(family: str = "llama") -> Path:
    """The demo LLM's model config of ``family`` (demo.llm_family)."""
    return MODEL_CONFIG_DIR / f"{NAMES[family]}.json"


def build_demo_llm(directory: str, steps: int, formats: Sequence[str] = ("plain",), family: str = "llama") -> str:
    """Build the tokenizer and the briefly trained tiny LLM of ``family`` (llama: causal, t5:
    encoder-decoder), reading ``formats``, into ``directory`` (overwritten)."""
    model_json = json.loads(config_json(family).read_text())
    model, tok = train_demo_llm(model_json, steps, formats)
    tmp = Path(f"{directory}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / STAMP).write_text(json.dumps({"fingerprint": _fingerprint(model_json, formats), "formats": list(formats), "steps": steps, "seed": SEED}, indent=2))
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(directory)), exist_ok=True)
    try:
        tmp.rename(directory)
    except OSError:  # another process finished the same build first: keep its copy
        if not (Path(directory) / STAMP).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def train_demo_llm(model_json: dict[str, Any], steps: int, formats: Sequence[str] = ("plain",), lr: Optional[float] = None):
    """The demo LLM's recipe on the model config ``model_json`` (a ``transformers`` config as a
    dict): (model, tokenizer), trained ``steps`` steps. ``build_demo_llm`` saves it;
    ``benchmarks/demo_llm_formats.py`` tries other sizes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    convs = demo_conversations(formats=formats)
    tok = build_tokenizer(tokenizer_texts(convs), model_json["vocab_size"])
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if model_json["model_type"] == "t5":
        ids["decoder_start_token_id"] = tok.pad_token_id  # T5 starts decoding from <pad>
    config = AutoConfig.for_model(**{**model_json, **ids})
    torch.manual_seed(SEED)
    if config.is_encoder_decoder:
        model = AutoModelForSeq2SeqLM.from_config(config)
        if steps:
            _pretrain(model, steps, _seq2seq_batches(*seq2seq_examples(tok, convs), tok.pad_token_id), lr or SEQ2SEQ_LR, SEQ2SEQ_WARMUP)
    else:
        model = AutoModelForCausalLM.from_config(config)
        rendered = [tok.apply_chat_template(c, tokenize=False) for c in convs]
        token_ids = [tok(r, add_special_tokens=False)["input_ids"] for r in rendered]
        # the loss of a yes/no or multiple-choice conversation is on its reply only: next-token loss on
        # a 40-token prompt of options in random order left 1,000 steps too few to learn the replies.
        # Plain ones keep it on every token: with the reply alone, the LLM copied shapes and positions
        # from its context only 19% and 34% of the time (colours 100%)
        starts = [0 if c[0].get("loss", True) else
                  len(tok(tok.apply_chat_template(c[:1], tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"])
                  for c in convs]
        if steps:
            _pretrain(model, steps, _causal_batches(token_ids, starts, tok.pad_token_id), lr or LR)
    return model, tok


def seq2seq_examples(tok, convs: list[list[dict[str, str]]]) -> tuple[list[list[int]], list[list[int]]]:
    """(encoder ids, decoder target ids) of each conversation, as ``lmeye.model.seq2seq`` lays a
    sample out: the user turn rendered for generation, tokenised in one call; the reply and EOS."""
    enc = [tok(tok.apply_chat_template(c[:1], tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
           for c in convs]
    tgt = [tok(c[1]["content"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in convs]
    return enc, tgt


def _causal_batches(ids: list[list[int]], starts: list[int], pad: int):
    """Next-token prediction on the rendered conversations, from ``starts`` (the reply) on."""
    import torch

    def batch(pick: list[int]) -> dict[str, Any]:
        width = max(len(ids[i]) for i in pick)
        x = torch.full((len(pick), width), pad)
        m = torch.zeros(len(pick), width, dtype=torch.long)
        y = torch.full((len(pick), width), -100)
        for r, i in enumerate(pick):
            x[r, : len(ids[i])] = torch.tensor(ids[i])
            m[r, : len(ids[i])] = 1
            y[r, starts[i] : len(ids[i])] = x[r, starts[i] : len(ids[i])]
        return {"input_ids": x, "attention_mask": m, "labels": y}

    return len(ids), batch


def _seq2seq_batches(enc: list[list[int]], tgt: list[list[int]], pad: int):
    """Encoder input -> decoder target; right-padded as ``Seq2SeqIPN`` pads its targets."""
    import torch

    def batch(pick: list[int]) -> dict[str, Any]:
        x = torch.full((len(pick), max(len(enc[i]) for i in pick)), pad)
        m = torch.zeros_like(x)
        y = torch.full((len(pick), max(len(tgt[i]) for i in pick)), -100)
        for r, i in enumerate(pick):
            x[r, : len(enc[i])] = torch.tensor(enc[i])
            m[r, : len(enc[i])] = 1
            y[r, : len(tgt[i])] = torch.tensor(tgt[i])
        return {"input_ids": x, "attention_mask": m, "labels": y}

    return len(enc), batch


def _pretrain(model, steps: int, batches, lr: float = LR, warmup: int = 0) -> None:
    """AdamW steps on random batches of BATCH examples; ``batches``: (how many examples, picks -> model inputs)."""
    import torch

    count, batch = batches
    gen = torch.Generator().manual_seed(SEED)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same sums in the same order on every machine, and no contention (2 threads beside a busy Ray took 10x as long)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
    model.train()
    for _ in range(steps):
        pick = torch.randint(count, (BATCH,), generator=gen).tolist()
        loss = model(**batch(pick)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    torch.set_num_threads(threads)
    model.eval()


def _plan(cfg, steps: Optional[int] = None) -> tuple[str, int, bool]:
    """(where the demo LLM is, its steps, whether it must be built there).

    ``model.llm`` set to a directory without this module's stamp (or to a hub id) is the user's own
    LLM: it is used as it is and never built over (the build replaces its directory)."""
    steps = cfg.demo.llm_steps if steps is None else steps
    path = cfg.model.llm or f"{cfg.data.root.rstrip('/')}/models/{NAMES[cfg.demo.llm_family]}"
    if "://" not in path:  # Ray workers do not share the driver's working directory
        path = os.path.abspath(path)
    stamp = Path(path) / STAMP
    if cfg.model.llm is not None and not stamp.is_file():
        return cfg.model.llm, steps, False
    want = _fingerprint(json.loads(config_json(cfg.demo.llm_family).read_text()), cfg.demo.llm_formats)  # the model config names the family
    built = json.loads(stamp.read_text()) if stamp.is_file() else {}
    return path, steps, (built.get("fingerprint"), built.get("steps")) != (want, steps)


def start_demo_llm(cfg):
    """Start building the demo LLM behind the pipeline (``lmeye.demo.behind``) where ``ensure_demo_llm``
    would build it; ``ensure_demo_llm(cfg, pending=...)`` waits for it. None when nothing is to build."""
    from lmeye.demo import behind

    path, steps, build = _plan(cfg)
    # at a lower priority: beside it at the same one, extract took 63 s instead of 46
    return behind.start("demo-llm", build_demo_llm, path, steps, list(cfg.demo.llm_formats), cfg.demo.llm_family, nice=10) if build else None


def ensure_demo_llm(cfg, steps: Optional[int] = None, pending=None) -> str:
    """Make sure the demo LLM exists (built once, cached); point ``cfg.model.llm`` at it; return its path.

    ``cfg`` is the whole config: the default place is ``{data.root}/models/lingcloud-tiny-llm``,
    trained ``demo.llm_steps`` steps unless ``steps`` says otherwise. ``pending``: the process
    ``start_demo_llm`` started, waited for first (where it failed, the build runs here again and
    raises its error). When ``model.clip_pretrained`` is null and ``model.clip_model`` is the extract
    stage's model, it is pointed at the extract stage's demo CLIP checkpoint (built if absent), so RVII
    runs the text transformer of the very CLIP that made the features; where ``demo.clip_heads``
    aligned that CLIP's heads, with its text projection as initialised (``lmeye.demo.clip_heads.ensure_rvii_clip``).
    """
    from lmeye.demo import behind

    behind.wait(pending)
    path, steps, build = _plan(cfg, steps)
    if build:
        build_demo_llm(path, steps, cfg.demo.llm_formats, cfg.demo.llm_family)
    if cfg.model.llm != path:
        cfg.model.llm = path
    if cfg.model.rvii == "clip_text" and cfg.model.clip_pretrained is None and cfg.model.clip_model == cfg.extract.model:
        from lmeye.demo.clip_heads import ensure_rvii_clip

        clip = ensure_rvii_clip(cfg)
        cfg.model.clip_pretrained = os.path.abspath(clip) if os.path.isfile(clip) else clip  # a tag or a URL stays as it is
    return path


# Tiny random configs of other families: tests and benchmarks run the same IPN code over them.
TINY_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256},
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256},
    "qwen2": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256},
    "opt": {"model_type": "opt", "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "word_embed_proj_dim": 32, "max_position_embeddings": 256},
    "bloom": {"model_type": "bloom", "hidden_size": 32, "n_layer": 2, "n_head": 4},
}


def build_tiny_llm(directory: str, family: str, tokenizer, seed: int = 0, **overrides: Any) -> str:
    """A random tiny causal LM of ``family`` (see TINY_FAMILIES) sharing ``tokenizer``, saved like real weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = {**TINY_FAMILIES[family], **overrides}
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = AutoConfig.for_model(**spec, vocab_size=len(tokenizer), **ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
