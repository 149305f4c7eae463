"""The IPN's two passes: prefix KV reuse is exact, only IPN weights train, batches don't leak."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmeye.errors import UserError
from lmeye.model import IPN, build_ipn

from lmeye.model.testing import FAMILIES, FEATURE_DIM, MORE_FAMILIES, QA, batch_of, features


def _wake(ipn: IPN) -> IPN:
    """Non-zero transmission, so the <img-d> slots really depend on the request and the image."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in ipn.own_parameters().values():
            p.normal_(0, 0.3)
    return ipn


@pytest.mark.parametrize("family", FAMILIES + MORE_FAMILIES)
def test_prefix_reuse_equals_full_recomputation(ipn_factory, family):
    ipn = _wake(ipn_factory(family))
    batch = batch_of(ipn)
    with torch.no_grad():
        cached = ipn(batch, return_logits=True)
        full = ipn(batch, reuse_prefix=False, return_logits=True)
    real = batch["suffix_mask"].bool()
    assert (cached.logits - full.logits)[real].abs().max().item() <= 1e-4
    assert torch.allclose(cached.per_sample_loss, full.per_sample_loss, atol=1e-5)
    # generation on the same cached path gives what a generate() without the cache gives
    prompts = ipn.collate([ipn.encode(c[:1], img, for_generation=True) for c, img in QA], *features(len(QA)))
    assert ipn.generate(prompts, max_new_tokens=6) == ipn.generate(prompts, max_new_tokens=6, reuse_prefix=False)


