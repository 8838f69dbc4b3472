"""
Judging a pre-trained image encoder once its decoder is thrown away.

    python probe.py --ckpt=out/ckpt.pt --dataset=cifar10         # out/ckpt.pt: what python mdc.py writes
    python probe.py --ckpt=mdc/ckpt.pt --ckpt=ar/ckpt.pt --ckpt=clip/ckpt.pt --ckpt=random --ckpt=pixels
    python probe.py --ckpt=out/ckpt.pt --dataset=imagenet:data/imagenet --classes=imagenet100
    python probe.py --ckpt=out/ckpt.pt --export_timm=out/vit_timm.pt      # the encoder as a timm ViT
    python probe.py --summary=objective --diff=objective:mdc,ar --from_json='results/default/*.json'  # many runs

Every call prints one table, rows = encoders, columns = metrics; `random` (the same ViT at
random initialisation) and `pixels` (raw pixels) are the floors every table should carry.
- Linear probe on frozen features (mean of the final tokens after the final LayerNorm), extracted
  once and cached on disk (an ImageFolder decoded batch by batch in --num_workers workers; at 224 px
  and above the standard evaluation transform, short side to 256 and a centre crop of 224, below it the
  whole short side): closed-form ridge (big_vision's fast few-shot probe, `mdc.ridge_probe`, which
  `python mdc.py` also runs) and L2-regularised multinomial logistic regression by L-BFGS, its strength
  chosen on a stratified 10% hold-out and refitted on all of the training set (CLIP's protocol).
- Zero-shot classification, ARO-style compositionality and image-text retrieval, all by scoring
  captions (RULES): mdc by minus its training loss (K Monte Carlo draws; the ELBO only as t_min -> 0)
  or a cheaper rule, ar/cappa by the exact log-likelihood, clip/siglip/rils by cosine similarity
  (mae, umd, milan have no text side: they get the linear probe only).
- The visual signal per caption position (`--signal`, `--plot`): how much the true image lowers the
  decoder's loss at each position against a mismatched image; the largest attention logit (`--logits`).
- Last, fenced: the summaries of many runs' result files (`--summary`, `--plot_vs`): means and paired
  intervals over seeds, the seeds and minutes a contrast needs, and the figures.

`python probe.py --bench` times the L-BFGS sweep. Imports run one way: probe -> mdc -> data.
"""
import argparse
import glob
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.nn.functional as F

import data
import mdc
from data import PAD
from mdc import (  # the ridge probe and feature extraction, which python mdc.py runs at the end of training
    random_encoder, extract, standardize, stratified_holdout, topk, accuracies, RIDGE_GRID, ridge_probe)

# -----------------------------------------------------------------------------
# Features: a frozen encoder -> (N, D), extracted once, cached on disk


def cache_key(**parts):
    """A file name from everything that changes the features: which encoder (a checkpoint's path,
    size and mtime, or a random init's config and seed), dataset, split, size, subset."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cached_features(key, compute, cache_dir):
    """compute() -> (x, y) unless cache_dir/key.pt exists; a sweep never extracts twice."""
    path = os.path.join(cache_dir, key + ".pt") if cache_dir else None
    if path and os.path.exists(path):
        d = torch.load(path, weights_only=True)
        return d["x"], d["y"]
    x, y = compute()
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        torch.save({"x": x, "y": y}, path + ".tmp")
        os.replace(path + ".tmp", path)  # never half a file, even if interrupted
    return x, y


# -----------------------------------------------------------------------------
# Linear probes on fixed features: closed-form ridge, and L-BFGS logistic regression.
# Regularisation strengths are per sample: ridge minimises mean ||XW - Y||^2 + lam ||W||^2,
# logistic regression mean CE + lam ||W||^2 (sklearn's C = 1 / (2 N lam)); biases are free.


def logreg_fit(x, xt, y, lam, P, max_iter=500, tol=1e-5):
    """Full-batch L-BFGS on mean CE + lam ||W||^2, run until converged. x: (N, D+1), a ones column last (the
    free bias), xt = x.T contiguous, P: (C, D+1) start. It works on V = P / s, s = (mean(x^2) / C + 2 lam)^(-1/2)
    per column (1/C: the softmax curvature at uniform predictions), where the Hessian is near the identity for
    uncorrelated columns (logreg_probe rotates them so): in raw coordinates the iterations grow with the
    features' condition number, and a fixed cap stopped weak-lam fits far from their optimum. Converged = max
    |dLoss/dV| <= tol, alike on every feature set (loss - optimum ~ |dLoss/dV|^2 / 2). float32 (the loss summed
    in float64), ending in float64 if float32's line search stalls. Returns (P, {evals, iters, grad, converged})."""
    C, N = P.shape[0], len(x)
    pen = torch.ones_like(P)
    pen[:, -1] = 0                                             # no penalty on the bias column
    s = (x.square().mean(0) / C + 2 * lam * pen[0]).clamp(min=1e-30).rsqrt()  # (D+1,)
    V = torch.nn.Parameter(P / s)
    opt = torch.optim.LBFGS([V], lr=1, max_iter=max_iter, max_eval=2 * max_iter, history_size=20,
                            tolerance_grad=tol, tolerance_change=0, line_search_fn="strong_wolfe")
    onehot = F.one_hot(y, C).to(x.dtype)                       # (N, C)
    evals = 0

    def closure():
        nonlocal evals
        evals += 1
        with torch.no_grad():
            P = V * s                                          # (C, D+1)
            logp = F.linear(x, P).log_softmax(1)               # (N, C)
            loss = -logp.gather(1, y[:, None]).double().mean() + lam * (pen * P * P).sum().double()
            G = logp.exp_().sub_(onehot)                       # (N, C) d CE / d logits = softmax - onehot
            # written out because x.T @ G with x.T contiguous is the fastest layout for BLAS here
            # (the tests check the fit against autograd in float64); times s for d / dV
            V.grad = (((xt @ G).T / N + 2 * lam * pen * P) * s).contiguous()  # (C, D+1)
        return loss

    opt.step(closure)
    closure()                                                  # the gradient at the point returned
    g, iters = V.grad.abs().max().item(), opt.state[V]["n_iter"]
    P = (V * s).detach()
    if g > tol and iters < max_iter and x.dtype == torch.float32:
        # stopped early without converging: the line search found no lower float32 loss (near
        # the optimum of a large problem the rounding of x @ P is bigger than what is left to
        # gain). The last steps in float64, from here.
        P, more = logreg_fit(x.double(), xt.double(), y, lam, P.double(), max_iter - iters, tol)
        return P.float(), {**more, "evals": evals + more["evals"], "iters": iters + more["iters"], "float64 steps": more["iters"]}
    return P, dict(evals=evals, iters=iters, grad=g, converged=g <= tol)


def with_bias(x):
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)  # (N, D+1)


def pca_rotate(xtr, *others):
    """Centre on the training mean and rotate onto the training covariance's eigenvectors (float64 inside).
    Not a whitening: the L2 problem is the same (a rotation changes neither predictions nor ||W||^2, the
    centring moves only the free bias), but uncorrelated columns make logreg_fit's per-column preconditioner
    match the Hessian, and in float32 nothing cancels (a weak-lam W on ill-conditioned features has large
    components that cancel in x @ W beyond what float32 resolves)."""
    xd = xtr.double()
    m = xd.mean(0)
    _, Q = torch.linalg.eigh(xd.T @ xd / len(xd) - torch.outer(m, m))   # of the covariance, (D, D)
    return [((x.double() - m) @ Q).float() for x in (xtr, *others)]


def pick_lambda(fit, grid, log):
    """CLIP's sweep of lam = 10^e, e = grid[1] .. grid[0] (strong to weak, each fit warm-starting the next):
    fit(e, start weights or None) -> (weights, hold-out accuracy, converged). The best accuracy among the
    converged fits wins (all if none converged: an unconverged fit says how far the optimiser got, not how
    good its lam is), ties to the stronger lam; a pick on the edge of the grid extends it 2 decades that
    way (and says so). Returns (the best e, {e: hold-out accuracy}, {e: weights})."""
    W, accs, stalled = {}, {}, set()

    def sweep(exps, start):
        for e in exps:
            W[e], accs[e], ok = fit(e, start)
            start = W[e]
            if not ok:
                stalled.add(e)

    lo, hi = grid
    sweep(range(hi, lo - 1, -1), None)
    while True:
        best = max([e for e in accs if e not in stalled] or list(accs), key=lambda e: (accs[e], e))
        if best == min(accs) and best > -14:
            log(f"best lam 1e{best} is the weakest tried; extending the grid to 1e{best - 2}")
            sweep(range(best - 1, best - 3, -1), W[best])
        elif best == max(accs) and best < 6:
            log(f"best lam 1e{best} is the strongest tried; extending the grid to 1e{best + 2}")
            sweep(range(best + 1, best + 3), W[best])
        else:
            return best, accs, W


