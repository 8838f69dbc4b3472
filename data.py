"""
Data for MDC: the word-level tokenizer, the built-in synthetic captioned
dataset ("shapes", the default, no download), and its labelled probe tasks.

Everything here returns plain tensors: images as float (B, 3, H, W) in [0, 1],
captions as strings that the tokenizer turns into (B, L) int64 ids.
"""
import re
from collections import Counter

import numpy as np
import torch

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
        """(B, max_len) int64, right-padded with [PAD]; also returns how many were truncated."""
        out = torch.full((len(texts), max_len), PAD, dtype=torch.long)
        truncated = 0
        for i, t in enumerate(texts):
            ids = self.encode(t, max_len)
            truncated += len(split_words(t)) > max_len - 1
            out[i, :len(ids)] = torch.tensor(ids)
        return out, truncated

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
# The synthetic "shapes" dataset: 1-3 coloured objects on a noisy background,
# captions from a small grammar that names every object and a spatial relation.
# Every image is a pure function of (seed, index), computed with a counter-based
# hash, so any batch of indices is generated in one vectorised pass, in any order.

SHAPES = ["circle", "square", "triangle", "diamond", "cross", "ring"]
COLORS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.1), "blue": (0.15, 0.3, 1.0),
          "yellow": (0.95, 0.9, 0.1), "purple": (0.65, 0.15, 0.9), "cyan": (0.1, 0.85, 0.9),
          "orange": (1.0, 0.55, 0.0)}
COLOR_NAMES = list(COLORS)
SIZES = ["small", "large"]
SYNONYMS = {  # the grammar picks one at random, so a caption is not a fixed string per image
    "small": ["small", "little", "tiny"], "large": ["large", "big", "huge"],
    "circle": ["circle", "disc"], "square": ["square", "box"], "triangle": ["triangle"],
    "diamond": ["diamond", "rhombus"], "cross": ["cross", "plus"], "ring": ["ring", "hoop"],
    "above": ["above", "over"], "below": ["below", "under", "beneath"],
    "left of": ["left of", "to the left of"], "right of": ["right of", "to the right of"],
}
INVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
MAX_OBJECTS = 3


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


def scene_attributes(seed, idx, n_objects=None):
    """Attributes of the scenes at indices idx (1-D array of ints).
    Returns a dict of numpy arrays, K = MAX_OBJECTS object slots per scene:
    n (B,), shape (B, K), color (B, K), size (B, K), cell (B, K) in 0..8 (a 3x3 grid), jitter (B, K, 2)."""
    idx = np.asarray(idx, dtype=np.int64)
    B, K = len(idx), MAX_OBJECTS
    u = lambda f: _hash_uniform(seed, idx, f)
    n = (1 + (u(0) * K).astype(int)) if n_objects is None else np.full(B, n_objects)
    shape = np.stack([(u(10 + k) * len(SHAPES)).astype(int) for k in range(K)], 1)
    color = np.stack([(u(20 + k) * len(COLORS)).astype(int) for k in range(K)], 1)
    size = np.stack([(u(30 + k) * 2).astype(int) for k in range(K)], 1)
    # distinct cells of a 3x3 grid: rank 9 hashed keys per scene, take the first K
    keys = np.stack([u(40 + c) for c in range(9)], 1)                 # (B, 9)
    cell = np.argsort(keys, axis=1)[:, :K]                             # (B, K)
    jitter = np.stack([np.stack([u(50 + 2 * k), u(51 + 2 * k)], 1) for k in range(K)], 1)  # (B, K, 2)
    return dict(n=n, shape=shape, color=color, size=size, cell=cell, jitter=jitter,
                u_text=np.stack([u(100 + j) for j in range(16)], 1))  # (B, 16) draws for the grammar