def test_gradients_through_the_cache_equal_the_full_pass(ipn_factory):
    ipn = _wake(ipn_factory("llama"))
    batch = batch_of(ipn)
    grads = []
    for reuse in (True, False):
        ipn.zero_grad()
        ipn(batch, reuse_prefix=reuse).loss.backward()
        grads.append({n: p.grad.clone() for n, p in ipn.own_parameters().items() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5), n


def test_only_ipn_parameters_train(ipn_factory):
    ipn = ipn_factory("llama")
    frozen = {n: t.clone() for n, t in ipn.state_dict().items() if n.startswith(("llm.", "rvii.tower."))}
    assert any(n.startswith("rvii.tower.") for n in frozen)  # the CLIP text tower is part of the model...
    before = {n: p.detach().clone() for n, p in ipn.own_parameters().items()}
    opt = torch.optim.Adam(ipn.trainable_parameters(), lr=1e-2)
    batch = batch_of(ipn)
    ipn.train()
    for _ in range(2):  # transmission starts at zero: the parts behind it get gradients from step 2
        opt.zero_grad()
        ipn(batch).loss.backward()
        opt.step()
    for n, p in ipn.named_parameters():
        if n.startswith(("llm.", "rvii.tower.")):
            assert not p.requires_grad and p.grad is None, n
    for n, t in ipn.state_dict().items():
        if n in frozen:
            assert torch.equal(t, frozen[n]), f"{n} changed"  # ...and it is untouched
    changed = {n for n, p in ipn.own_parameters().items() if not torch.equal(p.detach(), before[n])}
    assert changed == set(before)
    assert not ipn.llm.training  # frozen parts stay in eval mode


def test_align_stage_trains_the_visual_mapping_only(ipn_factory):
    ipn = ipn_factory("llama")
    ipn.set_trainable("align")
    names = {n for n, p in ipn.own_parameters().items() if p.requires_grad}
    assert names == {"img_proj.weight", "img_proj.bias", "img_embed"}
    ipn.set_trainable("instruct", train_visual_mapping=False)
    names = {n for n, p in ipn.own_parameters().items() if p.requires_grad}
    assert "img_proj.weight" not in names and {"imgq_embed", "transmit.weight", "imgd_embed"} <= names


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mixed_batch_gives_each_samples_own_loss(ipn_factory, family):
    ipn = _wake(ipn_factory(family))
    emb, patches = features(len(QA))
    encs = [ipn.encode(c, img) for c, img in QA]
    with torch.no_grad():
        together = ipn(ipn.collate(encs, emb, patches)).per_sample_loss
        alone = [ipn(ipn.collate([e], emb[i : i + 1], patches[i : i + 1])).per_sample_loss[0] for i, e in enumerate(encs)]
    assert torch.allclose(together, torch.stack(alone), atol=1e-5)


def test_text_only_sample_goes_through_the_llm_alone(ipn_factory):
    ipn = _wake(ipn_factory("llama"))
    conv, _ = QA[2]
    enc = ipn.encode(conv, has_image=False)
    with torch.no_grad():
        got = ipn(ipn.collate([enc])).loss
        ids = torch.tensor([enc["prefix_ids"] + enc["suffix_ids"]])
        labels = torch.tensor([[-100] * len(enc["prefix_ids"]) + enc["labels"]])
        want = ipn.llm(input_ids=ids, labels=labels).loss
    assert torch.allclose(got, want, atol=1e-5)


def test_generate_greedy_sampling_beam_and_streamer(ipn_factory):
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.ids = []

        def put(self, value):
            self.ids += value.flatten().tolist()

        def end(self):
            pass

    ipn = _wake(ipn_factory("llama"))
    conv = QA[0][0][:1]
    emb, patches = features(1)
    prompt = ipn.collate([ipn.encode(conv, True, for_generation=True)], emb, patches)
    greedy = ipn.generate(prompt, max_new_tokens=5)
    torch.manual_seed(0)
    sampled = ipn.generate(prompt, max_new_tokens=5, do_sample=True, top_k=20, temperature=0.8)
    torch.manual_seed(0)
    assert ipn.generate(prompt, max_new_tokens=5, do_sample=True, top_k=20, temperature=0.8) == sampled
    beam = ipn.generate(prompt, max_new_tokens=5, num_beams=3)
    assert beam == ipn.generate(prompt, max_new_tokens=5, num_beams=3, reuse_prefix=False)
    assert all(isinstance(t, str) for t in greedy + sampled + beam)
    streamer = Collect()
    assert ipn.generate(prompt, max_new_tokens=5, streamer=streamer) == greedy
    assert ipn.tokenizer.decode(streamer.ids, skip_special_tokens=True) == greedy[0]
    assert ipn.chat(conv, emb[0], patches[0], max_new_tokens=5) == greedy[0]


def test_score_choices_is_the_answer_log_likelihood(ipn_factory):
    ipn = _wake(ipn_factory("llama"))
    conv = QA[0][0][:1]
    emb, patches = features(1)
    scores = ipn.score_choices(conv, ["red", "blue square"], emb[0], patches[0])
    enc = ipn.encode(conv + [{"role": "assistant", "content": "blue square"}], True)
    with torch.no_grad():
        out = ipn(ipn.collate([enc], emb, patches))
    assert len(scores) == 2 and scores[1] == pytest.approx(-(out.per_sample_loss * out.num_tokens).item(), abs=1e-4)


@pytest.mark.parametrize("patch_shape", [(16, 64), None])
def test_trained_rvii_and_pooled_only_features(ipn_factory, patch_shape):
    ipn = ipn_factory("qwen2", patch_shape=patch_shape, rvii="transformer", rvii_width=32, rvii_heads=2, clip_pretrained="missing-is-fine")
    assert not any(n.startswith("rvii.tower.") for n, _ in ipn.named_parameters())  # no CLIP text tower loaded
    _wake(ipn)
    batch = batch_of(ipn, patch_shape=patch_shape)
    assert ("patch_tokens" in batch) == (patch_shape is not None)
    out = ipn(batch)
    out.loss.backward()
    assert ipn.rvii.image_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert (ipn(batch, return_logits=True).logits - ipn(batch, reuse_prefix=False, return_logits=True).logits)[batch["suffix_mask"].bool()].abs().max() <= 1e-4


def test_feature_dimension_mismatch_names_both_numbers(ipn_factory):
    ipn = ipn_factory("llama")
    encs = [ipn.encode(c, img) for c, img in QA]
    with pytest.raises(UserError, match=f"dimension 48, the IPN expects {FEATURE_DIM}"):
        ipn.collate(encs, np.zeros((len(QA), 48), np.float32), np.zeros((len(QA), 16, 64), np.float32))
    with pytest.raises(UserError, match="patch-token width 32, the IPN expects 64"):
        ipn.check_features(FEATURE_DIM, (16, 32))


def test_patch_tokens_pooled_to_another_grid_are_refused(ipn_factory):
    """A table extracted with extract.patch_pool 2 (2x2 = 4 tokens) does not fit an IPN trained on the 4x4 grid."""
    ipn = ipn_factory("llama")
    encs = [ipn.encode(c, img) for c, img in QA]
    with pytest.raises(UserError, match="features have 4 patch tokens an image, the IPN was trained on 16"):
        ipn.collate(encs, np.zeros((len(QA), FEATURE_DIM), np.float32), np.zeros((len(QA), 4, 64), np.float32))
    ipn.check_features(FEATURE_DIM, (16, 64))  # its own grid passes


def test_bad_llm_paths_are_one_clear_error(model_cfg, tmp_path):
    from transformers import ViTConfig

    with pytest.raises(UserError, match="no-such-llm"):
        build_ipn(model_cfg(llm=str(tmp_path / "no-such-llm")), FEATURE_DIM, None)
    # an image model is no LLM (an encoder-decoder such as T5 is one: tests/lmeye/model/test_seq2seq.py)
    ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16).save_pretrained(tmp_path / "vit")
    with pytest.raises(UserError, match="is not a causal LM nor an encoder-decoder LM"):
        build_ipn(model_cfg(llm=str(tmp_path / "vit")), FEATURE_DIM, None)
    with pytest.raises(UserError, match="no-such-clip"):
        build_ipn(model_cfg(clip_model="no-such-clip"), FEATURE_DIM, None)