def logreg_probe(xtr, ytr, xte, yte, n_classes, grid=(-7, 1), max_iter=500, refit_iter=500, seed=0, device="cpu", log=print):
    """CLIP's protocol: lam by pick_lambda on a stratified 10% hold-out, then a refit on the whole
    training set. Every fit runs to convergence (logreg_fit); one that ends unconverged (at its cap,
    max_iter or refit_iter, or stalled even in float64) is logged and listed under 'logreg unconverged'.
    The penalty is on the weights of the standardised features, as in the ridge probe (the PCA rotation
    leaves it unchanged): lam = 1 / (2 N C) in sklearn's terms, its default L2 penalty with a free
    intercept. float32 on the device; the rotation, and a fit's last steps where needed, in float64."""
    t0 = time.perf_counter()
    xtr, xte = (with_bias(x) for x in pca_rotate(*standardize(xtr.float().to(device), xte.float().to(device))))
    ytr, yte = ytr.to(device), yte.to(device)
    fit, hold = (i.to(device) for i in stratified_holdout(ytr.cpu(), 0.1, seed))
    xf, yf, xh, yh = xtr[fit], ytr[fit], xtr[hold], ytr[hold]
    xft = xf.T.contiguous()
    evals, unconverged = 0, []

    def fitted(x, xt, y, e, start, cap, what):
        nonlocal evals
        P, info = logreg_fit(x, xt, y, 10.0 ** e, start, cap)
        evals += info["evals"]
        if not info["converged"]:
            unconverged.append(f"{what} 1e{e}")
            log(f"logreg: {what} at lam 1e{e} not converged after {info['iters']} iterations "
                f"(max gradient {info['grad']:.1e})")
        return P, info["converged"]

    def holdout_fit(e, start):
        start = torch.zeros(n_classes, xtr.shape[1], device=device) if start is None else start
        P, ok = fitted(xf, xft, yf, e, start, max_iter, "hold-out fit")
        return P, topk(xh @ P.T, yh), ok

    best, accs, P = pick_lambda(holdout_fit, grid, lambda s: log("logreg: " + s))
    W, _ = fitted(xtr, xtr.T.contiguous(), ytr, best, P[best], refit_iter, "refit")
    out = accuracies("logreg", xte @ W.T, yte, n_classes)
    return {**out, "logreg lambda": 10.0 ** best, "logreg holdout": {f"1e{e}": a for e, a in sorted(accs.items())},
            "logreg evals": evals, "logreg unconverged": unconverged, "logreg seconds": time.perf_counter() - t0}


def sklearn_probe(xtr, ytr, xte, yte, n_classes, grid=(-7, 1), seed=0, solver="lbfgs", at_lam=None):
    """A reference for logreg_probe, only for measuring (pip install scikit-learn; the project does not need
    it): LogisticRegression (`solver`, tol 1e-6, up to 10^5 iterations, C = 1 / (2 N lam)) on the same features,
    hold-out, pick_lambda and refit, counting ConvergenceWarnings; with at_lam (logreg_probe's pick) also a fit
    of all of train at that lam, to compare the fitters at one lam. lbfgs can need 10^4-10^5 iterations at
    weak lam on ill-conditioned features; newton-cholesky (second order) converges in a few."""
    import warnings
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    t0 = time.perf_counter()
    xtr, xte = (x.double().numpy() for x in standardize(xtr.float(), xte.float()))
    fit, hold = (i.numpy() for i in stratified_holdout(ytr, 0.1, seed))
    ytr, yte = ytr.numpy(), yte.numpy()
    unconverged = []

    def fitted(x, y, e, start, what="hold-out fit"):
        m = LogisticRegression(C=1 / (2 * len(x) * 10.0 ** e), tol=1e-6, max_iter=100_000, warm_start=True, solver=solver)
        if start is not None:
            m.coef_, m.intercept_ = (a.copy() for a in start)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always", ConvergenceWarning)
            m.fit(x, y)
        ok = not any(issubclass(i.category, ConvergenceWarning) for i in w)
        if not ok:
            unconverged.append(f"{what} 1e{e}")
        return m, ok

    def holdout_fit(e, start):  # every fit is a candidate for the pick: a ConvergenceWarning is only counted
        m, _ = fitted(xtr[fit], ytr[fit], e, start)
        return (m.coef_, m.intercept_), float((m.predict(xtr[hold]) == ytr[hold]).mean()), True

    best, _, coefs = pick_lambda(holdout_fit, grid, lambda s: None)
    m, _ = fitted(xtr, ytr, best, coefs[best], "refit")
    out = {"sklearn top1": float((m.predict(xte) == yte).mean()), "sklearn lambda": 10.0 ** best,
           "sklearn unconverged": unconverged, "sklearn seconds": time.perf_counter() - t0, "sklearn solver": solver}
    if at_lam is not None:  # from scratch, on all of the training set, at the other fitter's lam
        t0 = time.perf_counter()
        m, ok = fitted(xtr, ytr, round(float(np.log10(at_lam))), None, "fit at the L-BFGS probe's lam")
        out.update({"sklearn top1 at logreg lambda": float((m.predict(xte) == yte).mean()),
                    "sklearn converged at logreg lambda": ok, "sklearn seconds at logreg lambda": time.perf_counter() - t0})
    return out


def physical_memory():
    """Bytes of memory this machine has, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_newton_memory(n_features, n_classes):
    """scikit-learn's newton-cholesky builds the multinomial Hessian, (C (D + 1))^2 float64 values,
    and works on copies of it: on wide features (raw pixels) that is more memory than a machine
    has. Stop with one line, before any fit, when one copy alone is over a quarter of it."""
    need, have = 8 * (n_classes * (n_features + 1)) ** 2, physical_memory()
    if have and 4 * need > have:
        raise data.UsageError(f"--sklearn_solver=newton-cholesky on {n_features}-wide features of {n_classes} classes builds a "
                              f"{need / 2**30:.1f} GiB Hessian (and copies) on a machine of {have / 2**30:.0f} GiB; use "
                              f"--sklearn_solver=lbfgs, or a narrower feature set")


def linear_probe(xtr, ytr, xte, yte, n_classes, fitter="both", device="cpu", log=print, sklearn_solver="lbfgs"):
    if fitter == "sklearn" and sklearn_solver == "newton-cholesky":
        check_newton_memory(xtr.shape[1], n_classes)
    out = {}
    if fitter in ("ridge", "both"):
        out.update(ridge_probe(xtr, ytr, xte, yte, n_classes, log=log))
    if fitter in ("lbfgs", "both", "sklearn"):
        out.update(logreg_probe(xtr, ytr, xte, yte, n_classes, device=device, log=log))
    if fitter == "sklearn":
        out.update(sklearn_probe(xtr, ytr, xte, yte, n_classes, solver=sklearn_solver, at_lam=out["logreg lambda"]))
    return out


# -----------------------------------------------------------------------------
# Scoring captions: one routine serves zero-shot, compositionality and retrieval


MDC_RULES = ("loss", "pll", "all")  # mdc.caption_logprob: minus the training loss, a pseudo-log-likelihood, all masked
# how an objective's checkpoint scores a caption: the exact log-likelihood (causal captioners), MDC_RULES (the
# other captioners), cosine similarity (contrastive), or not at all (no text side)
RULES = {o: ("exact",) if o in mdc.CAUSAL else MDC_RULES if o in mdc.CAPTIONERS else ("cos",) if o in mdc.CONTRASTIVE else ()
         for o in mdc.OBJECTIVES}


@torch.no_grad()
def score_captions(model, cfg, tok, imgs, cands, rule, K=8, batch_size=128, seed=0):
    """How well each candidate caption fits its image, higher = better.
    imgs: (B, 3, S, S) in [0, 1]; cands: B lists of C strings (candidates for image b).
    rule: one of RULES[cfg.objective]. Returns (B, C)."""
    device = next(model.parameters()).device
    B, C = len(cands), len(cands[0])
    out = torch.empty(B, C)
    for i in range(0, B, batch_size):
        with mdc.autocast(device, cfg.dtype):
            v = model.encoder(data.to_input(imgs[i:i + batch_size], cfg.img_size).to(device))  # (b, N, D), once per image
        b = len(v)
        x = tok.batch([c for cs in cands[i:i + b] for c in cs], cfg.max_len).view(b, C, -1)  # (b, C, L)
        seen = mdc.feed(x.view(b * C, -1), cfg).keys.any(0)     # (L,) the positions the decoder reads
        x = x[..., :int(seen.nonzero().max()) + 1]               # the trailing ones it does not read change no score
        x = x.to(device)
        for c in range(C):
            xc = x[:, c]                                         # (b, L)
            with mdc.autocast(device, cfg.dtype):
                if rule == "cos":
                    img, txt = model.embed(v, xc, xc != PAD)
                    s = (img.float() * txt.float()).sum(-1)
                else:
                    # the same (t, mask) draws for every candidate of an image (common random
                    # numbers): the loss rule's Monte Carlo noise mostly cancels when candidates are compared
                    g = torch.Generator().manual_seed(seed * 1_000_003 + i)
                    s = mdc.caption_logprob(model, v, xc, rule, K, g)
            out[i:i + b, c] = s.float().cpu()
    return out


# -----------------------------------------------------------------------------
# Zero-shot classification: the class whose prompt scores highest


TEMPLATES = ["a photo of a {}."]


def shapes_zeroshot(task, n, seed=0, order="color_first", alias=0, subset=None):
    """Candidates for the synthetic probe's test images (data.shapes_probe): each image's own
    caption, described again with only the class attribute changed (the shape, the colour, or
    both), one candidate per class, so candidates differ in the class words alone.
    Returns (B lists of n_classes captions, labels (B,))."""
    n_classes, label = data.PROBE_TASKS[task]
    _, attrs = data.probe_scenes("test", n, seed, subset)          # the test split of data.shapes_probe
    cands = []
    for i in range(n):
        row = []
        for c in range(n_classes):
            a = {k: v[i:i + 1].copy() if isinstance(v, np.ndarray) else v for k, v in attrs.items()}  # scene i alone
            if task == "shape":
                a["shape"][0, 0] = c
            elif task == "color":
                a["color"][0, 0] = c
            else:                                          # label = shape * n_colours + colour
                a["shape"][0, 0], a["color"][0, 0] = divmod(c, len(data.COLORS))
            row.append(data.describe(a, 0, order, alias))
        cands.append(row)
    return cands, torch.from_numpy(label(attrs).astype(np.int64))


def zeroshot(model, cfg, tok, ds, spec, n, K=8, seed=0, batch_size=128, rules=None):
    """Accuracy per scoring rule on (up to) n test images. None if the classes have no names."""
    kind, _, arg = spec.partition(":")
    if kind == "shapes":
        task, subset = data.shapes_task(arg, spec)
        cands, labels = shapes_zeroshot(task, n, seed, cfg.order, cfg.alias, subset)
        imgs = data.dataset_tensors(ds)[0][:n]
        assert torch.equal(labels, data.dataset_tensors(ds)[1][:n]), "data.shapes_probe changed; update shapes_zeroshot"
    else:
        names = getattr(ds, "classes", None)
        if names is None or any(re.fullmatch(r"n\d{8}", c) for c in names):   # ImageNet wnids are not words
            return None
        pick = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]  # a seeded subset
        imgs, labels = data.dataset_tensors(ds, pick)     # an ImageFolder: only these are decoded
        cands = [[t.format(c.replace("_", " ")) for c in names for t in TEMPLATES]] * len(labels)
    out = {}
    for rule in rules or RULES[cfg.objective]:
        s = score_captions(model, cfg, tok, imgs, cands, rule, K, batch_size, seed)   # (B, C * templates)
        s = s.view(len(labels), -1, len(TEMPLATES) if kind != "shapes" else 1).mean(-1)  # average templates
        out[rule] = (s.argmax(1) == labels).float().mean().item()
    return out


# -----------------------------------------------------------------------------
# Compositionality, ARO-style: true caption vs a corruption with the same bag of words


def noun_phrases(words):
    """(start, end, index of the colour word) of the synthetic grammar's noun phrases:
    "a <size> <colour> <shape> <aliases>" (color_first) or "a <size> <shape> <aliases> in <colour>"
    (shape_first); the shape's aliases (--alias) belong to its phrase."""
    out = []
    for j in range(len(words) - 3):
        if words[j] != "a":
            continue
        colour_first = words[j + 2] in data.COLOR_NAMES
        k = j + 3 if colour_first else j + 2                    # the shape word, then past its aliases
        while k + 1 < len(words) and words[k + 1] in data.ALIAS_WORDS:
            k += 1
        if colour_first:
            out.append((j, k + 1, j + 2))
        elif words[k + 1:k + 2] == ["in"] and words[k + 2:k + 3] and words[k + 2] in data.COLOR_NAMES:
            out.append((j, k + 3, k + 2))
    return out


