"""Batched per-example LoRA gradients == the batch-1 backward reference, in float64."""

from __future__ import annotations

import pytest
import torch

from rose_select.errors import ConfigError, NonFiniteError
from rose_select.features.gradients import (AdamState, adam_transform, loop_features, pair_row_to_item,
                                   pairwise_loss_fn, per_example_features, sft_loss_fn)
from rose_select.losses import forward_logits, response_logprobs
from rose_select.losses import dpo_loss, sequence_logprob, sft_loss_per_example, sum_per_row, token_logprobs
from rose_select.modeling import LoraSettings, attach_lora, load_model, lora_parameters
from rose_select.tokenization import collate

TOL = dict(rtol=1e-9, atol=1e-11)
# Brute-force checks weight the per-row gradients by other scalars than the batched path does;
# LlamaRMSNorm computes in float32 even in a float64 model, so these agree to float32 rounding.
LOOSE = dict(rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    torch.manual_seed(0)
    model = load_model(str(tiny_model_dir), dtype="float64")
    model = attach_lora(model, LoraSettings(r=3, alpha=6.0, dropout=0.1))
    with torch.no_grad():
        for n, p in lora_parameters(model).items():
            p.normal_(0, 0.3)
    return model.eval()


def _examples(n, seed=0, vocab=300):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(4, 14, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length - 2, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def _pair_batch(chosen, rejected, side):
    return collate(list(chosen) + list(rejected), pad_id=0, padding_side=side)


@pytest.mark.parametrize("side", ["right", "left"])
def test_response_only_head_equals_full_logits(lora_model, side):
    ex = _examples(5, seed=7) + [{"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}]  # no response token
    batch = collate(ex, 0, side)
    logits = forward_logits(lora_model, batch)
    logp, rows = response_logprobs(lora_model, batch)
    full = token_logprobs(logits, batch["labels"])
    mask = batch["labels"][:, 1:] != -100
    torch.testing.assert_close(logp, full[mask], rtol=1e-12, atol=1e-12)
    assert rows.tolist() == mask.nonzero()[:, 0].tolist()
    torch.testing.assert_close(sum_per_row(logp, rows, len(ex)), sequence_logprob(logits, batch["labels"]))
    torch.testing.assert_close(sft_loss_fn(lora_model, batch), sft_loss_per_example(logits, batch["labels"]))
    assert sft_loss_fn(lora_model, batch)[-1] == 0


@pytest.mark.parametrize("side", ["right", "left"])
def test_sft_batched_equals_loop(lora_model, side):
    ex = _examples(5)
    batched = per_example_features(lora_model, collate(ex, 0, side), sft_loss_fn, None, out_dtype=torch.float64)
    ref = loop_features(lora_model, [collate([e], 0, side) for e in ex], sft_loss_fn, None,
                        out_dtype=torch.float64)
    assert batched.shape == ref.shape and ref.abs().max() > 0
    torch.testing.assert_close(batched, ref, **TOL)


def test_sft_adam_batched_equals_loop(lora_model):
    ex = _examples(4, seed=1)
    g = torch.Generator().manual_seed(2)
    moments = {n: (torch.randn(p.shape, generator=g, dtype=torch.float64) * 1e-3,
                   torch.rand(p.shape, generator=g, dtype=torch.float64) * 1e-4 + 1e-6)
               for n, p in lora_parameters(lora_model).items()}
    adam = AdamState(moments, 0.9, 0.999, 1e-8).to("cpu", torch.float64)
    batched = per_example_features(lora_model, collate(ex, 0, "right"), sft_loss_fn, None, adam=adam,
                                   out_dtype=torch.float64)
    ref = loop_features(lora_model, [collate([e], 0, "right") for e in ex], sft_loss_fn, None, adam=adam,
                        out_dtype=torch.float64)
    torch.testing.assert_close(batched, ref, **TOL)
    # the transform itself
    gg, m, v = torch.tensor([[2.0]]), torch.tensor([1.0]), torch.tensor([3.0])
    expect = (0.9 * 1 + 0.1 * 2) / (0.999 * 3 + 0.001 * 4 + 1e-8) ** 0.5
    assert adam_transform(gg, m, v).item() == pytest.approx(expect, rel=1e-6)
    # the engine's precomputed form equals the formula, with non-default hyperparameters too
    state = AdamState({"w": (torch.randn(50, dtype=torch.float64), torch.rand(50, dtype=torch.float64))},
                      0.8, 0.99, 1e-3)
    block = torch.randn(3, 50, dtype=torch.float64)
    torch.testing.assert_close(state.apply("w", block), adam_transform(block, *state.moments["w"], 0.8, 0.99, 1e-3),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("ref", ["base", "self"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_pairwise_batched_equals_loop(lora_model, ref, side):
    ch, rj = _examples(3, seed=3), _examples(3, seed=4)
    fn = pairwise_loss_fn(0.1, ref)
    batched = per_example_features(lora_model, _pair_batch(ch, rj, side), fn, None,
                                   row_to_item=pair_row_to_item(3), n_items=3, out_dtype=torch.float64)
    loop = loop_features(lora_model, [_pair_batch([c], [r], side) for c, r in zip(ch, rj)], fn, None,
                         out_dtype=torch.float64)
    assert batched.abs().max() > 0
    torch.testing.assert_close(batched, loop, **TOL)


def _flat_grad(model, loss):
    params = list(lora_parameters(model).values())
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def test_ref_self_is_half_beta_logprob_difference(lora_model):
    ch, rj = _examples(2, seed=5), _examples(2, seed=6)
    beta = 0.3
    feats = per_example_features(lora_model, _pair_batch(ch, rj, "right"), pairwise_loss_fn(beta, "self"),
                                 None, row_to_item=pair_row_to_item(2), n_items=2, out_dtype=torch.float64)
    for i in range(2):
        lw = sequence_logprob(forward_logits(lora_model, collate([ch[i]], 0)), collate([ch[i]], 0)["labels"]).sum()
        ll = sequence_logprob(forward_logits(lora_model, collate([rj[i]], 0)), collate([rj[i]], 0)["labels"]).sum()
        expect = -beta / 2 * (_flat_grad(lora_model, lw) - _flat_grad(lora_model, ll))
        torch.testing.assert_close(feats[i], expect, **LOOSE)


def test_ref_base_is_dpo_with_adapters_disabled(lora_model):
    ch, rj = _examples(2, seed=7), _examples(2, seed=8)
    feats = per_example_features(lora_model, _pair_batch(ch, rj, "left"), pairwise_loss_fn(0.1, "base"),
                                 None, row_to_item=pair_row_to_item(2), n_items=2, out_dtype=torch.float64)
    for i in range(2):
        bw, bl = collate([ch[i]], 0), collate([rj[i]], 0)
        with torch.no_grad(), lora_model.disable_adapter():
            rw = sequence_logprob(forward_logits(lora_model, bw), bw["labels"])
            rl = sequence_logprob(forward_logits(lora_model, bl), bl["labels"])
        pw = sequence_logprob(forward_logits(lora_model, bw), bw["labels"])
        pl = sequence_logprob(forward_logits(lora_model, bl), bl["labels"])
        assert not torch.allclose(rw, pw)
        expect = _flat_grad(lora_model, dpo_loss(pw, pl, rw, rl, 0.1).sum())
        torch.testing.assert_close(feats[i], expect, **LOOSE)


def test_separate_reference_model(lora_model, tiny_model_dir):
    ref_model = load_model(str(tiny_model_dir), dtype="float64")
    ch, rj = _examples(2, seed=9), _examples(2, seed=10)
    fn = pairwise_loss_fn(0.1, ref_model)
    batched = per_example_features(lora_model, _pair_batch(ch, rj, "right"), fn, None,
                                   row_to_item=pair_row_to_item(2), n_items=2, out_dtype=torch.float64)
    loop = loop_features(lora_model, [_pair_batch([c], [r], "right") for c, r in zip(ch, rj)], fn, None,
                         out_dtype=torch.float64)
    torch.testing.assert_close(batched, loop, **TOL)
    # the base model is the reference "base": same values
    base = per_example_features(lora_model, _pair_batch(ch, rj, "right"), pairwise_loss_fn(0.1, "base"), None,
                                row_to_item=pair_row_to_item(2), n_items=2, out_dtype=torch.float64)
    torch.testing.assert_close(batched, base, **TOL)


@pytest.mark.parametrize("kind", ["sjlt", "rademacher", "none"])
def test_projected_equals_projection_of_exact(lora_model, kind):
    from rose_select.features.gradients import param_numels
    from rose_select.features.projection import make_projector

    ex = _examples(4, seed=11)
    proj = make_projector(kind, 0 if kind == "none" else 64, 7, dict(param_numels(lora_model)))
    batched = per_example_features(lora_model, collate(ex, 0, "right"), sft_loss_fn, proj)
    ref = loop_features(lora_model, [collate([e], 0, "right") for e in ex], sft_loss_fn, proj)
    assert batched.dtype == torch.float32 and batched.shape == (4, proj.dim)
    torch.testing.assert_close(batched, ref, rtol=1e-4, atol=1e-6)


def test_nonfinite_names_item(lora_model):
    ex = _examples(3, seed=12)

    def bad_loss(model, batch):
        loss = sft_loss_fn(model, batch)
        return loss * torch.tensor([1.0, float("nan"), 1.0], dtype=loss.dtype)

    with pytest.raises(NonFiniteError, match="b-id"):
        per_example_features(lora_model, collate(ex, 0), bad_loss, None, item_ids=["a-id", "b-id", "c-id"])


def test_adam_needs_one_row_per_item_and_eval_mode(lora_model):
    ch, rj = _examples(1, seed=13), _examples(1, seed=14)
    adam = AdamState({n: (torch.zeros(p.shape), torch.ones(p.shape))
                      for n, p in lora_parameters(lora_model).items()})
    with pytest.raises(ConfigError, match="one batch row per item"):
        per_example_features(lora_model, _pair_batch(ch, rj, "right"), pairwise_loss_fn(0.1, "self"), None,
                             row_to_item=pair_row_to_item(1), n_items=1, adam=adam)
    lora_model.train()
    try:
        with pytest.raises(ConfigError, match="eval mode"):
            per_example_features(lora_model, collate(ch, 0), sft_loss_fn, None)
    finally:
        lora_model.eval()
