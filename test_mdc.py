"""The tests, on a CPU in a few minutes (70 to 170 s on two cores). Each compares against an
independent computation, a known value (ln V) or a property (nothing leaks through a mask), never
against a number the code itself printed. Sections: mdc.py (objectives, masks, learning, training loop), data.py
(loaders on fixtures the tests write, bad input, the batch stream, the cache), probe.py
(fitters, feature cache, caption scoring, corruptions, position signal)."""
import csv
import dataclasses
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data
import mdc
import probe
from data import MASK, PAD


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one thread. OpenMP's synchronisation between threads costs these tiny
    training steps far more than it gains, most of all on cores that other work keeps busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# =============================================================================
# mdc.py
HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--width=32", "--enc_depth=1", "--dec_depth=1", "--heads=2", "--img_size=16", "--patch_size=4",
        "--batch_size=16", "--probe=", "--eval_every=0", "--log_every=1"]


def tiny_cfg(*extra):
    return mdc.parse_args(TINY + list(extra))


def tiny_batch(cfg, n=8, seed=0):
    ds = data.Shapes(seed, cfg.img_size)
    imgs, caps = ds.batch(np.arange(n))
    tok = data.Tokenizer.build(ds.vocab_captions(2000))
    return imgs, tok.batch(caps, cfg.max_len), tok


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


@pytest.mark.parametrize("objective", ["mdc", "ar", "cappa", "clip", "siglip"])  # the masked-image ones: their section
def test_every_objective_gives_a_finite_scalar_and_gradients(objective):
    cfg = tiny_cfg(f"--objective={objective}")
    imgs, x, tok = tiny_batch(cfg)
    model = mdc.Model(cfg, len(tok))
    loss, n = mdc.LOSSES[objective](model, imgs, x, mdc.draw_noise(cfg, len(x), 0), cfg)
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
        losses.append(mdc.mdc_loss(model, None, x, mdc.draw_noise(cfg, len(x), step), cfg)[0].item())
    mean, se = np.mean(losses), np.std(losses) / np.sqrt(len(losses))
    assert abs(mean - math.log(V - 1)) < max(4 * se, 1e-3), (mean, math.log(V - 1), se)


def test_mdc_unweighted_uniform_is_exactly_log_v_and_matches_hand_computation():
    cfg = tiny_cfg("--mdc_weight=none", "--t_min=0.3")
    V = 40
    x = torch.randint(5, V, (16, cfg.max_len))
    x[:8, 15:] = PAD
    noise = mdc.draw_noise(cfg, len(x), 3)
    loss, _ = mdc.mdc_loss(UniformLogits(V), None, x, noise, cfg)
    assert abs(loss.item() - math.log(V - 1)) < 1e-5
    # with t fixed (u = 0 -> t = t_min), the loss is the mean CE over masked tokens, computed by hand
    torch.manual_seed(0)
    logits = torch.randn(16, cfg.max_len, V)

    class Fixed(nn.Module):
        def forward(self, imgs, tokens, real, causal=False):
            return logits

    loss, n = mdc.mdc_loss(Fixed(), None, x, noise._replace(u=torch.zeros(16)), cfg)
    ces = []
    for b in range(16):
        for k in range(cfg.max_len):
            if x[b, k] != PAD and noise.caption[b, k] < cfg.t_min:
                ces.append(-torch.log_softmax(logits[b, k], -1)[x[b, k]].item())
    assert n == len(ces) and abs(loss.item() - np.mean(ces)) < 1e-5


def test_masked_fraction_follows_t_and_t_stays_in_range():
    cfg = tiny_cfg("--t_min=0.25")
    noise = mdc.draw_noise(cfg, 4096, 0)
    t, r = mdc.sample_t(noise.u, cfg.t_min), noise.caption
    assert t.min() >= 0.25 and t.max() <= 1.0
    assert abs(t.mean().item() - 0.625) < 0.01  # antithetic draw: t evenly spread over [t_min, 1]
    masked = mdc.corrupt(torch.full(r.shape, 7), t, r)[1]   # the corruption mdc_loss uses (no pads here)
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
    noise = mdc.draw_noise(cfg, len(x), 0)
    mdc.mdc_loss(Spy(40), None, x, noise, cfg)
    t = mdc.sample_t(noise.u, cfg.t_min)
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
    real = torch.ones(2, 5, dtype=torch.bool)
    m = mdc.attention_mask(real, torch.tensor([True, False]))
    assert torch.equal(m[0, 0], torch.ones(5, 5).tril().bool())
    assert m[1].all()