def swap_attributes(caption):
    """Colours of the first two objects swapped: "a small red circle above a large blue square" ->
    "a small blue circle above a large red square". None if there is nothing to swap."""
    w = caption.split()
    nps = noun_phrases(w)
    if len(nps) < 2 or w[nps[0][2]] == w[nps[1][2]]:
        return None
    (_, _, ca), (_, _, cb) = nps[:2]
    w[ca], w[cb] = w[cb], w[ca]
    return " ".join(w)


def swap_relation(caption):
    """The first two noun phrases exchanged, so the relation between them is reversed with the same
    words: "A above B" -> "B above A" (ARO's VG-Relation). None if they are the same words."""
    w = caption.split()
    nps = noun_phrases(w)
    if len(nps) < 2:
        return None
    (a, a_end, _), (b, b_end, _) = nps[:2]
    if w[a:a_end] == w[b:b_end]:
        return None
    return " ".join(w[:a] + w[b:b_end] + w[a_end:b] + w[a:a_end] + w[b_end:])


def corruptions(caption, rng, synthetic=True):
    """name -> corrupted caption (or None where impossible); every one keeps the bag of words: the words
    shuffled (ARO Order), the trigrams kept whole in shuffled order and the words shuffled inside each
    trigram (ARO's COCO/Flickr-Order), and with the synthetic grammar's noun phrases the attribute and
    relation swaps. A shuffle is redrawn (up to 20 times) until it differs from the original."""
    w = data.split_words(caption)
    tri = [w[i:i + 3] for i in range(0, len(w), 3)]

    def shuffled(draw):
        tries = (draw() for _ in range(20 if len(set(w)) > 1 else 0))
        return next((" ".join(out) for out in tries if out != w), None)

    out = {"word shuffle": shuffled(lambda: [w[i] for i in rng.permutation(len(w))]),
           "trigram shuffle": shuffled(lambda: [x for i in rng.permutation(len(tri)) for x in tri[i]]),
           "within-trigram": shuffled(lambda: [t[j] for t in tri for j in rng.permutation(len(t))])}
    if synthetic:
        out = {"attr swap": swap_attributes(caption), "relation swap": swap_relation(caption), **out}
    return out


def compositional(model, cfg, tok, imgs, caps, synthetic=True, K=8, seed=0, batch_size=128, rules=None):
    """Fraction of pairs where the true caption outscores its corruption (ties count half;
    chance = 0.5), per corruption and scoring rule: {corruption: {rule: fraction}}."""
    rng = np.random.default_rng(seed)
    bad = [corruptions(c, rng, synthetic) for c in caps]
    out = {}
    for name in bad[0]:
        keep = [i for i, b in enumerate(bad) if b[name] is not None]
        if not keep:
            continue
        pairs = [[caps[i], bad[i][name]] for i in keep]
        out[name] = {}
        for rule in rules or RULES[cfg.objective]:
            s = score_captions(model, cfg, tok, imgs[keep], pairs, rule, K, batch_size, seed)  # (B, 2)
            out[name][rule] = ((s[:, 0] > s[:, 1]).float() + 0.5 * (s[:, 0] == s[:, 1]).float()).mean().item()
    return out


def multi_object(val, n):
    """(images, captions) of the first n validation scenes with two or more objects."""
    idx = np.arange(8 * n, dtype=np.int64)
    return val.batch(idx[val.attributes(idx)["n"] >= 2][:n])   # the same draws as val.batch


# -----------------------------------------------------------------------------
# Image-text retrieval: every image against every caption


def retrieval(model, cfg, tok, imgs, caps, K=8, seed=0, batch_size=128, rules=None):
    """Recall@1/5 image->text and text->image over N pairs: {metric: {rule: value}}.
    Captioners score log p(caption | image): comparable across images for a fixed caption, but
    across captions it favours short ones, so their image->text numbers carry a length bias."""
    N = len(caps)
    out = {}
    for rule in rules or RULES[cfg.objective]:
        S = score_captions(model, cfg, tok, imgs, [caps] * N, rule, K, batch_size, seed)  # (N images, N captions)
        true = S.diagonal()
        # rank of the true partner: how many others score at least as high (ties count against)
        r_i2t = (S >= true[:, None]).sum(1) - 1
        r_t2i = (S >= true[None, :]).sum(0) - 1
        for k in (1, 5):
            out.setdefault(f"i2t R@{k}", {})[rule] = (r_i2t < k).float().mean().item()
            out.setdefault(f"t2i R@{k}", {})[rule] = (r_t2i < k).float().mean().item()
    return out


# -----------------------------------------------------------------------------
# Visual signal per caption position (MDC's argument: AR's later tokens need the image less),
# and the largest attention logit (stability)


@torch.no_grad()
def signal_terms(model, cfg, imgs, x, t=None, K=4, generator=None):
    """CE(k | mismatched image) - CE(k | true image) summed per caption position, and how often
    each was counted; the mismatched image is the batch rolled by one. imgs (B, 3, S, S), x (B, L).
    ar/cappa: teacher-forced causal CE at every real position. mdc: masked CE under K random masks
    at ratio t (a number, or t ~ U(t_min, 1) per caption as in training), counted where masked.
    Returns (diff (B, L), count (B, L))."""
    v = model.encoder(imgs)                                  # (B, N, D)
    v_wrong = v.roll(1, 0)                                   # every caption gets another image
    B, L = x.shape
    if cfg.objective not in mdc.CAPTIONERS:
        raise ValueError(f"{cfg.objective} has no caption decoder")
    diff, count = torch.zeros(B, L, device=x.device), torch.zeros(B, L, device=x.device)
    for _ in range(1 if cfg.objective in mdc.CAUSAL else K):
        if cfg.objective in mdc.CAUSAL:                      # teacher-forced: no draw
            f = mdc.feed(x, cfg, causal=True)
        else:
            tt = torch.full((B,), float(t)) if t is not None else mdc.sample_t(torch.rand(B, generator=generator), cfg.t_min)
            f = mdc.feed(x, cfg, t=tt.to(x.device), r=torch.rand(B, L, generator=generator).to(x.device))
        m = f.target & (x != PAD)                            # the signal is measured at the caption's tokens
        ce = lambda vv: mdc.token_ce(model.decode(f.inp, vv, f.keys, f.causal).float(), x)   # the same input, both images
        diff += (ce(v_wrong) - ce(v)) * m
        count += m
    return diff, count


def position_signal(model, cfg, imgs, x, t=None, K=4, generator=None):
    """The visual signal per caption position k (nats): mean over captions of
    CE(k | mismatched image) - CE(k | true image). Returns (L,); nan where never counted."""
    diff, count = signal_terms(model, cfg, imgs, x, t, K, generator)
    return (diff.sum(0) / count.sum(0)).cpu()                # (L,), 0/0 = nan