def test_bfloat16_llm_with_float32_ipn_weights(ipn_factory):
    ipn = ipn_factory("opt", dtype="bfloat16")
    assert next(ipn.llm.parameters()).dtype == torch.bfloat16 and ipn.img_proj.weight.dtype == torch.float32
    out = ipn(batch_of(ipn))
    out.loss.backward()
    assert torch.isfinite(out.loss) and ipn.img_proj.weight.grad.abs().sum() > 0


def test_a_patch_grid_is_pooled_into_image_regions():
    from lmeye.model.rvii import pool_tokens

    grid = torch.arange(64.0).view(1, 64, 1)  # an 8 x 8 grid, row-major; each token holds its index
    pooled = pool_tokens(grid, 9).flatten().tolist()
    assert len(pooled) == 9
    # the top-left region averages rows 0-2 x columns 0-2, the centre rows 2-5 x columns 2-5
    assert pooled[0] == pytest.approx(sum(r * 8 + c for r in range(3) for c in range(3)) / 9)
    assert pooled[4] == pytest.approx(sum(r * 8 + c for r in range(2, 6) for c in range(2, 6)) / 16)
    assert pool_tokens(grid, 64).shape == (1, 64, 1) and pool_tokens(grid, 32).shape == (1, 25, 1)  # 5 x 5 regions
    assert pool_tokens(torch.rand(2, 50, 3), 10).shape == (2, 10, 3)  # not a square grid: along the tokens


@pytest.mark.parametrize("rvii", ["clip_text", "transformer"])
def test_centred_rvii_ignores_what_all_tokens_share_and_sees_where_they_are(ipn_factory, rvii):
    extra = {"rvii_width": 32, "rvii_heads": 2} if rvii == "transformer" else {}
    ipn = _wake(ipn_factory("llama", patch_shape=(16, 64), rvii=rvii, rvii_center_tokens=True, **extra))
    request = torch.randn(2, ipn.cfg.num_img_d, ipn.rvii.request_width)
    tokens = torch.randn(2, 16, 64)
    with torch.no_grad():
        out = ipn.rvii(request, tokens)
        shared = torch.randn(2, 1, 64) * 5  # the same vector added to every token of an image
        assert torch.allclose(ipn.rvii(request, tokens + shared), out, atol=1e-4)
        assert not torch.allclose(ipn.rvii(request, tokens.flip(1)), out, atol=1e-3)  # order (position) matters
    ipn(batch_of(ipn, patch_shape=(16, 64))).loss.backward()
    assert ipn.rvii.image_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("transmission", ["shared", "joint"])
