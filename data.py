"""
Data for MDC: the word-level tokenizer, the built-in synthetic captioned
dataset ("shapes", the default, no download), caption datasets on disk (COCO,
Flickr8k/30k, a CSV/TSV/JSONL, img2dataset webdataset shards), a uint8 cache of
them, and the labelled probe sets (synthetic, CIFAR-10/100, ImageFolder trees).

Everything here returns plain tensors: images as float (B, 3, H, W) in [0, 1],
captions as strings that the tokenizer turns into (B, L) int64 ids.

    python data.py prepare --data=flickr:data/flickr8k --size=64 --out=data/f8k64   # decode once
    python data.py bench   --data=flickr:data/flickr8k --size=64 --out=data/f8k64   # feed rates

Reading a prepared cache is an index into a memory map, no decoding: `python data.py bench` prints
the feed rates of both paths. augment() is written for the device the batch is on (the GPU).
"""
import argparse
import csv
import glob
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import time
from collections import Counter
from multiprocessing import Pool

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

# -----------------------------------------------------------------------------
# Mistakes at the command line: one line and exit status 2, never a traceback


class UsageError(Exception):
    """A mistake in a flag or in a path the user gave, not a bug. The command lines of mdc.py,
    probe.py and data.py print it as one line and exit with status 2; tracebacks are for bugs."""


def command_line(main, argv, prog):
    """Run main(argv) as a command: a UsageError becomes `prog: error: ...` on stderr and exit status 2."""
    try:
        return main(argv)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


# -----------------------------------------------------------------------------
# Tokenizer: word level, built from the training captions

SPECIALS = ["[PAD]", "[MASK]", "[BOS]", "[EOS]", "[UNK]"]
PAD, MASK, BOS, EOS, UNK = range(len(SPECIALS))


def split_words(text):
    """Lower-case and split punctuation off words: "A dog, running." -> a dog , running ."""
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]", text.lower())


class Tokenizer:
    """Word-level vocabulary. `itos` is a plain list of strings, so a checkpoint can
    store it without pickling an object (weights_only=True loading)."""

    def __init__(self, itos):
        assert list(itos[:len(SPECIALS)]) == SPECIALS, "vocabulary must start with the special tokens"
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, captions, min_count=1):
        counts = Counter(w for c in captions for w in split_words(c))
        # sorted by count then word, so the same captions always give the same ids
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(SPECIALS + words)

    def __len__(self):
        return len(self.itos)

    def encode(self, text, max_len):
        """Ids of the words then [EOS]; a caption longer than max_len is cut, keeping [EOS] last."""
        ids = [self.stoi.get(w, UNK) for w in split_words(text)][:max_len - 1]
        return ids + [EOS]

    def batch(self, texts, max_len):
        """(B, max_len) int64 ids, right-padded with [PAD] (truncation_report counts the cut ones)."""
        out = torch.full((len(texts), max_len), PAD, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = self.encode(t, max_len)
            out[i, :len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids):
        """Words up to the first [EOS]; [PAD], [BOS] and [MASK] are skipped ([MASK] shown as _)."""
        words = []
        for i in ids.tolist() if torch.is_tensor(ids) else ids:
            if i == EOS:
                break
            if i in (PAD, BOS):
                continue
            words.append("_" if i == MASK else self.itos[i])
        return " ".join(words)


# -----------------------------------------------------------------------------
# The synthetic "shapes" dataset: one or two coloured objects on a noisy background,
# captions from a small grammar that names each object's size, colour and shape and,
# for two, where one is relative to the other. Every image is a pure function of
# (seed, index), computed with a counter-based hash, so any batch of indices is
# generated in one vectorised pass, in any order.

SHAPES = ["circle", "square", "triangle", "diamond", "cross", "ring"]
COLORS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.1), "blue": (0.15, 0.3, 1.0),
          "yellow": (0.95, 0.9, 0.1), "purple": (0.65, 0.15, 0.9), "cyan": (0.1, 0.85, 0.9)}
COLOR_NAMES = list(COLORS)
SIZES = ["small", "large"]
TIE_SHAPE = list(range(len(COLORS)))  # --tie: the shape a colour implies: red circle, green square, blue triangle, ...
RELATIONS = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}  # and its inverse
# --alias=r: after its shape word, every caption names the shape again in r made-up words, a fixed
# one-to-one function of the shape ("a small red circle blick dax"). They add nothing about the image
# beyond the shape and the colour says nothing of them: a redundancy that lives in the text alone.
ALIASES = {"circle": ("blick", "dax", "wug"), "square": ("fep", "toma", "zup"), "triangle": ("kiki", "lorp", "vex"),
           "diamond": ("gorp", "mib", "yok"), "cross": ("nup", "sarn", "tiv"), "ring": ("hoon", "plab", "rux")}
MAX_ALIAS = 3
ALIAS_WORDS = {w for ws in ALIASES.values() for w in ws}
WORD_KINDS = {"size": SIZES, "colour": COLOR_NAMES, "shape": SHAPES,   # per-word-kind signal (probe.py)
              **{f"alias{j + 1}": [ALIASES[s][j] for s in SHAPES] for j in range(MAX_ALIAS)}}
WORD_KIND = {**{w: kind for kind, words in WORD_KINDS.items() for w in words},   # word -> its kind; the other
             **{w: "relation" for rel in RELATIONS for w in rel.split()}}       # words ("a", [EOS]) are their own
ORDERS = ("color_first", "shape_first")
MAX_OBJECTS = 2
P_SINGLE = 0.5            # the fraction of scenes with a single object (the others have two)
GRID = 2                  # objects sit in distinct cells of a GRID x GRID grid
RADIUS = (0.25, 0.40)     # object radius (small, large), a fraction of a cell
SPREAD = 1.0              # how far a pre-training object may move from its cell's centre: 1 = anywhere inside the cell
PROBE_SPREAD = 1.0        # the same for the probe's objects: anywhere in the cell, so no pixel template fits


def _hash_uniform(seed, idx, field):
    """Uniform floats in [0, 1) from (seed, index, field) by splitmix64: the same
    index always gets the same draw, whatever batch it is in."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps around on purpose
        x = (np.asarray(idx, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
             + np.asarray(seed * 1000003 + field, dtype=np.uint64) * np.uint64(0xBF58476D1CE4E5B9))
        x = x ^ (x >> np.uint64(30)); x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27)); x = x * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def scene_attributes(seed, idx, n_objects=None, tie=0.0, spread=None, p_single=P_SINGLE, scale=1.0):
    """Attributes of the scenes at indices idx (1-D array of ints): a dict of numpy arrays with
    K = MAX_OBJECTS object slots per scene: n (B,), shape, color, size, cell (B, K), jitter (B, K, 2),
    and spread (a number, default SPREAD): how far an object may sit from its cell's centre.
    tie: the probability that an object's shape is the one its colour implies (TIE_SHAPE), a
    text prior: whoever has read the colour word can guess the shape word without the image.
    p_single: the fraction of scenes with one object (n_objects, where given, fixes it instead); scale (a number):
    the objects' radius is RADIUS times it."""
    idx = np.asarray(idx, dtype=np.int64)
    B, K = len(idx), MAX_OBJECTS
    u = lambda f: _hash_uniform(seed, idx, f)
    n = np.where(u(0) < p_single, 1, K) if n_objects is None else np.full(B, n_objects)
    color = np.stack([(u(20 + k) * len(COLORS)).astype(int) for k in range(K)], 1)
    free = np.stack([(u(10 + k) * len(SHAPES)).astype(int) for k in range(K)], 1)
    tied = np.stack([u(60 + k) < tie for k in range(K)], 1)             # (B, K)
    shape = np.where(tied, np.array(TIE_SHAPE)[color], free)
    size = np.stack([(u(30 + k) * 2).astype(int) for k in range(K)], 1)
    # distinct cells of the grid: rank GRID*GRID hashed keys per scene, take the first K
    keys = np.stack([u(40 + c) for c in range(GRID * GRID)], 1)       # (B, GRID*GRID)
    cell = np.argsort(keys, axis=1)[:, :K]                             # (B, K)
    jitter = np.stack([np.stack([u(50 + 2 * k), u(51 + 2 * k)], 1) for k in range(K)], 1)  # (B, K, 2)
    return dict(n=n, shape=shape, color=color, size=size, cell=cell, jitter=jitter,
                spread=SPREAD if spread is None else spread, scale=scale,
                u_text=np.stack([u(100 + j) for j in range(4)], 1))  # (B, 4) draws for the grammar