def signal_thirds(diff, count, x):
    """The same signal over the early / middle / late third of each caption (by position relative
    to the caption's own length, so captions of different lengths line up). Returns 3 floats."""
    n = (x != PAD).sum(1, keepdim=True).clamp(min=1)         # (B, 1) tokens, [EOS] included
    k = torch.arange(x.shape[1], device=x.device)[None]      # (1, L)
    third = (3 * k // n).clamp(max=2)                        # (B, L) 0, 1, 2; pads are not counted
    return [((diff * (third == i)).sum() / (count * (third == i)).sum()).item() for i in range(3)]


def caption_signal(model, cfg, tok, val, n, K=4, seed=0, batch_size=128):
    """signal_terms over the first n validation pairs -> {"signal early"/"middle"/"late": nats,
    "signal per position": [nats or None, ...]} (the t of mdc drawn as in training)."""
    device = next(model.parameters()).device
    imgs, caps = val.batch(np.arange(n))
    x = tok.batch(caps, cfg.max_len)                         # (n, L)
    g = torch.Generator().manual_seed(seed)
    diff, count = torch.zeros(x.shape), torch.zeros(x.shape)
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:  # a batch of one would be "mismatched" with itself
        starts.pop()
    for i, j in zip(starts, starts[1:] + [n]):
        d, c = signal_terms(model, cfg, data.to_input(imgs[i:j], cfg.img_size).to(device), x[i:j].to(device), None, K, g)
        diff[i:j], count[i:j] = d.float().cpu(), c.float().cpu()
    per_pos = diff.sum(0) / count.sum(0)                     # (L,)
    json_safe = lambda vs: [None if v != v else v for v in vs]   # nan -> None for JSON
    return {**dict(zip(("signal early", "signal middle", "signal late"), json_safe(signal_thirds(diff, count, x)))),
            **signal_by_word_kind(diff, count, x, tok), "signal per position": json_safe(per_pos.tolist())}


def signal_by_word_kind(diff, count, x, tok):
    """The same signal at the words of each kind of data.WORD_KINDS (shape, colour, size words):
    {"signal shape word": nats or None, ...}; None where no caption has such a word, and no key
    for a kind the vocabulary does not have (the aliases of a model trained without --alias)."""
    out = {}
    for kind, words in data.WORD_KINDS.items():
        if not any(w in tok.stoi for w in words):
            continue
        at = torch.isin(x, torch.tensor([tok.stoi[w] for w in words if w in tok.stoi], dtype=x.dtype))  # (B, L)
        n = (count * at).sum()
        out[f"signal {kind} word"] = ((diff * at).sum() / n).item() if n > 0 else None
    return out


@torch.no_grad()
def attention_logit_max(model, cfg, imgs, x):
    """Largest attention logit |q.k| / sqrt(head dim) in the encoder and in the text transformer
    on one batch (pads included): {"enc logit max": ., "text logit max": .}. Logits that grow
    without bound make training spike and diverge (ViT-22B, Dehghani et al. 2023); --qk_norm
    bounds them. imgs (B, 3, S, S), x (B, L)."""
    peak = {"enc logit max": 0.0, "text logit max": 0.0}

    def hook_for(name):
        key = "enc logit max" if name.startswith("encoder.") else "text logit max"

        def hook(mod, args, kwargs):
            q, k, _ = mod.heads_qkv(args[0], kwargs.get("ctx"))  # (B, H, T, hd), (B, H, S, hd)
            peak[key] = max(peak[key], ((q @ k.transpose(-1, -2)).abs().max() / q.shape[-1] ** 0.5).item())
        return hook

    hooks = [m.register_forward_pre_hook(hook_for(name), with_kwargs=True)
             for name, m in model.named_modules() if isinstance(m, mdc.Attention)]
    try:
        v = model.encoder(imgs)                              # (B, N, D)
        if model.contrastive:
            model.embed(v, x, x != PAD)
        else:                                                # the decoder's input in training
            f = mdc.feed(x, cfg, causal=cfg.objective in mdc.CAUSAL)   # causal, or every word masked
            model.decode(f.inp, v, f.keys, f.causal)
    finally:
        for h in hooks:
            h.remove()
    return peak


def run_name(path):
    """out/ar/ckpt.pt -> ar; runs/ar.pt -> ar; runs/ar/step400.pt -> ar/step400."""
    stem = os.path.splitext(os.path.basename(path))[0]
    run = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return run if stem == "ckpt" else f"{run}/{stem}" if re.fullmatch(r"step\d+", stem) else stem


def plot_signal(results, path):
    """Per-position visual signal of every captioner in a results dict, one line each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for e in results["encoders"]:
        s = e["metrics"].get("signal per position")
        if s:
            k = [i + 1 for i, v in enumerate(s) if v is not None]
            ax.plot(k, [v for v in s if v is not None], marker="o", ms=3, label=f"{run_name(e['name'])} ({e['objective']})")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(xlabel="caption position k (word, then [EOS])", ylabel="CE(wrong image) - CE(true image), nats",
           title="visual signal per caption position")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -----------------------------------------------------------------------------
# The encoders of one call: checkpoints, a random init of the same ViT, raw pixels


def ckpt_spec(s):
    """A --ckpt value that names a checkpoint -> (its path, whether ema:PATH asks for its --ema weights)."""
    return s.removeprefix("ema:"), s.startswith("ema:")


def load_encoders(specs, preset="tiny", img_size=0, seed=0, device="cpu", patch_size=0):
    """--ckpt values -> list of dicts (name, kind, cfg, encoder, key; a checkpoint also model, tok, step, weights). A
    checkpoint keeps its decoder for scoring; ema:PATH loads the moving average of its weights (--ema) instead of
    the weights; 'random' copies the first checkpoint's config (else the preset)."""
    encs, ref = [], None
    for s in specs:
        if s in ("random", "pixels") or re.fullmatch(r"random:\d+", s):   # random:S = the init of seed S
            kind, _, init = s.partition(":")
            encs.append(dict(name=s, kind=kind, init_seed=int(init) if init else seed))
            continue
        path, ema = ckpt_spec(s)
        model, cfg, tok, ckpt = mdc.load_checkpoint(path, device, ema=ema)
        st = os.stat(path)
        key = dict(path=os.path.abspath(path), size=st.st_size, mtime=st.st_mtime_ns, **({"weights": "ema"} if ema else {}))
        encs.append(dict(name=s, kind="ckpt", cfg=cfg, model=model, tok=tok, encoder=model.encoder, step=ckpt.get("step"),
                         weights="ema" if ema else "final", key=key, made=ckpt.get("provenance")))
        ref = ref or cfg
    if ref is None:
        ref = mdc.parse_args([f"--model={preset}"] + ([f"--img_size={img_size}"] if img_size else [])
                             + ([f"--patch_size={patch_size}"] if patch_size else []))
    for e in encs:
        if e["kind"] == "random":
            e.update(cfg=ref, encoder=random_encoder(ref, e["init_seed"], device), key=dict(random=asdict(ref), seed=e["init_seed"]))
        elif e["kind"] == "pixels":
            e.update(cfg=ref)
    return encs


def probe_features(enc, split, args, device, datasets):
    """(features (N, D), labels (N,), dataset()) of one encoder on one split, the features cached;
    dataset() loads the probe dataset at the encoder's size once (kept in `datasets`)."""
    size = enc["cfg"].img_size
    if enc["kind"] == "pixels":  # raw pixels, at most --pixel_size (150k values at 224 px is too many)
        size = min(size, args.pixel_size)
    ds_args = dict(spec=args.dataset, split=split, img_size=size, data_root=args.data_root, seed=args.seed,
                   classes=args.classes, per_class=args.per_class)

    def ds():
        k = json.dumps(ds_args, sort_keys=True)
        if k not in datasets:
            datasets[k] = data.probe_dataset(**ds_args)
        return datasets[k]

    read = dict(batch_size=args.batch_size, desc=f"{enc['name']} {split}", num_workers=args.num_workers)
    if enc["kind"] == "pixels":  # (N, 3 * S * S), read batch by batch like the features, not cached
        x, y = extract(lambda imgs: imgs.flatten(1), ds(), size, torch.device("cpu"), **read)
    else:
        # an ImageFolder at 224 px and above is read through the evaluation transform (data.eval_resize)
        dtype = mdc.precision(device, enc["cfg"].dtype)       # the checkpoint's own, or --dtype
        key = cache_key(encoder=enc["key"], **ds_args, resize=data.eval_resize(size), dtype=dtype)
        x, y = cached_features(key, lambda: extract(enc["encoder"].features, ds(), size, device, dtype=dtype, **read),
                               args.cache_dir)
    return x, y, ds


# -----------------------------------------------------------------------------
# The encoder as a timm VisionTransformer (pip install timm; the project itself does not need it)


TIMM_LN_EPS = 1e-6  # timm's LayerNorm default (timm/layers/norm.py), which every norm_layer given by name gets


def timm_export(enc, cfg):
    """The ViT `enc` as a file for timm: {model_name, kwargs (plain values), state_dict, mean, std}, with
    timm.create_model(model_name, pretrained=False, **kwargs).load_state_dict(state_dict) (strict) a
    VisionTransformer whose forward_head(forward_features((images - mean) / std), pre_logits=True) is
    enc.features(images), images in [0, 1]: no class token, the fixed sin-cos positions as pos_embed, the
    final norm before the mean (fc_norm=False). timm's LayerNorm eps is 1e-6, this ViT's 1e-5, and
    LN_eps(x) = LN_{c^2 eps}(c x): with c = sqrt(1e-6 / 1e-5) the residual stream is carried times c (patch
    embedding, positions, every branch's output projection) and, with qk_norm, so are the queries and keys."""
    c = math.sqrt(TIMM_LN_EPS / enc.ln.eps)
    D = cfg.width
    t = lambda x, scale=1.0: (x.detach().float().cpu() * scale).contiguous()
    sd = {"patch_embed.proj.weight": t(enc.patch.weight, c), "patch_embed.proj.bias": t(enc.patch.bias, c),
          "pos_embed": t(enc.pos, c),                                          # (1, N, D), row-major as the patches
          "norm.weight": t(enc.ln.weight), "norm.bias": t(enc.ln.bias)}
    for i, blk in enumerate(enc.blocks):
        # timm's name -> (this ViT's module, scale of its weight and bias)
        parts = {"norm1": (blk.ln1, 1.0), "attn.qkv": (blk.attn.qkv, 1.0), "attn.proj": (blk.attn.proj, c),
                 "norm2": (blk.ln2, 1.0), "mlp.fc1": (blk.mlp[0], 1.0), "mlp.fc2": (blk.mlp[2], c)}
        if cfg.qk_norm:
            parts = {"attn.q_norm": (blk.attn.q_norm, 1.0), "attn.k_norm": (blk.attn.k_norm, 1.0), **parts}
        for name, (mod, scale) in parts.items():
            sd[f"blocks.{i}.{name}.weight"], sd[f"blocks.{i}.{name}.bias"] = t(mod.weight, scale), t(mod.bias, scale)
        if cfg.qk_norm:   # q_norm(c q) at c^2 eps = q_norm(q): the rows of q and k in the fused qkv times c
            sd[f"blocks.{i}.attn.qkv.weight"][:2 * D] *= c
            sd[f"blocks.{i}.attn.qkv.bias"][:2 * D] *= c
    mean, std = t(enc.mean).view(3, 1, 1), t(enc.std).view(3, 1, 1)
    # the name only selects timm's VisionTransformer; every size comes from kwargs
    name = {768: "vit_base_patch16_224"}.get(D, "vit_small_patch16_224")
    kwargs = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=D, depth=cfg.enc_depth, num_heads=cfg.heads,
                  mlp_ratio=cfg.mlp_ratio, qkv_bias=True, qk_norm=cfg.qk_norm, class_token=False, global_pool="avg",
                  fc_norm=False, num_classes=0,
                  # what timm.data.resolve_model_data_config reads: this ViT's input size, normalisation, crop
                  pretrained_cfg_overlay=dict(input_size=(3, cfg.img_size, cfg.img_size), mean=tuple(round(v, 6) for v in mean.flatten().tolist()),
                                              std=tuple(round(v, 6) for v in std.flatten().tolist()), interpolation="bicubic",
                                              crop_pct=cfg.img_size / data.eval_resize(cfg.img_size)))
    return dict(model_name=name, kwargs=kwargs, state_dict=sd, mean=mean, std=std, mdc_config=asdict(cfg))