def render(attrs, img_size=32, seed=0, idx=None):
    """Draw the scenes: float tensor (B, 3, img_size, img_size) in [0, 1]."""
    B, K = attrs["shape"].shape
    S = img_size
    cell_px = S / 3.0
    # object centres in pixels: the cell centre plus up to +-15% of a cell of jitter
    cy = (attrs["cell"] // 3 + 0.5 + 0.3 * (attrs["jitter"][..., 0] - 0.5)) * cell_px  # (B, K)
    cx = (attrs["cell"] % 3 + 0.5 + 0.3 * (attrs["jitter"][..., 1] - 0.5)) * cell_px
    radius = np.where(attrs["size"] == 1, 0.42, 0.26) * cell_px                        # (B, K)
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
    for k in range(K):  # later objects are drawn on top; cells are distinct so overlap is rare
        rgb = palette[attrs["color"][:, k]][:, :, None, None]                          # (B, 3, 1, 1)
        shade = 0.85 + 0.15 * noise.reshape(B, 3, S, S)                                # a little texture
        img = np.where(obj[:, k, None], rgb * shade, img)
    return torch.from_numpy(np.clip(img, 0, 1).astype(np.float32))


def _pick(words, u):
    return words[min(int(u * len(words)), len(words) - 1)]


def describe(attrs, i):
    """The caption of scene i: every object with size, colour and shape, and spatial relations."""
    u = attrs["u_text"][i]
    n = attrs["n"][i]

    def noun(k, uu):
        size = _pick(SYNONYMS[SIZES[attrs["size"][i, k]]], uu)
        shape = _pick(SYNONYMS[SHAPES[attrs["shape"][i, k]]], 1 - uu)
        return f"a {size} {COLOR_NAMES[attrs['color'][i, k]]} {shape}"

    def relation(a, b):  # where a is relative to b, from the grid cells (never the same cell)
        ra, ca = divmod(int(attrs["cell"][i, a]), 3)
        rb, cb = divmod(int(attrs["cell"][i, b]), 3)
        if abs(ra - rb) >= abs(ca - cb):
            return "above" if ra < rb else "below"
        return "left of" if ca < cb else "right of"

    if n == 1:
        r, c = divmod(int(attrs["cell"][i, 0]), 3)
        where = {0: "at the top", 1: "in the middle", 2: "at the bottom"}[r]
        side = {0: " on the left", 1: "", 2: " on the right"}[c]
        return _pick([f"{noun(0, u[0])} {where}{side}", f"there is {noun(0, u[0])} {where}{side}"], u[1])

    def clause(a, b, ua, ub, uw):
        rel = relation(a, b)
        if uw < 0.5:   # same meaning, two word orders: "A above B" or "B below A"
            return f"{noun(a, ua)} {_pick(SYNONYMS[rel], ub)} {noun(b, ub)}"
        return f"{noun(b, ub)} {_pick(SYNONYMS[INVERSE[rel]], ua)} {noun(a, ua)}"

    first = clause(0, 1, u[0], u[1], u[2])
    if n == 2:
        return _pick([first, f"there is {first}", f"{first} in the picture"], u[3])
    second = clause(2, _pick([0, 1], u[4]), u[5], u[6], u[7])
    return _pick([f"{first} and {second}", f"{first} , {second}", f"{second} and {first}"], u[8])


class Shapes:
    """The built-in synthetic captioned dataset. Unlimited: index i is scene i.
    `batch(idx)` returns (images (B, 3, S, S) float in [0, 1], captions list of str)."""
    name = "shapes"

    def __init__(self, seed=0, img_size=32, split="train"):
        # train and val draw from disjoint index ranges of the same generator
        self.seed, self.img_size = seed, img_size
        self.offset = 0 if split == "train" else 1 << 40

    def __len__(self):
        return 1 << 40  # effectively unlimited

    def batch(self, idx, epoch=0):  # epoch: unused, every index is a new scene
        idx = np.asarray(idx, dtype=np.int64) + self.offset
        attrs = scene_attributes(self.seed, idx)
        imgs = render(attrs, self.img_size, self.seed, idx)
        return imgs, [describe(attrs, i) for i in range(len(idx))]

    def vocabulary_captions(self, n=20000):
        """Enough captions to cover every word of the grammar, for Tokenizer.build."""
        attrs = scene_attributes(self.seed, np.arange(n))
        return [describe(attrs, i) for i in range(n)]


PROBE_TASKS = {  # name -> (number of classes, label of a single-object scene)
    "shape": (len(SHAPES), lambda a: a["shape"][:, 0]),
    "shape_color": (len(SHAPES) * len(COLORS), lambda a: a["shape"][:, 0] * len(COLORS) + a["color"][:, 0]),
}


def shapes_probe(task="shape", n_train=5000, n_test=2000, img_size=32, seed=0):
    """A labelled probe set from the same generator: single-object scenes, label from PROBE_TASKS.
    Seeded apart from pre-training data (different seed) so no probe image was seen in training.
    Returns (x_train, y_train, x_test, y_test, n_classes)."""
    n_classes, label = PROBE_TASKS[task]
    out = []
    for off, n in ((0, n_train), (1 << 41, n_test)):
        idx = np.arange(n, dtype=np.int64) + off
        attrs = scene_attributes(seed + 12345, idx, n_objects=1)
        out += [render(attrs, img_size, seed + 12345, idx), torch.from_numpy(label(attrs).astype(np.int64))]
    return (*out, n_classes)


# -----------------------------------------------------------------------------
# Choosing a dataset by name, and the stream of training batches

def build_caption_data(spec, img_size=32, seed=0, all_captions=False):
    """spec 'shapes' or 'KIND:PATH' -> (train, val) caption datasets.
    A caption dataset has __len__ (samples in an epoch), batch(idx, epoch) ->
    (images (B, 3, S, S) float32 in [0, 1], list of B caption strings), and
    vocab_captions() -> the training captions to build the tokenizer from."""
    kind, _, path = spec.partition(":")
    if kind == "shapes":
        return Shapes(seed, img_size, "train"), Shapes(seed, img_size, "val")
    raise ValueError(f"unknown dataset kind {kind!r} in --data={spec}; expected one of: shapes")


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


def batches(ds, start_step, batch_size, seed, rank=0, world=1):
    """Yields (images, captions) of this rank's share of each global batch, from start_step on."""
    assert batch_size % world == 0, f"batch_size {batch_size} must divide by the number of processes {world}"
    per_rank = batch_size // world
    step = start_step
    while True:
        idx, epoch = batch_indices(step, batch_size, len(ds), seed)
        yield ds.batch(idx[rank * per_rank:(rank + 1) * per_rank], epoch)
        step += 1


def probe_dataset(spec, split, img_size=32, data_root="data", seed=0, classes=0, per_class=0):
    """A labelled image dataset for linear probing: spec 'shapes' (task 'shape'),
    'shapes:TASK' (a key of PROBE_TASKS). Returns a torch Dataset of (image float32
    (3, S, S) in [0, 1], int label) with attributes n_classes and name."""
    kind, _, arg = spec.partition(":")
    if kind == "shapes":
        task = arg or "shape"
        if task not in PROBE_TASKS:
            raise ValueError(f"unknown synthetic probe task {task!r}; expected one of {list(PROBE_TASKS)}")
        xtr, ytr, xte, yte, n_classes = shapes_probe(task, img_size=img_size, seed=seed)
        ds = torch.utils.data.TensorDataset(*((xtr, ytr) if split == "train" else (xte, yte)))
        ds.n_classes, ds.name = n_classes, f"shapes:{task}"
        return ds
    raise ValueError(f"unknown probe dataset {spec!r}; expected shapes[:TASK]")
