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