def export_timm(ckpt, path):
    """--export_timm: write timm_export of a checkpoint's encoder (ema:PATH: its --ema weights) to path
    (torch.save, loads with weights_only)."""
    src, ema = ckpt_spec(ckpt)
    model, cfg, _, meta = mdc.load_checkpoint(src, ema=ema)
    torch.save({**timm_export(model.encoder, cfg), "step": meta.get("step")}, path)
    print(f"wrote {path}: the encoder of {ckpt} (step {meta.get('step')}) for timm.create_model; README.md says how to load it")


# -----------------------------------------------------------------------------
# Table and JSON


SIGNAL = ("signal early", "signal middle", "signal late", *(f"signal {k} word" for k in data.WORD_KINDS))  # nats, not %
RAW = {**{k: "{:.3f}" for k in SIGNAL}, "enc logit max": "{:.1f}", "text logit max": "{:.1f}"}  # columns printed as they are


def format_table(results):
    """Rows = encoders (plus one row per extra scoring rule of mdc), columns = metrics, in %."""
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
    rule_names = {r for rs in RULES.values() for r in rs}
    cols = list(dict.fromkeys(k for e in results["encoders"] for k, v in e["metrics"].items()   # in order of appearance
                              if (isinstance(v, dict) and set(v) <= rule_names) or k.endswith(("top1", "top5")) or k in RAW))
    rows = []
    for e in results["encoders"]:
        m = e["metrics"]
        known = RULES.get(e.get("objective"), ())
        rules = [r for r in known if any(isinstance(v, dict) and r in v for v in m.values())] or known[:1]  # those that ran
        label = e["name"] + (f" ({e['objective']})" if e.get("objective") else "")
        for i, rule in enumerate(rules or [None]):
            cells = []
            for c in cols:
                v = m.get(c)
                if c in RAW:
                    cells.append("" if i else "-" if v is None else RAW[c].format(v))
                else:
                    cells.append(pct(v.get(rule)) if isinstance(v, dict) else pct(v) if i == 0 else "")
            name = label if i == 0 else f"  same, scored by {rule}"
            rows.append([name + (f" [{rule}]" if i == 0 and rule else "")] + cells)
    head = ["encoder"] + cols
    w = [max(len(r[j]) for r in [head] + rows) for j in range(len(head))]
    line = lambda r: "  ".join(s.ljust(w[0]) if j == 0 else s.rjust(w[j]) for j, s in enumerate(r))
    return "\n".join([line(head), "-" * len(line(head))] + [line(r) for r in rows])


def save_json(path, results):
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def load_json(path):
    with open(path) as f:
        return json.load(f)


def machine():
    return (f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads, torch {torch.__version__}"
            + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))


# -----------------------------------------------------------------------------
# The command line: parse, evaluate, report


