"""Tests of probe.py: the fitters against known answers and an independent fit, the feature
cache, caption scoring on tiny overfitted models, corruptions, the position signal, JSON."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import mdc
import probe


def blobs(n, d, c, sep, seed=0):
    """Gaussian class blobs: (x (n, d), y (n,)); larger sep = easier."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    means = torch.randn(c, d, generator=g) * sep
    return means[y] + torch.randn(n, d, generator=g), y


def split(x, y, n_train):
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


quiet = dict(log=lambda s: None)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one thread. On 2 cores shared with other jobs, OpenMP's synchronisation made
    a tiny training step 100x slower with 2 threads (measured 600 ms vs 5 ms)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

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


def test_ridge_and_lbfgs_agree_on_an_easy_problem():
    x, y = blobs(3000, 16, 5, sep=0.8)
    xtr, ytr, xte, yte = split(x, y, 2000)
    r = probe.ridge_probe(xtr, ytr, xte, yte, 5, **quiet)
    l = probe.logreg_probe(xtr, ytr, xte, yte, 5, **quiet)
    assert 0.6 < r["ridge top1"] < 0.99            # not trivially separable
    assert abs(r["ridge top1"] - l["logreg top1"]) < 0.03


def test_lbfgs_reaches_the_optimum_of_an_independent_float64_fit():
    """Same features, same lam: L-BFGS (float32, hand-written gradient) vs plain gradient descent
    in float64 with autograd, many steps, on mean CE + lam ||W||^2 (bias unpenalised)."""
    x, y = blobs(400, 10, 3, sep=0.7, seed=3)
    x = probe.standardize(x)[0]
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
        return probe.extract(enc.features, ds, 16, torch.device("cpu"), batch_size=16)

    key = probe.cache_key(encoder={"random": 1}, spec="shapes", split="train", img_size=16)
    x1, y1 = probe.cached_features(key, compute, str(tmp_path))
    x2, y2 = probe.cached_features(key, compute, str(tmp_path))
    assert len(calls) == 1                                # the second call never touched the encoder
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.shape == (40, 32)
    assert probe.cache_key(encoder={"random": 1}, spec="shapes", split="test", img_size=16) != key


# -----------------------------------------------------------------------------
# Caption scoring on tiny models overfitted to a handful of (image, caption) pairs


def overfit(objective, imgs, caps, steps=400):
    cfg = mdc.parse_args([f"--objective={objective}", "--width=32", "--enc_depth=1", "--dec_depth=1", "--heads=2",
                          "--img_size=16", "--patch_size=4", "--max_len=16"])
    tok = data.Tokenizer.build(caps)
    torch.manual_seed(0)
    model = mdc.Model(cfg, len(tok))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = tok.batch(caps, cfg.max_len)[0]
    for step in range(steps):
        u, r = mdc.draw_noise(cfg, len(x), step)
        loss, _ = mdc.LOSSES[objective](model, imgs, x, u, r, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), cfg, tok


@pytest.fixture(scope="module")
def pairs():
    """Six single-object test images of the synthetic probe, one per shape, with 7-word captions:
    caption length (which the mdc decoder sees) cannot tell them apart, only the image can.
    Returns (images, true captions, candidates: for image y, its caption with each shape word)."""
    cands, labels = probe.shapes_zeroshot("shape", 200)
    first = {}
    for i, (row, y) in enumerate(zip(cands, labels.tolist())):
        if len(row[0].split()) == 7:
            first.setdefault(y, i)
    idx = [first[y] for y in range(6)]
    imgs = data.probe_dataset("shapes", "test", img_size=16).tensors[0][idx]
    return imgs, [cands[i][y] for y, i in enumerate(idx)], [cands[i] for i in idx]


@pytest.fixture(scope="module")
def models(pairs):
    return {o: overfit(o, *pairs[:2]) for o in ("mdc", "ar", "clip")}


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


def test_shapes_zeroshot_candidates_differ_only_in_the_class_word():
    for task in ("shape", "shape_color"):
        cands, labels = probe.shapes_zeroshot(task, 50)
        _, ytest = data.probe_dataset(f"shapes:{task}", "test").tensors
        assert torch.equal(labels, ytest[:50])            # the same scenes as the probe's test split
        n_classes = data.PROBE_TASKS[task][0]
        for row, y in zip(cands, labels):
            assert len(row) == n_classes == len(set(row))
            assert len({len(c.split()) for c in row}) == 1
            differ = {j for c in row for j, (a, b) in enumerate(zip(c.split(), row[0].split())) if a != b}
            assert len(differ) == (1 if task == "shape" else 2)


def test_a_corrupted_caption_never_equals_the_original_and_keeps_its_words():
    imgs, caps = probe.multi_object(data.Shapes(seed=0, img_size=16, split="val"), 300, seed=0)
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
    c = "a small red circle above a big blue box"
    assert probe.swap_relation(c) == "a big blue box above a small red circle"
    assert probe.swap_attributes(c) == "a small blue circle above a big red box"
    assert probe.swap_attributes("a small red circle above a big red box") is None


# -----------------------------------------------------------------------------
# Position signal, JSON


def test_position_signal_is_zero_when_the_decoder_ignores_the_image(models, pairs):
    imgs, caps, _ = pairs
    for objective in ("mdc", "ar"):
        model, cfg, tok = models[objective]
        x = tok.batch(caps, cfg.max_len)[0]
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


def test_results_json_round_trips(models, tmp_path):
    model, cfg, tok = models["mdc"]
    path = str(tmp_path / "mdc.pt")
    mdc.save_checkpoint(path, model, None, cfg, tok, 300)
    out = str(tmp_path / "r.json")
    res = probe.main([f"--ckpt={path}", "--ckpt=random", "--ckpt=pixels", f"--json={out}", "--fitter=ridge",
                      "--n_eval=12", "--n_retrieval=6", "--K=2", f"--cache_dir={tmp_path}/cache"])
    back = probe.load_json(out)
    assert back == res                                     # no NaN, tuple or tensor slipped in
    assert [e["name"] for e in back["encoders"]] == [path, "random", "pixels"]
    assert back["encoders"][0]["config"]["width"] == 32 and "zero-shot" in back["encoders"][0]["metrics"]
    assert probe.format_table(back) == probe.format_table(res)