def render(attrs, img_size=32, seed=0, idx=None):
    """Draw the scenes: float tensor (B, 3, img_size, img_size) in [0, 1]."""
    B, K = attrs["shape"].shape
    S = img_size
    cell_px = S / GRID
    radius = np.where(attrs["size"] == 1, RADIUS[1], RADIUS[0]) * cell_px * attrs["scale"]      # (B, K)
    # object centres in pixels: the cell centre, moved by up to spread x the room the object has in its cell
    room = attrs["spread"] * np.maximum(cell_px / 2 - 1.05 * radius, 0)                         # (B, K)
    cy = (attrs["cell"] // GRID + 0.5) * cell_px + room * (2 * attrs["jitter"][..., 0] - 1)
    cx = (attrs["cell"] % GRID + 0.5) * cell_px + room * (2 * attrs["jitter"][..., 1] - 1)
    yy, xx = np.meshgrid(np.arange(S) + 0.5, np.arange(S) + 0.5, indexing="ij")      # (S, S)
    dy = (yy[None, None] - cy[..., None, None]) / radius[..., None, None]             # (B, K, S, S)
    dx = (xx[None, None] - cx[..., None, None]) / radius[..., None, None]
    ay, ax = np.abs(dy), np.abs(dx)
    r = np.sqrt(dy ** 2 + dx ** 2)
    masks = np.stack([
        r <= 1.0,                                           # circle
        np.maximum(ay, ax) <= 0.8,                          # square
        (dy <= 0.75) & (ax <= (dy + 0.9) * 0.62),           # triangle, pointing up
        (ay + ax) <= 1.05,                                  # diamond
        (np.minimum(ay, ax) <= 0.3) & (np.maximum(ay, ax) <= 1.0),  # cross
        (r <= 1.0) & (r >= 0.55),                           # ring
    ], 0)                                                   # (n_shapes, B, K, S, S)
    obj = np.take_along_axis(masks, attrs["shape"][None, :, :, None, None], 0)[0]   # (B, K, S, S)
    obj &= (np.arange(K)[None, :] < attrs["n"][:, None])[..., None, None]            # drop unused slots
    # noisy background: per-scene grey level plus per-pixel noise, both from the hash
    ids = np.arange(B) if idx is None else np.asarray(idx)
    base = 0.15 + 0.25 * _hash_uniform(seed, ids, 200)[:, None, None, None]           # (B, 1, 1, 1)
    pix = np.arange(3 * S * S, dtype=np.int64)
    noise = _hash_uniform(seed + 7919, (ids[:, None] * (3 * S * S) + pix[None]), 201)  # (B, 3*S*S)
    img = base + 0.18 * (noise.reshape(B, 3, S, S) - 0.5)
    palette = np.array(list(COLORS.values()))                                          # (n_colors, 3)
    for k in range(K):  # the second object is drawn on top where the two overlap
        rgb = palette[attrs["color"][:, k]][:, :, None, None]                          # (B, 3, 1, 1)
        shade = 0.85 + 0.15 * noise.reshape(B, 3, S, S)                                # a little texture
        img = np.where(obj[:, k, None], rgb * shade, img)
    return torch.from_numpy(np.clip(img, 0, 1).astype(np.float32))


def describe(attrs, i, order="color_first", alias=0):
    """The caption of scene i: each object's size, colour and shape ("a small red circle", or with
    order="shape_first" "a small circle in red"), and for two objects where the first is relative to
    the second, in one of two equivalent word orders ("A left of B" or "B right of A"). alias=r puts
    the shape's first r ALIASES right after the shape word ("a small red circle blick dax")."""
    u = attrs["u_text"][i]

    def noun(k):
        size, colour, shape = SIZES[attrs["size"][i, k]], COLOR_NAMES[attrs["color"][i, k]], SHAPES[attrs["shape"][i, k]]
        shape = " ".join((shape, *ALIASES[shape][:alias]))
        return f"a {size} {colour} {shape}" if order == "color_first" else f"a {size} {shape} in {colour}"

    if attrs["n"][i] == 1:
        return noun(0)
    (ra, ca), (rb, cb) = divmod(int(attrs["cell"][i, 0]), GRID), divmod(int(attrs["cell"][i, 1]), GRID)
    if abs(ra - rb) >= abs(ca - cb):  # distinct cells; on a diagonal the rows decide
        rel = "above" if ra < rb else "below"
    else:
        rel = "left of" if ca < cb else "right of"
    if u[0] < 0.5:
        return f"{noun(0)} {rel} {noun(1)}"
    return f"{noun(1)} {RELATIONS[rel]} {noun(0)}"


def longest_caption(order="color_first", alias=0):
    """Words in the longest shapes caption: two noun phrases, each with its aliases, and "left of"."""
    return 2 * (4 + (order == "shape_first") + alias) + 2


class Shapes:
    """The built-in synthetic captioned dataset. Unlimited: index i is scene i.
    `batch(idx)` returns (images (B, 3, S, S) float in [0, 1], captions list of str).
    tie, order and alias: the text prior, the word order and the shape's aliases (scene_attributes, describe);
    p_single: the fraction of single-object scenes (the others have two); obj_scale: the objects' radius is RADIUS
    times it (the probe's scenes, shapes_probe, keep RADIUS)."""
    name = "shapes"

    def __init__(self, seed=0, img_size=32, split="train", tie=0.0, order="color_first", alias=0, p_single=P_SINGLE, obj_scale=1.0):
        # train and val draw from disjoint index ranges of the same generator: val starts at index 2^40,
        # which training (a step's batch of scenes at a time) never reaches
        self.seed, self.img_size, self.tie, self.order, self.alias = seed, img_size, tie, order, alias
        self.p_single, self.obj_scale = p_single, obj_scale
        self.offset = 0 if split == "train" else len(self)

    def __len__(self):
        return 1 << 40  # effectively unlimited

    def attributes(self, idx):
        return scene_attributes(self.seed, np.asarray(idx, dtype=np.int64) + self.offset, tie=self.tie, p_single=self.p_single,
                                scale=self.obj_scale)

    def batch(self, idx, epoch=0):  # epoch: unused, every index is a new scene
        attrs = self.attributes(idx)
        imgs = render(attrs, self.img_size, self.seed, np.asarray(idx, dtype=np.int64) + self.offset)
        return imgs, [describe(attrs, i, self.order, self.alias) for i in range(len(idx))]

    def vocab_captions(self, n=2000):
        """Enough captions to cover every word of the grammar, for Tokenizer.build."""
        attrs = scene_attributes(self.seed, np.arange(n), tie=self.tie, p_single=self.p_single)
        return [describe(attrs, i, self.order, self.alias) for i in range(n)]

    def report(self):
        return (f"shapes: synthetic (tie {self.tie}, {self.order}, alias {self.alias}, single-object scenes {self.p_single}, "
                f"object scale {self.obj_scale}), generated on the fly, nothing skipped")


PROBE_TASKS = {  # name -> (number of classes, label of a single-object scene)
    "shape": (len(SHAPES), lambda a: a["shape"][:, 0]),
    "color": (len(COLORS), lambda a: a["color"][:, 0]),
    "shape_color": (len(SHAPES) * len(COLORS), lambda a: a["shape"][:, 0] * len(COLORS) + a["color"][:, 0]),
}
PROBE_WORLD = 12345  # added to the seed of the probe scenes: another world than pre-training, no probe image was seen in training
PROBE_TEST_OFFSET = 1 << 41  # the probe's test scenes are indices from here on, far from the training scenes' 0, 1, ...


def implied_shape(a):
    """(B,) bool: the single object's shape is the one its colour implies (TIE_SHAPE)."""
    return a["shape"][:, 0] == np.array(TIE_SHAPE)[a["color"][:, 0]]


PROBE_SUBSETS = {  # shapes:TASK/SUBSET: test scenes whose shape is, or is not, the one their colour implies (--tie)
    "implied": implied_shape,
    "not_implied": lambda a: ~implied_shape(a),
}


def shapes_task(arg, spec):
    """'TASK' or 'TASK/SUBSET' of a shapes:... probe spec -> (task, subset or None), or a UsageError."""
    task, _, subset = (arg or "shape").partition("/")
    if task not in PROBE_TASKS:
        raise UsageError(f"unknown synthetic probe task {task!r} in {spec!r}; expected one of {list(PROBE_TASKS)}")
    if subset and subset not in PROBE_SUBSETS:
        raise UsageError(f"unknown test subset {subset!r} in {spec!r}; expected one of {list(PROBE_SUBSETS)}")
    return task, subset or None


def probe_scenes(split, n, seed=0, subset=None):
    """(indices, attributes) of n single-object scenes of the shapes probe's split (train or test). With
    a subset (a key of PROBE_SUBSETS; test only) the first n test scenes in it: a model trained with --tie
    is then probed where the colour's shortcut holds and where it fails, the classifier fitted as before."""
    m = n if subset is None else 8 * n + 64   # 1 scene in 6 has the implied shape: 8n + 64 hold n of them
    idx = np.arange(m, dtype=np.int64) + (0 if split == "train" else PROBE_TEST_OFFSET)
    attrs = scene_attributes(seed + PROBE_WORLD, idx, n_objects=1, spread=PROBE_SPREAD)
    if subset is not None:
        keep = np.flatnonzero(PROBE_SUBSETS[subset](attrs))[:n]
        assert len(keep) == n, f"{len(keep)} {subset} scenes among {m}"
        idx, attrs = idx[keep], {k: v[keep] if isinstance(v, np.ndarray) else v for k, v in attrs.items()}
    return idx, attrs


def shapes_probe(task="shape", n_train=5000, n_test=2000, img_size=32, seed=0, subset=None):
    """A labelled probe set from the same generator: single-object scenes, label from PROBE_TASKS.
    The shape is drawn independently of the colour (no tie), so a probe of shape measures what the
    encoder knows about shape, not about colour; subset narrows the test scenes (probe_scenes).
    Returns (x_train, y_train, x_test, y_test, n_classes)."""
    n_classes, label = PROBE_TASKS[task]
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        idx, attrs = probe_scenes(split, n, seed, subset if split == "test" else None)
        out += [render(attrs, img_size, seed + PROBE_WORLD, idx), torch.from_numpy(label(attrs).astype(np.int64))]
    return (*out, n_classes)


# -----------------------------------------------------------------------------
# Decoding images, and counting what is skipped

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


def eval_resize(size):
    """The short side an image is resized to before its centre crop of `size`: at 224 px and above the
    standard evaluation transform (short side to 256, centre crop 224: torchvision's ImageNet
    evaluation, timm's crop_pct 0.875), below it the whole short side (size itself)."""
    return round(size * 256 / 224) if size >= 224 else size


def load_image(src, size, resize=None):
    """Decode one image to uint8 (size, size, 3): short side resized to `resize` (default `size`), then a
    centre crop of size x size (keeps the aspect ratio; a square image at resize = size is just resized).
    `src` is a file path or (tar path, byte offset, byte count). Returns None when the image cannot be decoded."""
    try:
        if isinstance(src, (tuple, list)):  # a webdataset member, read by offset: no tarfile needed
            path, offset, nbytes = src
            with open(path, "rb") as f:
                f.seek(offset)
                src = io.BytesIO(f.read(nbytes))
        with Image.open(src) as im:
            r = resize or size
            im.draft("RGB", (r, r))  # JPEG: decode at 1/2, 1/4 or 1/8 scale, far faster for big photos
            im = im.convert("RGB")
            if r == size:
                return np.asarray(ImageOps.fit(im, (size, size), Image.BICUBIC), dtype=np.uint8)
            w, h = im.size
            s = min(w, h)
            im = im.resize((r if w == s else int(r * w / s), r if h == s else int(r * h / s)), Image.BICUBIC)  # (W, H)
            left, top = round((im.width - size) / 2), round((im.height - size) / 2)   # as torchvision's Resize, CenterCrop
            return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None  # corrupt, truncated or unreadable: the caller counts it and moves on


class SkipLog:
    """Pairs dropped while loading one source, by reason, shared by its train and val splits.
    Counts are (image, caption) pairs: a missing image with 5 captions counts 5."""

    def __init__(self, name, total):
        self.name, self.total, self.counts = name, total, Counter()

    def add(self, reason, n=1):
        self.counts[reason] += n

    def __str__(self):
        n = sum(self.counts.values())
        if n == 0:
            return f"{self.name}: {self.total:,} pairs, none skipped"
        why = ", ".join(f"{k} {r}{'s' if k != 1 else ''}" for r, k in sorted(self.counts.items(), key=lambda x: -x[1]))
        return f"{self.name}: skipped {n:,} of {self.total:,} pairs: {why}"


def truncation_report(captions, max_len):
    """One line for the training log: how many captions do not fit in max_len tokens (the
    tokenizer cuts them, keeping [EOS] last)."""
    n = sum(len(split_words(c)) > max_len - 1 for c in captions)
    return (f"{n:,} of {len(captions):,} captions ({100 * n / max(len(captions), 1):.2f}%) are longer than "
            f"max_len={max_len} and get truncated, keeping [EOS]")


# -----------------------------------------------------------------------------
# Caption datasets on disk. Every source becomes the same thing: a list of images
# (file paths or tar offsets) and a list of captions per image, so all of them are
# map-style: any batch of indices can be read in any order, which keeps --resume exact.

class ImageCaptions:
    """Images with one or more captions each. One sample per image per epoch, its caption
    a pure function of (seed, epoch, image); all_captions=True makes every pair a sample."""

    def __init__(self, name, srcs, captions, log, img_size=32, seed=0, all_captions=False):
        self.name, self.srcs, self.captions, self.log = name, srcs, captions, log
        self.img_size, self.seed, self.all_captions = img_size, seed, all_captions
        self.n_caps = np.array([len(c) for c in captions], dtype=np.int64)
        self.pair_img = np.repeat(np.arange(len(captions)), self.n_caps)          # (P,) image of each pair
        first = np.cumsum(self.n_caps) - self.n_caps                               # (N,) first pair of each image
        self.pair_cap = np.arange(len(self.pair_img)) - np.repeat(first, self.n_caps)  # (P,) caption within its image
        self.bad = set()      # images that failed to decode, in this process: skipped from then on
        self.counted = set()  # those already counted in the log (workers find them, the main process counts)

    def __len__(self):
        return len(self.pair_img) if self.all_captions else len(self.captions)

    def vocab_captions(self):
        return [c for caps in self.captions for c in caps]

    def report(self):
        return str(self.log)

    def _pairs(self, idx, epoch):
        """Sample indices -> (image indices, caption indices)."""
        idx = np.asarray(idx, dtype=np.int64)
        if self.all_captions:
            return self.pair_img[idx], self.pair_cap[idx]
        u = _hash_uniform(self.seed, idx, 1000 + epoch)  # a new caption draw every epoch
        return idx, np.minimum((u * self.n_caps[idx]).astype(np.int64), self.n_caps[idx] - 1)

    def load_batch(self, idx, epoch):
        """-> (uint8 images (B, 3, S, S), captions, indices of images newly found corrupt).
        Runs inside DataLoader workers, so it never raises on a bad image: it takes the next
        image instead (a deterministic substitute), and the main process counts it."""
        imgs, caps, new_bad = [], [], []
        for i, c in zip(*self._pairs(idx, epoch)):
            for _ in range(len(self.srcs)):
                x = None if i in self.bad else load_image(self.srcs[i], self.img_size)
                if x is not None:
                    break
                if i not in self.bad:
                    self.bad.add(i)
                    new_bad.append(int(i))
                i = (i + 1) % len(self.srcs)
            else:
                raise RuntimeError(f"{self.name}: no image could be decoded")
            imgs.append(x)
            caps.append(self.captions[i][c % self.n_caps[i]])
        return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2), caps, new_bad  # (B, 3, S, S) uint8

    def note_bad(self, new_bad):
        """Count images that failed to decode (found in this process or in a worker), once each."""
        for i in new_bad:
            if i not in self.counted:
                self.bad.add(i), self.counted.add(i)
                self.log.add("corrupt image", int(self.n_caps[i]))
                print(f"data: could not decode {self.srcs[i]}, skipped; now {self.log}", file=sys.stderr)

    def batch(self, idx, epoch=0):
        """(images (B, 3, S, S) float32 in [0, 1], list of B captions)."""
        imgs, caps, new_bad = self.load_batch(idx, epoch)
        self.note_bad(new_bad)
        return to_float(imgs), caps