def bench(n=50_000, d=384, c=100, device="cpu"):
    """Time the whole L-BFGS sweep (hold-out grid + refit, every fit to convergence) on
    class-structured Gaussian features."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, c, (n + 10_000,), generator=g)
    means = torch.randn(c, d, generator=g) * 0.25
    x = means[y] + torch.randn(n + 10_000, d, generator=g)
    t0 = time.perf_counter()
    r = logreg_probe(x[:n], y[:n], x[n:], y[n:], c, device=torch.device(device))
    print(f"L-BFGS logistic-regression sweep on {n:,} x {d} features, {c} classes: {time.perf_counter() - t0:.1f} s "
          f"({r['logreg evals']} function evaluations, lam {r['logreg lambda']:.0e}, test top-1 "
          f"{100 * r['logreg top1']:.1f}%, unconverged fits: {', '.join(r['logreg unconverged']) or 'none'}) | {machine()}")
    t0 = time.perf_counter()
    r = ridge_probe(x[:n], y[:n], x[n:], y[n:], c, log=lambda s: None)
    print(f"ridge sweep ({len(RIDGE_GRID)} strengths) on the same: {time.perf_counter() - t0:.1f} s, "
          f"test top-1 {100 * r['ridge top1']:.1f}%")


def parse(argv):
    p = data.ArgumentParser(prog="probe.py", description="linear probe, zero-shot, compositionality and retrieval of encoders")
    arg = p.add_argument
    # the encoders and the probe data
    arg("--ckpt", action="append", default=[], help="checkpoint, ema:PATH (--ema weights), random[:SEED] or pixels; repeatable")
    arg("--dataset", default="shapes", help="shapes[:TASK[/SUBSET]], cifar10, cifar100, imagefolder:ROOT or imagenet:ROOT")
    arg("--data_root", default="data")
    arg("--classes", default="0", help="imagenet/imagefolder: a number of classes (seeded), imagenet100 (CMC) or a wnid file")
    arg("--per_class", type=int, default=0, help="cap on training images per class (0 = all)")
    arg("--captions", default=None, help="caption dataset for compositionality, retrieval and the signal (default shapes)")
    arg("--caption_tie", type=float, default=None, help="shapes: the --tie of those captions (default: each model's own; 0 tells "
        "whether a model trained with a tie sees shape, not only colour)")
    arg("--model", default="tiny", help="preset for 'random' when no checkpoint is given")
    arg("--img_size", type=int, default=0, help="input size for 'random'/'pixels' when no checkpoint is given")
    arg("--patch_size", type=int, default=0, help="patch size for 'random' when no checkpoint is given (0: the preset's)")
    arg("--pixel_size", type=int, default=32, help="raw pixels are resized to at most this")
    # what runs
    arg("--fitter", default="both", choices=["both", "ridge", "lbfgs", "sklearn"],
        help="sklearn: also scikit-learn (pip install), to compare")
    arg("--sklearn_solver", default="lbfgs", choices=["lbfgs", "newton-cholesky"],
        help="--fitter=sklearn: its solver (newton-cholesky converges fast)")
    for task in ("zeroshot", "compositional", "retrieval"):
        arg(f"--{task}", action=argparse.BooleanOptionalAction, default=None)
    arg("--signal", action=argparse.BooleanOptionalAction, default=None,
        help="visual signal per caption position (on with captions)")
    arg("--logits", action="store_true", help="largest attention logit on a caption batch (stability)")
    arg("--plot", default=None, help="save the per-position visual signal of every captioner as a PNG here")
    arg("--mdc_rules", default=",".join(MDC_RULES), help="mdc's scoring rules to run (pll costs a decoder pass per token)")
    arg("--K", type=int, default=8, help="mdc: Monte Carlo (t, mask) draws per caption score")
    arg("--n_eval", type=int, default=1000, help="images for zero-shot and compositionality")
    arg("--n_retrieval", type=int, default=100, help="image-caption pairs for retrieval")
    arg("--seed", type=int, default=0, help="probe data, hold-out split, random init, Monte Carlo draws")
    arg("--cache_dir", default=".cache/features")
    arg("--batch_size", type=int, default=256)
    arg("--device", default="auto")
    arg("--dtype", default=None, choices=mdc.DTYPES,
        help="of features and scoring (default: each checkpoint's own; auto: bf16 on CUDA)")
    arg("--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="imagefolder/imagenet: decoding workers (0 = none)")
    arg("--json", default=None, help="write the results and each checkpoint's config here")
    # no probing: read the result files of earlier calls, or write a checkpoint's encoder for timm
    arg("--plot_vs", default=None, help="plot --metrics of the --from_json runs against this field (tie, step, ...) into --plot")
    arg("--bands", action="store_true", help="--plot_vs: draw the 95%% intervals as shaded bands, not error bars")
    arg("--from_json", action="append", default=[],
        help="a results file of --json, or a quoted pattern ('results/default/*.json'); repeatable")
    arg("--metrics", default="ridge top1", help="--plot_vs, --summary: comma-separated metric names, e.g. 'ridge top1,zero-shot'")
    arg("--summary", default=None, help="n, mean, sd and 95%% interval of --metrics over the seeds of the --from_json runs, "
        "per group of these comma-separated flags (e.g. objective,t_min)")
    arg("--diff", action="append", default=[], help="--summary: FLAG:A,B, the paired-by-seed difference (FLAG=A) - (FLAG=B) "
        "instead; twice: the interaction")
    arg("--pool", default="", help="--summary: flags over which a seed's runs may be averaged (else differing runs are an error)")
    arg("--seed_of", default="seed", choices=["seed", "init_seed", "data_seed", "noise_seed"],
        help="--summary: the flag that numbers the replicates (-1 reads as --seed)")
    arg("--bench", action="store_true", help="time the L-BFGS sweep on 50,000 x 384 features, 100 classes")
    arg("--export_timm", default=None, metavar="PATH", help="write the --ckpt's encoder as a file for timm (README.md)")
    a = p.parse_args(argv)
    a.classes = int(a.classes) if a.classes.isdigit() else a.classes
    if bad := [r for r in a.mdc_rules.split(",") if r not in MDC_RULES]:
        p.error(f"--mdc_rules: unknown rule(s) {bad}; choose from {','.join(MDC_RULES)}")
    for name, ok in (("K", a.K >= 1), ("n_eval", a.n_eval >= 1), ("n_retrieval", a.n_retrieval >= 2),
                     ("batch_size", a.batch_size >= 1), ("num_workers", a.num_workers >= 0), ("per_class", a.per_class >= 0),
                     ("pixel_size", a.pixel_size >= 1), ("img_size", a.img_size >= 0), ("patch_size", a.patch_size >= 0),
                     ("caption_tie", a.caption_tie is None or 0 <= a.caption_tie <= 1)):
        if not ok:
            p.error(f"--{name}={getattr(a, name)} is out of range")
    if missing := [c for c in a.ckpt if c != "pixels" and not re.fullmatch(r"random(:\d+)?", c) and not os.path.isfile(ckpt_spec(c)[0])]:
        p.error(f"--ckpt={missing[0]}: no such file (a checkpoint path, ema:PATH, or random / random:SEED / pixels)")
    # --from_json takes files or quoted patterns ('results/default/*.json'), expanded here in sorted order
    a.from_json = [f for pat in a.from_json for f in (sorted(glob.glob(pat)) if glob.has_magic(pat) else [pat])
                   or p.error(f"--from_json={pat}: no file matches")]
    a.diff = [(f, *ab.split(",", 1)) for f, _, ab in (d.partition(":") for d in a.diff)]
    a.pool = [f for f in a.pool.split(",") if f]
    if a.json and os.path.exists(a.json):
        p.error(f"--json={a.json} exists: a result file is never overwritten; give the rerun its own name")
    if any(len(d) != 3 for d in a.diff):
        p.error("--diff expects FLAG:A,B, e.g. --diff=objective:mdc,ar")
    if a.export_timm:
        if len(a.ckpt) != 1 or a.ckpt[0] == "pixels" or a.ckpt[0].startswith("random"):
            p.error("--export_timm=PATH needs exactly one --ckpt=CHECKPOINT (a file written by mdc.py)")
        if os.path.isdir(a.export_timm) or not os.path.isdir(os.path.dirname(os.path.abspath(a.export_timm))):
            p.error(f"--export_timm={a.export_timm}: not a file path in an existing folder")
        return a
    if a.summary is not None or a.plot_vs:   # --summary wins where both are given
        if a.summary is None and not (a.from_json and a.plot):
            p.error("--plot_vs needs --from_json=FILE (one or more) and --plot=FILE.png")
        if not a.from_json:
            p.error("--summary needs --from_json=FILE (one or more)")
        if missing := [f for f in a.from_json if not os.path.isfile(f)]:
            p.error(f"--from_json={missing[0]}: no such file")
        return a
    if not a.bench and not a.ckpt:
        p.error("give at least one --ckpt=PATH (or --ckpt=random / --ckpt=pixels)")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device={a.device}: no CUDA device is available here")
    data.check_probe(a.dataset, a.data_root)
    return a


def tasks(args, encs):
    """Which evaluations run beyond the linear probe: {zeroshot, compositional, retrieval, signal} -> bool
    (a flag of the call, else on with captions; all off where no encoder here scores captions)."""
    with_captions = args.dataset.startswith("shapes") or args.captions is not None
    on = {"zeroshot": True, "compositional": with_captions, "retrieval": with_captions, "signal": with_captions}
    scorers = any(e["kind"] == "ckpt" and RULES[e["cfg"].objective] for e in encs)
    return {k: scorers and (default if getattr(args, k) is None else getattr(args, k)) for k, default in on.items()}


def caption_metrics(e, args, do, te, caption_sets, device):
    """The evaluations that score captions (zero-shot, compositionality, retrieval, the largest attention
    logit, the visual signal) of one checkpoint e: {metric: value}. caption_sets caches the caption data."""
    model, tok, cfg, m = e["model"], e["tok"], e["cfg"], {}
    rules = [r for r in args.mdc_rules.split(",") if r] if RULES[cfg.objective] == MDC_RULES else None
    kw = dict(K=args.K, seed=args.seed, batch_size=args.batch_size, rules=rules)
    if do["zeroshot"] and (zs := zeroshot(model, cfg, tok, te, args.dataset, args.n_eval, **kw)):
        m["zero-shot"] = zs
    if not (do["compositional"] or do["retrieval"] or do["signal"] or args.logits):
        return m
    captions = args.captions or "shapes"
    tie = cfg.tie if args.caption_tie is None else args.caption_tie   # shapes: the model's own world by default
    key = (captions, cfg.img_size, tie, cfg.order, cfg.alias)
    if key not in caption_sets:
        caption_sets[key] = data.build_caption_data(captions, img_size=cfg.img_size, seed=args.seed,
                                                    tie=tie, order=cfg.order, alias=cfg.alias)[1]
    val, m["caption tie"] = caption_sets[key], tie
    if do["compositional"]:
        synthetic = captions == "shapes"
        imgs, caps = multi_object(val, args.n_eval) if synthetic else val.batch(np.arange(args.n_eval), 0)
        m.update(compositional(model, cfg, tok, imgs, caps, synthetic, **kw))
    if do["retrieval"]:
        m.update(retrieval(model, cfg, tok, *val.batch(np.arange(args.n_retrieval), 0), **kw))
    if args.logits:
        imgs, caps = val.batch(np.arange(min(args.n_eval, 256)), 0)
        m.update(attention_logit_max(model, cfg, data.to_input(imgs, cfg.img_size).to(device), tok.batch(caps, cfg.max_len).to(device)))
    if do["signal"] and cfg.objective in mdc.CAPTIONERS:
        m.update(caption_signal(model, cfg, tok, val, args.n_eval, args.K, args.seed, args.batch_size))
    return m


def evaluate(args, argv, device):
    """Every --ckpt of the call through the linear probe and, where it scores captions, the caption
    evaluations -> the results dict that --json writes (with how and where it was made)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    t_start = time.perf_counter()
    encs = load_encoders(args.ckpt, args.model, args.img_size, args.seed, device, args.patch_size)
    for e in encs:  # --dtype: every encoder in this precision; by default each checkpoint's own (--dtype of mdc.py)
        e["cfg"] = replace(e["cfg"], dtype=args.dtype or e["cfg"].dtype)
    do = tasks(args, encs)
    command = "python " + " ".join([os.path.basename(sys.argv[0] or "probe.py")] + list(argv))
    datasets, caption_sets, results = {}, {}, {"command": command, "machine": machine(), "device": str(device),
                                               "threads": torch.get_num_threads(), "commit": mdc.code_version(),
                                               "args": vars(args), "tasks": do, "encoders": []}
    for e in encs:
        t0, cfg = time.perf_counter(), e["cfg"]
        log = lambda s: print(f"{e['name']}: {s}")
        xtr, ytr, _ = probe_features(e, "train", args, device, datasets)
        xte, yte, te = probe_features(e, "test", args, device, datasets)
        m = linear_probe(xtr, ytr, xte, yte, int(max(ytr.max(), yte.max())) + 1, args.fitter, device, log, args.sklearn_solver)
        if e["kind"] == "ckpt" and not RULES[cfg.objective]:
            log(f"{cfg.objective} has no text side: linear probe only (no zero-shot, compositionality, retrieval, signal)")
        elif e["kind"] == "ckpt":
            m.update(caption_metrics(e, args, do, te(), caption_sets, device))
        log(f"done in {time.perf_counter() - t0:.0f} s")
        results["encoders"].append(dict(name=e["name"], kind=e["kind"], objective=cfg.objective if e["kind"] == "ckpt" else None,
                                        step=e.get("step"), init_seed=e.get("init_seed"), config=asdict(cfg), metrics=m,
                                        **({"weights": e["weights"], "training": e["made"]} if e["kind"] == "ckpt" else {})))
    results["probe_seconds"] = time.perf_counter() - t_start
    return results


