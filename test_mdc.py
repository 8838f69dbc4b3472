"""Tests for mdc.py: each compares against an independent computation, a known value
(ln V) or a property (nothing leaks through a mask), on a CPU in seconds."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import data
import mdc
from data import MASK, PAD

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--width=32", "--enc_depth=1", "--dec_depth=1", "--heads=2", "--img_size=16", "--patch_size=4",
        "--batch_size=16", "--probe=", "--eval_every=0", "--log_every=1"]


def tiny_cfg(*extra):
    return mdc.parse_args(TINY + list(extra))


def tiny_batch(cfg, n=8, seed=0):
    ds = data.Shapes(seed, cfg.img_size)
    imgs, caps = ds.batch(np.arange(n))
    tok = data.Tokenizer.build(ds.vocab_captions(2000))
    return imgs, tok.batch(caps, cfg.max_len)[0], tok


class UniformLogits(nn.Module):
    """A 'model' that predicts the uniform distribution over every token but [MASK]."""

    def __init__(self, V):
        super().__init__()
        self.V = V

    def forward(self, imgs, tokens, real, causal=False):
        logits = torch.zeros(*tokens.shape, self.V)
        logits[..., MASK] = float("-inf")
        return logits


# -----------------------------------------------------------------------------
# objectives


@pytest.mark.parametrize("objective", mdc.OBJECTIVES)
def test_every_objective_gives_a_finite_scalar_and_gradients(objective):
    cfg = tiny_cfg(f"--objective={objective}")
    imgs, x, tok = tiny_batch(cfg)
    model = mdc.Model(cfg, len(tok))
    u, r = mdc.draw_noise(cfg, len(x), 0)
    loss, n = mdc.LOSSES[objective](model, imgs, x, u, r, cfg)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert model.encoder.patch.weight.grad.abs().sum() > 0  # the image encoder learns from every objective
    if objective in ("clip", "siglip"):
        img, txt = model(imgs, x, x != PAD)
        assert img.shape == txt.shape == (len(x), cfg.width)
    else:
        assert model(imgs, x, x != PAD).shape == (len(x), cfg.max_len, len(tok))
        assert model.encoder(imgs).shape == (len(x), (cfg.img_size // cfg.patch_size) ** 2, cfg.width)


@pytest.mark.parametrize("t_min", [0.001, 0.25, 0.5, 0.75])
def test_mdc_elbo_of_uniform_predictions_is_log_v(t_min):
    """With the 1/t weight, E[sum_masked CE / t] / n_real = ln V for uniform predictions, any t_min."""
    cfg = tiny_cfg(f"--t_min={t_min}", "--max_len=24")
    V = 50
    model = UniformLogits(V)
    x = torch.randint(5, V, (64, cfg.max_len))
    x[:, 20:] = PAD  # some padding, which must not count
    losses = []
    for step in range(200):
        u, r = mdc.draw_noise(cfg, len(x), step)
        losses.append(mdc.mdc_loss(model, None, x, u, r, cfg)[0].item())
    mean, se = np.mean(losses), np.std(losses) / np.sqrt(len(losses))
    assert abs(mean - math.log(V - 1)) < max(4 * se, 1e-3), (mean, math.log(V - 1), se)


def test_mdc_unweighted_uniform_is_exactly_log_v_and_matches_hand_computation():
    cfg = tiny_cfg("--mdc_weight=none", "--t_min=0.3")
    V = 40
    x = torch.randint(5, V, (16, cfg.max_len))
    x[:8, 15:] = PAD
    u, r = mdc.draw_noise(cfg, len(x), 3)
    loss, _ = mdc.mdc_loss(UniformLogits(V), None, x, u, r, cfg)
    assert abs(loss.item() - math.log(V - 1)) < 1e-5
    # with t fixed (u = 0 -> t = t_min), the loss is the mean CE over masked tokens, computed by hand
    torch.manual_seed(0)
    logits = torch.randn(16, cfg.max_len, V)

    class Fixed(nn.Module):
        def forward(self, imgs, tokens, real, causal=False):
            return logits

    u = torch.zeros(16)
    loss, n = mdc.mdc_loss(Fixed(), None, x, u, r, cfg)
    ces = []
    for b in range(16):
        for k in range(cfg.max_len):
            if x[b, k] != PAD and r[b, k] < cfg.t_min:
                ces.append(-torch.log_softmax(logits[b, k], -1)[x[b, k]].item())
    assert n == len(ces) and abs(loss.item() - np.mean(ces)) < 1e-5


def test_masked_fraction_follows_t_and_t_stays_in_range():
    cfg = tiny_cfg("--t_min=0.25")
    u, r = mdc.draw_noise(cfg, 4096, 0)
    t = mdc.sample_t(u, cfg.t_min)
    assert t.min() >= 0.25 and t.max() <= 1.0
    assert abs(t.mean().item() - 0.625) < 0.01  # antithetic draw: t evenly spread over [t_min, 1]
    masked = r < t[:, None]                       # the rule mdc_loss uses
    for lo in (0.25, 0.5, 0.75):
        sel = (t >= lo) & (t < lo + 0.05)
        assert abs(masked[sel].float().mean().item() - (lo + 0.025)) < 0.03


def test_masking_in_mdc_loss_matches_t():
    """Record what the model is fed: the fraction of [MASK] per caption tracks t."""
    cfg = tiny_cfg("--t_min=0.001", "--max_len=24")
    seen = {}

    class Spy(UniformLogits):
        def forward(self, imgs, tokens, real, causal=False):
            seen["frac"] = ((tokens == MASK) & real).sum(1) / real.sum(1)
            return super().forward(imgs, tokens, real, causal)

    x = torch.randint(5, 40, (512, cfg.max_len))
    u, r = mdc.draw_noise(cfg, len(x), 0)
    mdc.mdc_loss(Spy(40), None, x, u, r, cfg)
    t = mdc.sample_t(u, cfg.t_min)
    assert torch.corrcoef(torch.stack([seen["frac"], t]))[0, 1] > 0.95


# -----------------------------------------------------------------------------
# attention masks


def test_causal_decoder_leaks_nothing_from_the_future():
    cfg = tiny_cfg()
    imgs, x, tok = tiny_batch(cfg, 4)
    model = mdc.Model(cfg, len(tok)).eval()
    v = model.encoder(imgs)
    real = torch.ones_like(x, dtype=torch.bool)
    base = model.decode(x, v, real, causal=True)
    for k in (0, 5, 12):
        x2 = x.clone()
        x2[:, k + 1] = (x2[:, k + 1] + 1) % len(tok)
        out = model.decode(x2, v, real, causal=True)
        assert torch.allclose(out[:, :k + 1], base[:, :k + 1], atol=1e-6)
        assert not torch.allclose(out[:, k + 1:], base[:, k + 1:])  # the change is seen downstream


@pytest.mark.parametrize("causal", [False, True])
def test_pads_never_influence_real_positions(causal):
    cfg = tiny_cfg()
    imgs, x, tok = tiny_batch(cfg, 4)
    model = mdc.Model(cfg, len(tok)).eval()
    v = model.encoder(imgs)
    real = x != PAD
    base = model.decode(x, v, real, causal)
    junk = torch.where(real, x, torch.randint(5, len(tok), x.shape))  # different tokens at pad positions
    out = model.decode(junk, v, real, causal)
    assert torch.allclose(out[real], base[real], atol=1e-6)
    # and the text encoder of clip ignores them too
    cfg_c = tiny_cfg("--objective=clip")
    mc = mdc.Model(cfg_c, len(tok)).eval()
    assert torch.allclose(mc.embed(v, x, real)[1], mc.embed(v, junk, real)[1], atol=1e-6)


def test_cappa_mixes_parallel_and_causal_examples():
    cfg = tiny_cfg("--objective=cappa")
    real = torch.ones(2, 5, dtype=torch.bool)
    m = mdc.attention_mask(real, torch.tensor([True, False]))
    assert torch.equal(m[0, 0], torch.ones(5, 5).tril().bool())
    assert m[1].all()


# -----------------------------------------------------------------------------
# learning, generation


def overfit(objective, steps=150, n=4):
    torch.manual_seed(0)
    cfg = tiny_cfg(f"--objective={objective}", "--width=64", "--t_min=0.001")
    imgs, x, tok = tiny_batch(cfg, n)
    model = mdc.Model(cfg, len(tok))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        u, r = mdc.draw_noise(cfg, n, step)
        loss, _ = mdc.LOSSES[objective](model, imgs, x, u, r, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), imgs, x, tok, losses


@pytest.mark.parametrize("objective", ["mdc", "ar"])
def test_overfit_one_batch_and_generate_it_back(objective):
    model, imgs, x, tok, losses = overfit(objective, steps=250)
    assert np.mean(losses[-10:]) < 0.1 * np.mean(losses[:5]), (losses[:5], losses[-10:])
    length = (x != PAD).sum(1)
    out = mdc.generate(model, imgs, objective, x.shape[1], length=length if objective == "mdc" else None)
    assert out.dtype == torch.long and out.min() >= 0 and out.max() < len(tok)
    assert not (out == MASK).any()
    got = [tok.decode(o) for o in out]
    want = [tok.decode(o) for o in x]
    assert got == want


def test_mdc_generation_random_order_and_fewer_steps_return_valid_tokens():
    cfg = tiny_cfg()
    imgs, x, tok = tiny_batch(cfg, 3)
    model = mdc.Model(cfg, len(tok), mdc.length_histogram(tok, ["a b c", "a b"], cfg.max_len)).eval()
    out = mdc.generate(model, imgs, "mdc", cfg.max_len, steps=2, order="random", generator=torch.Generator().manual_seed(0))
    assert not (out == MASK).any()
    real = out != PAD
    assert set(real.sum(1).tolist()) <= {3, 4}  # lengths drawn from the prior (3 or 2 words + [EOS])


# -----------------------------------------------------------------------------
# training loop: checkpoints, resume, DDP, stability, CLI


def run_train(tmp_path, *extra):
    cfg = tiny_cfg(f"--out_dir={tmp_path}", *extra)
    return mdc.train(cfg)


def params(path):
    return torch.load(path, weights_only=True)["model"]


def test_checkpoint_round_trip_weights_only(tmp_path):
    model, tok, _, _ = run_train(tmp_path, "--steps=2")
    path = os.path.join(tmp_path, "ckpt.pt")
    ckpt = torch.load(path, weights_only=True)  # plain data only: no pickled objects
    assert ckpt["step"] == 2 and ckpt["vocab"] == tok.itos and ckpt["config"]["steps"] == 2
    loaded, cfg, tok2, _ = mdc.load_checkpoint(path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    assert not os.path.exists(path + ".tmp")


def test_resume_equals_uninterrupted_training(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_train(a, "--steps=6")
    run_train(b, "--steps=6", "--stop_after=3")
    half = params(b / "ckpt.pt")
    assert torch.load(b / "ckpt.pt", weights_only=True)["step"] == 3
    run_train(b, "--steps=6", "--resume")
    pa, pb = params(a / "ckpt.pt"), params(b / "ckpt.pt")
    for k in pa:
        assert torch.allclose(pa[k], pb[k], atol=1e-6), k
    assert not torch.allclose(half["encoder.patch.weight"], pb["encoder.patch.weight"])  # it did train on


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    flags = TINY + ["--steps=3", "--device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "mdc.py", *flags, f"--out_dir={tmp_path / 'one'}"], cwd=HERE,
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                          "mdc.py", *flags, f"--out_dir={tmp_path / 'two'}"], cwd=HERE,
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "max parameter difference across ranks 0" in two.stdout, two.stdout[-2000:]
    p1, p2 = params(tmp_path / "one" / "ckpt.pt"), params(tmp_path / "two" / "ckpt.pt")
    for k in p1:
        assert torch.allclose(p1[k], p2[k], atol=1e-5), k
    assert not torch.equal(p1["encoder.patch.weight"], mdc.Model(tiny_cfg(), 51).encoder.patch.weight)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    run_train(tmp_path, "--steps=4", "--ckpt_every=2", "--stop_after=2")
    good = params(tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit, match="non-finite loss at step"):
        run_train(tmp_path, "--steps=4", "--ckpt_every=2", "--resume", "--lr=1e30")
    after = params(tmp_path / "ckpt.pt")
    assert all(torch.equal(good[k], after[k]) for k in good)


@pytest.mark.parametrize("flag", ["--qk_norm", "--z_loss=0.01"])
def test_stability_flags_change_the_forward_pass(flag):
    torch.manual_seed(0)
    cfg0, cfg1 = tiny_cfg(), tiny_cfg(flag)
    imgs, x, tok = tiny_batch(cfg0, 4)
    m0 = mdc.Model(cfg0, len(tok))
    m1 = mdc.Model(cfg1, len(tok))
    m1.load_state_dict(m0.state_dict(), strict=False)  # same weights; qk_norm adds LayerNorms (init to identity)
    with torch.no_grad():  # give the model large logits so the z-loss and qk-norm matter
        for m in (m0, m1):
            m.head.weight.mul_(50)
            for n, p in m.named_parameters():
                if "qkv" in n and p.ndim == 2:
                    p.mul_(20)
    u, r = mdc.draw_noise(cfg0, 4, 0)
    l0, _ = mdc.mdc_loss(m0, imgs, x, u, r, cfg0)
    l1, _ = mdc.mdc_loss(m1, imgs, x, u, r, cfg1)
    assert abs(l0.item() - l1.item()) > 1e-3


def test_cli_rejects_unknown_flags_and_bad_values():
    with pytest.raises(SystemExit, match=r"(?s)unknown argument '--lrr=1'. Did you mean --lr\?.*--t_min="):
        mdc.parse_args(["--lrr=1"])
    with pytest.raises(SystemExit, match="--steps expects a int"):
        mdc.parse_args(["--steps=many"])
    with pytest.raises(SystemExit, match="--objective must be one of"):
        mdc.parse_args(["--objective=gan"])
    cfg = mdc.parse_args(["--model=small", "--img_size=64", "--qk_norm"])
    assert cfg.width == 384 and cfg.img_size == 64 and cfg.qk_norm is True