def to_float(imgs, device=None):
    """uint8 (B, 3, S, S) -> float32 in [0, 1], converted after the copy to the device (4x fewer bytes moved)."""
    imgs = imgs.to(device, non_blocking=True) if device is not None else imgs
    return imgs.float().div_(255) if imgs.dtype == torch.uint8 else imgs


def to_input(imgs, size):
    """uint8 or float (B, 3, S, S) -> float in [0, 1] at an encoder's input size (antialiased)."""
    imgs = to_float(imgs).float()
    if imgs.shape[-1] != size:
        imgs = F.interpolate(imgs, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return imgs


class _Files:
    """Does a file exist? One directory listing per folder instead of one stat per image."""

    def __init__(self):
        self.listed = {}

    def __call__(self, path):
        d, f = os.path.split(path)
        if d not in self.listed:
            self.listed[d] = set(os.listdir(d)) if os.path.isdir(d) else set()
        return f in self.listed[d]


def _group(rows, name, exists=None):
    """(image src, image key, caption) rows -> (srcs, keys, caption lists, SkipLog): captions grouped
    by image in first-seen order; rows with an empty caption or a missing image are skipped."""
    log = SkipLog(name, len(rows))
    where, srcs, keys, caps = {}, [], [], []
    for src, key, cap in rows:
        cap = (cap or "").strip()
        if not cap:
            log.add("empty caption")
        elif exists is not None and not exists(src):
            log.add("missing image")
        else:
            if key not in where:
                where[key] = len(srcs)
                srcs.append(src), keys.append(key), caps.append([])
            caps[where[key]].append(cap)
    return srcs, keys, caps, log


def _holdout(keys, val_frac):
    """A deterministic validation split by image: an image is in val when the hash of its key
    (its path, not its position) is below val_frac, so no image is in both splits and adding
    images to the source does not move the others. At least one val image when there are two."""
    u = np.array([int.from_bytes(hashlib.md5(k.encode()).digest()[:8], "little") / 2.0 ** 64 for k in keys])
    val = u < val_frac
    if len(keys) > 1 and val_frac > 0 and not val.any():
        val[np.argmin(u)] = True
    return val


def _split(srcs, keys, caps, log, val_frac, **kw):
    val = _holdout(keys, val_frac)
    pick = lambda m: ([s for s, v in zip(srcs, m) if v], [c for c, v in zip(caps, m) if v])
    return ImageCaptions(log.name + ":train", *pick(~val), log, **kw), ImageCaptions(log.name + ":val", *pick(val), log, **kw)


def _read_table(path, image_col, caption_col):
    """Rows of (image, caption) from a .csv / .tsv (header line) or .jsonl (one object per line)."""
    with open(path, newline="", encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            recs = [json.loads(line) for line in f if line.strip()]
        else:
            recs = list(csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ","))
    if recs and (image_col not in recs[0] or caption_col not in recs[0]):
        raise UsageError(f"{path}: expected columns {image_col!r} and {caption_col!r} "
                         f"(set them with --image_col / --caption_col), found {list(recs[0])}")
    return [(r[image_col], r[caption_col]) for r in recs]


def _need(path, what):
    if not os.path.exists(path):
        raise UsageError(f"{path} not found: expected {what}")


def load_flickr(root, val_frac=0.05, **kw):
    """Flickr8k / Flickr30k, Kaggle layout: ROOT/Images/*.jpg and ROOT/captions.txt (CSV with header
    image,caption). No official split in this layout, so val is held out by image."""
    what = "ROOT/captions.txt and ROOT/Images/ (Flickr8k/30k Kaggle layout)"
    _need(root, what); _need(os.path.join(root, "captions.txt"), what); _need(os.path.join(root, "Images"), what)
    table = _read_table(os.path.join(root, "captions.txt"), "image", "caption")
    rows = [(os.path.join(root, "Images", im), im, cap) for im, cap in table]
    return _split(*_group(rows, "flickr", _Files()), val_frac, **kw)


def load_csv(path, image_col="image", caption_col="caption", val_frac=0.05, **kw):
    """A .csv / .tsv / .jsonl of (image path, caption); paths relative to the file's folder."""
    _need(path, "a .csv, .tsv or .jsonl file of (image path, caption) rows")
    if not path.endswith((".csv", ".tsv", ".jsonl")):
        raise UsageError(f"{path}: expected a .csv, .tsv or .jsonl file")
    base = os.path.dirname(os.path.abspath(path))
    rows = [(os.path.join(base, im), im, cap) for im, cap in _read_table(path, image_col, caption_col)]
    return _split(*_group(rows, "csv", _Files()), val_frac, **kw)


def load_coco(root, val_frac=0.05, **kw):
    """COCO captions: ROOT/annotations/captions_{train,val}2017.json with ROOT/{train,val}2017/.
    The official val2017 is the val split (a hold-out from train if its files are absent)."""
    what = "ROOT/annotations/captions_train2017.json and ROOT/train2017/ (COCO 2017 layout)"
    _need(root, what); _need(os.path.join(root, "annotations", "captions_train2017.json"), what)
    _need(os.path.join(root, "train2017"), what)

    def read(split):
        with open(os.path.join(root, "annotations", f"captions_{split}2017.json")) as f:
            js = json.load(f)
        files = {im["id"]: im["file_name"] for im in js["images"]}
        rows = [(os.path.join(root, f"{split}2017", files.get(a["image_id"], f"<no image {a['image_id']}>")),
                 f"{split}/{a['image_id']}", a["caption"]) for a in js["annotations"]]
        return _group(rows, "coco", _Files())

    srcs, keys, caps, log = read("train")
    has_val = os.path.exists(os.path.join(root, "annotations", "captions_val2017.json")) and os.path.isdir(os.path.join(root, "val2017"))
    if not has_val:
        print(f"coco: no val2017 in {root}, holding out {val_frac:.0%} of train2017 images", file=sys.stderr)
        return _split(srcs, keys, caps, log, val_frac, **kw)
    vsrcs, _, vcaps, vlog = read("val")
    log.total += vlog.total
    log.counts.update(vlog.counts)
    return ImageCaptions("coco:train", srcs, caps, log, **kw), ImageCaptions("coco:val", vsrcs, vcaps, log, **kw)


def load_wds(spec, val_frac=0.05, **kw):
    """Webdataset shards as img2dataset writes them (CC3M, CC12M): *.tar holding KEY.jpg|png|webp
    and KEY.txt. Each tar is scanned once with tarfile to index (byte offset, size) per image,
    after which any image is read directly by offset: random access, so batches from any step
    on are reproducible and each DDP rank / DataLoader worker reads only the samples it uses."""
    shards = sorted(glob.glob(os.path.join(spec, "*.tar"))) if os.path.isdir(spec) else sorted(glob.glob(spec))
    if not shards:
        raise UsageError(f"no shards at {spec}: expected a folder of *.tar (or a glob like DIR/0*.tar) "
                                f"holding KEY.jpg + KEY.txt, as written by img2dataset")
    rows = []
    for shard in tqdm(shards, desc="indexing shards", disable=len(shards) < 10):
        samples = {}  # key -> {"img": (shard, offset, size), "txt": caption}
        with tarfile.open(shard) as tf:
            for m in tf:
                if not m.isfile():
                    continue
                d, base = os.path.split(m.name)
                key, ext = base.split(".", 1) if "." in base else (base, "")  # webdataset: key is up to the first dot
                s = samples.setdefault(os.path.join(d, key), {})
                if "." + ext.lower() in IMAGE_EXTS:
                    s["img"] = (shard, m.offset_data, m.size)
                elif ext == "txt":
                    s["txt"] = tf.extractfile(m).read().decode("utf-8", "replace")
        for key, s in samples.items():
            if "img" in s or "txt" in s:  # a lone KEY.json (no image, no caption) is not a pair
                rows.append((s.get("img"), f"{os.path.basename(shard)}/{key}", s.get("txt")))
    return _split(*_group(rows, "wds", lambda src: src is not None), val_frac, **kw)


# -----------------------------------------------------------------------------
# The fast path: decode and resize every image once into a uint8 memmap
# (`python data.py prepare`), then batches are an index into it, augmentation a
# few tensor ops on the device (airbench keeps its data as tensors the same way).

def prepare(spec, size, out, workers=None, **kw):
    """Decode every image of a caption source once at size x size into OUT/images.u8
    (uint8 memmap (N, S, S, 3), train images first), OUT/captions.json and OUT/manifest.json."""
    if spec.partition(":")[0] in ("shapes", "cache"):
        raise UsageError(f"prepare reads an image source (coco:, flickr:, csv:, wds:), not {spec}")
    train, val = build_caption_data(spec, img_size=size, **kw)
    os.makedirs(out, exist_ok=True)
    srcs = train.srcs + val.srcs
    # a plain raw file (the manifest holds its shape), so any tool can memory-map it
    images = np.memmap(os.path.join(out, "images.u8"), dtype=np.uint8, mode="w+", shape=(max(len(srcs), 1), size, size, 3))
    kept = {"train": [], "val": []}
    n = 0
    with Pool(workers or os.cpu_count()) as pool:
        decoded = pool.imap(_load_sized, [(s, size) for s in srcs], chunksize=64)
        for i, x in enumerate(tqdm(decoded, total=len(srcs), desc=f"prepare {size}px")):
            split, j = ("train", i) if i < len(train.srcs) else ("val", i - len(train.srcs))
            ds = train if split == "train" else val
            if x is None:
                train.log.add("corrupt image", len(ds.captions[j]))
                continue
            images[n] = x
            kept[split].append(ds.captions[j])
            n += 1
    images.flush()
    del images
    os.truncate(os.path.join(out, "images.u8"), n * size * size * 3)  # drop the rows of skipped images
    with open(os.path.join(out, "captions.json"), "w") as f:
        json.dump(kept, f)
    manifest = dict(source=spec, size=size, layout="uint8 (N, S, S, 3), train rows then val rows",
                    n_images=n, n_train=len(kept["train"]), n_val=len(kept["val"]),
                    pairs_total=train.log.total, pairs_kept=sum(len(c) for k in kept.values() for c in k),
                    skipped=dict(train.log.counts), report=str(train.log), options={k: v for k, v in kw.items()})
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"prepared {out}: {n:,} images at {size}px; {train.log}")
    return manifest