def report(results, args):
    """The table of one call, what its columns mean, and the --plot and --json files."""
    do, captions = results["tasks"], args.captions or "shapes"
    parts = [f"zero-shot on {args.n_eval} images"] if do["zeroshot"] else []
    parts += [f"compositionality on {args.n_eval} {captions} val captions"] if do["compositional"] else []
    parts += [f"retrieval on {args.n_retrieval} {captions} val pairs"] if do["retrieval"] else []
    print(f"\n{results['command']}\nmachine: {results['machine']}, device {results['device']}\nprobe {args.dataset}: "
          f"ridge / logreg = linear probe (top-1 %), L2 chosen on a 10% hold-out of train"
          + "".join(f"; {p}" for p in parts) + f"; mdc scored by minus its training loss over K={args.K} draws\n")
    print(format_table(results))
    if args.fitter == "sklearn":
        for e in results["encoders"]:
            m = e["metrics"]
            print(f"{e['name']}: L-BFGS probe {m['logreg seconds']:.1f} s (lam {m['logreg lambda']:.0e}, unconverged "
                  f"{m['logreg unconverged'] or 'none'}) | scikit-learn {m['sklearn solver']} {m['sklearn seconds']:.1f} s (lam "
                  f"{m['sklearn lambda']:.0e}, unconverged {m['sklearn unconverged'] or 'none'}); at the L-BFGS probe's lam "
                  f"{100 * m['sklearn top1 at logreg lambda']:.1f}% in {m['sklearn seconds at logreg lambda']:.1f} s "
                  f"({'converged' if m['sklearn converged at logreg lambda'] else 'NOT converged'}) | {torch.get_num_threads()} threads")
    if do["signal"]:
        print("signal early / middle / late: mean CE(mismatched image) - CE(true image) in nats over the "
              "first, middle and last third of each caption, and at the shape / colour / size words; mdc at its "
              "training t ~ U(t_min, 1)")
    if args.plot:
        plot_signal(results, args.plot)
        print(f"wrote {args.plot}")
    if args.json:
        save_json(args.json, results)
        print(f"\nwrote {args.json}")


def main(argv):
    args = parse(argv)
    device = mdc.pick_device(args.device)
    if args.bench:
        return bench(device=device)
    if args.export_timm:
        return export_timm(args.ckpt[0], args.export_timm)
    if args.summary is not None:   # the summaries of earlier calls' result files: the last section
        results = [load_json(f) for f in args.from_json]
        tables = [summary_table(results, [f for f in args.summary.split(",") if f], m, args.diff, args.pool, args.seed_of)
                  for m in args.metrics.split(",")]
        print("\n\n".join(tables))
        return tables
    if args.plot_vs:
        plot_vs([load_json(f) for f in args.from_json], args.plot_vs, args.metrics.split(","), args.plot, args.bands)
        return print(f"wrote {args.plot}")
    results = evaluate(args, argv, device)
    report(results, args)
    return results


# =============================================================================
# Summaries of many runs: the statistics, sweeps and figures behind RESULTS.md, read from the
# result files of earlier calls (--summary, --plot_vs). One seed is a smoke test: n, mean,
# standard deviation and the 95% interval (Student t) per group of runs, and the paired
# difference of two arms that share their seeds, whose interval says whether they differ.
# =============================================================================


T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df):
    """The 97.5% quantile of Student's t with df degrees of freedom: a two-sided 95% interval is
    mean +- t975(n - 1) * sd / sqrt(n). A table up to 30; above, z + (z^3 + z) / (4 df) (Cornish-Fisher)."""
    z = 1.959964
    return float("nan") if df < 1 else T975[df - 1] if df <= len(T975) else z + (z ** 3 + z) / (4 * df)


def t_pvalue(t, df):
    """Two-sided p-value of Student's t statistic with df degrees of freedom: 1 - 2 * the integral of
    the t density from 0 to |t| (Simpson's rule on 2,000 intervals: no scipy needed)."""
    if df < 1 or t != t:
        return float("nan")
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    x = np.linspace(0, abs(t), 2001)
    f = c * (1 + x ** 2 / df) ** (-(df + 1) / 2)
    area = (x[1] - x[0]) / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    return float(min(1.0, max(0.0, 1 - 2 * area)))


def mean_ci(values):
    """(n, mean, standard deviation, half-width of the 95% interval); sd and interval nan for n < 2."""
    v = np.asarray(values, dtype=float)
    n = len(v)
    if n < 2:
        return n, float(v.mean()) if n else float("nan"), float("nan"), float("nan")
    sd = float(v.std(ddof=1))
    return n, float(v.mean()), sd, t975(n - 1) * sd / math.sqrt(n)


def metric_value(m, metric, objective=None):
    """One metric of a metrics dict: accuracies in %, nats as they are; a per-rule metric (zero-shot,
    swaps) at the objective's first rule (without an objective, the first that ran). None if absent."""
    v = m.get(metric)
    if isinstance(v, dict):
        v = v.get(RULES.get(objective, ("",))[0] if objective else "", next(iter(v.values()), None))
    return None if v is None else v if metric in RAW else 100 * v


def run_flags(e, defaults, args=None):
    """The flags of one checkpoint's result: its config (a flag added to Config after the run takes its
    default), its step (--keep_ckpts), the weights probed (final, or ema) and the probe call's dataset and
    caption tie (`args`: a split probe or a signal on untied captions is a group of its own)."""
    args = args or {}
    tie = args.get("caption_tie")
    return {**defaults, **e["config"], "step": e.get("step"), "weights": e.get("weights", "final"),
            "probe_data": args.get("dataset", "shapes"), "probe_tie": "-" if tie is None else tie}


def run_rows(results, metric, seed_of="seed"):
    """[(flags, seed, value, wall)] of one metric over the encoders of many results dicts: a checkpoint's flags
    are run_flags (a new flag's default is the behaviour the code had before it), a floor's {"objective":
    "random" or "pixels"} with its init seed. seed_of: the config field that numbers the replicates (-1 reads
    as --seed). wall: training seconds plus a share of the probe's, where recorded (else None)."""
    rows, defaults = [], asdict(mdc.Config())
    for r in results:
        n_ckpt = sum(e["kind"] == "ckpt" for e in r["encoders"]) or 1
        for e in r["encoders"]:
            if e["kind"] == "ckpt":
                flags = run_flags(e, defaults, r.get("args"))
                seed = flags[seed_of] if flags[seed_of] >= 0 else flags["seed"]
                train_s, probe_s = (e.get("training") or {}).get("train_seconds"), r.get("probe_seconds")
                wall = None if train_s is None or probe_s is None else train_s + probe_s / n_ckpt
            else:
                flags, seed, wall = {"objective": e["kind"]}, e.get("init_seed", 0), None
            if (v := metric_value(e["metrics"], metric, e.get("objective"))) is not None:
                rows.append((flags, seed, v, wall))
    return rows


def same(value, text):
    """A config value against a command-line string: 0.5 == '0.5', 'mdc' == 'mdc', True == 'true'."""
    if isinstance(value, bool):
        return text.lower() in (("true", "1") if value else ("false", "0"))
    if isinstance(value, (int, float)):
        try:
            return float(text) == value
        except ValueError:
            return False
    return str(value) == text


def mixed_flags(flag_sets, named):
    """{flag: [values]} of the flags in which runs of one cell (one group, one seed) differ, leaving out the
    flags named in the grouping and those that do not change the weights (mdc.BOOKKEEPING)."""
    keys = set().union(*flag_sets) - set(named) - set(mdc.BOOKKEEPING)
    vals = {k: sorted({json.dumps(f.get(k)) for f in flag_sets}) for k in keys}
    return {k: [json.loads(v) for v in vs] for k, vs in vals.items() if len(vs) > 1}


