"""A tiny stand-in for the IPN (same interface as ``lmeye.model.IPN``), and table builders.

The trainer is tested with this fake so its tests do not depend on the real model: it has a frozen
"LLM" (an embedding and a head), a visual mapping (trains in ``align``) and a request/patch part
(trains in ``instruct``). A training forward appends, per rank, the keys of the rows it saw and a
digest of the trainable weights to ``{log_dir}/rank{RANK}.jsonl``, so a test can check which rows
each rank trained and that the ranks' weights agree.

Loaded by file path (``load()``) and pickled by value into the Ray workers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import time
import types
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import torch
from torch import nn

NAME = "lingcloud_fake_ipn"


def load() -> types.ModuleType:
    """This file as the module ``lingcloud_fake_ipn``, registered for pickling by value."""
    if NAME in sys.modules:
        return sys.modules[NAME]
    from ray import cloudpickle

    spec = importlib.util.spec_from_file_location(NAME, Path(__file__))
    module = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = module
    spec.loader.exec_module(module)
    cloudpickle.register_pickle_by_value(module)
    return module


VOCAB = 64


def _ids(text: str) -> list[int]:
    return [3 + zlib.crc32(w.encode()) % (VOCAB - 3) for w in text.lower().split()]


class FakeIPN(nn.Module):
    def __init__(self, feature_dim: int, patch_shape: Optional[tuple[int, int]], hidden: int = 16,
                 max_length: int = 24, log_dir: Optional[str] = None, delay_s: float = 0.0):
        super().__init__()
        self.meta = {"feature_dim": feature_dim, "patch_shape": list(patch_shape) if patch_shape else None,
                     "hidden": hidden, "max_length": max_length}
        self.log_dir, self.delay_s = log_dir, delay_s
        self.embed = nn.Embedding(VOCAB, hidden)  # the frozen "LLM"
        self.head = nn.Linear(hidden, VOCAB)
        self.visual = nn.Linear(feature_dim, hidden)  # visual mapping
        self.request = nn.Linear(hidden, hidden)  # request acquisition + transmission
        self.patch = nn.Linear(patch_shape[1], hidden) if patch_shape else None  # RVII
        self.tokenizer = None
        self.set_trainable("instruct", train_visual_mapping=True)

    def _parts(self) -> dict[str, nn.Module]:
        parts = {"visual": self.visual, "request": self.request}
        if self.patch is not None:
            parts["patch"] = self.patch
        return parts

    def set_trainable(self, stage: str, train_visual_mapping: bool = True) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        train = ["visual"] if stage == "align" else ["request", "patch"] + (["visual"] if train_visual_mapping else [])
        for name, mod in self._parts().items():
            if name in train:
                for p in mod.parameters():
                    p.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{n}.{k}": v.detach().float().contiguous() for n, m in self._parts().items() for k, v in m.state_dict().items()}

    def load_trainable_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for n, m in self._parts().items():
            m.load_state_dict({k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith(n + ".")})

    def save_pretrained(self, directory: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        save_file(self.trainable_state_dict(), os.path.join(directory, "ipn.safetensors"))
        with open(os.path.join(directory, "ipn_config.json"), "w") as f:
            json.dump(self.meta, f)

    # ------------------------------------------------------------------ data path
    def encode(self, conversation: list[dict], has_image: bool, for_generation: bool = False) -> Optional[dict]:
        prompt = [1] + sum((_ids(t["content"]) for t in conversation if t["role"] == "user"), [])
        answer = [] if for_generation else sum((_ids(t["content"]) for t in conversation if t["role"] == "assistant"), []) + [2]
        if len(prompt) + len(answer) > self.meta["max_length"]:
            return None
        return {"prompt": prompt, "answer": answer, "key": conversation[0]["content"], "has_image": has_image}

    def collate(self, encs: list[dict], embeddings: np.ndarray, patch_tokens: Optional[np.ndarray]) -> dict[str, Any]:
        n = max(len(e["prompt"]) + len(e["answer"]) for e in encs)
        ids = torch.zeros(len(encs), n, dtype=torch.long)
        labels = torch.full((len(encs), n), -100, dtype=torch.long)
        mask = torch.zeros(len(encs), n, dtype=torch.long)
        for i, e in enumerate(encs):
            seq = e["prompt"] + e["answer"]
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            if e["answer"]:
                labels[i, len(e["prompt"]) : len(seq)] = torch.tensor(e["answer"])
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask,
                 "embeddings": torch.from_numpy(np.asarray(embeddings, np.float32)),
                 "has_image": torch.tensor([e["has_image"] for e in encs]),
                 "keys": [e["key"] for e in encs]}
        if patch_tokens is not None:
            batch["patch_tokens"] = torch.from_numpy(np.asarray(patch_tokens, np.float32))
        return batch

    def _context(self, batch: dict[str, Any]) -> torch.Tensor:
        img = self.visual(batch["embeddings"])
        if self.patch is not None and "patch_tokens" in batch:
            img = img + self.patch(batch["patch_tokens"]).mean(1)
        img = img * batch["has_image"].to(img.dtype)[:, None]
        return img + self.request(img)

    def forward(self, batch: dict[str, Any]) -> Any:
        h = self.embed(batch["input_ids"]) + self._context(batch)[:, None, :]
        logits = self.head(h)[:, :-1].float()
        labels = batch["labels"][:, 1:]
        tok = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100, reduction="none")
        tok = tok.view(labels.shape)
        valid = (labels != -100).float()
        per = (tok * valid).sum(1) / valid.sum(1).clamp(min=1)
        if self.training and self.log_dir:
            self._log(batch["keys"])
        return types.SimpleNamespace(loss=(tok * valid).sum() / valid.sum().clamp(min=1), per_sample_loss=per)

    def generate(self, batch: dict[str, Any], max_new_tokens: int = 16, **_: Any) -> list[str]:
        ctx = self._context(batch)
        last = batch["input_ids"].gather(1, (batch["attention_mask"].sum(1, keepdim=True) - 1))
        tok = self.head(self.embed(last[:, 0]) + ctx).argmax(-1)
        return [f"w{int(t)}" for t in tok]

    def _log(self, keys: list[str]) -> None:
        digest = hashlib.sha256()
        for v in self.trainable_state_dict().values():
            digest.update(v.numpy().tobytes())
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        os.makedirs(self.log_dir, exist_ok=True)
        with open(os.path.join(self.log_dir, f"rank{rank}.jsonl"), "a") as f:
            f.write(json.dumps({"keys": keys, "weights": digest.hexdigest(), "pid": os.getpid()}) + "\n")
        if self.delay_s:
            time.sleep(self.delay_s)


class FakeFactory:
    """The model factory the trainer calls (see lmeye.train.model_factory)."""

    def __init__(self, log_dir: Optional[str] = None, delay_s: float = 0.0, llm_ok: bool = True):
        self.log_dir, self.delay_s, self.llm_ok = log_dir, delay_s, llm_ok

    def check(self, cfg: Any, features: Any) -> None:
        from lmeye.errors import UserError

        if not self.llm_ok:
            raise UserError("model.llm: cannot load an LLM config from '/nowhere/llm'")

    def build(self, cfg: Any, feature_dim: int, patch_shape: Optional[tuple[int, int]]) -> FakeIPN:
        torch.manual_seed(cfg.train.seed)
        return FakeIPN(feature_dim, patch_shape, log_dir=self.log_dir, delay_s=self.delay_s)

    def load(self, directory: str, dtype: Optional[str] = None) -> FakeIPN:
        """From a model directory at any fsspec path (a bucket's too), as ``lmeye.model.load_ipn``."""
        import fsspec
        from safetensors.torch import load

        with fsspec.open(f"{directory}/ipn_config.json", "r") as f:
            meta = json.load(f)
        ipn = FakeIPN(meta["feature_dim"], tuple(meta["patch_shape"]) if meta["patch_shape"] else None,
                      log_dir=self.log_dir, delay_s=self.delay_s)
        with fsspec.open(f"{directory}/ipn.safetensors", "rb") as f:
            ipn.load_trainable_state_dict(load(f.read()))
        return ipn

    def feature_shape(self, directory: str) -> tuple[Optional[int], Optional[tuple[int, int]]]:
        from lmeye.train.model_factory import feature_shape_from_json

        return feature_shape_from_json(f"{directory}/ipn_config.json")


def read_log(log_dir: str) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for p in sorted(Path(log_dir).glob("rank*.jsonl")):
        out[int(p.stem[4:])] = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return out


# ---------------------------------------------------------------------------------------------
# Tables

FEATURE_META = {"model": "toy", "pretrained": "none", "checkpoint_sha256": "", "image_size": "32",
                "dtype": "float32", "embed_dim": "8", "precision": "fp32"}


def write_features(path: Path, uids: list[str], dim: int = 8, patch: Optional[tuple[int, int]] = (4, 6), seed: int = 0,
                   meta: Optional[dict[str, str]] = None) -> None:
    """A features table of random vectors; ``meta`` overrides the metadata (the CLIP it names)."""
    from lmeye.tables import TableWriter
    from schemas.features import FEATURES, SUCCESS, features_schema

    rng = np.random.default_rng(seed)
    n = len(uids)
    cols = {
        "uid": pa.array(uids),
        "status": pa.array([SUCCESS] * n),
        "error_message": pa.array([None] * n, pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(n * dim).astype(np.float32)), dim),
    }
    if patch:
        w = patch[0] * patch[1]
        cols["patch_tokens"] = pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(n * w).astype(np.float32)), w)
    meta = {**FEATURE_META, "embed_dim": str(dim), **(meta or {})}
    schema = features_schema(dim, "float32", patch, meta)
    writer = TableWriter(str(path), FEATURES, config={"fake": seed})
    writer.write("00000.parquet", pa.table(cols, schema=schema))
    writer.finalize(["00000.parquet"], stats={}, metadata=meta)