def _load_sized(args):  # top level, so a Pool can pickle it
    return load_image(*args)


class Cached(ImageCaptions):
    """A prepared cache: batch(idx) is one index into the memmap, no decoding."""

    def __init__(self, root, split, img_size=32, seed=0, all_captions=False):
        what = "images.u8, captions.json and manifest.json written by `python data.py prepare`"
        for f in ("manifest.json", "captions.json", "images.u8"):
            _need(os.path.join(root, f), what)
        with open(os.path.join(root, "manifest.json")) as f:
            self.manifest = m = json.load(f)
        with open(os.path.join(root, "captions.json")) as f:
            caps = json.load(f)[split]
        log = SkipLog(f"cache:{root} (from {m['source']})", m["pairs_total"])
        log.counts.update(m["skipped"])
        super().__init__(f"cache:{split}", None, caps, log, img_size, seed, all_captions)
        S, first = m["size"], 0 if split == "train" else m["n_train"]
        self.images = np.memmap(os.path.join(root, "images.u8"), dtype=np.uint8, mode="r",
                                shape=(m["n_images"], S, S, 3))[first:first + len(caps)]

    def load_batch(self, idx, epoch):
        img, cap = self._pairs(idx, epoch)
        x = torch.from_numpy(self.images[img]).permute(0, 3, 1, 2)  # (B, 3, S, S) uint8
        if x.shape[-1] != self.img_size:  # a 64 px cache can feed a 32 px run
            x = F.interpolate(x.float(), size=self.img_size, mode="bilinear", antialias=True, align_corners=False).clamp_(0, 255)
        return x, [self.captions[i][c] for i, c in zip(img, cap)], []