def test_transmission_maps_each_rvii_output_or_all_of_them_to_each_slot(ipn_factory, transmission):
    ipn = _wake(ipn_factory("llama", transmission=transmission))
    k = ipn.cfg.num_img_d
    out = torch.randn(2, k, ipn.rvii.out_dim)
    moved = out.clone()
    moved[:, 0] += 1.0  # change the first RVII output only
    ipn.rvii.forward = lambda request, tokens, outs=[out, moved]: outs.pop(0)
    batch = batch_of(ipn)
    request = torch.zeros(2, ipn.hidden)
    two = {"patch_tokens": batch["patch_tokens"][:2]}
    with torch.no_grad():
        changed = (ipn._img_d(two, request) - ipn._img_d(two, request)).abs().sum(-1) > 0
    # shared: only the first <img-d> slot moves; joint: every slot depends on every RVII output
    assert changed[:, 0].all() and changed[:, 1:].all() == (transmission == "joint") and changed[:, 1:].any() == (transmission == "joint")
    fresh = _wake(ipn_factory("llama", transmission=transmission))
    fresh(batch_of(fresh)).loss.backward()
    assert fresh.transmit.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_the_loss_computes_logits_only_at_answer_positions_in_fp32_chunks(ipn_factory, monkeypatch, reuse_prefix):
    """A 128k vocabulary over the whole suffix in fp32 was ~10 GB at micro-batch 16 x 512: the LM head
    runs only where some row has an answer token, and the fp32 cross-entropy goes in chunks."""
    import lmeye.model.ipn as ipn_module

    ipn = _wake(ipn_factory("llama"))
    batch = batch_of(ipn)
    head_rows = []
    ipn.llm.get_output_embeddings().register_forward_hook(lambda m, i, o: head_rows.append(i[0].shape[1]))
    with torch.no_grad():
        reference = ipn(batch, reuse_prefix=reuse_prefix, return_logits=True)  # every suffix position
    answer_positions = int((batch["labels"][:, 1:] != -100).any(0).sum())
    every = batch["suffix_ids"].shape[1] + (0 if reuse_prefix else batch["prefix_ids"].shape[1])
    assert head_rows[-1] == every > answer_positions
    monkeypatch.setattr(ipn_module, "CE_ROWS", 2)  # several chunks even at this size
    out = ipn(batch, reuse_prefix=reuse_prefix)
    assert head_rows[-1] == answer_positions  # the head saw the answer positions only
    assert torch.allclose(out.per_sample_loss, reference.per_sample_loss, atol=1e-6)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in ipn.named_parameters() if p.grad is not None}
    ipn.zero_grad()
    labels, logits = batch["labels"][:, 1:], reference.logits
    ipn(batch, reuse_prefix=reuse_prefix, return_logits=True).loss.backward()  # the unchunked path
    assert grads and all(torch.allclose(grads[n], p.grad, atol=1e-6) for n, p in ipn.named_parameters() if n in grads)
    assert labels.shape[1] == logits.shape[1] - 1


def test_clip_text_rvii_learns_an_embedding_per_image_region(ipn_factory):
    plain = _wake(ipn_factory("llama", patch_shape=(16, 64), rvii_image_tokens=4))
    ipn = _wake(ipn_factory("llama", patch_shape=(16, 64), rvii_image_tokens=4, rvii_image_position=True))
    assert plain.rvii.image_pos is None and "rvii.image_pos" not in plain.trainable_state_dict()
    assert tuple(ipn.rvii.image_pos.shape) == (4, ipn.rvii.tower.width)  # one per 2 x 2 region of the 4 x 4 grid
    assert "rvii.image_pos" in ipn.trainable_state_dict()  # saved with the checkpoint
    request = torch.randn(2, ipn.cfg.num_img_d, ipn.rvii.request_width)
    tokens = torch.randn(2, 16, 64)
    with torch.no_grad():
        ipn.rvii.image_pos.zero_()
        plain.rvii.image_proj.load_state_dict(ipn.rvii.image_proj.state_dict())
        assert torch.allclose(ipn.rvii(request, tokens), plain.rvii(request, tokens), atol=1e-5)  # zero: LMEye's RVII
        step = torch.randn(ipn.rvii.tower.width)  # not a constant vector: the tower's LayerNorm removes those
        ipn.rvii.image_pos[3] += step  # the bottom-right region only
        moved = ipn.rvii(request, tokens)
        assert not torch.allclose(moved, plain.rvii(request, tokens), atol=1e-3)
        shifted = tokens.clone()  # the same change made to the bottom-right region's projected token
        shifted[:, [10, 11, 14, 15]] += torch.linalg.pinv(ipn.rvii.image_proj.weight) @ step
        assert torch.allclose(plain.rvii(request, shifted), moved, atol=1e-3)
    ipn.set_trainable("align")
    assert not ipn.rvii.image_pos.requires_grad
    ipn.set_trainable("instruct")
    ipn(batch_of(ipn, patch_shape=(16, 64))).loss.backward()
    assert (ipn.rvii.image_pos.grad.abs().sum(-1) > 0).all()  # every region's embedding trains