def summarize(results, by, metric, diffs=(), pool=(), seed_of="seed", report=None):
    """Per group of the `by` flags: (n, mean, sd, 95% half-width) of metric over its seeds. With diffs
    [(flag, a, b), ...]: the paired contrast instead, per group of the uncontrasted `by` flags and per
    seed that has every cell: A - B for one diff, (A1 - B1) - (A2 - B2) (the interaction) for two.
    Runs of one seed in one cell that differ in a flag neither `by`, `diffs` nor `pool` names are an
    error that lists the flags; over the flags in `pool` they are averaged (report["pooled"]: over which
    values). report["reruns"] counts cells that averaged runs of identical flags, report["walls"][group]
    holds the recorded seconds of its runs. Returns {group tuple: (stats, {seed: value})}."""
    report = {} if report is None else report
    # seed_of numbers the replicates; under a stream's seed, runs of one replicate must share --seed too
    named = set(by) | {d[0] for d in diffs} | set(pool) | {seed_of}
    cells = {}   # group -> seed -> cell (signs of the diffs; () without) -> [(flags, value, wall)]
    for flags, seed, v, wall in run_rows(results, metric, seed_of):
        signs = tuple(1 if f in flags and same(flags[f], a) else -1 if f in flags and same(flags[f], b) else 0
                      for f, a, b in diffs)
        if 0 not in signs:
            group = tuple(flags.get(f, "-") for f in by if f not in [d[0] for d in diffs])
            cells.setdefault(group, {}).setdefault(seed, {}).setdefault(signs, []).append((flags, v, wall))
    report.setdefault("pooled", {}), report.setdefault("walls", {})
    report["reruns"] = 0
    for k, per_seed in cells.items():
        for seed, per_cell in per_seed.items():
            for runs in per_cell.values():
                flag_sets = [f for f, _, _ in runs]
                if bad := mixed_flags(flag_sets, named):
                    raise data.UsageError(
                        f"--summary: runs of seed {seed} in group {k} differ in {', '.join(f'{f} {v}' for f, v in sorted(bad.items()))}: "
                        f"name the flags (--summary=...,{','.join(sorted(bad))}) to keep them apart, narrow --from_json, "
                        f"or --pool={','.join(sorted(bad))} to average them")
                for f, vals in mixed_flags(flag_sets, named - set(pool)).items():
                    report["pooled"].setdefault(f, set()).update(json.dumps(x) for x in vals)
                ckpts = [f for f in flag_sets if f.get("objective") not in ("random", "pixels")]
                report["reruns"] += len(ckpts) > 1 and not mixed_flags(ckpts, {seed_of})
    cell_mean = lambda runs: float(np.mean([v for _, v, _ in runs]))   # a seed's runs in one cell are averaged first
    out = {}
    for k, per_seed in cells.items():
        # the seeds with every cell; a contrast is the sum of the cells' means times the product of their signs
        full = {s: sum(float(np.prod(cell)) * cell_mean(runs) for cell, runs in c.items()) if diffs else cell_mean(c[()])
                for s, c in per_seed.items() if len(c) == 2 ** len(diffs)}
        if full:
            out[k] = (mean_ci(list(full.values())), full)
            report["walls"][k] = [w for s in full for runs in per_seed[s].values() for _, _, w in runs]
    return out


def seeds_needed(sd, half_width):
    """Seeds per arm for a 95% interval of +- half_width at standard deviation sd: the smallest n >= 2
    with t975(n - 1) sd / sqrt(n) <= half_width (Student t; the sd taken as known)."""
    if sd != sd:
        return None
    n = 2
    while t975(n - 1) * sd / math.sqrt(n) > half_width:
        n += 1
    return n


def summary_table(results, by, metric, diffs=(), pool=(), seed_of="seed"):
    """summarize() as a markdown table: group, n, mean, sd, the 95% interval, and each seed's value. For a
    paired difference also the seeds per arm a 95% interval of +-3 and +-5 points needs at its sd, and what
    they cost in two-core minutes from the runs' recorded seconds (two runs at a time)."""
    report = {}
    res = summarize(results, by, metric, diffs, pool, seed_of, report)
    cols = [f for f in by if f not in [d[0] for d in diffs]]
    title = (f"{metric}, paired by seed: " + " x ".join(f"({f}={a}) - ({f}={b})" for f, a, b in diffs)) if diffs else metric
    lines = [f"{title} (mean, sd and 95% interval over seeds, Student t)" + (f"; seeds numbered by {seed_of}" if seed_of != "seed" else "")]
    if report["pooled"]:
        lines.append("averaged within each seed over: " + "; ".join(f"{f} ({', '.join(sorted(v))})" for f, v in sorted(report["pooled"].items())))
    if report["reruns"]:
        lines.append(f"{report['reruns']} cell(s) average reruns of the same flags and seed")
    settle = diffs and metric not in RAW     # seeds and minutes to settle, in points
    lines += ["", "| " + " | ".join(cols + ["n", "mean", "sd", "95% interval"] + (["interval excludes 0", "p (paired t)"] if diffs else [])
                                    + (["seeds for ±3 / ±5", "2-core min for ±3 / ±5"] if settle else []) + ["per seed"]) + " |",
              "|" + "---|" * (len(cols) + 5 + 2 * bool(diffs) + 2 * bool(settle))]
    dp = 2 if metric in RAW else 1                            # decimals: nats, or points
    fmt = ("{:+.%df}" if diffs else "{:.%df}") % dp
    order = lambda k: tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in k)   # 640 before 1280
    for k, ((n, m, sd, h), per_seed) in sorted(res.items(), key=lambda kv: order(kv[0])):
        ci = "-" if h != h else f"{fmt.format(m)} ± {h:.{dp}f} [{fmt.format(m - h)}, {fmt.format(m + h)}]"
        p = t_pvalue(m / (sd / math.sqrt(n)) if sd > 0 else float("nan"), n - 1) if n > 1 else float("nan")
        verdict = ["-" if h != h else "yes" if abs(m) > h else "no: level", "-" if p != p else f"{p:.3f}"] if diffs else []
        need = [seeds_needed(sd, w) for w in (3, 5)] if settle else []
        # two-core minutes for x seeds of each of the 2^len(diffs) arms, two runs at a time, at the mean recorded
        # seconds of a run; None where a run's seconds are not recorded
        walls = report["walls"][k]
        mins = [None if x is None or not walls or None in walls else x * 2 ** len(diffs) * float(np.mean(walls)) / 2 / 60
                for x in need]
        extra = [" / ".join("-" if x is None else str(x) for x in need),
                 " / ".join("-" if x is None else f"{x:.0f}" for x in mins)] if settle else []
        seeds = ", ".join(f"{s}: {fmt.format(v)}" for s, v in sorted(per_seed.items()))
        lines.append("| " + " | ".join([str(x) for x in k] + [str(n), fmt.format(m), "-" if sd != sd else f"{sd:.{dp}f}", ci]
                                       + verdict + extra + [seeds]) + " |")
    return "\n".join(lines)


def sweep_points(results, field, metric):
    """The points of one metric of many runs (results dicts of earlier calls) against one config field,
    e.g. tie, or the training step of the checkpoints (field "step", --keep_ckpts). Returns (the other
    flags in which the runs differ, the seed aside; {their values: {field value: [metric over seeds]}};
    {floor kind: metric, the mean over its init seeds}), accuracies in %, a per-rule metric at its first rule."""
    defaults = asdict(mdc.Config())
    ckpts = [(e, run_flags(e, defaults, r.get("args"))) for r in results for e in r["encoders"] if e["kind"] == "ckpt"]
    fixed = (field, "seed", "step") + mdc.BOOKKEEPING   # runs differ by what was trained, not by how it was logged
    varying = [k for k in (ckpts[0][1] if ckpts else ()) if k not in fixed and len({json.dumps(f.get(k)) for _, f in ckpts}) > 1]
    groups, floors = {}, {}
    for e, f in ckpts:
        if (v := metric_value(e["metrics"], metric)) is not None:
            groups.setdefault(tuple(f.get(k) for k in varying), {}).setdefault(f[field], []).append(v)
    for e in (e for r in results for e in r["encoders"] if e["kind"] in ("random", "pixels")):
        if (v := metric_value(e["metrics"], metric)) is not None:
            floors.setdefault(e["kind"], []).append(v)
    return varying, groups, {k: float(np.mean(v)) for k, v in floors.items()}


def plot_vs(results, field, metrics, path, bands=False):
    """One panel per metric against --field: a line per group of sweep_points (the mean over seeds,
    with its 95% interval as error bars, or a shaded band with bands, where there are 2 seeds or more,
    n beside each point), one colour per objective (the same in every panel and figure), the floors
    (averaged over their init seeds) as dashed lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), dpi=110, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        varying, groups, floors = sweep_points(results, field, metric)
        styles = {}                                                   # other flags than the objective: a line style each
        for key, pts in sorted(groups.items(), key=str):
            xs = sorted(pts)
            stats = [mean_ci(pts[x]) for x in xs]                     # (n, mean, sd, half-width) per point
            ys = np.array([m for _, m, _, _ in stats])
            err = np.array([0 if h != h else h for _, _, _, h in stats])
            obj = dict(zip(varying, key)).get("objective", results[0]["encoders"][0].get("objective"))
            colour = matplotlib.colormaps["tab10"](mdc.OBJECTIVES.index(obj) % 10) if obj in mdc.OBJECTIVES else "grey"
            rest = tuple(v for k, v in zip(varying, key) if k != "objective")
            ls = styles.setdefault(rest, ("-", "--", ":", "-.")[len(styles) % 4])
            label = ", ".join(f"{k}={v}" for k, v in zip(varying, key)) or obj
            if bands:
                ax.plot(xs, ys, marker="o", ms=4, ls=ls, color=colour, label=label)
                ax.fill_between(xs, ys - err, ys + err, color=colour, alpha=0.15, lw=0)
            else:
                ax.errorbar(xs, ys, yerr=err, marker="o", ms=4, capsize=3, ls=ls, color=colour, label=label)
            for x, y, (n, *_) in zip(xs, ys, stats):
                ax.annotate(f"n={n}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=6)
        for (kind, v), ls in zip(sorted(floors.items()), ("--", ":")):
            ax.axhline(v, color="k", ls=ls, lw=1, label=f"{kind} (floor)")
        ax.set(xlabel=f"--{field}", ylabel=metric + ("" if metric in RAW else " (%)"), title=metric)
        ax.legend(fontsize=7, title=", ".join(varying) or None, title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    data.command_line(main, sys.argv[1:], "probe.py")