def augment(imgs, generator=None, mode="bilinear"):
    """Random resized crop (area 0.35-1 of the image, aspect 3/4-4/3) and horizontal flip, as
    one grid_sample on whatever device imgs are on. imgs: float (B, 3, H, W); same shape out.
    mode="nearest" is ~5x cheaper on a CPU; on a GPU either costs next to nothing."""
    B, _, H, W = imgs.shape
    gdev = generator.device if generator is not None else imgs.device         # draw where the generator lives
    r = torch.rand(B, 5, generator=generator, device=gdev).to(imgs.device)  # (B, 5) uniform draws
    area, log_aspect = 0.35 + 0.65 * r[:, 0], (2 * r[:, 1] - 1) * np.log(4 / 3)
    w = (area * log_aspect.exp()).sqrt().clamp(max=1)                        # crop width, fraction of the image
    h = (area / log_aspect.exp()).sqrt().clamp(max=1)
    cx, cy = (2 * r[:, 2] - 1) * (1 - w), (2 * r[:, 3] - 1) * (1 - h)        # crop centre, in [-1, 1] coordinates
    w = torch.where(r[:, 4] < 0.5, -w, w)                                    # a negative width flips left-right
    # where each output pixel samples the input: the crop is an axis-aligned box, so the grid is
    # separable, an x per column and a y per row (cheaper than F.affine_grid on a CPU)
    tx = (torch.arange(W, device=imgs.device) * 2 + 1) / W - 1               # (W,) pixel centres in [-1, 1]
    ty = (torch.arange(H, device=imgs.device) * 2 + 1) / H - 1
    gx, gy = cx[:, None] + w[:, None] * tx, cy[:, None] + h[:, None] * ty    # (B, W), (B, H)
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1)  # (B, H, W, 2)
    return F.grid_sample(imgs, grid, mode=mode, padding_mode="border", align_corners=False)


