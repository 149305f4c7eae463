"""Parameter counts of an IPN, part by part, and the trainable fraction.

    python -m lmeye.model.describe --config configs/demo.yaml [--stage instruct|align] [--set k=v]
    lmeye model describe --config configs/demo.yaml

The feature shapes come from the features table when it exists, else from the extract section's
CLIP (probed without weights). For the demo config the tiny LLM is built first if absent.
"""

from __future__ import annotations

import argparse
from typing import Optional


def feature_shapes(cfg) -> tuple[int, Optional[tuple[int, int]]]:
    """(embedding dim, patch shape or None) of the features the IPN will be trained on."""
    import os

    path = cfg.extract.output
    manifest = f"{path}/_manifest.json" if path else None
    if manifest and os.path.isfile(manifest):
        import glob

        import pyarrow.parquet as pq

        from schemas.features import patch_shape_of

        shards = sorted(glob.glob(f"{path}/*.parquet"))
        if shards:
            schema = pq.read_schema(shards[0])
            return schema.field("embedding").type.list_size, patch_shape_of(schema)
    from lmeye.clip import probe_model

    spec = probe_model(cfg.extract.model, None, config_dirs=cfg.extract.model_config_dirs, with_checksum=False)
    return spec.embed_dim, (spec.token_shape if cfg.extract.patch_tokens else None)


def rows(ipn) -> list[tuple[str, int, int]]:
    """(part, parameters, trainable parameters) for every part, frozen ones included."""
    from lmeye.model.ipn import PARTS, ClipTextRVII

    def count(params):
        params = list(params)
        return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)

    out = [("llm (frozen)", *count(ipn.llm.parameters()))]
    if isinstance(ipn.rvii, ClipTextRVII):
        out.append(("clip text tower (frozen)", *count(ipn.rvii.tower.parameters())))
    own = ipn.own_parameters()
    for part, prefixes in PARTS.items():
        out.append((part, *count(p for n, p in own.items() if n.startswith(prefixes))))
    return out


def render(ipn) -> str:
    table = rows(ipn)
    total = sum(r[1] for r in table)
    trainable = sum(r[2] for r in table)
    lines = [f"{'part':<26}{'parameters':>14}{'trainable':>14}"]
    lines += [f"{name:<26}{n:>14,}{t:>14,}" for name, n, t in table]
    lines.append(f"{'total':<26}{total:>14,}{trainable:>14,}")
    lines.append(f"trainable fraction: {trainable / total:.4%} ({trainable:,} of {total:,})")
    return "\n".join(lines)


def describe(cfg, stage: str = "instruct") -> str:
    from lmeye.model.ipn import IPN

    if cfg.model.llm is None or "lingcloud-tiny-llm" in cfg.model.llm:
        from lmeye.model.demo import ensure_demo_llm

        ensure_demo_llm(cfg)
    dim, patch = feature_shapes(cfg)
    model = cfg.model
    if model.rvii == "clip_text" and model.clip_model is None:  # as training does: the CLIP that makes the features
        model = model.model_copy(update={"clip_model": cfg.extract.model, "clip_pretrained": cfg.extract.pretrained})
    ipn = IPN.from_config(model, dim, patch)
    ipn.set_trainable(stage)
    head = (f"IPN: llm {cfg.model.llm} ({type(ipn.llm).__name__}, hidden {ipn.hidden}); rvii {cfg.model.rvii}; "
            f"features {dim}-d, patch tokens {patch}; stage {stage}")
    return head + "\n" + render(ipn)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lmeye.cli import add_config_args

    add_config_args(p)
    p.add_argument("--stage", choices=["instruct", "align"], default="instruct", help="which parts train (default instruct)")


def run(args: argparse.Namespace) -> int:
    from lmeye.cli import config_from_args

    print(describe(config_from_args(args), args.stage))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    import sys

    from lmeye.errors import user_errors

    p = argparse.ArgumentParser(prog="python -m lmeye.model.describe", description=__doc__.split("\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except user_errors() as err:
        print(f"describe: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