class Spy(nn.Module):
    """Calls the model and keeps what its text transformer was fed (tokens, attention mask) and the logits."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inputs, self.logits = model, [], []
        text = model.text.forward
        model.text.forward = lambda tokens, real, causal=False, v=None: (
            self.inputs.append((tokens, mdc.attention_mask(real, causal))) or text(tokens, real, causal, v))

    def forward(self, *args, **kw):
        self.logits.append(self.model(*args, **kw))
        return self.logits[-1]


@pytest.mark.parametrize("objective", ["mdc", "cappa"])
@pytest.mark.parametrize("hide", [False, True])
def test_hide_length_gives_captions_that_differ_only_in_length_the_same_all_mask_input(objective, hide):
    """At t = 1 (mdc) and in cappa's parallel branch every word is masked. With --hide_length the
    decoder input of a 3-word and of a 9-word caption is then the same (every position [MASK] and
    a key, big_vision's decoder_mask of ones), and so are its predictions at the words they share;
    without it the pads are not keys, and the decoder is told the length."""
    cfg = tiny_cfg(f"--objective={objective}", "--t_min=1.0", "--cappa_frac=1.0", f"--hide_length={hide}")
    ds = data.Shapes(0, cfg.img_size)
    imgs, _ = ds.batch(np.arange(1))
    tok = data.Tokenizer.build(ds.vocab_captions(2000))
    x = tok.batch(["a small circle", "a small red circle above a large blue square"], cfg.max_len)   # (2, L)
    torch.manual_seed(0)
    spy = Spy(mdc.Model(cfg, len(tok)).eval())
    loss, n = mdc.LOSSES[objective](spy, imgs.expand(2, -1, -1, -1), x, mdc.draw_noise(cfg, 2, 0), cfg)
    (tokens, mask), logits = spy.inputs[0], spy.logits[0]
    assert (tokens[:, :4] == MASK).all()                              # the short caption's words and [EOS]
    same_input = torch.equal(tokens[0], tokens[1]) and torch.equal(mask[0], mask[1])
    same_output = torch.allclose(logits[0, :4], logits[1, :4], atol=1e-5)
    assert same_input == same_output == hide
    if objective == "mdc":   # --hide_length: the pads are masked and predicted too (LLaDA), else only the words
        assert n == (x.numel() if hide else (x != PAD).sum())


def test_hide_length_generation_and_scoring_read_every_position():
    cfg = tiny_cfg("--hide_length")
    imgs, x, tok = tiny_batch(cfg, 3)
    torch.manual_seed(0)
    model = mdc.Model(cfg, len(tok)).eval()
    out = mdc.generate_mdc(model, imgs, length=torch.tensor([2, 3, 4]))   # the model writes the length
    assert out.shape == (3, cfg.max_len) and not (out == MASK).any()
    v = model.encoder(imgs)
    with torch.no_grad():      # t = 1: every position masked, each a key; the CE summed over all, pads too
        ce = mdc.token_ce(model.decode(torch.full_like(x, MASK), v, torch.ones_like(x, dtype=torch.bool)), x)
    assert torch.allclose(mdc.caption_logprob(model, v, x, "all"), -ce.sum(1), atol=1e-5)


# -----------------------------------------------------------------------------
# learning, generation


def fit_until(model, objective, cfg, imgs, x, threshold, cap, lr=3e-3):
    """Adam on one fixed batch until the mean loss of the last 10 steps is below `threshold`.
    A fixture must not assume that a fixed number of steps converged (on another CPU's floating
    point it may not): past `cap` steps it fails and says so. Returns (model in eval mode, losses)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(cap):
        loss, _ = mdc.LOSSES[objective](model, imgs, x, mdc.draw_noise(cfg, len(x), step), cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step >= 10 and np.mean(losses[-10:]) < threshold:
            return model.eval(), losses
    pytest.fail(f"the {objective} fixture did not converge: mean loss of the last 10 of {cap} steps "
                f"{np.mean(losses[-10:]):.4f}, needed < {threshold}")


def overfit(objective, n=4):
    torch.manual_seed(0)
    cfg = tiny_cfg(f"--objective={objective}", "--width=64", "--t_min=0.001")
    imgs, x, tok = tiny_batch(cfg, n)
    model, losses = fit_until(mdc.Model(cfg, len(tok)), objective, cfg, imgs, x, threshold=0.02, cap=2000)
    return model, imgs, x, tok, losses


@pytest.mark.parametrize("objective", ["mdc", "ar"])
def test_overfit_one_batch_and_generate_it_back(objective):
    model, imgs, x, tok, losses = overfit(objective)
    assert np.mean(losses[:5]) > 2.0                      # it started far from the answer (about ln V)
    length = (x != PAD).sum(1)
    out = mdc.generate_mdc(model, imgs, length) if objective == "mdc" else mdc.generate_ar(model, imgs, x.shape[1])
    assert out.dtype == torch.long and out.min() >= 0 and out.max() < len(tok)
    assert not (out == MASK).any()
    got = [tok.decode(o) for o in out]
    want = [tok.decode(o) for o in x]
    assert got == want


def test_mdc_generation_random_order_and_fewer_steps_return_valid_tokens():
    cfg = tiny_cfg()
    imgs, x, tok = tiny_batch(cfg, 3)
    model = mdc.Model(cfg, len(tok), mdc.length_histogram(["a b c", "a b"], cfg.max_len)).eval()
    out = mdc.generate_mdc(model, imgs, steps=2, order="random", generator=torch.Generator().manual_seed(0))
    assert not (out == MASK).any()
    real = out != PAD
    assert set(real.sum(1).tolist()) <= {3, 4}  # lengths drawn from the prior (3 or 2 words + [EOS])


@pytest.mark.parametrize("order", ["confidence", "random"])
def test_mdc_generation_commits_a_scheduled_number_of_argmax_tokens_per_round(order):
    """What the random order is (LLaDA's random remasking at temperature 0, not MDLM's ancestral
    step): every round unmasks a fixed share of the caption, each position as the argmax of that
    round's prediction; confidence commits the most probable positions first."""
    cfg = tiny_cfg()
    imgs, x, tok = tiny_batch(cfg, 3)
    torch.manual_seed(0)
    model = mdc.Model(cfg, len(tok)).eval()
    rounds = []

    class Watch:                                          # looks like the model to generate_mdc
        cfg, encoder, len_hist = model.cfg, model.encoder, model.len_hist

        def decode(self, tokens, v, real, causal=False):
            rounds.append((tokens.clone(), model.decode(tokens, v, real, causal)))
            return rounds[-1][1]

    length = torch.tensor([9, 6, 3])
    out = mdc.generate_mdc(Watch(), imgs, length, steps=3, order=order, generator=torch.Generator().manual_seed(1))
    for k, (before, logits) in enumerate(rounds):
        after = rounds[k + 1][0] if k + 1 < len(rounds) else out
        new = (before == MASK) & (after != MASK)                                 # (B, L') committed in round k
        assert new.sum(1).tolist() == (length // 3).tolist()                     # 3, 2 and 1 per round
        probs = logits.float().softmax(-1)
        assert torch.equal(after[new], probs.argmax(-1)[new])                    # temperature 0
        if order == "confidence":                                                # no masked position left more sure
            conf = probs.max(-1).values
            left = (after == MASK)
            for b in range(3):
                if left[b].any():
                    assert conf[b][new[b]].min() >= conf[b][left[b]].max()


# -----------------------------------------------------------------------------
# training loop: checkpoints, resume, DDP, stability, CLI


def run_train(tmp_path, *extra, callback=None):
    cfg = tiny_cfg(f"--out_dir={tmp_path}", *extra)
    return mdc.train(cfg, callback)


def params(path):
    return torch.load(path, weights_only=True)["model"]


def test_same_flags_seed_threads_and_code_give_the_same_weights_and_probe_to_the_digit(tmp_path, monkeypatch):
    """A run is a function of its flags, seed, thread count and code: two short runs of the same train
    bit for bit the same weights, and probe.py gives them the same numbers; the checkpoint and the result
    file record how the run was made, and a result file is never overwritten."""
    import functools
    monkeypatch.setattr(data, "shapes_probe", functools.partial(data.shapes_probe, n_train=300, n_test=100))
    res = []
    for run in ("a", "b"):
        run_train(tmp_path / run, "--steps=6", "--seed=3")
        out = tmp_path / f"{run}.json"
        probe.main([f"--ckpt={tmp_path / run / 'ckpt.pt'}", "--fitter=both", "--no-zeroshot", "--no-compositional",
                    "--no-retrieval", "--no-signal", f"--cache_dir={tmp_path / 'cache'}", f"--json={out}"])
        res.append(probe.load_json(str(out)))
    a, b = params(tmp_path / "a" / "ckpt.pt"), params(tmp_path / "b" / "ckpt.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (r["encoders"][0]["metrics"] for r in res)
    assert all(ma[k] == mb[k] for k in ("ridge top1", "ridge lambda", "logreg top1", "logreg lambda"))
    made = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["provenance"]
    assert made["threads"] == torch.get_num_threads() and made["processes"] == 1 and made["train_seconds"] > 0
    assert res[0]["encoders"][0]["training"] == made and res[0]["threads"] == torch.get_num_threads() and res[0]["probe_seconds"] > 0
    assert made["commit"] == res[0]["commit"] == mdc.code_version()           # '' outside a git checkout
    with pytest.raises(data.UsageError, match="never overwritten"):
        probe.parse(["--ckpt=random", f"--json={tmp_path / 'a.json'}"])


def test_each_random_stream_has_its_own_seed(tmp_path):
    """--init_seed, --data_seed and --noise_seed move one stream and leave the others at --seed; -1 is --seed.
    (The data's word counts order the vocabulary, so --data_seed may also change which word gets which
    initial embedding row, and len_hist, a count of the data, is part of the state.)"""
    def streams(*flags):
        cfg = tiny_cfg(*flags)
        model, _, tok, train_set, _, _ = mdc.build(cfg, torch.device("cpu"))
        batch = next(data.batches(train_set, 0, cfg.batch_size, mdc.stream_seed(cfg, "data")))
        return model.state_dict(), batch[1], mdc.draw_noise(cfg, 4, 0).caption
    base, minus, init, dat, noise = (streams("--seed=2", *f) for f in
                                     ([], ["--init_seed=-1", "--data_seed=-1"], ["--init_seed=5"], ["--data_seed=5"], ["--noise_seed=5"]))
    same_w = lambda a, b: all(torch.equal(a[0][k], b[0][k]) for k in a[0] if k != "len_hist")
    assert same_w(base, minus) and base[1] == minus[1] and torch.equal(base[2], minus[2])
    assert not same_w(base, init) and init[1] == base[1] and torch.equal(init[2], base[2])
    assert same_w(base, dat) and dat[1] != base[1] and torch.equal(dat[2], base[2])
    assert same_w(base, noise) and noise[1] == base[1] and not torch.equal(noise[2], base[2])
    with pytest.raises(data.UsageError, match="--noise_seed"):
        tiny_cfg("--noise_seed=-2")


def test_wsd_schedule_is_constant_then_linear_to_zero_and_cosine_is_unchanged():
    cfg = tiny_cfg("--steps=100", "--lr=1.0", "--warmup=0.1", "--schedule=wsd", "--cooldown=0.2")
    lr = [mdc.lr_at(s, cfg) for s in range(100)]
    assert lr[:10] == [(s + 1) / 10 for s in range(10)] and lr[10:80] == [1.0] * 70
    assert lr[80:] == [(100 - s) / 20 for s in range(80, 100)]                    # 1, 0.95, ..., 0.05
    cos = dataclasses.replace(cfg, schedule="cosine")
    assert mdc.lr_at(55, cos) == 0.5 * (1 + math.cos(math.pi * 45 / 90))
    with pytest.raises(data.UsageError, match="--cooldown"):
        tiny_cfg("--schedule=wsd", "--warmup=0.5", "--cooldown=0.6")


def test_train_calls_back_with_every_log_row_and_the_validation_loss(tmp_path):
    rows = []
    run_train(tmp_path, "--steps=4", "--log_every=1", "--eval_every=2", callback=rows.append)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert ["val_loss" in r for r in rows] == [False, True, False, True]
    logged = list(csv.DictReader(open(tmp_path / "log.csv")))    # the same rows, on disk
    assert [int(r["step"]) for r in logged] == [1, 2, 3, 4]
    for r, l in zip(rows, logged):
        assert math.isclose(r["loss"], float(l["loss"]), rel_tol=1e-5) and math.isfinite(r["loss"])
        assert (l["val_loss"] != "") == ("val_loss" in r)


def test_bench_times_the_training_step(tmp_path, capsys):
    out = run_train(tmp_path, "--bench", "--bench_steps=2")
    assert out["step_s"] > 0 and out["data_s"] > 0 and out["flops"] > 0 and 0 < out["mfu"] < 10
    assert "img/s" in capsys.readouterr().out


def test_mfu_compares_against_the_peak_of_the_precision_the_run_uses():
    assert mdc.gpu_peak("NVIDIA H100 80GB HBM3", "bf16") == (989e12, "nominal bf16 peak of NVIDIA H100 80GB HBM3")
    assert mdc.gpu_peak("NVIDIA A100-SXM4-40GB", "fp32")[0] == 156e12          # fp32 matmuls run as TF32
    assert mdc.gpu_peak("NVIDIA A10", "bf16")[0] == 125e12 and mdc.gpu_peak("Tesla T4", "bf16")[0] is None
    assert mdc.gpu_peak("NVIDIA L40S", "bf16")[0] == 362e12 and mdc.gpu_peak("NVIDIA L4", "bf16")[0] == 121e12


def test_one_description_of_the_decoder_input_serves_training_scoring_the_signal_and_sampling(monkeypatch):
    """Every captioner's loss, every scoring rule, the signal measurement and both samplers build the
    decoder's input through mdc.feed, so scoring cannot drift from what the model was trained on."""
    cfg = tiny_cfg()
    imgs, x, tok = tiny_batch(cfg, 4)
    model = mdc.Model(cfg, len(tok)).eval()
    ar = mdc.Model(tiny_cfg("--objective=ar"), len(tok)).eval()
    calls, real = [], mdc.feed
    monkeypatch.setattr(mdc, "feed", lambda *a, **k: calls.append(1) or real(*a, **k))
    counts = {}
    for name, fn in [("training", lambda: mdc.mdc_loss(model, imgs, x, mdc.draw_noise(cfg, 4, 0), cfg)),
                     ("ar", lambda: mdc.ar_loss(ar, imgs, x, None, ar.cfg)),
                     ("cappa", lambda: mdc.cappa_loss(model, imgs, x, mdc.draw_noise(cfg, 4, 0), cfg)),
                     *[(m, lambda m=m: mdc.caption_logprob(model, model.encoder(imgs), x, m, K=2)) for m in probe.MDC_RULES],
                     ("exact", lambda: mdc.caption_logprob(ar, ar.encoder(imgs), x)),
                     ("signal", lambda: probe.signal_terms(model, cfg, imgs, x, K=2)),
                     ("sample", lambda: mdc.generate_mdc(model, imgs, 5)), ("sample ar", lambda: mdc.generate_ar(ar, imgs, 6))]:
        calls.clear()
        fn()
        counts[name] = len(calls)
    assert counts["training"] == counts["ar"] == counts["all"] == counts["exact"] == counts["sample"] == 1, counts
    assert counts["loss"] == counts["signal"] == counts["cappa"] == 2 and counts["sample ar"] == 6, counts
    assert counts["pll"] == 1 + int((x != PAD).any(0).sum())   # which positions are read, then one per position


def test_imports_run_one_way_probe_mdc_data():
    code = "import sys, mdc; assert 'probe' not in sys.modules; import data; assert 'mdc' not in dir(data)"
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_checkpoint_round_trip_weights_only(tmp_path):
    model, tok, _ = run_train(tmp_path, "--steps=2")
    path = os.path.join(tmp_path, "ckpt.pt")
    ckpt = torch.load(path, weights_only=True)  # plain data only: no pickled objects
    assert ckpt["step"] == 2 and ckpt["vocab"] == tok.itos and ckpt["config"]["steps"] == 2
    loaded, cfg, tok2, _ = mdc.load_checkpoint(path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    assert not os.path.exists(path + ".tmp")


def test_int8_checkpoint_keeps_every_weight_within_half_a_step_at_about_a_quarter_of_the_size(tmp_path):
    """save_checkpoint(int8=True): each float matrix as int8 with a scale per row; read back as float32, every
    element within s / 2 of the original, every vector and buffer exact; extra keys ride along."""
    cfg = tiny_cfg("--objective=mdc")
    _, _, tok = tiny_batch(cfg)
    model = mdc.Model(cfg, len(tok))
    full, small = str(tmp_path / "full.pt"), str(tmp_path / "small.pt")
    mdc.save_checkpoint(full, model, None, cfg, tok, 7)
    mdc.save_checkpoint(small, model, None, cfg, tok, 7, int8=True, history={"loss": [2.0, 1.5]})
    loaded, _, _, ckpt = mdc.load_checkpoint(small)
    assert ckpt["history"] == {"loss": [2.0, 1.5]} and ckpt["step"] == 7
    packed = torch.load(small, weights_only=True)["model"]
    size = lambda weights: sum(w.numel() * w.element_size() for w in weights.values())
    assert size(packed) < 0.35 * size(torch.load(full, weights_only=True)["model"])
    for k, w in model.state_dict().items():
        got = loaded.state_dict()[k]
        if w.is_floating_point() and w.dim() >= 2:
            assert packed[k].dtype == torch.int8
            s = packed[k + "@scale"]
            assert ((got - w).abs() <= s / 2 + 1e-7).all(), k
        else:
            assert torch.equal(got, w), k


TUTORIAL_MODELS = {"mdc": [], "ar": ["--objective=ar"], "clip": ["--objective=clip"],
                   "mdc-alias2": ["--alias=2"], "ar-alias2": ["--objective=ar", "--alias=2"]}


@pytest.mark.parametrize("name", sorted(TUTORIAL_MODELS))
def test_tutorial_weights_are_the_default_budget_and_load(name):
    """docs/tutorial/NAME.pt, which tutorial.ipynb loads instead of training: python mdc.py's default flags (the
    tutorial's budget) with the model's own, all steps trained, the loss history beside it, about 1 MB each."""
    path = os.path.join(HERE, "docs", "tutorial", f"{name}.pt")
    model, cfg, tok, ckpt = mdc.load_checkpoint(path)
    want = mdc.parse_args(["--probe="] + TUTORIAL_MODELS[name])
    flags = lambda c: {k: v for k, v in dataclasses.asdict(c).items() if k not in mdc.BOOKKEEPING}
    assert flags(cfg) == flags(want) and ckpt["step"] == cfg.steps and ckpt["int8"]
    assert len(ckpt["history"]["loss"]) == cfg.steps and ckpt["provenance"]["train_seconds"] > 0
    assert os.path.getsize(path) < 1.2e6
    val = data.Shapes(cfg.seed, cfg.img_size, "val", alias=cfg.alias)
    chance = math.log(cfg.batch_size if cfg.objective == "clip" else len(tok) - 1)   # a uniform guess
    assert mdc.evaluate(model, cfg, val, tok, n_batches=1) < chance / 3             # a trained model, not an init


@pytest.mark.parametrize("objective", ["mdc", "clip"])
def test_checkpoints_of_earlier_versions_load(tmp_path, objective):
    """Earlier checkpoints called cross-attention's query projection xattn.qkv, and clip's held a
    frozen logit_bias of 0: both load, with every tensor in its place."""
    cfg = tiny_cfg(f"--objective={objective}")
    _, _, tok = tiny_batch(cfg)
    model = mdc.Model(cfg, len(tok))
    old = {k.replace(".xattn.q.", ".xattn.qkv."): v for k, v in model.state_dict().items()}
    if objective == "clip":
        old["logit_bias"] = torch.tensor(0.0)
    else:
        assert any(".xattn.qkv." in k for k in old)
    path = str(tmp_path / "old.pt")
    mdc.save_checkpoint(path, model, None, cfg, tok, 0)
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, "model": old}, path)
    loaded = mdc.load_checkpoint(path)[0]
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_the_objective_registry_is_whole_and_nothing_else_compares_names():
    assert list(mdc.LOSSES) == list(mdc.OBJECTIVES) and set(probe.RULES) == set(mdc.OBJECTIVES)
    groups = (mdc.CAPTIONERS, mdc.CAUSAL, mdc.CONTRASTIVE, mdc.MASKED_IMAGE, mdc.TAUGHT, mdc.TEACHERS, mdc.ALIAS_LOSS)
    assert all(set(g) <= set(mdc.OBJECTIVES) for g in groups) and set(mdc.CAUSAL) <= set(mdc.CAPTIONERS)
    for obj in mdc.OBJECTIVES:   # the parts each family needs, and only those
        cfg = tiny_cfg(f"--objective={obj}", *(["--teacher=" + __file__] if obj in mdc.TAUGHT else []))
        tcfg = tiny_cfg("--objective=clip") if obj in mdc.TAUGHT else None
        m = mdc.build_model(cfg, 30, teacher_cfg=tcfg)
        assert hasattr(m, "head") == (obj in mdc.CAPTIONERS) and hasattr(m, "txt_proj") == (obj in mdc.CONTRASTIVE)
        assert hasattr(m, "decoder") == (obj in mdc.MASKED_IMAGE) and hasattr(m, "teacher") == (obj in mdc.TAUGHT)
        assert hasattr(m, "logit_bias") == (obj in mdc.CONTRASTIVE and mdc.CONTRASTIVE[obj][1] is not None)
    # an objective's name is compared only in the registry (and its loss's own body): no ==, != or
    # `in` against a string literal that names an objective, anywhere in mdc.py and probe.py
    import ast
    for f in ("mdc.py", "probe.py"):
        tree = ast.parse(open(os.path.join(HERE, f)).read())
        hits = []
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name in {fn.__name__ for fn in mdc.LOSSES.values()}:
                continue
            if isinstance(node, ast.Compare):
                consts = [c for side in node.comparators for c in ast.walk(side) if isinstance(c, ast.Constant)]
                if any(c.value in mdc.OBJECTIVES for c in consts):
                    hits.append(f"{f}:{node.lineno}")
        assert not hits, hits

@pytest.mark.parametrize("objective", ["mdc", "mae"])  # mae: the patch masks come from draw_noise too
def test_resume_equals_uninterrupted_training(tmp_path, objective):
    a, b = tmp_path / "a", tmp_path / "b"
    run_train(a, "--steps=6", f"--objective={objective}")
    run_train(b, "--steps=6", "--stop_after=3", f"--objective={objective}")
    half = params(b / "ckpt.pt")
    assert torch.load(b / "ckpt.pt", weights_only=True)["step"] == 3
    run_train(b, "--steps=6", "--resume", f"--objective={objective}")
    pa, pb = params(a / "ckpt.pt"), params(b / "ckpt.pt")
    for k in pa:
        assert torch.allclose(pa[k], pb[k], atol=1e-6), k
    assert not torch.allclose(half["encoder.patch.weight"], pb["encoder.patch.weight"])  # it did train on


def succeeded(run, log):
    """A finished subprocess exited 0; if not, the message holds its whole stderr, also kept in the file
    log: a child that dies under load (once: SIGABRT in a DDP worker) may explain itself only at length."""
    log.write_text(run.stderr)
    assert run.returncode == 0, f"exit status {run.returncode}; stderr in full (kept in {log}):\n{run.stderr}\nstdout:\n{run.stdout}"


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    flags = TINY + ["--steps=3", "--device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a child killed by a signal prints its stack
    one = subprocess.run([sys.executable, "mdc.py", *flags, f"--out_dir={tmp_path / 'one'}"], cwd=HERE,
                         capture_output=True, text=True, env=env, timeout=300)
    succeeded(one, tmp_path / "one.stderr")
    with socket.socket() as s:  # a free port: another test run on this machine may hold a fixed one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                          "mdc.py", *flags, f"--out_dir={tmp_path / 'two'}"], cwd=HERE,
                         capture_output=True, text=True, env=env, timeout=300)
    succeeded(two, tmp_path / "two.stderr")
    assert "max parameter difference across ranks 0" in two.stdout, two.stdout[-2000:]
    p1, p2 = params(tmp_path / "one" / "ckpt.pt"), params(tmp_path / "two" / "ckpt.pt")
    for k in p1:
        assert torch.allclose(p1[k], p2[k], atol=1e-5), k
    assert not torch.equal(p1["encoder.patch.weight"], mdc.Model(tiny_cfg(), 51).encoder.patch.weight)


def test_ddp_refuses_a_batch_that_does_not_divide_by_the_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                          "mdc.py", *TINY, "--batch_size=3", "--steps=1", "--device=cpu", f"--out_dir={tmp_path}"],
                         cwd=HERE, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode != 0 and "mdc.py: error: --batch_size=3 must divide by the number of processes (2)" in out.stderr
    assert not (tmp_path / "ckpt.pt").exists()


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    run_train(tmp_path, "--steps=4", "--ckpt_every=2", "--stop_after=2")
    good = params(tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit, match=f"non-finite loss at step [34]; stopping, the last good checkpoint is {tmp_path}"):
        run_train(tmp_path, "--steps=4", "--ckpt_every=2", "--resume", "--lr=1e30")  # steps 3-4 come after it
    after = params(tmp_path / "ckpt.pt")
    assert all(torch.equal(good[k], after[k]) for k in good)
    with pytest.raises(SystemExit, match="non-finite loss at step [12]; stopping, no checkpoint was written"):
        run_train(tmp_path / "fresh", "--steps=4", "--ckpt_every=2", "--lr=1e30")


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
    noise = mdc.draw_noise(cfg0, 4, 0)
    l0, _ = mdc.mdc_loss(m0, imgs, x, noise, cfg0)
    l1, _ = mdc.mdc_loss(m1, imgs, x, noise, cfg1)
    assert abs(l0.item() - l1.item()) > 1e-3


def test_training_log_has_gradient_norms_and_grad_clip_0_means_no_clipping(tmp_path):
    # a clip norm far above any gradient and "0" (no clipping) must give the same weights;
    # a tiny clip norm must not (so clipping is really applied when asked for)
    run_train(tmp_path / "off", "--steps=3", "--grad_clip=0")
    run_train(tmp_path / "huge", "--steps=3", "--grad_clip=1e9")
    run_train(tmp_path / "tight", "--steps=3", "--grad_clip=1e-4")
    off, huge, tight = (params(tmp_path / d / "ckpt.pt") for d in ("off", "huge", "tight"))
    assert all(torch.equal(off[k], huge[k]) for k in off)
    assert not torch.allclose(off["encoder.patch.weight"], tight["encoder.patch.weight"])
    rows = list(csv.DictReader(open(tmp_path / "off" / "log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]      # --log_every=1 in TINY
    assert all(float(r["grad_norm_max"]) >= float(r["grad_norm_median"]) > 0 for r in rows)


def test_qk_norm_bounds_the_attention_logits():
    # LayerNormed q and k (unit gain at init) have norm sqrt(hd), so |q.k| / sqrt(hd) <= sqrt(hd)
    # whatever the weights; without it, scaling the projections scales the logits
    imgs, x, tok = tiny_batch(tiny_cfg(), 4)
    peaks = {}
    for flag in ("--qk_norm", "--qk_norm=false"):
        cfg = tiny_cfg(flag)
        torch.manual_seed(0)
        model = mdc.Model(cfg, len(tok)).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ("qkv" in n or ".kv" in n) and p.ndim == 2:
                    p.mul_(30)
        peaks[flag] = probe.attention_logit_max(model, cfg, imgs, x)
    hd = 32 // 2
    assert max(peaks["--qk_norm"].values()) <= hd ** 0.5 + 1e-4, peaks
    assert min(peaks["--qk_norm=false"].values()) > 3 * hd ** 0.5, peaks


# -----------------------------------------------------------------------------
# the GPU's code paths, run on a CPU: bf16 autocast and torch.compile


def short_run(cfg, steps=4, n=8):
    """`steps` training steps of cfg from a seeded init on shapes batches of n: the losses and gradient norms."""
    torch.manual_seed(0)
    ds = data.Shapes(0, cfg.img_size)
    tok = data.Tokenizer.build(ds.vocab_captions(2000))
    model = mdc.build_model(cfg, len(tok))
    opt = mdc.make_optimizer(model, cfg, torch.device("cpu"))
    out = []
    for step in range(steps):
        imgs, caps = ds.batch(np.arange(step * n, (step + 1) * n))
        out.append([t.item() for t in mdc.train_step(model, opt, imgs, tok.batch(caps, cfg.max_len), step, cfg)])
    return np.array(out)                                                    # (steps, 2): loss, gradient norm


needs_cpu_bf16 = pytest.mark.skipif(not torch.amp.is_autocast_available("cpu"), reason="no bf16 autocast on this CPU build")


@needs_cpu_bf16
@pytest.mark.parametrize("objective", [o for o in mdc.OBJECTIVES if o != "milan"])   # milan: needs a teacher run
def test_bf16_autocast_trains_on_a_cpu_close_to_fp32(objective):
    """--dtype=bf16 on a CPU: four steps from the same init and batches as --dtype=fp32. bf16 keeps 8
    significant bits (a rounding error of up to 2^-9 = 0.2% each time); the losses are means over many
    terms and measured 0.4% apart at most here, so 2% is a margin, not a blind spot: a loss computed in
    bf16 itself, or a wrong cast, is off by more. rils weights its KL term by an argmax, which a rounding
    may flip: its losses only have to be finite."""
    fp32, bf16 = (short_run(tiny_cfg(f"--objective={objective}", f"--dtype={d}", "--mim_width=32")) for d in ("fp32", "bf16"))
    assert np.isfinite(bf16).all(), bf16
    assert not np.array_equal(fp32, bf16)                                   # autocast did change the arithmetic
    if objective != "rils":
        assert np.allclose(bf16[:, 0], fp32[:, 0], rtol=0.02, atol=0), (fp32[:, 0], bf16[:, 0])


@needs_cpu_bf16
def test_bf16_feature_extraction_on_a_cpu_is_close_to_fp32():
    cfg = tiny_cfg("--dtype=bf16")
    enc = mdc.random_encoder(cfg, 0, torch.device("cpu"))
    ds = torch.utils.data.TensorDataset(data.Shapes(0, cfg.img_size).batch(np.arange(64))[0], torch.arange(64) % 4)
    (a, ya), (b, yb) = (mdc.extract(enc.features, ds, cfg.img_size, torch.device("cpu"), 16, dtype=d) for d in ("fp32", cfg.dtype))
    assert b.dtype == torch.float32 and torch.equal(ya, yb) and not torch.equal(a, b)
    # features after a LayerNorm and a mean: each row within a few bf16 roundings of fp32's
    assert ((a - b).norm(dim=1) / a.norm(dim=1)).max() < 0.02
    assert mdc.precision(torch.device("cpu")) == "fp32" and mdc.precision(torch.device("cuda")) == "bf16"   # auto


def test_compile_on_a_cpu_gives_the_eager_losses(tmp_path):
    """--compile on a CPU (inductor, C++ kernels): two training steps as in eager mode, in one graph with
    no break. Both fp32; inductor fuses and reorders the sums, so they agree to rounding, 1e-4 relative
    with a wide margin; a wrong kernel is off by far more. The first run on a machine compiles 22 C++
    kernels (41-81 s on the shared 2-core machine); later runs read them from inductor's cache (4-7 s)."""
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile does not support this Python")
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 - whatever stops inductor finding a compiler
        pytest.skip(f"no C++ compiler for inductor here ({type(e).__name__}: {e})")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    rows = {}
    for flags in ([], ["--compile"]):
        rows[bool(flags)] = []
        run_train(tmp_path / str(len(flags)), "--steps=2", "--batch_size=8", "--device=cpu", *flags, callback=rows[bool(flags)].append)
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()
    for eager, compiled in zip(rows[False], rows[True], strict=True):
        for k in ("loss", "grad_norm_max"):
            assert math.isclose(eager[k], compiled[k], rel_tol=1e-4), (k, eager[k], compiled[k])


def test_presets_and_explicit_flags_and_help(capsys):
    cfg = mdc.parse_args(["--model=small", "--img_size=64", "--qk_norm"])
    assert cfg.width == 384 and cfg.img_size == 64 and cfg.qk_norm is True
    with pytest.raises(SystemExit) as e:
        mdc.parse_args(["--help"])
    helptext = capsys.readouterr().out
    assert e.value.code == 0 and all(f"--{f.name}=" in helptext for f in dataclasses.fields(mdc.Config))
    assert "--t_min=0.5" in helptext and "mask ratio" in helptext.split("--t_min=")[1].splitlines()[0]


def write_junk(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a checkpoint")
    return path


# (argv, what the one line must name); {tmp} is a fresh folder, {run} one with a 2-step checkpoint of TINY
MDC_MISTAKES = [
    (["--batch_size=0"], "--batch_size=0"), (["--lr=-1"], "--lr=-1.0"), (["--max_len=1"], "--max_len=1"),
    (["--steps=0"], "--steps=0"), (["--lrr=1"], "did you mean --lr?"), (["--steps=many"], "--steps expects a int"),
    (["--objective=gan"], "--objective='gan'"), (["--t_min=0"], "--t_min=0.0"), (["--img_size=18"], "--patch_size=4"),
    (["--width=30"], "--width=30"), (["--warmup=2"], "--warmup=2.0"), (["--ckpt_every=0"], "--ckpt_every=0"),
    (["--data=laion:/x"], "--data='laion:/x'"), (["--probe=shapes:colour"], "'colour'"),
    (["--data=csv:/missing.csv"], "/missing.csv not found"), (["--data=flickr:/wrong/dir"], "/wrong/dir not found"),
    (["--probe=imagefolder:/nowhere"], "/nowhere/train not found"), (["--probe=cifar10", "--data_root={tmp}"], "cifar-10-batches-py"),
    (["--resume", "--out_dir={tmp}"], "no checkpoint at"), (["--resume", "--out_dir={junk}"], "is not a checkpoint"),
    (["--resume", "--steps=4", "--max_len=12", "--out_dir={run}"], "--max_len=16, this run has --max_len=12"),
    (["--resume", "--steps=4", "--objective=ar", "--out_dir={run}"], "--objective='mdc', this run has --objective='ar'"),
    (["--resume", "--steps=2", "--out_dir={run}"], "already at step 2 of --steps=2"),
    (["--alias=3"], "fits --max_len=16"), (["--alias=2", "--order=shape_first"], "16 words and [EOS]"), (["--dtype=fp16"], "--dtype='fp16'"),
    (["--alias=4", "--max_len=32"], "in 0..3"), (["--alias=1", "--data=csv:/x.csv"], "0 unless --data=shapes"),
    (["--alias_loss=false", "--alias=2"], "--objective=ar"), (["--alias_loss=false", "--objective=ar"], "--alias > 0"),
]


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    mdc.train(tiny_cfg(f"--out_dir={out}", "--steps=2"))
    return out


@pytest.mark.parametrize("argv, names", MDC_MISTAKES, ids=[" ".join(a) for a, _ in MDC_MISTAKES])
def test_a_command_line_mistake_is_one_line_and_status_2(argv, names, tmp_path, two_step_run, capsys, monkeypatch):
    import torchvision

    def offline(*a, **k):  # no test may download CIFAR: this is what an offline machine raises
        raise OSError("network unreachable")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    argv = [a.format(tmp=tmp_path, run=two_step_run, junk=write_junk(tmp_path / "j" / "ckpt.pt").parent) for a in argv]
    with pytest.raises(SystemExit) as e:
        data.command_line(mdc.main, TINY + argv, "mdc.py")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("mdc.py: error: ") and len(err.splitlines()) == 1, err
    assert names in err, err


PROBE_MISTAKES = [(["--ckpt=/missing.pt"], "--ckpt=/missing.pt"), (["--ckpt=random", "--K=0"], "--K=0"),
                  (["--ckpt={junk}"], "is not a checkpoint"), (["--ckpt=random", "--dataset=imagefolder:/nope"], "/nope/train"),
                  (["--ckpt=random", "--dataset=mnist"], "'mnist'"), (["--bogus"], "--bogus"), ([], "--ckpt"),
                  (["--ckpt=random", "--num_workers=-1"], "--num_workers=-1"), (["--ckpt=random", "--dtype=fp16"], "'fp16'"),
                  (["--ckpt={junk}", "--export_timm={tmp}/vit.pt"], "is not a checkpoint"),
                  (["--ckpt={junk}", "--export_timm={tmp}/no/such/folder/vit.pt"], "/no/such/folder/vit.pt"),
                  (["--ckpt=random", "--export_timm={tmp}/vit.pt"], "needs exactly one --ckpt=CHECKPOINT")]


@pytest.mark.parametrize("argv, names", PROBE_MISTAKES, ids=[" ".join(a) for a, _ in PROBE_MISTAKES])
def test_a_probe_command_line_mistake_is_one_line_and_status_2(argv, names, tmp_path, capsys):
    argv = [a.format(junk=write_junk(tmp_path / "junk.pt"), tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as e:
        data.command_line(probe.main, argv, "probe.py")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("probe.py: error: ") and len(err.splitlines()) == 1, err
    assert names in err, err


@pytest.mark.parametrize("script, argv, names", [
    ("mdc.py", ["--lr=-1"], "--lr"), ("probe.py", ["--ckpt=/missing.pt"], "/missing.pt"),
    ("data.py", ["prepare", "--data=csv:/missing.csv", "--out=/tmp/never"], "/missing.csv"),
    ("data.py", ["prepare", "--data=shapes"], "--out")])
def test_each_command_line_exits_2_with_one_line_and_no_traceback(script, argv, names):
    out = subprocess.run([sys.executable, script, *argv], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr[-2000:]
    assert names in out.stderr and "Traceback" not in out.stderr


def test_the_valid_edge_values_still_train(tmp_path):
    for i, edge in enumerate((["--batch_size=1", "--steps=1"], ["--max_len=2", "--steps=1"], ["--objective=clip", "--batch_size=1"])):
        model, tok, _ = run_train(tmp_path / str(i), "--steps=1", *edge)
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_may_change_steps_and_lr(tmp_path):
    run_train(tmp_path, "--steps=2")
    run_train(tmp_path, "--steps=4", "--lr=1e-3", "--resume")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 4


def test_ema_update_is_a_moving_average_with_a_ramp():
    """ema <- d ema + (1 - d) w with d = min(decay, (1 + step) / (10 + step)); integer buffers are copied."""
    m = nn.Linear(1, 1)
    m.register_buffer("count", torch.tensor(3))
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema = {"weight": torch.zeros(1, 1), "bias": m.bias.detach().clone(), "count": torch.tensor(0)}
    mdc.ema_update(ema, m, 0.99, 0)                   # d = 1/10
    assert abs(ema["weight"].item() - 0.9) < 1e-7 and ema["count"].item() == 3
    mdc.ema_update(ema, m, 0.5, 100)                  # the ramp has passed 0.5: d = 0.5
    assert abs(ema["weight"].item() - 0.95) < 1e-7


def test_ema_is_kept_beside_the_weights_changes_no_training_and_resumes(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run_train(a, "--steps=6")
    run_train(b, "--steps=6", "--ema=0.9", "--keep_ckpts", "--ckpt_every=3")
    run_train(c, "--steps=6", "--ema=0.9", "--stop_after=3")
    run_train(c, "--steps=6", "--ema=0.9", "--resume")
    pa, cb, cc = params(a / "ckpt.pt"), torch.load(b / "ckpt.pt", weights_only=True), torch.load(c / "ckpt.pt", weights_only=True)
    assert torch.load(a / "ckpt.pt", weights_only=True)["ema"] is None
    for k in pa:   # the average is only watched: the weights are those of the run without it
        assert torch.allclose(pa[k], cb["model"][k], atol=1e-6), k
        assert torch.allclose(cb["ema"][k].float(), cc["ema"][k].float(), atol=1e-6), k   # resumed: the same average
    assert torch.load(b / "step3.pt", weights_only=True)["ema"] is not None
    ema_model = mdc.load_checkpoint(str(b / "ckpt.pt"), ema=True)[0]
    assert not torch.equal(ema_model.state_dict()["encoder.patch.weight"], cb["model"]["encoder.patch.weight"])
    assert torch.equal(ema_model.state_dict()["encoder.patch.weight"], cb["ema"]["encoder.patch.weight"])
    with pytest.raises(data.UsageError, match="without --ema"):
        mdc.load_checkpoint(str(a / "ckpt.pt"), ema=True)
    with pytest.raises(data.UsageError, match="--ema"):   # what is averaged is part of what the run is
        run_train(a, "--steps=8", "--ema=0.9", "--resume")
    with pytest.raises(data.UsageError, match="--ema"):
        tiny_cfg("--ema=1")


# -----------------------------------------------------------------------------
# masked-image objectives: mae, umd, milan, rils
MIM = ["mae", "umd", "milan", "rils"]


def clip_teacher(tmp_path, *extra):
    """A (random-init) clip checkpoint of the TINY size, for milan's --teacher; returns its path."""
    cfg = tiny_cfg("--objective=clip", *extra)
    _, _, tok = tiny_batch(cfg)
    path = str(tmp_path / "teacher.pt")
    torch.manual_seed(1)
    mdc.save_checkpoint(path, mdc.Model(cfg, len(tok)), None, cfg, tok, 0)
    return path


def mim_model(objective, tmp_path, *extra):
    """(cfg, Model) of a masked-image objective at the TINY size, milan with a clip teacher."""
    if objective == "milan":
        extra = (f"--teacher={clip_teacher(tmp_path)}", *extra)
    cfg = tiny_cfg(f"--objective={objective}", *extra)
    _, _, tok = tiny_batch(cfg)
    torch.manual_seed(0)
    if objective != "milan":
        return cfg, mdc.build_model(cfg, len(tok))
    clip, tcfg = mdc.load_teacher(cfg, torch.device("cpu"))
    model = mdc.build_model(cfg, len(tok), teacher_cfg=tcfg)
    model.copy_teacher(clip)
    return cfg, model


def pixel_mask(masked, cfg):
    """(B, N) patch mask -> (B, 1, S, S) the same mask on the pixels (patches row-major)."""
    h, p = cfg.img_size // cfg.patch_size, cfg.patch_size
    return masked.view(-1, 1, h, h).repeat_interleave(p, 2).repeat_interleave(p, 3)


def own_best_caption(model, imgs, x):
    """x with image 0's caption swapped for the caption rils's model scores highest for image 0, by a
    margin no CPU's rounding can undo: then image 0's best caption is its own, and rils's masked
    term has patches to average over."""
    with torch.no_grad():
        img, txt = model.embed(model.encoder(imgs), x, x != PAD)
        top = (img[0] @ txt.T).topk(2)                                        # image 0 against every caption
    assert top.values[0] - top.values[1] > 1e-4, top
    j = int(top.indices[0])
    x = x.clone()
    x[[0, j]] = x[[j, 0]]
    return x


@pytest.mark.parametrize("objective", MIM)
def test_masked_image_losses_are_finite_and_train_every_part(objective, tmp_path):
    cfg, model = mim_model(objective, tmp_path)
    imgs, x, _ = tiny_batch(cfg)
    if objective == "rils":  # its masked term needs an image whose best caption is its own
        x = own_best_caption(model, imgs, x)
    loss, n = mdc.LOSSES[objective](model, imgs, x, mdc.draw_noise(cfg, len(x), 0), cfg)
    assert loss.shape == () and torch.isfinite(loss) and n > 0
    loss.backward()
    trainable = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    assert {k.split(".")[0] for k, _ in trainable} >= {"encoder", "decoder"} | ({"text", "img_proj", "txt_proj"} if objective == "rils" else set())
    silent = [k for k, p in trainable if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent, silent                             # DDP wants every parameter used, every step


def test_patchify_matches_unfold_and_the_vits_token_order():
    cfg = tiny_cfg()
    imgs = torch.rand(2, 3, 16, 16)
    p, N = cfg.patch_size, 16
    ref = F.unfold(imgs, p, stride=p).view(2, 3, p, p, N).permute(0, 4, 2, 3, 1).reshape(2, N, -1)  # (B, N, p*p*3)
    assert torch.equal(mdc.patchify(imgs, p), ref)
    vit = mdc.ViT(cfg)                                    # token k of the ViT is patch k of patchify
    w = vit.patch.weight.permute(0, 2, 3, 1).reshape(cfg.width, -1)   # (D, p*p*3) in (row, col, channel) order
    tokens = mdc.patchify(imgs, p) @ w.T + vit.patch.bias
    assert torch.allclose(vit.patch(imgs).flatten(2).transpose(1, 2), tokens, atol=1e-5)


@pytest.mark.parametrize("objective", ["mae", "umd"])
def test_the_encoder_never_sees_the_masked_patches(objective, tmp_path):
    cfg, model = mim_model(objective, tmp_path)
    model.eval()
    imgs, x, _ = tiny_batch(cfg)
    ratio = cfg.mask_ratio if objective == "mae" else cfg.umd_mask_noised
    keep, masked = mdc.keep_first(mdc.draw_noise(cfg, len(x), 0).patches, ratio)
    assert (masked.sum(1) == 16 - keep.shape[1]).all() and keep.shape[1] == int(16 * (1 - ratio))
    other = torch.where(pixel_mask(masked, cfg), torch.rand_like(imgs), imgs)   # new pixels in the masked patches
    assert torch.allclose(model.encoder(imgs, keep), model.encoder(other, keep), atol=1e-6)
    assert not torch.allclose(model.encoder(imgs), model.encoder(other), atol=1e-3)  # the full view does see them
    # each visible patch carries its own position: listing the same patches in another order only
    # reorders the output (positions taken by slot, not gathered with the patch, would not)
    assert torch.allclose(model.encoder(imgs, keep.flip(1)), model.encoder(imgs, keep).flip(1), atol=1e-6)


class Recorder(nn.Module):
    """Stands in for Model in the pixel objectives: returns the given predictions, call by call, and
    records what it was fed (its encoder is there for the ImageNet normalisation of mae's targets)."""

    def __init__(self, preds):
        super().__init__()
        self.preds, self.calls, self.encoder = preds, [], mdc.ViT(tiny_cfg())

    def forward(self, imgs, keep=None, t=None):
        self.calls.append(dict(imgs=imgs, keep=keep, t=t))
        return self.preds[len(self.calls) - 1]


def visible_of(keep, N=16):
    return torch.zeros(len(keep), N, dtype=torch.bool).scatter(1, keep, True)


def test_mae_loss_counts_the_masked_patches_only_and_matches_a_hand_computation():
    cfg = tiny_cfg("--objective=mae")
    imgs, x, _ = tiny_batch(cfg, 4)
    noise = mdc.draw_noise(cfg, 4, 0)
    pred = torch.randn(4, 16, 48)
    spy = Recorder([pred])
    loss, n = mdc.mae_loss(spy, imgs, x, noise, cfg)
    vis = visible_of(spy.calls[0]["keep"])
    # by hand: the pixels as the encoder sees them (MAE's targets): normalised per channel by the
    # ImageNet mean and std, then each masked patch by its own mean and (unbiased) variance
    seen = (imgs - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    errs = []
    for b in range(4):
        for k in range(16):
            if not vis[b, k]:
                i, j = divmod(k, 4)
                patch = seen[b, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4].permute(1, 2, 0).reshape(-1)
                target = (patch - patch.mean()) / (patch.var() + 1e-6).sqrt()
                errs.append(((pred[b, k] - target) ** 2).mean().item())
    assert n == len(errs) == 4 * 12 and abs(loss.item() - np.mean(errs)) < 1e-5
    changed = torch.where(vis[..., None], torch.randn_like(pred) * 100, pred)      # visible predictions: anything
    assert mdc.mae_loss(Recorder([changed]), imgs, x, noise, cfg)[0].item() == pytest.approx(loss.item(), abs=1e-6)
    assert mdc.mae_loss(Recorder([pred + 1]), imgs, x, noise, cfg)[0].item() != pytest.approx(loss.item(), abs=1e-3)


def test_umd_noise_loss_on_visible_patches_clean_loss_on_masked_and_t_zero_is_the_clean_image():
    cfg = tiny_cfg("--objective=umd")
    imgs, x, _ = tiny_batch(cfg, 8)
    noise = mdc.draw_noise(cfg, 8, 0)
    noised = noise.u < 0.5
    assert noised.sum() == 4                              # antithetic u: exactly half of the batch
    shapes = Recorder([torch.zeros(4, 16, 96), torch.zeros(4, 16, 96)])
    mdc.umd_loss(shapes, imgs, x, noise, cfg)
    clean, noisy = shapes.calls
    assert torch.allclose(clean["imgs"], imgs[~noised], atol=1e-6) and (clean["t"] == 0).all()   # clean half: the image
    assert clean["keep"].shape[1] == 4 and noisy["keep"].shape[1] == 10             # 75% and 37.5% hidden
    assert (noisy["t"] >= 1).all() and (noisy["t"] <= 1000).all()
    assert not torch.allclose(noisy["imgs"], imgs[noised], atol=1e-3)
    preds = [torch.randn(4, 16, 96), torch.randn(4, 16, 96)]
    base = mdc.umd_loss(Recorder(preds), imgs, x, noise, cfg)[0].item()
    vis = [visible_of(c["keep"])[..., None] for c in (clean, noisy)]                 # (4, 16, 1) each
    loss_with = lambda p: mdc.umd_loss(Recorder(p), imgs, x, noise, cfg)[0].item()
    junk = lambda: torch.randn(4, 16, 48) * 100
    x0_at_visible = [torch.cat([torch.where(v, junk(), p[..., :48]), p[..., 48:]], -1) for p, v in zip(preds, vis)]
    eps_at_masked = [torch.cat([p[..., :48], torch.where(v, p[..., 48:], junk())], -1) for p, v in zip(preds, vis)]
    assert loss_with(x0_at_visible) == pytest.approx(base, abs=1e-5)      # x0 counts on masked patches only
    assert loss_with(eps_at_masked) == pytest.approx(base, abs=1e-5)      # eps counts on visible patches only
    eps_at_visible = [preds[0], torch.cat([preds[1][..., :48], torch.where(vis[1], junk(), preds[1][..., 48:])], -1)]
    assert loss_with(eps_at_visible) > base + 1                           # ... of the noised half
    assert loss_with([preds[0], preds[1] + torch.cat([torch.zeros(4, 16, 48), torch.ones(4, 16, 48)], -1)]) != pytest.approx(base)


def test_cosine_schedule_is_the_telescoped_product():
    # without the 0.999 clip, prod (1 - beta_k) = f(t + 1) / f(0)
    abar = mdc.cosine_alpha_bar(1000)
    f = lambda i: math.cos((i / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    ref = torch.tensor([f(t + 1) / f(0) for t in range(1000)])
    assert torch.allclose(abar[:990], ref[:990], rtol=1e-4, atol=1e-7)
    assert (abar[1:] <= abar[:-1]).all() and abar[0] > 0.999 and abar[-1] < 1e-4


def test_proportional_keys_sample_in_proportion_to_the_weights():
    """milan orders patches by -log(u) / w: the first is patch i with probability w_i / sum(w)."""
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    u = torch.rand(40000, 4, generator=torch.Generator().manual_seed(0))
    first = mdc.proportional_keys(u, w.expand(40000, 4)).argmin(1)
    freq = torch.bincount(first, minlength=4).float() / 40000
    assert torch.allclose(freq, w / w.sum(), atol=0.01), freq          # sd of each frequency < 0.0025


def test_milan_teacher_is_frozen_in_eval_mode_outside_the_optimizer_and_saved(tmp_path):
    cfg, model = mim_model("milan", tmp_path)
    imgs, x, tok = tiny_batch(cfg)
    model.train()
    assert not model.teacher.training and model.encoder.training
    frozen = list(model.teacher.parameters()) + list(model.teacher_proj.parameters())
    assert frozen and not any(p.requires_grad for p in frozen)
    opt = mdc.make_optimizer(model, cfg, torch.device("cpu"))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in frozen} and {id(p) for p in model.encoder.parameters()} <= in_opt
    mdc.milan_loss(model, imgs, x, mdc.draw_noise(cfg, len(x), 0), cfg)[0].backward()
    assert all(p.grad is None for p in frozen) and model.encoder.patch.weight.grad.abs().sum() > 0
    path = str(tmp_path / "milan.pt")                     # the teacher is in the checkpoint: it loads alone
    mdc.save_checkpoint(path, model, opt, cfg, tok, 1)
    os.remove(cfg.teacher)
    loaded, _, _, _ = mdc.load_checkpoint(path)
    assert torch.equal(loaded.teacher.patch.weight, model.teacher.patch.weight)
    assert not loaded.teacher.training and loaded.teacher_cfg.objective == "clip"


def test_milan_teacher_must_be_a_matching_clip_or_siglip_checkpoint(tmp_path):
    with pytest.raises(data.UsageError, match="--teacher='': must be a clip or siglip checkpoint"):
        tiny_cfg("--objective=milan")
    cfg = tiny_cfg("--objective=milan", f"--teacher={clip_teacher(tmp_path, '--patch_size=8')}")
    with pytest.raises(data.UsageError, match="patch_size 8"):
        mdc.load_teacher(cfg, torch.device("cpu"))
    _, _, tok = tiny_batch(cfg)
    mdc.save_checkpoint(str(tmp_path / "ar.pt"), mdc.Model(tiny_cfg("--objective=ar"), len(tok)), None, tiny_cfg("--objective=ar"), tok, 0)
    with pytest.raises(data.UsageError, match="clip or siglip"):
        mdc.load_teacher(tiny_cfg("--objective=milan", f"--teacher={tmp_path / 'ar.pt'}"), torch.device("cpu"))


def test_rils_teacher_distribution_gets_no_gradient(tmp_path, monkeypatch):
    cfg, model = mim_model("rils", tmp_path)
    imgs, x, _ = tiny_batch(cfg)
    seen, real = [], mdc.sentence_logits
    monkeypatch.setattr(mdc, "sentence_logits", lambda *a: seen.append(real(*a)) or seen[-1])
    mdc.rils_loss(model, imgs, x, mdc.draw_noise(cfg, len(x), 0), cfg)[0].backward()
    student, teacher = seen
    assert student.requires_grad and teacher.grad_fn is None and not teacher.requires_grad
    assert model.text.tok.weight.grad.abs().sum() > 0    # the captions' side learns too


def test_rils_reconstruction_term_gives_the_text_encoder_no_gradient(tmp_path):
    """The sentence-space term takes the caption embeddings as constants (RILS gathers them without
    gradient): the text side's gradient of the whole loss is that of the contrastive term alone,
    while the image side's is not."""
    cfg, model = mim_model("rils", tmp_path)
    imgs, x, _ = tiny_batch(cfg)
    x = own_best_caption(model, imgs, x)
    noise = mdc.draw_noise(cfg, len(x), 0)
    text = list(model.text.parameters()) + [model.txt_proj.weight]
    mdc.rils_loss(model, imgs, x, noise, cfg)[0].backward()
    whole = [p.grad.clone() for p in text] + [model.encoder.patch.weight.grad.clone()]
    model.zero_grad()
    keep, _ = mdc.keep_first(noise.patches, cfg.mask_ratio)              # the contrastive term alone, by hand
    img, txt, _, _ = model(imgs, x, x != PAD, keep=keep)
    logits = model.log_scale.exp().clamp(max=100) * img @ txt.T
    labels = torch.arange(len(x))
    ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2).backward()
    assert all(torch.allclose(a, p.grad, rtol=1e-5, atol=1e-8) for a, p in zip(whole, text))
    assert not torch.allclose(whole[-1], model.encoder.patch.weight.grad, rtol=1e-3, atol=1e-6)


def test_umd_pixel_noise_has_its_own_uniforms():
    cfg = tiny_cfg("--objective=umd")
    imgs, x, _ = tiny_batch(cfg, 8)
    noise = mdc.draw_noise(cfg, 8, 0)

    def noised_input(n):                                  # what the encoder sees in the noised half
        rec = Recorder([torch.zeros(4, 16, 96), torch.zeros(4, 16, 96)])
        mdc.umd_loss(rec, imgs, x, n, cfg)
        return rec.calls[1]["imgs"]

    base = noised_input(noise)
    assert torch.equal(base, noised_input(noise._replace(caption=torch.rand(noise.caption.shape))))
    assert not torch.allclose(base, noised_input(noise._replace(pixels=torch.rand(noise.pixels.shape))), atol=1e-3)


def test_extract_returns_features_without_an_autograd_graph():
    """extract runs under no_grad: a graph kept with each batch's features holds every activation of the
    whole probe set (a probe of the tiny ViT on 7,000 scenes grew to 22 GB and was killed for memory)."""
    cfg = mdc.parse_args(["--img_size=16", "--width=32", "--enc_depth=1", "--heads=2"])
    enc = mdc.ViT(cfg)
    ds = torch.utils.data.TensorDataset(torch.rand(6, 3, 16, 16), torch.zeros(6))
    x, _ = mdc.extract(enc.features, ds, cfg.img_size, torch.device("cpu"), batch_size=4)
    assert x.shape == (6, cfg.width) and x.grad_fn is None and not x.requires_grad


def test_umd_probe_feature_is_the_mean_of_the_clean_unmasked_patch_tokens(tmp_path):
    """As umd_loss's docstring says: no class or register tokens, no t, no mask; the feature probe.py
    extracts is the mean over the N patch tokens of the clean image, computed here step by step."""
    cfg, model = mim_model("umd", tmp_path)
    imgs, _, tok = tiny_batch(cfg, 4)
    path = str(tmp_path / "umd.pt")
    mdc.save_checkpoint(path, model, None, cfg, tok, 0)
    enc = probe.load_encoders([path])[0]["encoder"].eval()
    feats = mdc.extract(enc.features, torch.utils.data.TensorDataset(imgs, torch.zeros(4)), cfg.img_size, torch.device("cpu"))[0]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    h = F.conv2d((imgs - mean) / std, enc.patch.weight, enc.patch.bias, stride=cfg.patch_size)  # (B, D, 4, 4)
    h = h.flatten(2).transpose(1, 2) + mdc.sincos_2d(4, cfg.width)        # (B, 16, D): the patches, nothing else
    for blk in enc.blocks:
        h = blk(h)
    assert torch.allclose(feats, enc.ln(h).mean(1), atol=1e-5)


@pytest.mark.parametrize("objective,frac", [("mae", 0.4), ("umd", 0.6), ("milan", 0.1), ("rils", 0.5)])
def test_masked_image_objectives_overfit_one_batch(objective, frac, tmp_path):
    """The loss on one batch of 4 falls to a fraction of where it started (the masks change every step)."""
    cfg, model = mim_model(objective, tmp_path)
    imgs, x, _ = tiny_batch(cfg, 4)
    start = mdc.LOSSES[objective](model, imgs, x, mdc.draw_noise(cfg, 4, 0), cfg)[0].item()
    fit_until(model, objective, cfg, imgs, x, threshold=frac * start, cap=1500)


def test_patch_masks_are_a_pure_function_of_seed_and_step():
    cfg = tiny_cfg("--objective=mae")
    masks = lambda seed, step: mdc.keep_first(mdc.draw_noise(tiny_cfg("--objective=mae", f"--seed={seed}"), 8, step).patches, 0.75)[1]
    assert torch.equal(masks(0, 3), masks(0, 3))
    assert not torch.equal(masks(0, 3), masks(0, 4)) and not torch.equal(masks(0, 3), masks(1, 3))
    noise = mdc.draw_noise(cfg, 8, 3)
    assert [tuple(a.shape) for a in noise] == [(8,), (8, cfg.max_len), (8, 16), (8, 2)]
    # the fields are drawn one after another, u's and the caption's first: a field added later
    # changes none of the draws before it
    g = torch.Generator().manual_seed(3 * 7)              # draw_noise's generator at seed 0, step 3
    torch.rand(1, generator=g), torch.randperm(8, generator=g)   # u's draws (antithetic) come first
    for field in noise[1:]:
        assert torch.equal(field, torch.rand(field.shape, generator=g))


@pytest.mark.parametrize("objective", ["mae", "rils"])
def test_probe_cli_on_masked_image_checkpoints(objective, tmp_path):
    cfg, model = mim_model(objective, tmp_path)
    _, _, tok = tiny_batch(cfg)
    path = str(tmp_path / f"{objective}.pt")
    mdc.save_checkpoint(path, model, None, cfg, tok, 0)
    res = probe.main([f"--ckpt={path}", "--ckpt=random", "--fitter=ridge", "--n_eval=8", "--n_retrieval=6",
                      f"--cache_dir={tmp_path}/cache"])
    m = res["encoders"][0]["metrics"]
    assert 0 <= m["ridge top1"] <= 1
    assert ("zero-shot" in m and "t2i R@1" in m) == (objective == "rils")   # mae scores no caption


# =============================================================================
# data.py: every loader on fixtures written into a temporary folder; bad input; the batch stream
# real data (Flickr8k, CIFAR-10 as an ImageFolder tree) where $MDC_DATA points, else data/ beside this file
REAL_DATA = Path(os.environ.get("MDC_DATA", Path(__file__).parent / "data"))


def png(path, color, size=(12, 8)):
    """A solid-colour image, so a decoded pixel tells which file it came from."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def color_of(img):  # float (3, S, S) -> the (r, g, b) uint8 of its centre pixel
    S = img.shape[-1]
    return tuple(int(round(v * 255)) for v in img[:, S // 2, S // 2].tolist())


COLORS = [(10 * i, 200 - 10 * i, 7 * i) for i in range(10)]


def write_flickr(root, n=8, bad=False):
    """Kaggle layout: Images/ and captions.txt with 2 captions per image, one with a quoted comma.
    bad=True adds a missing file row, an empty and a whitespace caption, and a corrupt image."""
    rows = []
    for i in range(n):
        png(f"{root}/Images/im{i}.png", COLORS[i])
        rows += [(f"im{i}.png", f"photo {i}, with a comma"), (f"im{i}.png", f"second caption {i}")]
    if bad:
        rows += [("gone.png", "a missing file"), ("im0.png", ""), ("im1.png", "   ")]
        with open(f"{root}/Images/broken.png", "wb") as f:
            f.write(b"not an image at all")
        rows += [("broken.png", "a corrupt image")]
    with open(f"{root}/captions.txt", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    return rows


def pairs_of(ds):
    """Every (image identity, caption) pair of a file-based dataset."""
    return {(os.path.basename(s), c) for s, caps in zip(ds.srcs, ds.captions) for c in caps}


def test_tie_rate_holds_in_a_large_sample():
    for tie in (0.0, 0.5, 0.9, 1.0):
        a = data.Shapes(seed=3, tie=tie).attributes(np.arange(60000))
        implied = a["shape"] == np.array(data.TIE_SHAPE)[a["color"]]        # (B, K)
        want = tie + (1 - tie) / len(data.SHAPES)                            # a free draw hits it by chance too
        assert abs(implied.mean() - want) < 0.01, (tie, implied.mean(), want)
        # the colour is drawn the same way whatever the tie: only the shape follows it
        assert np.abs(np.bincount(a["color"].ravel(), minlength=6) / a["color"].size - 1 / 6).max() < 0.01


def test_p_single_sets_the_share_of_one_object_scenes_and_the_default_world_is_unchanged():
    idx = np.arange(20000)
    hashed = data._hash_uniform(3, idx, 0) < 0.5             # the default's rule, written out: half the scenes
    default = data.Shapes(seed=3).attributes(idx)
    assert np.array_equal(default["n"] == 1, hashed)
    for p in (0.0, 0.9, 1.0):
        a = data.Shapes(seed=3, p_single=p).attributes(idx)
        assert abs((a["n"] == 1).mean() - p) < 0.01, (p, (a["n"] == 1).mean())
        for k in ("color", "size", "cell"):                 # only the object count follows p_single
            assert np.array_equal(a[k], default[k]), k
    caps = data.Shapes(seed=3, p_single=1.0).batch(np.arange(200))[1]
    assert all(len(c.split()) == 4 for c in caps)            # "a small red circle": no second object, no relation
    train, val = mdc.caption_data(mdc.parse_args(["--p_single=0.9"]))[:2]
    assert train.p_single == val.p_single == 0.9
    with pytest.raises(data.UsageError, match=r"--p_single=1.5: must be a fraction, in \[0, 1\]"):
        mdc.parse_args(["--p_single=1.5"])


def test_obj_scale_grows_the_training_objects_alone():
    idx = np.arange(64)
    base, big = data.Shapes(seed=4), data.Shapes(seed=4, obj_scale=1.25)
    (ib, cb), (ig, cg) = base.batch(idx), big.batch(idx)
    assert cb == cg                                              # the same scenes and captions, larger objects
    area = lambda imgs: (imgs.max(1).values - imgs.min(1).values > 0.3).float().sum((1, 2))   # (B,) coloured pixels
    ratio = (area(ig) / area(ib)).median().item()
    assert 1.3 < ratio < 1.8, ratio                              # area grows as the radius squared: 1.56
    ref = data.render(data.scene_attributes(4, idx), 32, 4, idx)  # the default is RADIUS itself, bit for bit
    assert torch.equal(ib, ref)
    assert mdc.caption_data(mdc.parse_args(["--obj_scale=1.25"]))[0].obj_scale == 1.25
    with pytest.raises(data.UsageError, match=r"--obj_scale=0.0: must be in \(0, 2\]"):
        mdc.parse_args(["--obj_scale=0"])


def test_the_probe_sets_shape_is_independent_of_its_colour():
    _, y_shape, _, _, _ = data.shapes_probe("shape", 6000, 10)
    _, y_color, _, _, _ = data.shapes_probe("color", 6000, 10)
    joint = np.zeros((6, 6))
    np.add.at(joint, (y_shape.numpy(), y_color.numpy()), 1)
    expected = np.outer(joint.sum(1), joint.sum(0)) / joint.sum()
    chi2 = ((joint - expected) ** 2 / expected).sum()
    assert chi2 < 60, chi2                                       # 25 degrees of freedom: p < 1e-4 above 60
    assert abs(np.trace(joint) / joint.sum() - 1 / 6) < 0.02    # the tied pairs at chance rate


def test_shape_first_changes_the_word_order_and_nothing_else():
    a, b = data.Shapes(seed=1, order="color_first"), data.Shapes(seed=1, order="shape_first")
    ia, ca = a.batch(np.arange(300))
    ib, cb = b.batch(np.arange(300))
    assert torch.equal(ia, ib)                                   # the same scenes
    for x, y in zip(ca, cb):
        wx, wy = x.split(), y.split()
        assert sorted(wx + ["in"] * wx.count("a")) == sorted(wy), (x, y)   # the same words, "in" before each colour
        for np_x, np_y in zip(probe.noun_phrases(wx), probe.noun_phrases(wy)):
            size, colour, shape = wx[np_x[0] + 1:np_x[1]]
            assert wy[np_y[0]:np_y[1]] == ["a", size, shape, "in", colour]
    assert any(len(x.split()) > 5 for x in ca)                   # two-object captions were among them


@pytest.mark.parametrize("order", data.ORDERS)
def test_alias_words_follow_their_shape_and_nothing_else_changes(order):
    plain = data.Shapes(seed=2, order=order)
    imgs0, caps0 = plain.batch(np.arange(400))
    shape_at = {"color_first": 3, "shape_first": 2}[order]     # the shape word's place in its noun phrase
    for r in (0, 1, 2):
        imgs, caps = data.Shapes(seed=2, order=order, alias=r).batch(np.arange(400))
        assert torch.equal(imgs, imgs0)                           # the images do not change
        for c, c0 in zip(caps, caps0):
            w = c.split()
            assert [x for x in w if x not in data.ALIAS_WORDS] == c0.split()   # take the aliases out: r = 0's caption
            assert sum(x in data.ALIAS_WORDS for x in w) == r * len(probe.noun_phrases(w))
            for a, _, _ in probe.noun_phrases(w):                 # right after each shape word, its own r aliases
                shape = w[a + shape_at]
                assert w[a + shape_at + 1:a + shape_at + 1 + r] == list(data.ALIASES[shape][:r]), c
        if r == 0:
            assert caps == caps0
    # the longest caption (two objects, "left of"/"right of") is what longest_caption says, and fits max_len
    for r in (0, 2):
        caps = data.Shapes(seed=2, order=order, alias=r).vocab_captions(3000)
        longest = max(len(c.split()) for c in caps)
        assert longest == data.longest_caption(order, r)
    assert data.longest_caption("color_first", 2) + 1 <= mdc.Config.max_len  # [EOS] included


def test_alias_vocabulary_is_one_to_one_with_the_shapes():
    words = [w for s in data.SHAPES for w in data.ALIASES[s]]
    assert len(set(words)) == len(words) == len(data.SHAPES) * data.MAX_ALIAS   # no alias names two shapes
    assert not set(words) & {w for c in data.Shapes(seed=0).vocab_captions(500) for w in c.split()}  # nor a grammar word
    for r in (0, 2):
        tok = data.Tokenizer.build(data.Shapes(seed=0, alias=r).vocab_captions())
        assert {w for w in data.ALIAS_WORDS if w in tok.stoi} == {data.ALIASES[s][j] for s in data.SHAPES for j in range(r)}


def test_attribute_and_relation_swaps_keep_the_aliases_with_their_shape():
    c = "a small red circle blick dax above a large blue square fep toma"
    assert probe.swap_relation(c) == "a large blue square fep toma above a small red circle blick dax"
    assert probe.swap_attributes(c) == "a small blue circle blick dax above a large red square fep toma"
    c = "a small circle blick in red left of a large square fep in blue"
    assert probe.swap_relation(c) == "a large square fep in blue left of a small circle blick in red"
    cands, _ = probe.shapes_zeroshot("shape", 20, alias=2)
    for row in cands:                                             # candidates differ in the shape and its aliases
        diff = {i for i in range(len(row[0].split())) if len({r.split()[i] for r in row}) > 1}
        assert len(diff) == 3, row


def test_ar_alias_loss_false_leaves_the_aliases_out_of_the_mean(tmp_path):
    cfg = tiny_cfg("--objective=ar", "--alias=2", "--alias_loss=false")
    ds = data.Shapes(0, cfg.img_size, alias=2)
    tok = data.Tokenizer.build(ds.vocab_captions())
    imgs, caps = ds.batch(np.arange(8))
    x = tok.batch(caps, cfg.max_len)
    torch.manual_seed(0)
    model = mdc.Model(cfg, len(tok)).eval()
    noise = mdc.draw_noise(cfg, len(x), 0)
    alias_ids = torch.tensor([tok.stoi[w] for w in data.ALIAS_WORDS if w in tok.stoi])
    model.alias_ids = alias_ids
    full, n_full = mdc.ar_loss(model, imgs, x, noise, dataclasses.replace(cfg, alias_loss=True))
    ctrl, n_ctrl = mdc.ar_loss(model, imgs, x, noise, cfg)
    logits = model(imgs, mdc.shift_right(x), x != PAD, causal=True)             # (B, L, V)
    ce = -logits.log_softmax(-1).gather(-1, x[..., None])[..., 0]               # (B, L) independent of token_ce
    keep = (x != PAD) & ~torch.isin(x, alias_ids)
    assert int(n_full - n_ctrl) == int(torch.isin(x, alias_ids).sum()) > 0
    assert torch.allclose(ctrl, ce[keep].mean(), atol=1e-5) and torch.allclose(full, ce[x != PAD].mean(), atol=1e-5)
    # and build() gives the model the alias words' ids of its own vocabulary
    m, _, tok2, *_ = mdc.build(cfg, torch.device("cpu"))
    assert {tok2.itos[i] for i in m.alias_ids.tolist()} == {w for w in data.ALIAS_WORDS if w in tok2.stoi} != set()


def test_flickr_pairs_split_and_quoted_comma(tmp_path):
    rows = write_flickr(tmp_path)
    assert '"photo 0, with a comma"' in (tmp_path / "captions.txt").read_text()  # the csv module quoted it
    train, val = data.build_caption_data(f"flickr:{tmp_path}", img_size=16, val_frac=0.3)
    assert pairs_of(train) | pairs_of(val) == set(rows)
    assert not {os.path.basename(s) for s in train.srcs} & {os.path.basename(s) for s in val.srcs}
    assert len(val) >= 1 and len(train) + len(val) == 8
    assert train.report() == "flickr: 16 pairs, none skipped"
    # the split is by hash of the image name: the same on a second load
    assert pairs_of(data.build_caption_data(f"flickr:{tmp_path}", img_size=16, val_frac=0.3)[1]) == pairs_of(val)
    imgs, caps = train.batch(np.arange(len(train)), epoch=0)
    assert imgs.shape == (len(train), 3, 16, 16) and imgs.dtype == torch.float32
    for img, cap, src in zip(imgs, caps, train.srcs):  # each caption comes with its own image
        i = int(os.path.basename(src)[2:-4])
        assert cap in (f"photo {i}, with a comma", f"second caption {i}")
        assert color_of(img) == COLORS[i]


def test_bad_input_skipped_counted_and_reported(tmp_path, capsys):
    write_flickr(tmp_path, bad=True)
    train, val = data.build_caption_data(f"flickr:{tmp_path}", img_size=16, val_frac=0.0)
    assert "skipped 3 of 20 pairs: 2 empty captions, 1 missing image" in capsys.readouterr().out
    # the corrupt file exists, so it is found at decode time: replaced by the next image, counted once
    j = [os.path.basename(s) for s in train.srcs].index("broken.png")
    for _ in range(2):
        imgs, caps = train.batch(np.array([j, 0]), epoch=0)
    assert caps[0] in ("photo 0, with a comma", "second caption 0") and color_of(imgs[0]) == COLORS[0]
    assert train.report() == "flickr: skipped 4 of 20 pairs: 2 empty captions, 1 missing image, 1 corrupt image"
    assert "could not decode" in capsys.readouterr().err


def test_corrupt_image_in_worker_does_not_crash(tmp_path):
    write_flickr(tmp_path, bad=True)
    train, _ = data.build_caption_data(f"flickr:{tmp_path}", img_size=16, val_frac=0.0)
    stream = data.batches(train, 0, 9, seed=0, num_workers=2)
    seen = [next(stream) for _ in range(3)]  # 3 epochs of 9 images: the corrupt one is in each
    assert all(len(c) == 9 for _, c in seen)
    assert "a corrupt image" not in {c for _, cs in seen for c in cs}
    assert train.log.counts == {"empty caption": 2, "missing image": 1, "corrupt image": 1}


def test_bad_paths_and_kinds(tmp_path):
    with pytest.raises(data.UsageError, match="unknown dataset kind 'laion'.*coco:ROOT"):
        data.build_caption_data("laion:/x")
    with pytest.raises(data.UsageError, match="Kaggle layout"):
        data.build_caption_data(f"flickr:{tmp_path}/nowhere")
    (tmp_path / "Images").mkdir()
    with pytest.raises(data.UsageError, match="captions.txt"):  # a folder without the expected files
        data.build_caption_data(f"flickr:{tmp_path}")
    with pytest.raises(data.UsageError, match="captions_train2017.json"):
        data.build_caption_data(f"coco:{tmp_path}")
    with pytest.raises(data.UsageError, match=r"\*\.tar"):
        data.build_caption_data(f"wds:{tmp_path}")
    with pytest.raises(data.UsageError, match="data.py prepare"):
        data.build_caption_data(f"cache:{tmp_path}")
    with pytest.raises(data.UsageError, match="unknown probe dataset"):
        data.probe_dataset("mnist", "train")
    with pytest.raises(data.UsageError, match="ImageFolder"):
        data.probe_dataset(f"imagefolder:{tmp_path}/nowhere", "train")
    with pytest.raises(data.UsageError, match="ROOT/train/<class>"):  # a folder, but no train/ in it
        data.probe_dataset(f"imagefolder:{tmp_path}", "train")


def test_coco_uses_official_val(tmp_path):
    for split, ids in (("train", [1, 2, 3]), ("val", [7, 8])):
        for i in ids:
            png(f"{tmp_path}/{split}2017/{i:012d}.png", COLORS[i])
        js = {"images": [{"id": i, "file_name": f"{i:012d}.png"} for i in ids],
              "annotations": [{"image_id": i, "id": 10 * i + k, "caption": f"{split} image {i} caption {k}"}
                              for i in ids for k in range(2)]}
        if split == "train":  # an annotation of an image not in `images`, and an empty caption
            js["annotations"] += [{"image_id": 99, "id": 990, "caption": "ghost"}, {"image_id": 1, "id": 991, "caption": " "}]
        os.makedirs(tmp_path / "annotations", exist_ok=True)
        (tmp_path / "annotations" / f"captions_{split}2017.json").write_text(json.dumps(js))
    train, val = data.build_caption_data(f"coco:{tmp_path}", img_size=8)
    assert pairs_of(train) == {(f"{i:012d}.png", f"train image {i} caption {k}") for i in (1, 2, 3) for k in range(2)}
    assert pairs_of(val) == {(f"{i:012d}.png", f"val image {i} caption {k}") for i in (7, 8) for k in range(2)}
    assert train.report() == "coco: skipped 2 of 12 pairs: 1 missing image, 1 empty caption"
    imgs, caps = val.batch(np.array([0, 1]), epoch=3)
    assert [color_of(x) for x in imgs] == [COLORS[7], COLORS[8]]


@pytest.mark.parametrize("ext", ["csv", "tsv", "jsonl"])
def test_csv_tsv_jsonl_with_named_columns(tmp_path, ext):
    rows = [(f"pics/p{i}.png", f"caption of {i}") for i in range(6)] + [("pics/none.png", "missing")]
    for i in range(6):
        png(f"{tmp_path}/pics/p{i}.png", COLORS[i])
    f = tmp_path / f"pairs.{ext}"
    if ext == "jsonl":
        f.write_text("".join(json.dumps({"file": p, "text": c}) + "\n" for p, c in rows))
    else:
        f.write_text("\n".join(["file\ttext" if ext == "tsv" else "file,text"]
                               + [f"{p}\t{c}" if ext == "tsv" else f"{p},{c}" for p, c in rows]) + "\n")
    with pytest.raises(data.UsageError, match="--image_col"):
        data.build_caption_data(f"csv:{f}")  # default column names are not in this file
    train, val = data.build_caption_data(f"csv:{f}", image_col="file", caption_col="text", val_frac=0.3)
    assert pairs_of(train) | pairs_of(val) == {(f"p{i}.png", f"caption of {i}") for i in range(6)}
    assert not pairs_of(train) & pairs_of(val) and len(val) >= 1
    assert train.report() == "csv: skipped 1 of 7 pairs: 1 missing image"


def write_shards(root):
    """Two img2dataset-style shards: KEY.jpg/png + KEY.txt + KEY.json; one sample lacks its image."""
    os.makedirs(root)
    expected = set()
    for s in range(2):
        with tarfile.open(f"{root}/{s:05d}.tar", "w") as tf:
            def add(name, payload):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
            for k in range(3):
                key, i = f"{s:05d}{k:04d}", 3 * s + k
                buf = io.BytesIO()
                Image.new("RGB", (9, 9), COLORS[i]).save(buf, format="PNG")
                add(f"{key}.png", buf.getvalue())
                add(f"{key}.txt", f"shard {s} sample {k}".encode())
                add(f"{key}.json", b"{}")
                expected.add((f"shard {s} sample {k}", COLORS[i]))
            add(f"{s:05d}9999.txt", b"caption without an image")
    return expected


def test_webdataset_shards(tmp_path):
    expected = write_shards(tmp_path / "wds")
    train, val = data.build_caption_data(f"wds:{tmp_path}/wds", img_size=8, val_frac=0.3)
    assert train.report() == "wds: skipped 2 of 8 pairs: 2 missing images"
    got = set()
    for ds in (train, val):
        imgs, caps = ds.batch(np.arange(len(ds)), epoch=0)
        got |= {(c, color_of(x)) for x, c in zip(imgs, caps)}  # pixels read by tar offset match the caption
    assert got == expected and len(val) >= 1
    assert data.build_caption_data(f"wds:{tmp_path}/wds/0000[01].tar", img_size=8)[0].log.total == 8  # a glob works


def test_caption_per_epoch_and_all_captions(tmp_path):
    write_flickr(tmp_path)
    one, _ = data.build_caption_data(f"flickr:{tmp_path}", img_size=8, val_frac=0.0)
    assert len(one) == 8  # one sample per image
    per_epoch = [one.batch(np.arange(8), epoch=e)[1] for e in range(6)]
    assert per_epoch[0] == one.batch(np.arange(8), epoch=0)[1]      # a pure function of (seed, epoch, image)
    assert len({tuple(c) for c in per_epoch}) > 1                     # but not the same caption every epoch
    every, _ = data.build_caption_data(f"flickr:{tmp_path}", img_size=8, val_frac=0.0, all_captions=True)
    assert len(every) == 16
    _, caps = every.batch(np.arange(16))
    assert sorted(caps) == sorted(c for cs in one.captions for c in cs)


def test_batches_resume_and_rank_slices(tmp_path):
    write_flickr(tmp_path)
    train, _ = data.build_caption_data(f"flickr:{tmp_path}", img_size=8, val_frac=0.0)
    take = lambda it, n: [next(it) for _ in range(n)]
    full = take(data.batches(train, 0, 6, seed=3), 5)  # 30 samples: crosses 3 epochs of 8 images
    resumed = take(data.batches(train, 2, 6, seed=3), 3)
    for (x, c), (y, d) in zip(full[2:], resumed):
        assert torch.equal(x, y) and c == d
    workers = take(data.batches(train, 2, 6, seed=3, num_workers=2), 3)  # workers do not change the order
    for (x, c), (y, d) in zip(full[2:], workers):
        assert torch.equal(x, y) and c == d
    ranks = [take(data.batches(train, 0, 6, seed=3, rank=r, world=2), 5) for r in (0, 1)]
    for step in range(5):
        assert torch.equal(torch.cat([ranks[0][step][0], ranks[1][step][0]]), full[step][0])
        assert ranks[0][step][1] + ranks[1][step][1] == full[step][1]
    # shapes data goes through the same stream
    s = data.build_caption_data("shapes", img_size=8)[0]
    a, b = take(data.batches(s, 0, 4, 0), 3), take(data.batches(s, 1, 4, 0), 2)
    assert torch.equal(a[2][0], b[1][0]) and a[1][1] == b[0][1]


def test_cache_round_trip(tmp_path):
    write_flickr(tmp_path / "src", bad=True)
    manifest = data.prepare(f"flickr:{tmp_path}/src", 16, str(tmp_path / "cache"), workers=1, val_frac=0.3)
    assert manifest["skipped"] == {"empty caption": 2, "missing image": 1, "corrupt image": 1}
    assert manifest["n_images"] == 8 and manifest["pairs_total"] == 20 and manifest["pairs_kept"] == 16
    assert os.path.getsize(tmp_path / "cache" / "images.u8") == 8 * 16 * 16 * 3
    src = data.build_caption_data(f"flickr:{tmp_path}/src", img_size=16, val_frac=0.3)
    cached = data.build_caption_data(f"cache:{tmp_path}/cache", img_size=16)
    for a, b in zip(src, cached):
        good = [i for i, s in enumerate(a.srcs) if "broken" not in s]
        assert [a.captions[i] for i in good] == b.captions
        x, c = a.batch(np.array(good), epoch=1)
        y, d = b.batch(np.arange(len(good)), epoch=1)
        assert (x - y).abs().max() <= 0.5 / 255 and y.dtype == torch.float32
    assert "skipped 4 of 20 pairs" in cached[0].report()
    small, _ = data.build_caption_data(f"cache:{tmp_path}/cache", img_size=8)  # a 16 px cache feeds an 8 px run
    assert small.batch(np.arange(3))[0].shape == (3, 3, 8, 8)


def test_augment_shape_range_and_determinism():
    x = torch.rand(16, 3, 24, 24)
    y = data.augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert torch.equal(y, data.augment(x, torch.Generator().manual_seed(0)))
    assert not torch.allclose(y, x)
    # a horizontal ramp stays a ramp, rising or (flipped) falling: a crop + flip, no rotation or shear
    ramp = torch.linspace(0, 1, 24).expand(16, 3, 24, 24).contiguous()
    z = data.augment(ramp, torch.Generator().manual_seed(1))
    d = z[..., 1:] - z[..., :-1]  # (16, 3, 24, 23)
    assert ((d >= -1e-6).all(-1) | (d <= 1e-6).all(-1)).all()
    assert (z[:, :, 0, :] - z[:, :, -1, :]).abs().max() < 1e-5  # every row the same


def test_truncation_report():
    tok = data.Tokenizer.build(["a b c d e f", "a b"])
    msg = data.truncation_report(["a b c d e f", "a b", "a b c", "a"], max_len=4)
    assert "1 of 4 captions (25.00%)" in msg
    ids = tok.batch(["a b c d e f"], 4)
    assert ids[0].tolist() == [tok.stoi[w] for w in "a b c".split()] + [data.EOS]  # cut, [EOS] kept last


def test_imagefolder_probe_classes_and_cap(tmp_path):
    for split in ("train", "val"):
        for c in range(5):
            for k in range(4):
                png(f"{tmp_path}/{split}/n0{c}/{k}.png", COLORS[c], size=(10, 10))
    (tmp_path / "wnids.txt").write_text("n03\nn01\n")
    ds = data.probe_dataset(f"imagefolder:{tmp_path}", "val", img_size=8, classes=str(tmp_path / "wnids.txt"), per_class=3)
    assert ds.n_classes == 2 and len(ds) == 6 and ds.classes == ["n01", "n03"]
    x, y = ds[5]
    assert x.shape == (3, 8, 8) and y == 1 and color_of(x) == COLORS[3]
    sub = [data.probe_dataset(f"imagenet:{tmp_path}", s, img_size=8, classes=c, seed=4) for s, c in (("train", 3), ("val", "3"))]
    assert sub[0].classes == sub[1].classes and len(sub[0].classes) == 3 and len(sub[0]) == 12
    for x, y in sub[1]:  # labels index the same class list in both splits
        assert color_of(x) == COLORS[int(sub[1].classes[y][-1])]


def jpeg_tree(root, n_per_class=8, classes=("a", "b", "c")):
    """ROOT/train/<class>/*.jpg: noise photos in a few shapes (portrait, landscape, square), under 512 px
    so that PIL's JPEG draft decodes them at full scale; and one corrupt file in class b."""
    rng = np.random.default_rng(0)
    sizes = [(300, 260), (260, 330), (256, 256), (341, 299)]
    for c in classes:
        os.makedirs(f"{root}/train/{c}")
        for k in range(n_per_class):
            w, h = sizes[k % len(sizes)]
            small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)    # smooth enough to matter under a crop
            Image.fromarray(small).resize((w, h), Image.BILINEAR).save(f"{root}/train/{c}/{k}.jpg", quality=90)
    (root / "train" / "b" / "3b.jpg").write_bytes(b"not a jpeg")
    return sorted(str(p) for p in (root / "train").glob("*/*.jpg"))


@pytest.mark.parametrize("size", [224, 16])
def test_a_streamed_imagefolder_gives_the_features_of_the_images_decoded_in_memory(size, tmp_path, capsys):
    """probe_batches (DataLoader workers, batch by batch) against the old way: every image decoded into one
    array first, then the features. At 224 px the decode is torchvision's evaluation transform (Resize(256)
    bicubic, CenterCrop(224)), an independent implementation; below 224 PIL's ImageOps.fit, as before."""
    from PIL import ImageOps
    import torchvision.transforms as T
    files = [f for f in jpeg_tree(tmp_path) if not f.endswith("3b.jpg")]            # sorted: class, then name
    labels = torch.tensor(["abc".index(f.split(os.sep)[-2]) for f in files])
    if size == 224:
        tf = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224)])
        decode = lambda f: np.asarray(tf(Image.open(f).convert("RGB")))
    else:
        def decode(f):
            im = Image.open(f)
            im.draft("RGB", (size, size))
            return np.asarray(ImageOps.fit(im.convert("RGB"), (size, size), Image.BICUBIC))
    old = torch.from_numpy(np.stack([decode(f) for f in files])).permute(0, 3, 1, 2)   # (N, 3, S, S) uint8
    ds = data.probe_dataset(f"imagefolder:{tmp_path}", "train", img_size=size)
    assert isinstance(ds, data.FolderImages) and len(ds) == len(files) + 1           # nothing decoded yet
    cfg = mdc.parse_args([f"--img_size={size}", f"--patch_size={min(size, 32) // 2}", "--width=32", "--enc_depth=1", "--heads=2"])
    enc = mdc.random_encoder(cfg, 0, torch.device("cpu"))
    x, y = mdc.extract(enc.features, ds, size, torch.device("cpu"), batch_size=5, num_workers=2)
    assert "skipped 1 of 25 images: could not decode" in capsys.readouterr().err
    ref, yref = mdc.extract(enc.features, data.ImageLabels(old, labels, 3, "old"), size, torch.device("cpu"), batch_size=64)
    assert torch.equal(y, labels) and torch.equal(yref, labels)                      # same order, corrupt file's label gone
    assert torch.allclose(x, ref, atol=1e-5), (x - ref).abs().max()
    imgs, _ = data.dataset_tensors(ds, torch.arange(10))                             # the pixels themselves, first 10 files
    assert torch.equal(imgs, old[:10])


def test_imagenet100_is_cmcs_100_classes_and_restricts_a_tree(tmp_path):
    wnids = data.CLASS_LISTS["imagenet100"]
    assert len(wnids) == len(set(wnids)) == 100 and all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    # CMC's imagenet100.txt (github.com/HobbitLong/CMC): its first two and last lines, in its order
    assert wnids[:2] == ["n02869837", "n01749939"] and wnids[-1] == "n02090622"
    others = ["n01440764", "n01443537"]                                  # ImageNet-1k classes outside the subset
    for split in ("train", "val"):
        for i, w in enumerate(wnids + others):
            png(f"{tmp_path}/{split}/{w}/0.png", (i, 0, 0), size=(4, 4))   # the red channel names the folder
    ds = data.probe_dataset(f"imagenet:{tmp_path}", "val", img_size=4, classes="imagenet100")
    assert ds.classes == sorted(wnids) and ds.n_classes == 100 and len(ds) == 100
    for x, y in ds:
        assert (wnids + others)[color_of(x)[0]] == ds.classes[y]
    few = tmp_path / "few"
    for w in wnids[:3] + others:
        png(f"{few}/train/{w}/0.png", (0, 0, 0))
        png(f"{few}/val/{w}/0.png", (0, 0, 0))
    with pytest.raises(data.UsageError, match="--classes=imagenet100: 97 classes not in"):
        data.probe_dataset(f"imagenet:{few}", "train", classes="imagenet100")


def test_cifar_offline_message(tmp_path, monkeypatch):
    import torchvision
    def offline(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(data.UsageError, match="cifar-10-batches-py"):
        data.probe_dataset("cifar10", "train", data_root=str(tmp_path))


@pytest.mark.skipif(not (REAL_DATA / "flickr8k" / "captions.txt").exists(), reason="no flickr8k in $MDC_DATA (default data/)")
def test_real_flickr8k():
    train, val = data.build_caption_data(f"flickr:{REAL_DATA / 'flickr8k'}", img_size=32)
    assert train.log.total == 40455 and len(train) + len(val) == 8091
    assert not set(train.srcs) & set(val.srcs)
    imgs, caps = next(data.batches(train, 0, 8, seed=0))
    assert imgs.shape == (8, 3, 32, 32) and len(caps) == 8 and all(caps)


@pytest.mark.skipif(not (REAL_DATA / "cifar10" / "train").exists(), reason="no cifar10 in $MDC_DATA (default data/)")
def test_real_cifar10_imagefolder():
    tr = data.probe_dataset(f"imagefolder:{REAL_DATA / 'cifar10'}", "train", per_class=20)
    te = data.probe_dataset(f"imagefolder:{REAL_DATA / 'cifar10'}", "val", per_class=20)  # val -> test/
    assert tr.n_classes == te.n_classes == 10 and len(tr) == len(te) == 200
    x, y = te[0]
    assert x.shape == (3, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1 and y == 0


@pytest.mark.skipif(not (REAL_DATA / "flickr8k").exists() or not (REAL_DATA / "cifar10").exists(),
                    reason="no flickr8k or cifar10 in $MDC_DATA (default data/)")
def test_real_flickr8k_trains_and_cifar10_probes(tmp_path):
    """End to end on real data: a few MDC steps on Flickr8k (augmented), then the encoder's
    features on CIFAR-10 read through the ImageFolder path."""
    cfg = tiny_cfg(f"--data=flickr:{REAL_DATA / 'flickr8k'}", "--steps=3", "--augment", "--vocab_min_count=5",
                   f"--out_dir={tmp_path}")
    model, tok, val = mdc.train(cfg)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["vocab"] == tok.itos and len(tok) > 1000  # a real vocabulary
    assert all(torch.isfinite(p).all() for p in model.parameters())
    ds = data.probe_dataset(f"imagefolder:{REAL_DATA / 'cifar10'}", "train", cfg.img_size, per_class=5)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        f = model.eval().encoder.features(x)
    assert f.shape == (50, cfg.width) and torch.isfinite(f).all()


# =============================================================================
# probe.py: fitters against known answers and an independent fit, feature cache, caption scoring
def blobs(n, d, c, sep, seed=0):
    """Gaussian class blobs: (x (n, d), y (n,)); larger sep = easier."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    means = torch.randn(c, d, generator=g) * sep
    return means[y] + torch.randn(n, d, generator=g), y


def split(x, y, n_train):
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


quiet = dict(log=lambda s: None)


# -----------------------------------------------------------------------------
# Linear probes


def test_separable_features_give_near_100():
    x, y = blobs(1500, 16, 4, sep=4.0)
    r = probe.linear_probe(*split(x, y, 1000), 4, **quiet)
    assert r["ridge top1"] > 0.98 and r["logreg top1"] > 0.98


def test_random_labels_give_chance():
    x, _ = blobs(3000, 20, 4, sep=0.0)
    y = torch.randint(0, 4, (3000,), generator=torch.Generator().manual_seed(1))  # unrelated to x
    r = probe.linear_probe(*split(x, y, 1000), 4, **quiet)
    for k in ("ridge top1", "logreg top1"):  # 2000 test points: chance 0.25, sd ~0.01
        assert 0.19 < r[k] < 0.31, (k, r[k])


def test_ridge_solves_the_regularised_least_squares_problem():
    """Against an independent solution: least squares on X stacked over sqrt(N lam) I, for every lam
    of the grid that a wide, rank-deficient X (more features than samples, as raw pixels can be) allows."""
    x, y = blobs(60, 80, 4, sep=1.0, seed=5)
    x = mdc.standardize(x)[0].double()
    Y = F.one_hot(y, 4).double() - F.one_hot(y, 4).double().mean(0)
    solve = mdc.ridge_fit(x, y, 4)
    for lam in (1e-3, 1e-1, 10.0):
        W, _ = solve(lam)
        A = torch.cat([x, (len(x) * lam) ** 0.5 * torch.eye(80, dtype=torch.double)])      # (N + D, D)
        ref = torch.linalg.lstsq(A, torch.cat([Y, torch.zeros(80, 4, dtype=torch.double)])).solution
        assert torch.allclose(W, ref, atol=1e-8 * ref.abs().max().item() + 1e-12), lam


def test_ridge_and_lbfgs_agree_on_an_easy_problem():
    x, y = blobs(3000, 16, 5, sep=0.8)
    xtr, ytr, xte, yte = split(x, y, 2000)
    r = mdc.ridge_probe(xtr, ytr, xte, yte, 5, **quiet)
    l = probe.logreg_probe(xtr, ytr, xte, yte, 5, **quiet)
    assert 0.6 < r["ridge top1"] < 0.99            # not trivially separable
    assert abs(r["ridge top1"] - l["logreg top1"]) < 0.03


def test_lbfgs_reaches_the_optimum_of_an_independent_float64_fit():
    """Same features, same lam: L-BFGS (float32, hand-written gradient) vs plain gradient descent
    in float64 with autograd, many steps, on mean CE + lam ||W||^2 (bias unpenalised)."""
    x, y = blobs(400, 10, 3, sep=0.7, seed=3)
    x = mdc.standardize(x)[0]
    lam = 3e-3
    P, _ = probe.logreg_fit(probe.with_bias(x), probe.with_bias(x).T.contiguous(), y, lam,
                            torch.zeros(3, 11), max_iter=500, tol=1e-9)
    xd = x.double()
    W = torch.zeros(10, 3, dtype=torch.double, requires_grad=True)
    b = torch.zeros(3, dtype=torch.double, requires_grad=True)
    objective = lambda: F.cross_entropy(xd @ W + b, y) + lam * (W ** 2).sum()
    lr = 1 / (0.5 * torch.linalg.eigvalsh(xd.T @ xd / len(xd)).max().item() + 1 + 2 * lam)  # 1 / Lipschitz bound
    for _ in range(20000):
        W.grad = b.grad = None
        objective().backward()
        with torch.no_grad():
            W -= lr * W.grad
            b -= lr * b.grad
    Wl, bl = P[:, :-1].T.double(), P[:, -1].double()
    scale = W.abs().max().item()
    assert scale > 0.1                                   # a non-trivial optimum
    assert (Wl - W).abs().max().item() < 2e-3 * scale
    # biases are defined up to a shared constant (softmax), compare them centred
    assert ((bl - bl.mean()) - (b - b.mean())).abs().max().item() < 2e-3 * scale
    with torch.no_grad():
        ref = objective().item()
        W.copy_(Wl), b.copy_(bl)
        assert abs(objective().item() - ref) < 1e-6


def test_lbfgs_converges_at_weak_regularisation_on_ill_conditioned_features():
    """Weak lam on ill-conditioned features (a random-init ViT's are like this), where L-BFGS
    capped at 30 iterations stopped far from the optimum and the hold-out then preferred strong
    regularisation. The probe's path (PCA rotation, logreg_fit in float32) against Newton's method
    in float64 with an autograd Hessian on the standardised features: a different algorithm,
    parametrisation and precision, run until its Newton decrement vanishes. Compared at the
    optimum (objective, test predictions), never along the way. The old fitter, run inline,
    must fail the same check by a wide margin: this test tells them apart."""
    g = torch.Generator().manual_seed(0)
    n, d, c, lam = 1500, 12, 4, 1e-6
    z, y = blobs(n, d, c, sep=0.6, seed=5)
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.double))
    V, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.double))
    A = U @ torch.diag(torch.logspace(-3, 1, d, dtype=torch.double)) @ V.T   # singular values 1e-3..1e1
    x = (z.double() @ A + 1e-3 * torch.randn(n, d, generator=g, dtype=torch.double)).float()
    xtr, ytr, xte, yte = split(x, y, 1000)
    xtr, xte = mdc.standardize(xtr, xte)
    xd = xtr.double()
    assert torch.linalg.cond(xd.T @ xd) > 1e6                 # ill-conditioned after standardising

    def objective(theta):                                      # W (d, c) and the biases of classes 1..c-1
        W, b = theta[:d * c].view(d, c), F.pad(theta[d * c:], (1, 0))  # class 0's bias is 0: softmax is shift-invariant
        return F.cross_entropy(xd @ W + b, ytr) + lam * (W ** 2).sum()

    theta = torch.zeros(d * c + c - 1, dtype=torch.double)
    for _ in range(100):                                       # damped Newton: converges in a few dozen steps
        grad = torch.autograd.functional.jacobian(objective, theta)
        step = torch.linalg.solve(torch.autograd.functional.hessian(objective, theta, vectorize=True), grad)
        decrement = (grad @ step).item()                       # ~ 2 (objective - optimum)
        if decrement < 1e-15:
            break
        t, f0 = 1.0, objective(theta).item()
        while objective(theta - t * step).item() > f0 - 0.25 * t * decrement and t > 1e-9:
            t /= 2
        theta = theta - t * step
    assert decrement < 1e-15
    best = objective(theta).item()
    W, b = theta[:d * c].view(d, c), F.pad(theta[d * c:], (1, 0))
    newton_pred = (xte.double() @ W + b).argmax(1)

    rtr, rte = probe.pca_rotate(xtr, xte)
    xb = probe.with_bias(rtr)
    P, info = probe.logreg_fit(xb, xb.T.contiguous(), ytr, lam, torch.zeros(c, d + 1))
    assert info["converged"]
    Pd = P.double()
    f_probe = (F.cross_entropy(rtr.double() @ Pd[:, :-1].T + Pd[:, -1], ytr) + lam * (Pd[:, :-1] ** 2).sum()).item()
    assert abs(f_probe - best) < 1e-6, (f_probe, best)
    assert (probe.with_bias(rte) @ P.T).argmax(1).eq(newton_pred).float().mean().item() > 0.99

    # the old fitter: 30 L-BFGS iterations on the standardised features
    xs = probe.with_bias(xtr)
    Q = torch.zeros(c, d + 1, requires_grad=True)
    opt = torch.optim.LBFGS([Q], lr=1, max_iter=30, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xs @ Q.T, ytr) + lam * (Q[:, :-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    Qd = Q.detach().double()
    f_old = (F.cross_entropy(xd @ Qd[:, :-1].T + Qd[:, -1], ytr) + lam * (Qd[:, :-1] ** 2).sum()).item()
    assert f_old - best > 1e-3, (f_old, best)                # >1000x the tolerance above


def test_lam_is_picked_among_converged_fits_only(monkeypatch):
    """A hold-out fit that did not converge says how far L-BFGS got, not how good its lam is: even
    when it scores best on the hold-out it is not picked (here the fit at the lam the sweep would
    otherwise pick is made to report itself unconverged)."""
    x, y = blobs(1500, 16, 5, sep=0.8)
    args = (*split(x, y, 1000), 5)
    first = probe.logreg_probe(*args, **quiet)
    e_best = round(math.log10(first["logreg lambda"]))
    real_fit = probe.logreg_fit

    def fit(x, xt, y, lam, P, max_iter=500, tol=1e-5):
        P, info = real_fit(x, xt, y, lam, P, max_iter, tol)
        if round(math.log10(lam)) == e_best and len(x) < 1000:     # the hold-out fit (900 rows), not the refit
            info = {**info, "converged": False}
        return P, info

    monkeypatch.setattr(probe, "logreg_fit", fit)
    logs = []
    second = probe.logreg_probe(*args, log=logs.append)
    assert f"hold-out fit 1e{e_best}" in second["logreg unconverged"] and any("not converged" in s for s in logs)
    assert second["logreg lambda"] != first["logreg lambda"]
    held = second["logreg holdout"]
    assert held[f"1e{round(math.log10(second['logreg lambda']))}"] == max(a for k, a in held.items() if k != f"1e{e_best}")


@pytest.mark.parametrize("solver", ["lbfgs", "newton-cholesky"])
def test_the_sklearn_reference_agrees_with_the_lbfgs_probe(solver):
    """--fitter=sklearn (only where scikit-learn is installed; the project does not need it): at the
    L-BFGS probe's own lam, scikit-learn's converged fit predicts the test set the same way."""
    pytest.importorskip("sklearn")
    x, y = blobs(1500, 16, 5, sep=0.6)
    r = probe.linear_probe(*split(x, y, 1000), 5, fitter="sklearn", log=lambda s: None, sklearn_solver=solver)
    assert r["sklearn converged at logreg lambda"] and r["sklearn solver"] == solver
    assert abs(r["sklearn top1 at logreg lambda"] - r["logreg top1"]) <= 0.004    # 2 of 500 test points


def test_newton_cholesky_on_wide_features_stops_with_one_line_before_any_fit(monkeypatch, capsys):
    """Raw 32 px pixels (3,072 wide), 10 classes: a 7.0 GiB Hessian; on a 24 GiB machine that is
    refused with what to use instead, before the L-BFGS probe spends its minutes; 384-wide features pass."""
    monkeypatch.setattr(probe, "physical_memory", lambda: 24 * 2**30)
    x, y = torch.zeros(40, 3072), torch.arange(40) % 10
    with pytest.raises(data.UsageError, match=r"7\.0 GiB Hessian.*use --sklearn_solver=lbfgs"):
        probe.linear_probe(x, y, x, y, 10, fitter="sklearn", log=print, sklearn_solver="newton-cholesky")
    assert capsys.readouterr().out == ""                 # no fit ran
    probe.check_newton_memory(384, 10)
    with pytest.raises(SystemExit) as e:                 # at the command line: one line, status 2
        data.command_line(lambda argv: probe.check_newton_memory(3072, 10), [], "probe.py")
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_grid_is_extended_when_the_best_is_on_its_edge():
    x, y = blobs(1500, 16, 5, sep=0.8)
    logs = []
    r = probe.logreg_probe(*split(x, y, 1000), 5, grid=(0, 1), log=logs.append)  # only 1e1 and 1e0
    assert any("extending the grid" in s for s in logs)
    assert r["logreg lambda"] < 1                         # the sweep went past the first grid


def test_feature_cache_hit_returns_identical_features(tmp_path):
    torch.manual_seed(0)
    cfg = mdc.parse_args(["--width=32", "--enc_depth=1", "--heads=2", "--img_size=16"])
    enc = mdc.ViT(cfg).eval()
    ds = torch.utils.data.TensorDataset(torch.rand(40, 3, 16, 16), torch.arange(40) % 4)
    calls = []

    def compute():
        calls.append(1)
        return mdc.extract(enc.features, ds, 16, torch.device("cpu"), batch_size=16)

    key = probe.cache_key(encoder={"random": 1}, spec="shapes", split="train", img_size=16)
    x1, y1 = probe.cached_features(key, compute, str(tmp_path))
    x2, y2 = probe.cached_features(key, compute, str(tmp_path))
    assert len(calls) == 1                                # the second call never touched the encoder
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.shape == (40, 32)
    assert probe.cache_key(encoder={"random": 1}, spec="shapes", split="test", img_size=16) != key


# -----------------------------------------------------------------------------
# The encoder in timm (optional: these skip where timm is not installed)


def timm_features(d, imgs):
    """Pooled features of the timm model described by an export d, on images in [0, 1]."""
    import timm
    m = timm.create_model(d["model_name"], pretrained=False, **d["kwargs"]).eval()
    m.load_state_dict(d["state_dict"])                                  # strict
    with torch.no_grad():
        return m.forward_head(m.forward_features((imgs - d["mean"]) / d["std"]), pre_logits=True)


@pytest.mark.parametrize("preset, extra, scale", [("tiny", [], 1.0), ("tiny", ["--qk_norm"], 0.01), ("small", [], 1.0)],
                         ids=["tiny", "tiny-qk_norm-small-activations", "small"])
def test_the_timm_export_gives_the_encoders_features(preset, extra, scale):
    """Every weight perturbed (so a bias or a norm mapped to the wrong place shows), and in one case the
    residual stream scaled down 100x, where LayerNorm's eps (1e-5 here, 1e-6 in timm) would be off by
    0.1 if the export did not account for it (at full scale by about 2e-5, under the 1e-4 asked for)."""
    pytest.importorskip("timm")
    cfg = mdc.parse_args([f"--model={preset}", *extra])
    enc = mdc.random_encoder(cfg, 0, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for t in (enc.patch.weight, enc.patch.bias, enc.pos):
            t.mul_(scale)
    imgs = torch.rand(2, 3, cfg.img_size, cfg.img_size, generator=g)
    with torch.no_grad():
        want = enc.features(imgs)                                         # (2, D)
    got = timm_features(probe.timm_export(enc, cfg), imgs)
    assert got.shape == want.shape and (got - want).abs().max() < 1e-4, (got - want).abs().max()


def test_export_timm_writes_plain_values_that_load_weights_only(two_step_run, tmp_path, capsys):
    path = tmp_path / "vit.pt"
    probe.main([f"--ckpt={two_step_run / 'ckpt.pt'}", f"--export_timm={path}"])
    assert f"wrote {path}" in capsys.readouterr().out
    d = torch.load(path, weights_only=True)                            # tensors, numbers, strings only
    assert {"model_name", "kwargs", "state_dict", "mean", "std"} <= set(d) and d["step"] == 2

    def plain(v):  # what can go into timm.create_model(**kwargs) from a file: no classes, no functions
        if isinstance(v, (tuple, list)):
            return all(map(plain, v))
        if isinstance(v, dict):
            return all(isinstance(k, str) and plain(x) for k, x in v.items())
        return v is None or isinstance(v, (bool, int, float, str))
    assert plain(d["kwargs"]) and d["kwargs"]["class_token"] is False and d["kwargs"]["global_pool"] == "avg"
    model, cfg, _, _ = mdc.load_checkpoint(str(two_step_run / "ckpt.pt"))
    assert d["kwargs"]["embed_dim"] == cfg.width and d["kwargs"]["depth"] == cfg.enc_depth
    try:
        import timm  # noqa: F401
    except ImportError:
        return
    imgs = torch.rand(3, 3, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        assert (timm_features(d, imgs) - model.encoder.features(imgs)).abs().max() < 1e-4


# -----------------------------------------------------------------------------
# Caption scoring on tiny models overfitted to a handful of (image, caption) pairs


def overfit_captions(objective, imgs, caps):
    cfg = mdc.parse_args([f"--objective={objective}", "--width=32", "--enc_depth=1", "--dec_depth=1", "--heads=2",
                          "--img_size=16", "--patch_size=4", "--max_len=16"])
    tok = data.Tokenizer.build(caps)
    torch.manual_seed(0)
    model, _ = fit_until(mdc.Model(cfg, len(tok)), objective, cfg, imgs, tok.batch(caps, cfg.max_len),
                         threshold=0.02, cap=3000)
    return model, cfg, tok


@pytest.fixture(scope="module")
def pairs():
    """Six single-object test images of the synthetic probe, one per shape. Their captions all have
    four words ("a small red circle"), so caption length (which the mdc decoder sees) cannot tell
    them apart, only the image can. Returns (images, true captions, candidates: for image y, its
    caption with each shape word)."""
    cands, labels = probe.shapes_zeroshot("shape", 200)
    first = {}
    for i, y in enumerate(labels.tolist()):
        first.setdefault(y, i)
    idx = [first[y] for y in range(6)]
    imgs = data.probe_dataset("shapes", "test", img_size=16).tensors[0][idx]
    return imgs, [cands[i][y] for y, i in enumerate(idx)], [cands[i] for i in idx]


@pytest.fixture(scope="module")
def models(pairs):
    return {o: overfit_captions(o, *pairs[:2]) for o in ("mdc", "ar", "clip")}


def test_zeroshot_on_overfitted_models_ranks_the_true_caption_first(models, pairs):
    """Candidates: the six training captions; and for the captioners also each image's caption with
    every shape word. (Six pairs never force CLIP's text encoder to read the shape word: the other
    words already tell the captions apart, so a contrastive model may ignore it.)"""
    imgs, caps, cands = pairs
    for objective, (model, cfg, tok) in models.items():
        for rule in probe.RULES[objective]:
            for c in ([caps] * 6, cands) if objective != "clip" else ([caps] * 6,):
                s = probe.score_captions(model, cfg, tok, imgs, c, rule, K=8)   # (6 images, 6 candidates)
                assert torch.equal(s.argmax(1), torch.arange(6)), (objective, rule, s)


def test_retrieval_and_compositional_run_and_are_fractions(models, pairs):
    imgs, caps, _ = pairs
    model, cfg, tok = models["ar"]
    r = probe.retrieval(model, cfg, tok, imgs, caps)
    assert r["t2i R@1"]["exact"] == 1.0 and r["i2t R@5"]["exact"] == 1.0
    c = probe.compositional(model, cfg, tok, imgs, caps)
    assert all(0 <= v["exact"] <= 1 for v in c.values()) and "word shuffle" in c


def test_loss_score_draws_t_in_the_range_of_the_models_own_config():
    # a model trained with t_min = 1: every draw masks every token with weight 1, exactly the 'all' score
    cfg = tiny_cfg("--t_min=1.0")
    imgs, x, tok = tiny_batch(cfg, 4)
    torch.manual_seed(0)
    model = mdc.Model(cfg, len(tok)).eval()
    v = model.encoder(imgs)
    g = torch.Generator().manual_seed(0)
    at_one = mdc.caption_logprob(model, v, x, "loss", K=3, generator=g)
    assert torch.allclose(at_one, mdc.caption_logprob(model, v, x, "all"), atol=1e-5)
    model.cfg = dataclasses.replace(cfg, t_min=1e-3)     # the same weights, read as a model of t_min = 0.001
    low = mdc.caption_logprob(model, v, x, "loss", K=3, generator=g)
    assert not torch.allclose(low, at_one, atol=1e-3)
    ar = mdc.Model(tiny_cfg("--objective=ar"), len(tok)).eval()   # a causal captioner: the exact log-likelihood
    exact = -(mdc.token_ce(ar.decode(mdc.shift_right(x), v, x != PAD, causal=True), x) * (x != PAD)).sum(1)
    assert torch.allclose(mdc.caption_logprob(ar, v, x, "loss"), exact, atol=1e-5)


def test_shapes_zeroshot_candidates_differ_only_in_the_class_word():
    for task in ("shape", "color", "shape_color"):
        cands, labels = probe.shapes_zeroshot(task, 50)
        _, ytest = data.probe_dataset(f"shapes:{task}", "test").tensors
        assert torch.equal(labels, ytest[:50])            # the same scenes as the probe's test split
        n_classes = data.PROBE_TASKS[task][0]
        for row, y in zip(cands, labels):
            assert len(row) == n_classes == len(set(row))
            assert len({len(c.split()) for c in row}) == 1
            differ = {j for c in row for j, (a, b) in enumerate(zip(c.split(), row[0].split())) if a != b}
            assert len(differ) == (2 if task == "shape_color" else 1)


def test_shape_probe_split_by_whether_the_colour_implies_the_shape(monkeypatch):
    """shapes:shape/implied and shapes:shape/not_implied: the same training scenes, the test scenes
    narrowed to those whose shape is (not) the one TIE_SHAPE gives their colour; zero-shot follows."""
    import functools
    monkeypatch.setattr(data, "shapes_probe", functools.partial(data.shapes_probe, n_train=200, n_test=120))
    full = data.probe_dataset("shapes:shape", "train", 16).tensors
    for subset, want in (("implied", True), ("not_implied", False)):
        tr, te = (data.probe_dataset(f"shapes:shape/{subset}", split, 16) for split in ("train", "test"))
        assert all(torch.equal(a, b) for a, b in zip(tr.tensors, full)) and len(te) == 120
        _, attrs = data.probe_scenes("test", 120, subset=subset)
        implied = attrs["shape"][:, 0] == np.array(data.TIE_SHAPE)[attrs["color"][:, 0]]
        assert (implied == want).all() and torch.equal(te.tensors[1], torch.from_numpy(attrs["shape"][:, 0]))
        assert te.name == f"shapes:shape/{subset}"
        cands, labels = probe.shapes_zeroshot("shape", 30, subset=subset)
        assert torch.equal(labels, te.tensors[1][:30])
    _, every = data.probe_scenes("test", 400)                       # the unsplit test scenes: about 1 in 6 implied
    assert 40 < (every["shape"][:, 0] == np.array(data.TIE_SHAPE)[every["color"][:, 0]]).sum() < 100
    for bad in ("shapes:shape/some", "shapes:size"):
        with pytest.raises(data.UsageError, match="some|size"):
            data.check_probe(bad)
    res = probe.main(["--ckpt=random", "--dataset=shapes:shape/not_implied", "--fitter=ridge", "--cache_dir="])
    assert 0 <= res["encoders"][0]["metrics"]["ridge top1"] <= 1


def test_a_corrupted_caption_never_equals_the_original_and_keeps_its_words():
    imgs, caps = probe.multi_object(data.Shapes(seed=0, img_size=16, split="val"), 300)
    caps = caps + ["a dog", "dog dog dog", "a man riding a horse on the beach .", "x"]
    rng = np.random.default_rng(0)
    made = {}
    for c in caps:
        for name, bad in probe.corruptions(c, rng).items():
            if bad is not None:
                assert bad != c, (name, c)
                assert sorted(data.split_words(bad)) == sorted(data.split_words(c)), (name, c, bad)
                made[name] = made.get(name, 0) + 1
    for name in ("attr swap", "relation swap", "word shuffle"):
        assert made[name] > 200, made                      # most multi-object captions have one


def test_relation_swap_reverses_the_relation():
    c = "a small red circle above a large blue square"
    assert probe.swap_relation(c) == "a large blue square above a small red circle"
    assert probe.swap_attributes(c) == "a small blue circle above a large red square"
    assert probe.swap_attributes("a small red circle above a large red square") is None
    c = "a small circle in red above a large square in blue"           # --order=shape_first
    assert probe.swap_relation(c) == "a large square in blue above a small circle in red"
    assert probe.swap_attributes(c) == "a small circle in blue above a large square in red"


# -----------------------------------------------------------------------------
# Position signal, JSON


def test_position_signal_is_zero_when_the_decoder_ignores_the_image(models, pairs):
    imgs, caps, _ = pairs
    for objective in ("mdc", "ar"):
        model, cfg, tok = models[objective]
        x = tok.batch(caps, cfg.max_len)
        g = torch.Generator().manual_seed(0)
        assert probe.position_signal(model, cfg, imgs, x, K=4, generator=g).nan_to_num().mean() > 0.1
        blind = mdc.Model(cfg, len(tok))
        blind.load_state_dict(model.state_dict())
        for blk in blind.text.blocks:                      # cross-attention adds exactly nothing
            torch.nn.init.zeros_(blk.xattn.proj.weight)
            torch.nn.init.zeros_(blk.xattn.proj.bias)
        s = probe.position_signal(blind.eval(), cfg, imgs, x, t=0.7, K=4, generator=g)
        counted = ~s.isnan()
        assert counted[:5].all() and (s[counted] == 0).all(), s


def test_signal_thirds_follow_each_captions_own_length():
    x = torch.tensor([[5, 6, 7, 8, 9, 10, PAD, PAD, PAD],     # 6 tokens: thirds = positions 0-1, 2-3, 4-5
                      [5, 6, 7, 8, 9, 10, 11, 12, 13]])       # 9 tokens: 0-2, 3-5, 6-8
    diff = torch.tensor([[1., 1, 2, 2, 3, 3, 99, 99, 99],     # values at pads must never count
                         [1., 1, 1, 2, 2, 2, 3, 3, 3]])
    count = (x != PAD).float()
    assert probe.signal_thirds(diff * count, count, x) == [1.0, 2.0, 3.0]
    half = count.clone()
    half[1, 6:] = 0                                           # positions never counted are left out
    assert probe.signal_thirds(diff * half, half, x) == [1.0, 2.0, 3.0]


def test_signal_by_word_kind_averages_over_the_words_of_each_kind():
    tok = data.Tokenizer.build(["a small red circle left of a large blue square"])
    x = tok.batch(["a small red circle", "a large blue square left of a small red circle"], 12)   # (2, 12)
    word = lambda w: (x == tok.stoi[w]).float()
    diff = 2.0 * (word("circle") + word("square")) + 5.0 * word("red") + 1.0 * word("a")   # nats per position
    count = (x != PAD).float()
    out = probe.signal_by_word_kind(diff * count, count, x, tok)
    assert out["signal shape word"] == 2.0 and math.isclose(out["signal colour word"], 10 / 3, rel_tol=1e-6)  # red, red, blue
    assert out["signal size word"] == 0.0
    half = count.clone()
    half[0] = 0                                           # uncounted positions are left out
    assert probe.signal_by_word_kind(diff * half, half, x, tok)["signal colour word"] == 2.5


def test_caption_signal_never_pairs_a_caption_with_its_own_image(models, monkeypatch):
    model, cfg, tok = models["ar"]
    sizes, real = [], probe.signal_terms
    monkeypatch.setattr(probe, "signal_terms", lambda m, c, imgs, *a: sizes.append(len(imgs)) or real(m, c, imgs, *a))
    probe.caption_signal(model, cfg, tok, data.Shapes(0, cfg.img_size), n=9, K=1, batch_size=4)
    assert sizes == [4, 5]                                 # not [4, 4, 1]: a lone image is rolled onto itself


def test_sweep_points_group_runs_by_the_flags_that_differ_and_average_seeds(tmp_path):
    run = lambda o, tie, seed, acc, sig: dict(name=f"{o}{tie}{seed}", kind="ckpt", objective=o, metrics={
        "ridge top1": acc, "signal shape word": sig, "zero-shot": {"loss": acc / 2}},
        config={**dataclasses.asdict(tiny_cfg(f"--objective={o}")), "tie": tie, "seed": seed, "out_dir": f"runs/{o}{tie}{seed}"})
    a = {"encoders": [run("mdc", 0.0, 0, 0.6, 1.0), run("mdc", 0.0, 1, 0.7, 3.0), run("mdc", 0.9, 0, 0.5, 0.5),
                      dict(name="random", kind="random", metrics={"ridge top1": 0.3})]}
    b = {"encoders": [run("ar", 0.0, 0, 0.4, 2.0), run("ar", 0.9, 0, 0.2, 0.1)]}
    varying, groups, floors = probe.sweep_points([a, b], "tie", "ridge top1")
    assert varying == ["objective"] and floors == {"random": 30.0}
    assert groups == {("mdc",): {0.0: [60.0, 70.0], 0.9: [50.0]}, ("ar",): {0.0: [40.0], 0.9: [20.0]}}
    assert probe.sweep_points([a], "tie", "signal shape word")[1] == {(): {0.0: [1.0, 3.0], 0.9: [0.5]}}  # nats, unscaled
    assert probe.sweep_points([b], "tie", "zero-shot")[1] == {(): {0.0: [20.0], 0.9: [10.0]}}
    for i, r in enumerate((a, b)):
        probe.save_json(tmp_path / f"{i}.json", r)
    probe.main(["--plot_vs=tie", f"--from_json={tmp_path / '0.json'}", f"--from_json={tmp_path / '1.json'}",
                "--metrics=ridge top1,signal shape word", f"--plot={tmp_path / 'vs.png'}"])
    assert open(tmp_path / "vs.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    probe.main(["--plot_vs=tie", f"--from_json={tmp_path / '0.json'}", "--bands", f"--plot={tmp_path / 'bands.png'}"])
    assert open(tmp_path / "bands.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_runs_that_differ_only_in_bookkeeping_are_one_line_and_ema_weights_another(tmp_path):
    """Flags that do not change the trained weights (mdc.BOOKKEEPING: checkpoint interval, --ema, ...)
    do not split a sweep; the probed weights (final or ema) do, in the figures and in --summary."""
    base = dataclasses.asdict(tiny_cfg("--t_min=0.5"))
    run = lambda seed, acc, weights="final", **cfg: dict(name=f"r{seed}{weights}", kind="ckpt", objective="mdc", step=640, weights=weights,
                                                         metrics={"ridge top1": acc}, config={**base, "seed": seed, "steps": 640, **cfg})
    res = [{"encoders": [run(0, 0.6, ckpt_every=80), run(1, 0.7, ckpt_every=160, ema=0.99), run(0, 0.5, t_min=0.75),
                         run(1, 0.8, "ema", ema=0.99, ckpt_every=160)]}]
    varying, groups, _ = probe.sweep_points(res, "t_min", "ridge top1")
    assert varying == ["weights"] and groups == {("final",): {0.5: [60.0, 70.0], 0.75: [50.0]}, ("ema",): {0.5: [80.0]}}
    d = probe.summarize(res, ["weights", "t_min"], "ridge top1", [("weights", "ema", "final")])
    assert list(d) == [(0.5,)] and d[(0.5,)][1] == {1: 10.0}      # seed 1 alone has both
    table = probe.summary_table(res + [{"encoders": [run(0, 0.4, steps=1280)]}], ["steps"], "ridge top1", pool=["t_min", "weights"])
    assert table.index("| 640 |") < table.index("| 1280 |")                 # numbers in their order, not as text


def test_a_split_probe_and_an_untied_signal_are_groups_of_their_own_not_averaged_with_the_plain_probe():
    """The probe call's --dataset and --caption_tie (a result's "args") are flags of its rows: the implied /
    not-implied split of one run pairs by seed, and a result without args reads as the plain shapes probe."""
    cfg = dataclasses.asdict(tiny_cfg("--tie=0.9"))
    res = lambda seed, acc, **args: {"args": args, "encoders": [dict(name="r", kind="ckpt", objective="mdc", step=640,
                                                                 metrics={"ridge top1": acc}, config={**cfg, "seed": seed})]}
    results = [res(0, 0.6, dataset="shapes"), res(0, 0.9, dataset="shapes:shape/implied"), res(0, 0.5, dataset="shapes:shape/not_implied"),
               res(1, 0.8, dataset="shapes:shape/implied"), res(1, 0.6, dataset="shapes:shape/not_implied"),
               res(1, 0.7, dataset="shapes", caption_tie=0.0), {"encoders": res(1, 0.4)["encoders"]}]
    by = probe.summarize(results, ["probe_data", "probe_tie"], "ridge top1")
    assert by[("shapes", "-")][1] == {0: 60.0, 1: 40.0} and by[("shapes", 0.0)][1] == {1: 70.0}
    assert by[("shapes:shape/implied", "-")][1] == {0: 90.0, 1: 80.0}
    d = probe.summarize(results, ["probe_data"], "ridge top1", [("probe_data", "shapes:shape/implied", "shapes:shape/not_implied")])
    assert list(d) == [()] and d[()][1] == {0: pytest.approx(40.0), 1: pytest.approx(20.0)}
    assert probe.sweep_points(results, "tie", "ridge top1")[0] == ["probe_data", "probe_tie"]   # one line per probe


def test_probe_reads_the_ema_weights_of_a_checkpoint(tmp_path):
    run_train(tmp_path, "--steps=3", "--ema=0.5")
    path = str(tmp_path / "ckpt.pt")
    final, ema = probe.load_encoders([path, f"ema:{path}"])
    assert (final["weights"], ema["weights"], ema["name"]) == ("final", "ema", f"ema:{path}") and final["key"] != ema["key"]
    want = torch.load(path, weights_only=True)["ema"]
    assert torch.equal(ema["encoder"].patch.weight, want["encoder.patch.weight"])
    assert not torch.equal(final["encoder"].patch.weight, ema["encoder"].patch.weight)
    out = tmp_path / "r.json"
    probe.main([f"--ckpt=ema:{path}", "--fitter=ridge", "--no-zeroshot", "--no-compositional", "--no-retrieval", "--no-signal",
                f"--cache_dir={tmp_path}/cache", f"--json={out}"])
    e = probe.load_json(str(out))["encoders"][0]
    assert e["weights"] == "ema" and probe.run_flags(e, dataclasses.asdict(mdc.Config()))["weights"] == "ema"
    probe.main([f"--ckpt=ema:{path}", f"--export_timm={tmp_path / 'vit.pt'}"])     # the averaged encoder, for timm
    got = torch.load(tmp_path / "vit.pt", weights_only=True)["state_dict"]["patch_embed.proj.weight"]
    assert torch.equal(got, probe.timm_export(ema["encoder"], ema["cfg"])["state_dict"]["patch_embed.proj.weight"])


def test_quick_probe_uses_one_set_of_probe_scenes_for_every_seed_and_averages_the_floor(monkeypatch):
    import functools
    monkeypatch.setattr(data, "shapes_probe", functools.partial(data.shapes_probe, n_train=300, n_test=100))
    seeds, inits, real_dataset, real_random = [], [], data.probe_dataset, mdc.random_encoder
    monkeypatch.setattr(data, "probe_dataset", lambda spec, split, size, root, seed: seeds.append(seed) or real_dataset(spec, split, size, root, seed))
    monkeypatch.setattr(mdc, "random_encoder", lambda cfg, s, dev: inits.append(s) or real_random(cfg, s, dev))
    out = {}
    for seed in (3, 7):
        cfg = tiny_cfg(f"--seed={seed}", "--probe=shapes")
        torch.manual_seed(seed)
        out[seed] = mdc.quick_probe(mdc.Model(cfg, 30).eval(), cfg)
    assert set(seeds) == {mdc.QUICK_PROBE_SEED} and inits == 2 * list(mdc.FLOOR_INITS)   # not the training seed
    assert out[3]["random init"] == out[7]["random init"] and out[3]["pixels"] == out[7]["pixels"]
    tr, te = (real_dataset("shapes", s, cfg.img_size, "data", mdc.QUICK_PROBE_SEED) for s in ("train", "test"))
    each = []
    for s in mdc.FLOOR_INITS:
        a, b = (mdc.extract(real_random(cfg, s, torch.device("cpu")).features, ds, cfg.img_size, torch.device("cpu")) for ds in (tr, te))
        each.append(mdc.ridge_probe(*a, *b, tr.n_classes, log=lambda _: None)["ridge top1"])
    assert abs(out[3]["random init"] - sum(each) / len(each)) < 1e-9


def test_t_quantiles_match_the_known_values():
    assert (probe.t975(1), probe.t975(2), probe.t975(4), probe.t975(9), probe.t975(30)) == (12.706, 4.303, 2.776, 2.262, 2.042)
    assert abs(probe.t975(60) - 2.0003) < 0.002 and abs(probe.t975(120) - 1.9799) < 0.002   # past the table
    assert math.isnan(probe.t975(0))


def made_up_results():
    """mdc and ar at alias 0 and 2, seeds 0-2 (ar at alias 2 also seed 3), two random floors: accuracies as fractions."""
    acc = {("mdc", 0): [60, 70, 80], ("ar", 0): [50, 72, 74], ("mdc", 2): [70, 75, 90], ("ar", 2): [52, 70, 80, 99]}
    base = dataclasses.asdict(tiny_cfg())
    encs = [dict(name=f"{o}{a}{s}", kind="ckpt", objective=o, config={**base, "objective": o, "alias": a, "seed": s},
                 metrics={"ridge top1": v / 100, "zero-shot": {probe.RULES[o][0]: v / 200}, "signal shape word": v / 10})
            for (o, a), vs in acc.items() for s, v in enumerate(vs)]
    encs += [dict(name=f"random:{s}", kind="random", init_seed=s, config=base, metrics={"ridge top1": v}) for s, v in ((0, 0.3), (1, 0.4))]
    return [{"encoders": encs[:7]}, {"encoders": encs[7:]}]


def by_hand(xs):
    """(n, mean, sd, 95% half-width) written out: sd with n - 1, t from a printed table."""
    n, m = len(xs), sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return n, m, sd, {2: 12.706, 3: 4.303, 4: 3.182}[n] * sd / math.sqrt(n)


def test_summary_means_intervals_and_paired_contrasts_against_hand_computations(tmp_path, capsys):
    res = made_up_results()
    close = lambda got, want: all(abs(g - w) < 1e-9 for g, w in zip(got, want))
    groups = probe.summarize(res, ["objective", "alias"], "ridge top1")
    assert close(groups[("mdc", 0)][0], by_hand([60, 70, 80])) and close(groups[("ar", 2)][0], by_hand([52, 70, 80, 99]))
    assert close(groups[("random", "-")][0], by_hand([30, 40]))                       # the floors: a group over init seeds
    # fewer flags than the runs differ in: an error, unless --pool names the flag; then a seed's runs are averaged first
    with pytest.raises(data.UsageError, match=r"differ in alias \[0, 2\].*--pool=alias"):
        probe.summarize(res, ["objective"], "signal shape word")
    report = {}
    assert close(probe.summarize(res, ["objective"], "signal shape word", pool=["alias"], report=report)[("mdc",)][0],
                 by_hand([6.5, 7.25, 8.5]))                                        # nats stay nats
    assert report["pooled"] == {"alias": {"0", "2"}} and report["reruns"] == 0
    # paired by seed: mdc - ar at alias 0 -> 10, -2, 6
    d = probe.summarize(res, ["objective", "alias"], "ridge top1", [("objective", "mdc", "ar")])
    assert close(d[(0,)][0], by_hand([10, -2, 6])) and d[(0,)][1] == {0: 10, 1: -2, 2: 6}
    assert sorted(d[(2,)][1]) == [0, 1, 2]                                             # seed 3 has no mdc: not paired
    # the interaction: (mdc2 - mdc0) - (ar2 - ar0) per seed -> 8, 7, 4
    i = probe.summarize(res, ["objective", "alias"], "ridge top1", [("alias", "2", "0"), ("objective", "mdc", "ar")])
    assert close(i[()][0], by_hand([8, 7, 4]))
    old = [{"encoders": [{**e, "config": {k: v for k, v in e["config"].items() if (k, v) != ("alias", 0)}}
                         for e in r["encoders"]]} for r in res]   # alias 0 written before --alias existed: its default
    assert probe.summarize(old, ["objective", "alias"], "ridge top1") == groups
    # a paired contrast over fewer flags than the runs differ in: each seed's runs in a cell are averaged first,
    # not overwritten: mdc - ar over alias 0 and 2 -> 65 - 51, 72.5 - 71, 85 - 77 (seed 3 has no mdc)
    avg = probe.summarize(res, ["objective"], "ridge top1", [("objective", "mdc", "ar")], pool=["alias"])
    assert close(avg[()][0], by_hand([14, 1.5, 8])) and avg[()][1] == {0: 14, 1: 1.5, 2: 8}
    z = probe.summarize(res, ["objective"], "zero-shot", pool=["alias"])                              # per-rule: the objective's rule
    assert close(z[("ar",)][0], by_hand([25.5, 35.5, 38.5, 49.5]))
    for k, r in enumerate(res):
        probe.save_json(tmp_path / f"{k}.json", r)
    probe.main(["--summary=objective,alias", "--diff=alias:2,0", "--diff=objective:mdc,ar", "--metrics=ridge top1",
                f"--from_json={tmp_path / '*.json'}"])                                  # a pattern: both files
    out = capsys.readouterr().out
    n, m, sd, h = by_hand([8, 7, 4])
    assert f"| 3 | +{m:.1f} | {sd:.1f} | +{m:.1f} ± {h:.1f} [+{m - h:.1f}, +{m + h:.1f}] | yes |" in out, out


def test_probe_cli_rejects_unknown_scoring_rules():
    with pytest.raises(data.UsageError, match="--mdc_rules"):
        probe.parse(["--ckpt=random", "--mdc_rules=loss,pl"])
    with pytest.raises(data.UsageError, match="--mdc_rules"):
        probe.parse(["--ckpt=random", "--mdc_rules=elbo"])         # the loss is no ELBO at t_min > 0
    assert probe.parse(["--ckpt=random", "--mdc_rules=loss,all"]).mdc_rules == "loss,all"


def test_results_json_round_trips(models, tmp_path):
    model, cfg, tok = models["mdc"]
    path = str(tmp_path / "mdc.pt")
    mdc.save_checkpoint(path, model, None, cfg, tok, 300)
    out = str(tmp_path / "r.json")
    res = probe.main([f"--ckpt={path}", "--ckpt=random", "--ckpt=pixels", f"--json={out}", "--fitter=ridge",
                      "--n_eval=12", "--n_retrieval=6", "--K=2", f"--cache_dir={tmp_path}/cache", "--logits",
                      f"--plot={tmp_path}/signal.png"])
    assert open(tmp_path / "signal.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    m = res["encoders"][0]["metrics"]
    assert len(m["signal per position"]) == cfg.max_len and m["enc logit max"] > 0 and m["text logit max"] > 0
    assert probe.run_name("out/ar/ckpt.pt") == "ar" and probe.run_name("runs/ar/step400.pt") == "ar/step400"
    back = probe.load_json(out)
    assert back == res                                     # no NaN, tuple or tensor slipped in
    assert [e["name"] for e in back["encoders"]] == [path, "random", "pixels"]
    assert back["encoders"][0]["config"]["width"] == 32 and "zero-shot" in back["encoders"][0]["metrics"]
    assert probe.format_table(back) == probe.format_table(res)


def test_caption_tie_sets_the_world_of_the_signal(models, tmp_path, monkeypatch):
    """probe.py measures the signal on captions of the model's own --tie unless --caption_tie says
    otherwise (0: shape independent of colour, whatever the model was trained with)."""
    model, cfg, tok = models["mdc"]
    path = str(tmp_path / "tied.pt")
    mdc.save_checkpoint(path, model, None, dataclasses.replace(cfg, tie=0.9), tok, 0)
    worlds, build = [], data.build_caption_data
    monkeypatch.setattr(data, "build_caption_data", lambda *a, **k: worlds.append(k["tie"]) or build(*a, **k))
    common = [f"--ckpt={path}", "--fitter=ridge", "--no-zeroshot", "--no-compositional", "--no-retrieval",
              "--n_eval=12", "--K=1", f"--cache_dir={tmp_path}/cache"]
    own = probe.main(common)
    assert worlds == [0.9] and own["encoders"][0]["metrics"]["caption tie"] == 0.9
    untied = probe.main(common + ["--caption_tie=0"])
    assert worlds == [0.9, 0.0] and untied["encoders"][0]["metrics"]["caption tie"] == 0.0
    assert "signal shape word" in untied["encoders"][0]["metrics"]


# =============================================================================
# tutorial.ipynb


def test_tutorial_notebook_runs_every_cell_in_smoke_mode(tmp_path, monkeypatch):
    """Every code cell of tutorial.ipynb in order, in one namespace, with MDC_SMOKE=1 (tiny steps and
    sizes) and matplotlib's Agg backend. Read with json: neither Jupyter nor nbformat is needed.
    Also checks that the file was saved with the outputs of a full (not smoke) run. NumPy 2's
    np.trapezoid, which NumPy 1.x lacks, is taken away, so the tour cannot come to need it."""
    import warnings
    monkeypatch.delattr(np, "trapezoid", raising=False)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(os.path.join(HERE, "tutorial.ipynb")) as f:
        cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
    outputs = [o for c in cells for o in c["outputs"]]
    text = "".join("".join(o.get("text", "")) for o in outputs)
    assert not [o for o in outputs if o["output_type"] == "error"], "the saved run has an error"
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 10, "the saved run lacks its plots"
    assert "smoke mode: False" in text and "whole notebook" in text, "not saved from one full run"
    code = "".join("".join(c["source"]) for c in cells)
    assert "mdc.train(" in code and ".backward(" not in code and "opt.step" not in code, "a training loop of its own"
    monkeypatch.setenv("MDC_SMOKE", "1")
    monkeypatch.chdir(tmp_path)                            # whatever the notebook writes lands here
    monkeypatch.syspath_prepend(HERE)                      # it imports mdc, data, probe
    ns = {"__name__": "tutorial"}
    for i, cell in enumerate(cells):
        src = "".join(cell["source"])
        assert not [s for s in src.splitlines() if s.lstrip().startswith(("%", "!"))], f"code cell {i}: IPython magic"
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*non-interactive.*")  # plt.show() under Agg
                exec(compile(src, f"tutorial.ipynb code cell {i}", "exec"), ns)
        except Exception as e:
            pytest.fail(f"tutorial.ipynb code cell {i} raised {type(e).__name__}: {e}\n{src}")
        finally:
            plt.close("all")
    assert ns["SMOKE"] and ns["TIMES"]["whole notebook"] > 0


def test_summary_gives_seeds_and_two_core_minutes_to_settle_a_difference_by_hand(tmp_path, capsys):
    """For a paired difference the table adds the seeds per arm that a 95% interval of +-3 and +-5 points
    needs at the measured sd (smallest n with t(n-1) sd / sqrt(n) <= w), and their cost in two-core
    minutes from the runs' recorded seconds (training + the probe's share, two runs at a time)."""
    res = made_up_results()
    for r in res:                       # every run: 400 s of training, files of one checkpoint probed in 40 s
        r["probe_seconds"] = 40.0 * sum(e["kind"] == "ckpt" for e in r["encoders"])
        for e in r["encoders"]:
            e["training"] = {"train_seconds": 400.0}
    sd = by_hand([10, -2, 6])[2]        # mdc - ar at alias 0: 10, -2, 6
    t = {k: v for k, v in zip(range(1, 31), probe.T975)}
    need = lambda w: next(n for n in range(2, 1000) if t.get(n - 1, 1.96) * sd / math.sqrt(n) <= w)
    assert [probe.seeds_needed(sd, w) for w in (3, 5)] == [need(3), need(5)] == [19, 9]
    assert probe.seeds_needed(float("nan"), 3) is None
    table = probe.summary_table(res, ["objective", "alias"], "ridge top1", [("objective", "mdc", "ar")])
    minutes = lambda n: n * 2 * 440 / 2 / 60                                    # n seeds x 2 arms x 440 s, two at a time
    assert f"| 19 / 9 | {minutes(19):.0f} / {minutes(9):.0f} |" in table.splitlines()[4], table
    del res[0]["probe_seconds"]         # a file from before the seconds were recorded: no minutes
    assert "| 19 / 9 | - / - |" in probe.summary_table(res, ["objective", "alias"], "ridge top1", [("objective", "mdc", "ar")])


def test_summary_numbers_replicates_by_one_random_stream_and_counts_reruns():
    """--seed_of=init_seed: runs that share --seed and vary --init_seed alone are replicates of one group
    (-1 reads as --seed); without it they are one seed that differs in init_seed: an error."""
    base = dataclasses.asdict(tiny_cfg())
    run = lambda acc, **cfg: dict(name="r", kind="ckpt", objective="mdc", metrics={"ridge top1": acc}, config={**base, **cfg})
    res = [{"encoders": [run(0.6), run(0.7, init_seed=1), run(0.8, init_seed=2), run(0.5, data_seed=1)]}]
    with pytest.raises(data.UsageError, match="init_seed"):
        probe.summarize(res, ["objective"], "ridge top1")
    by = probe.summarize(res, ["data_seed"], "ridge top1", seed_of="init_seed")
    assert by[(-1,)][1] == {0: 60.0, 1: 70.0, 2: 80.0} and by[(1,)][1] == {0: 50.0}
    with pytest.raises(data.UsageError, match="differ in seed"):              # replicate 0 twice, from two --seed
        probe.summarize(res + [{"encoders": [run(0.9, seed=5, init_seed=0)]}], ["data_seed"], "ridge top1", seed_of="init_seed")
    report = {}
    twice = probe.summarize([{"encoders": [run(0.6), run(0.8)]}], ["objective"], "ridge top1", report=report)
    assert twice[("mdc",)][1] == {0: 70.0} and report["reruns"] == 1


def test_t_pvalue_matches_the_t_table():
    """At the 97.5% quantiles the two-sided p-value is 0.05; at t = 0 it is 1; the normal limit at large df."""
    for df in (1, 2, 4, 9, 30):
        assert abs(probe.t_pvalue(probe.t975(df), df) - 0.05) < 2e-4
    assert probe.t_pvalue(0.0, 4) == pytest.approx(1.0) and abs(probe.t_pvalue(1.959964, 10_000) - 0.05) < 1e-3
    assert abs(probe.t_pvalue(-4.604, 4) - 0.01) < 2e-4                 # the 99.5% quantile of t(4), from a printed table


def test_probe_random_encoder_takes_the_patch_size_of_an_earlier_default():
    """probe.py --patch_size builds 'random' at another patch size than the preset's (the earlier default's
    floors, 4 px, still reproduce now that tiny has 8 px patches); a negative one is refused."""
    now, before = (probe.load_encoders(["random"], **kw)[0] for kw in ({}, {"patch_size": 4}))
    assert now["cfg"].patch_size == mdc.PRESETS["tiny"]["patch_size"] == 8 and before["cfg"].patch_size == 4
    imgs = torch.rand(2, 3, 32, 32)
    assert now["encoder"](imgs).shape == (2, 16, 128) and before["encoder"](imgs).shape == (2, 64, 128)
    with pytest.raises(data.UsageError, match="--patch_size=-1 is out of range"):
        probe.parse(["--ckpt=random", "--patch_size=-1"])