# -----------------------------------------------------------------------------
# Choosing a dataset by name, and the stream of training batches

CAPTION_KINDS = "shapes, coco:ROOT, flickr:ROOT, csv:FILE (.csv/.tsv/.jsonl), wds:DIR_OR_GLOB, cache:DIR"
CAPTION_KINDS_LIST = ("shapes", "coco", "flickr", "csv", "wds", "cache")


def build_caption_data(spec, img_size=32, seed=0, all_captions=False, image_col="image", caption_col="caption", val_frac=0.05,
                       tie=0.0, order="color_first", alias=0, p_single=P_SINGLE, obj_scale=1.0):
    """spec 'shapes' or 'KIND:PATH' -> (train, val) caption datasets.
    A caption dataset has __len__ (samples in an epoch), batch(idx, epoch) ->
    (images (B, 3, S, S) float32 in [0, 1], list of B caption strings),
    vocab_captions() -> the training captions to build the tokenizer from, and report()
    -> one line saying what was skipped (printed here, once)."""
    kind, _, path = spec.partition(":")
    if kind == "shapes":
        return tuple(Shapes(seed, img_size, split, tie, order, alias, p_single, obj_scale) for split in ("train", "val"))
    kw = dict(img_size=img_size, seed=seed, all_captions=all_captions)
    if kind in ("coco", "flickr", "csv", "wds") and not path:
        raise UsageError(f"--data={spec}: expected {kind}:PATH")
    if kind == "coco":
        train, val = load_coco(path, val_frac, **kw)
    elif kind == "flickr":
        train, val = load_flickr(path, val_frac, **kw)
    elif kind == "csv":
        train, val = load_csv(path, image_col, caption_col, val_frac, **kw)
    elif kind == "wds":
        train, val = load_wds(path, val_frac, **kw)
    elif kind == "cache":
        train, val = Cached(path, "train", **kw), Cached(path, "val", **kw)
    else:
        raise UsageError(f"unknown dataset kind {kind!r} in --data={spec}; expected one of: {CAPTION_KINDS}")
    if len(train) == 0:
        raise UsageError(f"--data={spec}: no usable training pairs ({train.report()})")
    print(f"data: {len(train.captions):,} train / {len(val.captions):,} val images; {train.report()}")
    return train, val


def batch_indices(step, batch_size, n, seed):
    """Indices of the global batch at `step`: a pure function of (seed, step), so a resumed run
    sees exactly the batches of an uninterrupted one. Finite datasets are walked epoch by
    epoch in a seeded permutation; returns (indices int64 array, epoch)."""
    if n >= 1 << 40:  # unlimited (synthetic) data: never repeat an index
        return np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64), 0
    start = step * batch_size
    out, epochs = [], []
    while len(out) < batch_size:
        epoch, pos = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).numpy()
        take = perm[pos:pos + batch_size - len(out)]
        out.extend(take.tolist())
        epochs.append(epoch)
    return np.asarray(out, dtype=np.int64), epochs[0]


class _BatchReader(torch.utils.data.Dataset):
    """Lets a DataLoader worker read one whole batch: the key is (indices, epoch)."""

    def __init__(self, ds):
        self.ds = ds

    def __getitem__(self, key):
        return self.ds.load_batch(*key)


def batches(ds, start_step, batch_size, seed, rank=0, world=1, num_workers=0, device=None):
    """Yields (images, captions) of this rank's share of each global batch, from start_step on.
    With num_workers > 0, JPEG sources are decoded by DataLoader workers (pinned memory on CUDA);
    the order is still a pure function of (seed, step): the workers only do the reading.
    device: where the images go (converted to float there)."""
    assert batch_size % world == 0, f"batch_size {batch_size} must divide by the number of processes {world}"
    per_rank = batch_size // world

    def plan():  # (this rank's indices, epoch) of every step from start_step on
        step = start_step
        while True:
            idx, epoch = batch_indices(step, batch_size, len(ds), seed)
            yield idx[rank * per_rank:(rank + 1) * per_rank], epoch
            step += 1

    if not hasattr(ds, "load_batch"):  # shapes: generated in-process, already float
        for idx, epoch in plan():
            imgs, caps = ds.batch(idx, epoch)
            yield to_float(imgs, device), caps
        return
    if num_workers == 0 or isinstance(ds, Cached):  # a memmap index needs no workers
        reader = (ds.load_batch(idx, epoch) for idx, epoch in plan())
    else:
        reader = torch.utils.data.DataLoader(_BatchReader(ds), batch_size=None, sampler=plan(), num_workers=num_workers,
                                             pin_memory=torch.cuda.is_available(), prefetch_factor=4)
    for imgs, caps, new_bad in reader:
        ds.note_bad(new_bad)  # corrupt images found in a worker are counted here, in the main process
        yield to_float(imgs, device), caps


# -----------------------------------------------------------------------------
# Probe datasets: CIFAR decoded once into one uint8 tensor; an ImageFolder split read lazily,
# batch by batch, so that a probe of ImageNet holds features, not images

class ImageLabels(torch.utils.data.Dataset):
    """(image float32 (3, S, S) in [0, 1], int label) from uint8 (N, 3, S, S) and int64 (N,) tensors."""

    def __init__(self, x, y, n_classes, name):
        self.x, self.y, self.n_classes, self.name = x, y, n_classes, name

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i].float() / 255, int(self.y[i])


class FolderImages(torch.utils.data.Dataset):
    """An ImageFolder split as a list of files and their labels; images are decoded only when read, by
    load_batch (probe_batches runs it in DataLoader workers). ImageNet-100's 126,000 training images
    would be 19 GB as uint8 at 224 px; their features are 126,000 x 384 floats, under 200 MB.
    Item i: (image float32 (3, S, S) in [0, 1], int label), at S >= 224 through the evaluation
    transform (eval_resize: short side to 256, centre crop 224), below it short side to S and a centre crop."""

    def __init__(self, files, labels, classes, img_size, name):
        self.files, self.labels, self.classes, self.img_size, self.name = files, torch.tensor(labels), classes, img_size, name
        self.n_classes = len(classes)

    def __len__(self):
        return len(self.files)

    def load_batch(self, idx):
        """(images uint8 (b, 3, S, S), labels int64 (b,), number skipped): the files at idx that decode."""
        xs = [load_image(self.files[i], self.img_size, eval_resize(self.img_size)) for i in idx]
        keep = [j for j, x in enumerate(xs) if x is not None]
        x = torch.from_numpy(np.stack([xs[j] for j in keep])) if keep else torch.zeros(0, self.img_size, self.img_size, 3, dtype=torch.uint8)
        return x.permute(0, 3, 1, 2), self.labels[np.asarray(idx)[keep]], len(xs) - len(keep)   # (b, 3, S, S)

    def __getitem__(self, i):
        x, y, bad = self.load_batch([i])
        if bad:
            raise UsageError(f"{self.files[i]}: cannot decode this image")
        return x[0].float() / 255, int(y[0])

    def subset(self, idx):
        """The same split restricted to the files at idx (in that order)."""
        return FolderImages([self.files[i] for i in idx], self.labels[idx].tolist(), self.classes, self.img_size, self.name)


