"""`model:` — the IPN (owned by the model): which frozen LLM and CLIP it joins, and its sizes."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from lmeye.config.base import Section


class ModelConfig(Section):
    # the frozen parts (referenced, never copied into a checkpoint)
    llm: Optional[str] = Field(
        None, description="directory (or hub name where a network exists) of a causal LM (AutoModelForCausalLM) or an encoder-decoder such as T5 (AutoModelForSeq2SeqLM), loaded frozen; required to build an IPN"
    )
    tokenizer: Optional[str] = Field(None, description="tokenizer directory or name; null: the llm's")
    chat_template: Optional[str] = Field(
        None,
        description="chat template: null = the tokenizer's own; a built-in (plain for base models, vicuna_v1, llama2, chatml) or a .jinja file (lmeye.model.templates); a tokenizer without one needs it",
    )
    clip_model: Optional[str] = Field(
        None,
        description="open_clip architecture whose frozen text tower runs RVII (rvii: clip_text); null: the CLIP that made the features table (its manifest names the model and weights), so the two cannot disagree",
    )
    clip_pretrained: Optional[str] = Field(
        None, description="open_clip pretrained tag or local checkpoint file of clip_model; null: the features table's when clip_model is null, else random weights (tests only)"
    )
    clip_model_config_dirs: list[str] = Field(default_factory=list, description="extra directories of open_clip model JSONs")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of the frozen LLM and CLIP text tower")
    attn_implementation: Optional[str] = Field(None, description="LLM attention kernel (sdpa, eager, ...); null: transformers' default")
    # the IPN's own (trained) parts
    rvii: Literal["clip_text", "transformer"] = Field(
        "clip_text",
        description="request-based visual interaction: the frozen CLIP text transformer over [BOS, image tokens, request, EOS] (LMEye), or a small trained transformer (no CLIP text tower needed)",
    )
    num_img: int = Field(1, gt=0, description="`<img>` prompt embeddings from the visual mapping of the pooled image embedding")
    num_img_d: int = Field(5, gt=0, description="k: `<img-d>` embeddings the RVII result is transmitted through (LMEye: 5)")
    rvii_image_tokens: int = Field(
        32, gt=0, description="most image tokens entering RVII; more patch tokens are average-pooled down to this many (CLIP's text context is 77)"
    )
    rvii_center_tokens: bool = Field(
        False,
        description="RVII sees each image token minus the image's mean token, so tokens differ by what is where rather than sharing the whole image's mix (lmeye.model.rvii.center_tokens); false: LMEye's raw tokens",
    )
    transmission: Literal["shared", "joint"] = Field(
        "shared",
        description="how RVII's k outputs become the k `<img-d>` embeddings: one linear map applied to each (shared, LMEye's), or one map from all k outputs to all k slots (joint: learns faster; k^2 times the weights)",
    )
    request: Literal["last", "prefix"] = Field(
        "last",
        description="what RVII reads of the question: the LLM's hidden state at `<img-q>` alone (last, LMEye's), or also its hidden states "
        "at every position of the user's turn, projected (prefix: instruction-aware, as InstructBLIP's Q-Former reads the instruction; "
        "lets RVII match the words of a question, a candidate or the options against the image; rvii: transformer only)",
    )
    rvii_width: int = Field(256, gt=0, description="width of the trained RVII transformer (rvii: transformer)")
    rvii_layers: int = Field(2, gt=0, description="layers of the trained RVII transformer (rvii: transformer)")
    rvii_heads: int = Field(4, gt=0, description="attention heads of the trained RVII transformer (rvii: transformer)")
    seed: int = Field(0, description="seed of the IPN's initial weights")
    # text
    max_length: int = Field(
        512, gt=0,
        description="token budget of one sample (capped by the LLM's context); longer: later turns, then the answer's tail are cut; a sample that would lose its first answer token is skipped (too_long)",
    )
    system_prompt: Optional[str] = Field(None, description="system turn put before every conversation (when the chat template has one)")

    @model_validator(mode="after")
    def _request_fits_rvii(self) -> "ModelConfig":
        # the CLIP text tower is causal with a fixed context of 77: a whole prompt does not fit beside the image
        # regions, and its padding would need a per-row layout (lmeye.model.rvii.TransformerRVII masks it)
        if self.request == "prefix" and self.rvii != "transformer":
            raise ValueError(f"request: prefix needs rvii: transformer (rvii is {self.rvii})")
        return self