def write_instructions(path: Path, rows: list[dict], shards: int = 3) -> None:
    """``rows``: dicts with sample_id, uid, task, split, conversation (source is filled in)."""
    from lmeye.tables import TableWriter
    from schemas.instructions import INSTRUCTIONS, shard_name

    writer = TableWriter(str(path), INSTRUCTIONS, config={"fake": True})
    names = []
    for split in ("train", "validation"):
        part = [dict(r, source="fake") for r in rows if r["split"] == split]
        per = -(-len(part) // shards) if part else 1
        for k in range(shards):
            chunk = part[k * per : (k + 1) * per]
            name = shard_name(split, k, shards)
            table = pa.Table.from_pylist(chunk, schema=INSTRUCTIONS.with_metadata(INSTRUCTIONS.schema))
            writer.write(name, table)
            names.append(name)
    writer.finalize(names, stats={})


def build_tables(root: Path, n_train: int = 40, n_val: int = 6, missing: tuple[int, ...] = (5, 22),
                 too_long: tuple[int, ...] = (9, 31), text_only: tuple[int, ...] = (13,), dim: int = 8,
                 patch: Optional[tuple[int, int]] = (4, 6)) -> dict[str, Any]:
    """An instructions table (train rows 0..n_train-1 and validation rows) and a features table.

    Train row i has key ``q{i}`` (the first user turn starts with it). Rows in ``missing`` name an
    image with no features, rows in ``too_long`` exceed the fake's max_length, rows in ``text_only``
    have no image. Returns the paths and the keys that must be trained.
    """
    from lmeye.uid import uid_for

    rows, feature_uids, trainable = [], [], []
    tasks = ("short_caption", "vqa")
    for i in range(n_train + n_val):
        split = "train" if i < n_train else "validation"
        key = f"q{i}" if split == "train" else f"v{i}"
        uid = uid_for(f"http://img/{i}.jpg")
        if split == "train" and i in text_only:
            uid = ""
        elif not (split == "train" and i in missing):
            feature_uids.append(uid)
        answer = "red" if i % 2 else "blue"
        question = key + (" word" * 40 if split == "train" and i in too_long else " what colour")
        rows.append({"sample_id": uid_for(f"sample/{i}")[:16], "uid": uid, "task": tasks[i % 2], "split": split,
                     "conversation": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
        if split == "train" and i not in missing and i not in too_long:
            trainable.append(question)
    write_instructions(root / "instructions", rows)
    write_features(root / "features", feature_uids, dim=dim, patch=patch)
    return {"instructions": root / "instructions", "features": root / "features", "trainable": trainable,
            "rows": rows}