def probe_batches(ds, batch_size=256, num_workers=0):
    """(images uint8 or float (b, 3, S, S), labels int64 (b,)) of a probe dataset, batch by batch, in order.
    A FolderImages split is decoded by `num_workers` DataLoader workers (in this process with 0), each batch
    dropped once used: the memory of a few batches, however many images; files that cannot be decoded
    are skipped with their labels and reported once at the end. CIFAR and shapes are in memory: sliced."""
    if not isinstance(ds, FolderImages):
        x, y = dataset_tensors(ds)
        for i in range(0, len(y), batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size].long()
        return
    plan = [(np.arange(i, min(i + batch_size, len(ds))),) for i in range(0, len(ds), batch_size)]
    reader = (ds.load_batch(*key) for key in plan) if num_workers == 0 else torch.utils.data.DataLoader(
        _BatchReader(ds), batch_size=None, sampler=plan, num_workers=num_workers, pin_memory=torch.cuda.is_available())
    bad = 0
    for x, y, n_bad in reader:
        bad += n_bad
        if len(y):
            yield x, y
    if bad:
        where = os.path.dirname(os.path.dirname(ds.files[0]))                  # ROOT/train or ROOT/val
        print(f"probe {where}: skipped {bad:,} of {len(ds):,} images: could not decode", file=sys.stderr)


def dataset_tensors(ds, idx=None):
    """(images, labels) of a probe dataset, or of its items at idx, without a per-item Python loop where
    possible: images uint8 or float (N, 3, S, S), labels int64 (N,). A FolderImages split is decoded
    into memory here: meant for a subset (zero-shot's images), not for a whole split."""
    if isinstance(ds, FolderImages):
        parts = list(probe_batches(ds if idx is None else ds.subset(idx)))
        S = ds.img_size
        return (torch.cat([x for x, _ in parts]) if parts else torch.zeros(0, 3, S, S, dtype=torch.uint8),
                torch.cat([y for _, y in parts]) if parts else torch.zeros(0, dtype=torch.long))
    if hasattr(ds, "x"):                                   # ImageLabels (uint8)
        x, y = ds.x, ds.y
    elif isinstance(ds, torch.utils.data.TensorDataset):   # the synthetic probe (float)
        x, y = ds.tensors
    else:
        xs, ys = zip(*[ds[i] for i in range(len(ds))])
        x, y = torch.stack(xs), torch.as_tensor(ys)
    return (x, y) if idx is None else (x[idx], y[idx])


def _resize_u8(x, img_size):  # uint8 (N, 3, S, S) -> uint8 (N, 3, img_size, img_size)
    if x.shape[-1] == img_size:
        return x
    out = [F.interpolate(c.float(), size=img_size, mode="bilinear", antialias=True, align_corners=False) for c in x.split(4096)]
    return torch.cat(out).round_().clamp_(0, 255).to(torch.uint8)


def _torchvision_cifar(kind, split, data_root):
    import torchvision
    cls, folder = {"cifar10": (torchvision.datasets.CIFAR10, "cifar-10-batches-py"),
                   "cifar100": (torchvision.datasets.CIFAR100, "cifar-100-python")}[kind]
    try:
        return cls(data_root, train=split == "train", download=True)
    except Exception as e:  # offline: urllib raises, deep inside torchvision
        why = (str(e).splitlines() or [""])[0]
        raise UsageError(f"could not download {kind} into {os.path.abspath(data_root)} ({type(e).__name__}: {why}); "
                         f"put the extracted {folder}/ folder there (or set --data_root)") from e


def _cifar(kind, split, img_size, data_root):
    ds = _torchvision_cifar(kind, split, data_root)
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2)  # (N, 3, 32, 32) uint8
    out = ImageLabels(_resize_u8(x, img_size), torch.tensor(ds.targets), len(ds.classes), kind)
    out.classes = list(ds.classes)  # class names, for zero-shot prompts
    return out


# ImageNet-100, --classes=imagenet100: the 100-class subset of CMC (Tian, Krishnan, Isola, Contrastive
# Multiview Coding, 2019; github.com/HobbitLong/CMC, imagenet100.txt, in that file's order), which most
# self-supervised papers since probe on
IMAGENET100 = """
n02869837 n01749939 n02488291 n02107142 n13037406 n02091831 n04517823 n04589890 n03062245 n01773797
n01735189 n07831146 n07753275 n03085013 n04485082 n02105505 n01983481 n02788148 n03530642 n04435653
n02086910 n02859443 n13040303 n03594734 n02085620 n02099849 n01558993 n04493381 n02109047 n04111531
n02877765 n04429376 n02009229 n01978455 n02106550 n01820546 n01692333 n07714571 n02974003 n02114855
n03785016 n03764736 n03775546 n02087046 n07836838 n04099969 n04592741 n03891251 n02701002 n03379051
n02259212 n07715103 n03947888 n04026417 n02326432 n03637318 n01980166 n02113799 n02086240 n03903868
n02483362 n04127249 n02089973 n03017168 n02093428 n02804414 n02396427 n04418357 n02172182 n01729322
n02113978 n03787032 n02089867 n02119022 n03777754 n04238763 n02231487 n03032252 n02138441 n02104029
n03837869 n03494278 n04136333 n03794056 n03492542 n02018207 n04067472 n03930630 n03584829 n02123045
n04229816 n02100583 n03642806 n04336792 n03259280 n02116738 n02108089 n03424325 n01855672 n02090622
""".split()
CLASS_LISTS = {"imagenet100": IMAGENET100}  # --classes=NAME


def class_subset(names, classes, seed=0, root=""):
    """The class folders a probe uses, sorted: all of `names` (classes 0 or ''), a seeded subset of that
    many (a number), a named list (CLASS_LISTS: 'imagenet100'), or those in a file of wnids, one a line."""
    if isinstance(classes, str) and classes.strip().isdigit():  # "100" from a command line is a count
        classes = int(classes)
    if isinstance(classes, str) and classes:
        if classes in CLASS_LISTS:
            wanted, where = CLASS_LISTS[classes], f"--classes={classes}"
        else:
            _need(classes, "--classes: a number of classes, a name (" + ", ".join(CLASS_LISTS)
                  + ") or a file of class folder names (wnids), one a line")
            with open(classes) as f:
                wanted, where = [w.strip() for w in f if w.strip()], classes
        if missing := sorted(set(wanted) - set(names)):
            raise UsageError(f"{where}: {len(missing)} classes not in {root}/train, e.g. {missing[:3]}")
        return sorted(set(wanted))
    if int(classes or 0) > 0 and int(classes) < len(names):  # a seeded subset of the sorted class names
        return sorted(np.random.default_rng(seed).choice(names, int(classes), replace=False).tolist())
    return names


