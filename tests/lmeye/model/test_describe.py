"""`python -m lmeye.model.describe` / `lmeye model describe`: parameter counts per part."""

from __future__ import annotations

import yaml

from lmeye.cli import main


def test_describe_prints_each_part_and_the_trainable_fraction(llm_dirs, clip_checkpoint, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"root": str(tmp_path / "out")},
        "extract": {"model": "lingcloud-tiny-vit", "pretrained": None, "patch_tokens": True},
        "model": {"llm": llm_dirs["llama"], "clip_model": "lingcloud-tiny-vit", "clip_pretrained": clip_checkpoint},
    }))
    assert main(["model", "describe", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    for part in ("llm (frozen)", "clip text tower (frozen)", "visual_mapping", "request", "rvii", "transmission", "trainable fraction"):
        assert part in out
    assert "features 32-d, patch tokens (16, 64)" in out
    assert main(["model", "describe", "--config", str(cfg), "--set", "model.llm=/no/such/llm"]) == 2
    assert "/no/such/llm" in capsys.readouterr().err


def test_describe_llm_shows_template_loss_mask_stops_and_prefix(released, capsys):
    assert main(["model", "describe", "--llm", released["qwen2"]]) == 0
    out = capsys.readouterr().out
    assert "family: qwen2 (Qwen2ForCausalLM), decoder-only" in out
    assert "chat template: the tokenizer's own" in out
    assert "stop tokens: '<|endoftext|>' (0), '<|im_end|>' (2)" in out
    # the trained characters: each answer through its end-of-turn token, not the newline after it
    assert "<|im_start|>assistant\n\u27e6red<|im_end|>\u27e7\n" in out
    assert "<img>What colour is the circle?<img-q>" + "<img-d>" * 5 + "<|im_end|>" in out
    assert "prefix: 26 tokens" in out
    assert main(["model", "describe", "--llm", released["opt"], "--chat-template", "plain"]) == 0
    out = capsys.readouterr().out
    assert "chat template: plain" in out and "Assistant:\u27e6 red</s>\u27e7" in out
    assert main(["model", "describe", "--llm", released["opt"]]) == 2
    assert "model.chat_template: not set" in capsys.readouterr().err


def test_describe_llm_of_an_encoder_decoder_shows_encoder_text_and_decoder_target(released, capsys):
    assert main(["model", "describe", "--llm", released["t5"], "--chat-template", "plain"]) == 0
    out = capsys.readouterr().out
    assert "family: t5 (T5ForConditionalGeneration), encoder-decoder" in out
    assert "encoder: Human: <img>What colour is the circle?<img-q>" in out and "Assistant: red</s>\n" in out
    assert "decoder: \u27e6white</s>\u27e7" in out and out.count("\u27e6") == 2  # the legend and the target