def _imagefolder(root, split, img_size, seed, classes, per_class):
    what = "ROOT/train/<class>/*.jpg and ROOT/val/<class>/ (or ROOT/test/), an ImageFolder tree"
    _need(root, what)
    sub = "train" if split == "train" else next((s for s in ("val", "test") if os.path.isdir(os.path.join(root, s))), "val")
    _need(os.path.join(root, sub), what)
    # classes come from train/ in both splits, so the labels agree between them
    _need(os.path.join(root, "train"), what)
    names = sorted(d for d in os.listdir(os.path.join(root, "train")) if os.path.isdir(os.path.join(root, "train", d)))
    names = class_subset(names, classes, seed, root)
    files, labels = [], []
    for y, c in enumerate(names):
        d = os.path.join(root, sub, c)
        fs = sorted(f for f in os.listdir(d) if f.lower().endswith(IMAGE_EXTS)) if os.path.isdir(d) else []
        fs = fs[:per_class] if per_class else fs  # sorted names, the first per_class: the same cap every run
        files += [os.path.join(d, f) for f in fs]
        labels += [y] * len(fs)
    if not files:
        raise UsageError(f"no images under {root}/{sub}: expected {what}")
    return FolderImages(files, labels, names, img_size, f"imagefolder:{root}")


PROBE_KINDS = "shapes[:TASK[/SUBSET]], cifar10, cifar100, imagefolder:ROOT or imagenet:ROOT"


def check_probe(spec, data_root="data"):
    """Fail before any training if a probe dataset cannot be had: a known spec and task; CIFAR's
    folder present or downloadable; an ImageFolder tree's train/ and val/ (or test/) there."""
    kind, _, arg = spec.partition(":")
    if kind == "shapes":
        shapes_task(arg, spec)
    elif kind in ("cifar10", "cifar100"):
        _torchvision_cifar(kind, "test", data_root)
    elif kind in ("imagefolder", "imagenet"):
        what = "ROOT/train/<class>/*.jpg and ROOT/val/<class>/ (or ROOT/test/), an ImageFolder tree"
        _need(os.path.join(arg, "train"), what)
        if not any(os.path.isdir(os.path.join(arg, s)) for s in ("val", "test")):
            raise UsageError(f"{arg} has no val/ or test/ folder: expected {what}")
    else:
        raise UsageError(f"unknown probe dataset {spec!r}; expected {PROBE_KINDS}")


def probe_dataset(spec, split, img_size=32, data_root="data", seed=0, classes=0, per_class=0):
    """A labelled image dataset for linear probing: 'shapes' (task 'shape'), 'shapes:TASK'
    (a key of PROBE_TASKS), 'shapes:TASK/SUBSET' (its test scenes narrowed to a key of PROBE_SUBSETS),
    'cifar10', 'cifar100' (torchvision, downloaded into data_root),
    'imagefolder:ROOT' or 'imagenet:ROOT' (ROOT/train, ROOT/val or ROOT/test; classes: a number
    for a seeded subset, 'imagenet100', or a file of wnids; per_class: cap on images per class, 0 = all;
    read lazily, see FolderImages). Returns a torch Dataset of (image float32 (3, S, S) in [0, 1],
    int label) with attributes n_classes and name; probe_batches reads any of them batch by batch."""
    kind, _, arg = spec.partition(":")
    if kind == "shapes":
        task, subset = shapes_task(arg, spec)
        xtr, ytr, xte, yte, n_classes = shapes_probe(task, img_size=img_size, seed=seed, subset=subset)
        ds = torch.utils.data.TensorDataset(*((xtr, ytr) if split == "train" else (xte, yte)))
        ds.n_classes, ds.name = n_classes, f"shapes:{task}" + (f"/{subset}" if subset else "")
        return ds
    if kind in ("cifar10", "cifar100"):
        return _cifar(kind, split, img_size, data_root)
    if kind in ("imagefolder", "imagenet"):
        return _imagefolder(arg, split, img_size, seed, classes, per_class)
    raise UsageError(f"unknown probe dataset {spec!r}; expected {PROBE_KINDS}")


# -----------------------------------------------------------------------------
# Command line: `python data.py prepare ...` writes a cache, `python data.py bench ...`
# compares feeding speed of the JPEG path and the cached path.

def bench(spec, size, cache, batch_size=256, workers=2, n_batches=30, **kw):
    """Images per second: (a) PIL decode + resize in a DataLoader with `workers` workers, and
    (b) the cache: memmap index + to float (+ augment on the CPU), both at size px."""
    def rate(stream, n_warm=10):
        # throughput over n_batches in a row, not a median per batch: a DataLoader hands out
        # prefetched batches in bursts (if anything this flatters the JPEG path: its queue is full at the start)
        for _ in range(n_warm):
            next(stream)
        t = time.perf_counter()
        for _ in range(n_batches):
            next(stream)
        return n_batches * batch_size / (time.perf_counter() - t)

    train, _ = build_caption_data(spec, img_size=size, **kw)
    jpeg = rate(batches(train, 0, batch_size, 0, num_workers=workers))
    if not os.path.exists(os.path.join(cache, "manifest.json")):
        prepare(spec, size, cache, **kw)
    ctrain, _ = build_caption_data(f"cache:{cache}", img_size=size)
    raw = rate(batches(ctrain, 0, batch_size, 0))
    g = torch.Generator().manual_seed(0)
    aug = {m: rate((augment(x, g, m), c) for x, c in batches(ctrain, 0, batch_size, 0)) for m in ("bilinear", "nearest")}
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} torch threads; "
          f"{size}px, batch {batch_size}, {n_batches} batches in a row after 10 warm-up")
    print(f"(a) JPEG + PIL resize, DataLoader {workers} workers:  {jpeg:8,.0f} images/s")
    print(f"(b) cache: memmap index + to float:            {raw:8,.0f} images/s  {raw / jpeg:5.1f}x")
    for m, r in aug.items():
        print(f"(b) cache + augment ({m + ') on the CPU:':<21}  {r:8,.0f} images/s  {r / jpeg:5.1f}x")

class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is a UsageError: one line, exit status 2 (argparse prints its usage too)."""

    def error(self, message):
        raise UsageError(f"{message} (--help lists the flags)")


def main(argv):
    p = ArgumentParser(prog="data.py", description="prepare a uint8 image cache, or benchmark data loading")
    p.add_argument("command", choices=["prepare", "bench"])
    p.add_argument("--data", required=True, help=CAPTION_KINDS)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--out", required=True, help="prepare: the cache folder to write; bench: where the cache is (made if absent)")
    p.add_argument("--image_col", default="image")
    p.add_argument("--caption_col", default="caption")
    p.add_argument("--val_frac", type=float, default=0.05)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--threads", type=int, default=0, help="bench: torch threads in the main process (0: torch's default)")
    a = p.parse_args(argv)
    for name, ok in (("--size", a.size >= 1), ("--val_frac", 0 <= a.val_frac < 1),
                     ("--workers", a.workers is None or a.workers >= 1), ("--threads", a.threads >= 0)):
        if not ok:
            p.error(f"{name}={getattr(a, name[2:])} is out of range")
    if a.threads:
        torch.set_num_threads(a.threads)
    kw = dict(image_col=a.image_col, caption_col=a.caption_col, val_frac=a.val_frac)
    if a.command == "prepare":
        prepare(a.data, a.size, a.out, workers=a.workers, **kw)
    else:
        bench(a.data, a.size, a.out, workers=a.workers or 2, **kw)


if __name__ == "__main__":
    command_line(main, sys.argv[1:], "data.py")
