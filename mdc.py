"""
Masked diffusion captioning (MDC) for visual feature learning, in one file.

A ViT encodes the image; a text decoder that cross-attends to the image tokens recovers a caption
whose tokens were replaced by [MASK] with probability t, t ~ U(t_min, 1), and the cross-entropy at
the masked tokens is weighted by 1/t (Feng, Wei, Owens 2025, following MDLM and LLaDA). After
training the decoder is dropped and the encoder is judged by a linear probe (probe.py).

In that order below: Config, the building blocks, Model, the noise, `feed` (what a caption decoder is shown
and asked, for every objective and caller), `mdc_loss`, sampling and scoring; the baselines on the same encoder
and decoder (`ar`, `cappa`; `clip`, `siglip`, whose decoder becomes a text encoder); fenced off, the
masked-image relatives (`mae`, `umd`, `milan`, `rils`: the encoder sees some of the patches, a light decoder
fills in the rest); the training loop, checkpoints, DDP, the benchmark, the end-of-run probe, the command line.

    python mdc.py                       # MDC on the built-in synthetic data, CPU, minutes
    python mdc.py --objective=ar        # the same with autoregressive captioning
    torchrun --nproc_per_node=2 mdc.py  # DDP (nccl on CUDA, gloo on CPU)
"""
import difflib
import inspect
import math
import os
import platform
import re
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from tqdm import tqdm

import data
from data import BOS, MASK, PAD

UsageError = data.UsageError  # a mistake at the command line: one line, exit status 2 (data.command_line)


# -----------------------------------------------------------------------------
# Config: every field is a command-line flag, --key=value

@dataclass
class Config:
    # what to train
    objective: str = "mdc"      # mdc | ar | cappa | clip | siglip | mae | umd | milan | rils
    model: str = "tiny"         # size preset (PRESETS below); explicit flags override it
    data: str = "shapes"        # shapes | coco:ROOT | flickr:ROOT | csv:FILE | wds:DIR | cache:DIR
    image_col: str = "image"    # --data=csv:FILE: the image path column
    caption_col: str = "caption"  # --data=csv:FILE: the caption column
    all_captions: bool = False  # iterate every (image, caption) pair instead of one caption per image per epoch
    val_frac: float = 0.05      # images held out for validation where the data has no split of its own
    augment: bool = False       # random resized crop + flip on the device (real data)
    num_workers: int = 0        # DataLoader workers for image decoding (real data)
    # encoder (ViT) and decoder sizes
    img_size: int = 32          # input images are img_size x img_size pixels
    patch_size: int = 8         # ViT patches of patch_size x patch_size pixels
    width: int = 128            # encoder and decoder width (CapPa uses one width for both)
    enc_depth: int = 4          # ViT blocks
    dec_depth: int = 2          # text transformer blocks (decoder, or CLIP text encoder)
    heads: int = 4              # attention heads (encoder and decoder)
    mlp_ratio: float = 4.0      # MLP hidden width / width
    max_len: int = 16           # caption tokens including [EOS]
    vocab_min_count: int = 1    # words seen fewer times become [UNK]
    # objective knobs
    t_min: float = 0.5          # mdc: mask ratio t ~ U(t_min, 1); the 1/t weight is at most 1/t_min (at the earlier default, 640 steps in 4 px patches, 0.001 probes 22.6 points lower on 3 seeds, slower learning, not after Holm; 0.75, 1 level: RESULTS.md §2.4)
    mdc_weight: str = "elbo"    # mdc: elbo = 1/t-weighted masked CE over real tokens; none = mean masked CE
    antithetic: bool = True     # mdc: stratified t across the batch, (u0 + i/B) mod 1 (MDLM-style), lowers loss variance
    # Off by default, a deviation: [PAD] is never masked nor a key, so mdc and cappa's parallel branch know the length.
    # big_vision's cappa.py masks and attends over all (its loss skips pads); LLaDA masks and predicts pads. With it
    # on, mdc's shape probe stayed at the random-init floor on 3 seeds (RESULTS.md §5.2); cappa level.
    hide_length: bool = False   # mdc, cappa: mask and attend over every position to max_len, [PAD] too (mdc predicts it)
    tie: float = 0.0            # shapes: probability that an object's shape is the one its colour implies (a text prior)
    order: str = "color_first"  # shapes: color_first ("a small red circle") | shape_first ("a small circle in red")
    alias: int = 0              # shapes: r made-up words after each shape word, a fixed function of it (redundancy in the text alone)
    p_single: float = 0.5       # shapes: the fraction of training scenes with one object (the others have two; the probe's have one)
    obj_scale: float = 1.0      # shapes: the training objects' radius x this (the probe's objects keep theirs)
    alias_loss: bool = True     # ar with --alias: False leaves the alias words out of the loss (a control for their dilution)
    cappa_frac: float = 0.75    # cappa: fraction of examples with all tokens masked (parallel prediction)
    freeze_encoder: bool = False  # train the text side only, on the ViT at its random init (a text-prior floor)
    qk_norm: bool = False       # LayerNorm on queries and keys: bounds attention logits (stability)
    z_loss: float = 0.0         # weight of log(Z)^2 on the decoder's logits (stability, PaLM)
    # masked-image objectives (mae, umd, milan, rils)
    mask_ratio: float = 0.75    # fraction of patches hidden from the encoder (MAE, MILAN, RILS; umd's clean half)
    umd_mask_noised: float = 0.375  # umd: fraction hidden in the noised half (UMD, configs/ae_i1k.py)
    mim_width: int = 128        # width of the light patch decoder; heads of 32 channels, as MAE's (512 wide, 16 heads)
    mim_depth: int = 2          # its blocks (MAE: 8, UMD: 4 at ViT-B); rils always uses one, as RILS
    teacher: str = ""           # milan: a clip or siglip checkpoint of this project, same data, img_size and patch_size
    # optimisation
    batch_size: int = 128       # global batch, split across DDP processes
    steps: int = 1920           # optimisation steps (the cosine schedule ends here; RESULTS.md §2.9 for 1,920)
    lr: float = 3e-3            # peak learning rate (AdamW)
    warmup: float = 0.05        # fraction of steps with linear warm-up, then the schedule
    schedule: str = "cosine"    # cosine: decay to 0 after the warm-up | wsd: constant, then linear to 0 over --cooldown
    cooldown: float = 0.2       # wsd: the fraction of the steps its linear cool-down takes
    weight_decay: float = 0.05  # AdamW decay, not on norms, biases and embeddings
    beta2: float = 0.95         # AdamW second-moment decay
    grad_clip: float = 1.0      # max gradient norm; 0 = no clipping (the norm is still logged)
    ema: float = 0.0            # decay of a moving average of the weights kept beside them (0 = none; probe.py --ckpt=ema:PATH)
    # evaluation, logging, checkpoints
    eval_every: int = 400       # validation loss every so many steps (0 = never)
    ckpt_every: int = 400       # checkpoint every so many steps (always at the end)
    keep_ckpts: bool = False    # also keep each checkpoint as out_dir/step{N}.pt (probing along training)
    log_every: int = 50         # a row of out_dir/log.csv every so many steps
    sample_steps: int = 0       # mdc generation: denoising steps (0 = one token per step)
    sample_order: str = "confidence"  # mdc generation: confidence (MaskGIT) | random (LLaDA's random remasking)
    probe: str = "shapes"       # probe dataset at the end of training ("" to skip)
    data_root: str = "data"     # where --probe=cifar10/cifar100 are (or are downloaded to)
    seed: int = 0               # initialisation, data order, noise: a run is a function of its flags
    init_seed: int = -1         # one random stream on its own (-1 = --seed): the weights' initialisation
    data_seed: int = -1         # ... the data: which scenes (shapes), the order and split (real data), augmentation
    noise_seed: int = -1        # ... the noise of every step (draw_noise: t, the masks, the patches)
    out_dir: str = "out"        # checkpoint ckpt.pt and log.csv go here
    resume: bool = False        # continue from out_dir/ckpt.pt
    stop_after: int = 0         # end this run after so many steps (checkpointed); --resume goes on
    # speed
    device: str = "auto"        # auto | cpu | cuda
    compile: bool = False       # torch.compile the model (CUDA; on a CPU inductor needs a C++ compiler)
    dtype: str = "auto"         # auto (bf16 autocast on CUDA, fp32 on a CPU) | fp32 | bf16 (autocast, on a CPU too)
    bench: bool = False         # time training steps and report images/s and MFU, then exit
    bench_steps: int = 10       # timed steps of --bench


PRESETS = {  # DiT-style named sizes
    "tiny": dict(img_size=32, patch_size=8, width=128, enc_depth=4, dec_depth=2, heads=4, mlp_ratio=2.0),  # CPU, minutes
    "small": dict(img_size=224, patch_size=16, width=384, enc_depth=12, dec_depth=6, heads=6,  # ViT-S/16, one GPU
                  batch_size=256, lr=1e-3, steps=20000, max_len=32, mim_width=384, mim_depth=4),  # decoder: UMD's
    "base": dict(img_size=224, patch_size=16, width=768, enc_depth=12, dec_depth=6, heads=12,  # ViT-B/16, as CapPa
                 batch_size=256, lr=1e-3, steps=20000, max_len=32, mim_width=512, mim_depth=8),  # decoder: MAE's
}

# The objectives by family: the Config checks, the parts Model builds, how probe.py scores a caption and
# which runs show captions read these; LOSSES, after the objectives, maps each name to its loss.
CAPTIONERS = ("mdc", "ar", "cappa")         # a caption decoder: cross-attends to the image, predicts the words
CAUSAL = ("ar", "cappa")                    # captioners trained left to right: exact likelihood, greedy decoding
CONTRASTIVE = {"clip": (1 / 0.07, None),    # a text encoder; the initial logit scale and bias (None: no bias):
               "siglip": (10.0, -10.0),     # CLIP's 1/0.07, SigLIP's 10 and -10
               "rils": (1 / 0.07, None)}
MASKED_IMAGE = ("mae", "umd", "milan", "rils")  # a patch decoder: the encoder sees a subset of the patches
TAUGHT, TEACHERS = ("milan",), ("clip", "siglip")  # objectives that learn from a frozen --teacher, and what it may be
ALIAS_LOSS = ("ar",)                        # objectives whose loss --alias_loss=false can leave the alias words out of
OBJECTIVES = CAPTIONERS + ("clip", "siglip") + MASKED_IMAGE
DTYPES = ("auto", "fp32", "bf16")


# -----------------------------------------------------------------------------
# Building blocks: attention, a pre-LN block with optional cross-attention, the ViT, the text transformer

class Attention(nn.Module):
    def __init__(self, dim, heads, qk_norm=False, cross=False):
        super().__init__()
        self.heads, self.cross = heads, cross
        if cross:  # queries from the text, keys and values from the image tokens
            self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        else:      # one fused q, k, v matmul
            self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        hd = dim // heads
        self.q_norm = nn.LayerNorm(hd) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(hd) if qk_norm else nn.Identity()

    def heads_qkv(self, x, ctx=None):
        B, T, D = x.shape
        H = self.heads
        if self.cross:
            S = ctx.shape[1]
            q = self.q(x).view(B, T, H, D // H).transpose(1, 2)                        # (B, H, T, hd)
            k, v = self.kv(ctx).view(B, S, 2, H, D // H).permute(2, 0, 3, 1, 4)      # 2 x (B, H, S, hd)
        else:
            q, k, v = self.qkv(x).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)   # 3 x (B, H, T, hd)
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x, ctx=None, mask=None):
        B, T, D = x.shape
        q, k, v = self.heads_qkv(x, ctx)
        # mask: bool, True = may attend; None lets SDPA pick the flash kernel (encoder)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)                  # (B, H, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))                          # (B, T, D)


class Block(nn.Module):
    """Pre-LN transformer block: self-attention, optional cross-attention to image tokens, MLP."""

    def __init__(self, dim, heads, mlp_ratio=4.0, qk_norm=False, cross=False):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, qk_norm)
        self.ln_x = nn.LayerNorm(dim) if cross else None
        self.xattn = Attention(dim, heads, qk_norm, cross=True) if cross else None
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(mlp_ratio * dim)), nn.GELU(), nn.Linear(int(mlp_ratio * dim), dim))

    def forward(self, x, mask=None, ctx=None):
        x = x + self.attn(self.ln1(x), mask=mask)
        if self.xattn is not None:
            x = x + self.xattn(self.ln_x(x), ctx=ctx)
        return x + self.mlp(self.ln2(x))


def sincos_2d(grid, dim):
    """(1, grid*grid, dim) fixed position table: half the channels encode the row, half the column."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4) / (dim // 4))          # (dim/4,)
    coords = torch.arange(grid, dtype=torch.float)
    ang = coords[:, None] * omega[None]                                     # (grid, dim/4)
    emb = torch.cat([ang.sin(), ang.cos()], 1)                              # (grid, dim/2)
    rows = emb[:, None, :].expand(grid, grid, -1)                           # (grid, grid, dim/2)
    cols = emb[None, :, :].expand(grid, grid, -1)
    return torch.cat([rows, cols], -1).reshape(1, grid * grid, dim)        # row-major, like the patches


class ViT(nn.Module):
    """images (B, 3, S, S) in [0, 1] -> tokens (B, N, D) after the final LayerNorm. No [CLS]:
    probe features are the mean of the tokens (CapPa probes the mean-pooled pre-logits)."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.width
        self.patch = nn.Conv2d(3, D, cfg.patch_size, cfg.patch_size)
        # fixed 2-D sin-cos positions (MAE): where a patch is, is known from the first step
        self.register_buffer("pos", sincos_2d(cfg.img_size // cfg.patch_size, D), persistent=False)
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.mlp_ratio, cfg.qk_norm) for _ in range(cfg.enc_depth))
        self.ln = nn.LayerNorm(D)
        # normalise inside the model so every caller just feeds [0, 1] images
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def normalize(self, imgs):  # [0, 1] images -> per channel minus the ImageNet mean, over its standard deviation
        return (imgs - self.mean) / self.std

    def embed(self, imgs):
        x = self.patch(self.normalize(imgs))                  # (B, D, S/p, S/p)
        return x.flatten(2).transpose(1, 2) + self.pos        # (B, N, D), row-major patches

    def forward(self, imgs, keep=None):
        """keep: None, or (B, K) indices of the patches the encoder sees (the masked-image objectives, MAE's
        asymmetric encoder); each keeps its own position, added before the gather."""
        x = self.embed(imgs)                                  # (B, N, D)
        if keep is not None:
            x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[2]))   # (B, K, D) visible patches only
        for blk in self.blocks:
            x = blk(x)
        return self.ln(x)

    def features(self, imgs):  # the probe feature of every objective: the mean of the tokens of the whole, clean image
        return self.forward(imgs).mean(1)                     # (B, D)


def attention_mask(real, causal):
    """real: (B, L) bool, True at keys (not at [PAD]); causal: bool or (B,) bool (cappa mixes both) -> (B, 1, L, L)
    bool, True = query may attend key. Pads are never keys, so they cannot touch real positions; every query sees
    position 0 (never a pad)."""
    B, L = real.shape
    allowed = real[:, None, None, :].expand(B, 1, L, L)                   # (B, 1, L, L) keys that are real
    if causal is False:
        return allowed
    tril = torch.ones(L, L, dtype=torch.bool, device=real.device).tril()  # (L, L)
    causal = torch.as_tensor(causal, device=real.device).view(-1, 1, 1, 1)  # (B or 1, 1, 1, 1)
    return allowed & (tril | ~causal)


class TextTransformer(nn.Module):
    """tokens (B, L) -> (B, L, D): the caption decoder (cross=True: attends to image tokens v) or CLIP's text encoder."""

    def __init__(self, cfg, vocab_size, cross=True):
        super().__init__()
        D = cfg.width
        self.tok = nn.Embedding(vocab_size, D)
        self.pos = nn.Parameter(torch.randn(1, cfg.max_len, D) * 0.02)
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.mlp_ratio, cfg.qk_norm, cross) for _ in range(cfg.dec_depth))
        self.ln = nn.LayerNorm(D)

    def forward(self, tokens, real, causal=False, v=None):
        L = tokens.shape[1]
        x = self.tok(tokens) + self.pos[:, :L]                # (B, L, D)
        mask = attention_mask(real, causal)
        for blk in self.blocks:
            x = blk(x, mask=mask, ctx=v)
        return self.ln(x)


# -----------------------------------------------------------------------------
# Model: the encoder and the text side

class Model(nn.Module):
    """The ViT encoder and a text transformer: with a vocabulary head, the captioners' caption decoder; without
    cross-attention, with two projections, the contrastive text encoder. MaskedImageModel adds a patch decoder."""

    def __init__(self, cfg, vocab_size, len_hist=None, teacher_cfg=None):
        super().__init__()
        self.cfg = cfg
        self.contrastive = cfg.objective in CONTRASTIVE
        self.encoder = ViT(cfg)
        if cfg.objective in CAPTIONERS or self.contrastive:
            self.text = TextTransformer(cfg, vocab_size, cross=not self.contrastive)
        if self.contrastive:
            self.img_proj = nn.Linear(cfg.width, cfg.width, bias=False)
            self.txt_proj = nn.Linear(cfg.width, cfg.width, bias=False)
            init_s, init_b = CONTRASTIVE[cfg.objective]
            self.log_scale = nn.Parameter(torch.tensor(math.log(init_s)))   # s = exp(log_s)
            if init_b is not None:  # SigLIP's learned bias
                self.logit_bias = nn.Parameter(torch.tensor(init_b))
        elif cfg.objective in CAPTIONERS:
            self.head = nn.Linear(cfg.width, vocab_size, bias=False)
        self.add_parts(cfg, teacher_cfg)
        # the ids of the shapes world's alias words in this vocabulary (build sets them; ar_loss's control)
        self.register_buffer("alias_ids", torch.zeros(0, dtype=torch.long), persistent=False)
        # caption-length prior (counts of lengths incl. [EOS]); mdc generation draws L' from it
        self.register_buffer("len_hist", torch.ones(cfg.max_len + 1) if len_hist is None else len_hist.float())
        self.apply(self._init)

    def add_parts(self, cfg, teacher_cfg):  # MaskedImageModel adds its patch decoder here, before the init
        pass

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def decode(self, tokens, v, real, causal=False):
        """Logits (B, L, V) of the caption tokens given image tokens v (B, N, D)."""
        logits = self.head(self.text(tokens, real, causal, v))  # (B, L, V)
        # [MASK] is never a target, so it is never predicted (MDLM sets its logit to -inf)
        return logits.index_fill(-1, torch.tensor([MASK], device=logits.device), float("-inf"))

    def embed(self, v, tokens, real):
        """Contrastive embeddings: image (B, D) from mean-pooled tokens, text (B, D) at [EOS]."""
        img = F.normalize(self.img_proj(v.mean(1)), dim=-1)
        h = self.text(tokens, real)                              # (B, L, D), bidirectional
        eos = real.sum(1) - 1                                    # (B,) [EOS] is the last real token
        txt = F.normalize(self.txt_proj(h[torch.arange(len(h)), eos]), dim=-1)
        return img, txt

    def forward(self, imgs, tokens, real, causal=False):
        # the single entry point, so DistributedDataParallel sees every parameter used
        v = self.encoder(imgs)                                               # (B, N, D)
        return self.embed(v, tokens, real) if self.contrastive else self.decode(tokens, v, real, causal)


# -----------------------------------------------------------------------------
# Noise, the corruption, the MDC loss. Every objective is a pure function of (model, images, tokens,
# noise) -> (loss, n), n the count the loss is normalised by (DDP renormalises by the global count).

class Noise(NamedTuple):  # the uniforms of one step's global batch, a field for each use
    u: torch.Tensor         # (B,) mdc: t; cappa: which branch; umd: which half and the diffusion step
    caption: torch.Tensor   # (B, max_len) mdc: which caption tokens are masked
    patches: torch.Tensor   # (B, N) masked-image objectives: which of the N patches are hidden
    pixels: torch.Tensor    # (B, 2) umd: the seeds of each image's Gaussian noise

    def to(self, device):
        return Noise(*(a.to(device) for a in self))


def stream_seed(cfg, stream):
    """The seed of one random stream (init, data or noise): --seed, unless --{stream}_seed sets it alone."""
    s = getattr(cfg, f"{stream}_seed")
    return cfg.seed if s < 0 else s


def draw_noise(cfg, B, step, salt=0):
    """Noise for the global batch at `step`: a pure function of (seed, step), so a resumed run and a DDP run (each
    rank slices the global draw) see the same. Fields drawn in order, so adding one changes none before it."""
    g = torch.Generator().manual_seed(stream_seed(cfg, "noise") * 1_000_003 + step * 7 + salt)
    if cfg.antithetic:  # u_i = (u0 + i/B) mod 1: one shared offset u0 for every stratum (MDLM jitters each stratum)
        u = (torch.rand(1, generator=g) + torch.arange(B) / B) % 1
        u = u[torch.randperm(B, generator=g)]  # so no rank gets only the small t's
    else:
        u = torch.rand(B, generator=g)
    caption = torch.rand(B, cfg.max_len, generator=g)
    patches = torch.rand(B, (cfg.img_size // cfg.patch_size) ** 2, generator=g)
    return Noise(u, caption, patches, torch.rand(B, 2, generator=g))


def sample_t(u, t_min):
    """Mask ratio per caption: t ~ U(t_min, 1), from uniforms u in [0, 1)."""
    return t_min + (1 - t_min) * u


def corrupt(x, t, r, maskable=None):
    """MDC's forward process: every maskable token of x (B, L) (default: all but [PAD]) becomes [MASK] with
    probability t (a number or (B,)), where its uniform r (B, L) < t. Returns (x_t (B, L) ids, masked (B, L) bool)."""
    t = torch.as_tensor(t, dtype=r.dtype, device=r.device).reshape(-1, 1)   # (B or 1, 1)
    maskable = x != PAD if maskable is None else maskable
    masked = (r[:, :x.shape[1]] < t) & maskable                             # (B, L)
    return torch.where(masked, MASK, x), masked


def shift_right(x):
    """AR decoder input: [BOS] + x[:-1], so position k predicts x[k] from x[:k]."""
    return torch.cat([torch.full_like(x[:, :1], BOS), x[:, :-1]], 1)          # (B, L)


class Feed(NamedTuple):  # what a caption decoder is shown of a caption x (B, L), and what it is asked
    inp: torch.Tensor       # (B, L) input ids
    keys: torch.Tensor      # (B, L) bool, the positions attention may read
    causal: bool            # left-to-right attention
    target: torch.Tensor    # (B, L) bool, the positions whose prediction is scored


def feed(x, cfg, causal=False, t=1.0, r=None):
    """How a captioner's decoder sees a caption x (B, L), the one description that training, scoring, the signal and
    the samplers share. causal (ar, cappa's AR rows): input [BOS] + x[:-1], left-to-right attention, every real
    token scored. Masked (mdc, cappa's parallel rows at t = 1): each token whose uniform r (B, L) is < t becomes
    [MASK] (r None: every one), full attention, the masked tokens scored. The caption's length is decided here alone:
    [PAD] is neither masked nor a key, so a masked decoder knows where the caption ends (the count of its keys);
    --hide_length makes every position up to max_len a key and masks [PAD] like a word (LLaDA), so the decoder must
    predict the length too. A causal decoder cannot see the pads: they come after every word it predicts."""
    real = x != PAD                                                         # (B, L) words and [EOS]
    if causal:
        return Feed(shift_right(x), real, True, real)
    seen = real | cfg.hide_length                                           # (B, L)
    xt, masked = corrupt(x, t, torch.zeros(x.shape, device=x.device) if r is None else r, seen)
    return Feed(xt, seen, False, masked)


def token_ce(logits, x):
    return F.cross_entropy(logits.transpose(1, 2), x, reduction="none")     # (B, L)


def z_penalty(logits, real, z_loss):
    """z-loss: pushes log Z of the logits towards 0 so they cannot drift (PaLM)."""
    return z_loss * (torch.logsumexp(logits.float(), -1) ** 2 * real).sum() / real.sum() if z_loss else 0.0


def mdc_loss(model, imgs, x, noise, cfg):
    """Masked diffusion captioning. x: (B, L) ids with [PAD]; noise: draw_noise's. Mask every real token with
    probability t ~ U(t_min, 1), predict the masked ones from the rest and the image, weight their cross-entropy by
    1/t. As t_min -> 0 this is the masked-diffusion bound on -log p(caption | image) per token (MDLM, Sahoo et al.
    2024; LLaDA, Nie et al. 2025); t_min > 0 leaves out nearly unmasked captions, which the text alone can fill in."""
    t = sample_t(noise.u, cfg.t_min)                           # (B,) mask ratio per caption
    f = feed(x, cfg, t=t, r=noise.caption)                     # (B, L) x_t, its keys, the masked positions
    logits = model(imgs, f.inp, f.keys)                        # (B, L, V), bidirectional
    ce = token_ce(logits, x) * f.target                        # (B, L) CE at masked tokens only
    if cfg.mdc_weight == "elbo":  # 1/t: each token counts once in expectation, whatever t (MDLM eq. 10)
        n = f.keys.sum()
        loss = (ce / t[:, None]).sum() / n
    else:                          # ablation: plain mean CE over the masked tokens
        n = f.target.sum().clamp(min=1)
        loss = ce.sum() / n
    return loss + z_penalty(logits, f.keys, cfg.z_loss), n


# -----------------------------------------------------------------------------
# Sampling and scoring

@torch.no_grad()
def generate_mdc(model, imgs, length=None, steps=0, order="confidence", generator=None):
    """MDC captions by iterative unmasking, images (B, 3, S, S) -> ids (B, L'): from L' [MASK] tokens, over `steps`
    rounds (0 = one token per round) predict every masked position and commit a scheduled number, each as its most
    likely token: the most confident first (MaskGIT, Chang et al. 2022) or in random order (LLaDA's random remasking
    at temperature 0; MDLM's ancestral sampler would draw the tokens and unmask a random number). L' is `length` (an
    int or (B,)) or drawn from the length prior, unless the model is not told the length (feed): then it fills all
    max_len positions, [PAD]s too."""
    v = model.encoder(imgs)                                             # (B, N, D)
    B, dev, L = len(imgs), imgs.device, model.cfg.max_len
    if length is None:
        length = torch.multinomial(model.len_hist[1:].float().cpu(), B, True, generator=generator) + 1
    length = torch.as_tensor(length, device=dev).expand(B)              # (B,) tokens, [EOS] included
    f = feed(torch.where(torch.arange(L, device=dev)[None] < length[:, None], MASK, PAD), model.cfg)  # t = 1: all masked
    W = int(f.keys.any(0).nonzero().max()) + 1                          # the positions the decoder reads
    x, real, length = f.inp[:, :W], f.keys[:, :W], f.target.sum(1)      # (B, W), (B, W), (B,) to fill
    steps = steps or W
    for k in range(steps):
        masked = x == MASK
        conf, pred = model.decode(x, v, real).float().softmax(-1).max(-1)   # (B, W) each
        if order == "random":
            conf = torch.rand(conf.shape, generator=generator).to(dev)
        keep = (length.float() * (1 - (k + 1) / steps)).floor().long()   # (B,) still masked after round k
        conf = conf.masked_fill(~masked, -1.0)                          # only masked positions compete
        rank = conf.argsort(1, descending=True).argsort(1)               # (B, L') 0 = most confident
        x = torch.where(masked & (rank < (masked.sum(1) - keep)[:, None]), pred, x)
    return x


@torch.no_grad()
def generate_ar(model, imgs, max_len):
    """Greedy captions (ar, cappa): images (B, 3, S, S) -> ids (B, max_len); Tokenizer.decode stops at [EOS]."""
    v = model.encoder(imgs)                                             # (B, N, D)
    out = torch.full((len(imgs), max_len), MASK, dtype=torch.long, device=imgs.device)  # [MASK]: not written yet
    for k in range(max_len):  # causal: the positions after k cannot change position k
        f = feed(out, model.cfg, causal=True)                           # [BOS] + out[:-1]
        out[:, k] = model.decode(f.inp, v, f.keys, causal=True)[:, k].argmax(-1)
    return out


@torch.no_grad()
def caption_logprob(model, v, x, rule="loss", K=8, generator=None):
    """A score of log p(caption | image) for scoring-based evaluation (higher = better), by the model's own Config.
    v: (B, N, D) image tokens, x: (B, L) ids. Causal captioners (ar, cappa): the exact log-likelihood, whatever
    the rule. mdc: 'loss' = minus the training loss, the 1/t-weighted masked CE averaged over K (t, mask) draws
    with t stratified over [t_min, 1] (below t_min the model was never trained and 1/t is large); the ELBO only as
    t_min -> 0; 'pll' = each token masked alone (a pseudo-log-likelihood); 'all' = every token masked at once."""
    cfg, (B, L) = model.cfg, x.shape

    def nll(w=1.0, **how):                                               # (B,) the scored CE of one feed
        f = feed(x, cfg, **how)
        return (token_ce(model.decode(f.inp, v, f.keys, f.causal).float(), x) * f.target * w).sum(1)
    if cfg.objective in CAUSAL:
        return -nll(causal=True)
    if rule == "all":                                                    # t = 1
        return -nll()
    if rule == "pll":                                                    # r = 0 at k alone: only k is masked
        pos, seen = torch.arange(L, device=x.device), feed(x, cfg).keys.any(0)   # (L,), (L,) positions read
        return -sum(nll(r=(pos != k).float().expand(B, L)) for k in range(L) if seen[k])
    total = torch.zeros(B, device=x.device)
    for k in range(K):  # one t in each K-th of [t_min, 1]: fewer draws for the same accuracy
        # t_min may be any positive number; below MDLM's 1e-3 the 1/t weight would let rare draws dominate
        t = sample_t((k + torch.rand(B, generator=generator)) / K, max(cfg.t_min, 1e-3)).to(x.device)  # (B,)
        r = torch.rand(B, L, generator=generator).to(x.device)
        total -= nll(1 / t[:, None], t=t, r=r) / K
    return total


# -----------------------------------------------------------------------------
# The baselines: the same encoder and decoder, another corruption and attention; or contrastive

def ar_loss(model, imgs, x, noise, cfg):
    """Autoregressive captioning: input [BOS] + x[:-1], causal attention, CE on every real token.
    --alias_loss=false (with --alias) leaves the alias words out: a control for their dilution of the loss."""
    f = feed(x, cfg, causal=True)
    logits = model(imgs, f.inp, f.keys, causal=True)
    scored = f.target if cfg.alias_loss else f.target & ~torch.isin(x, bare(model).alias_ids)   # (B, L)
    n = scored.sum()
    return (token_ce(logits, x) * scored).sum() / n + z_penalty(logits, f.keys, cfg.z_loss), n


def cappa_loss(model, imgs, x, noise, cfg):
    """CapPa (Tschannen et al. 2023; big_vision, models/proj/cappa/cappa.py): with probability cappa_frac the input
    is all [MASK] with full attention (parallel prediction: feed's MDC rows at t = 1), otherwise an ordinary AR
    example; the CE is over the real tokens either way (big_vision's skips the pads)."""
    real = x != PAD
    parallel = noise.u[:, None] < cfg.cappa_frac                        # (B, 1)
    par, seq = feed(x, cfg), feed(x, cfg, causal=True)                  # (B, L) each: all [MASK] / [BOS] + x[:-1]
    logits = model(imgs, torch.where(parallel, par.inp, seq.inp), torch.where(parallel, par.keys, seq.keys),
                   causal=~parallel[:, 0])
    n = real.sum()
    return (token_ce(logits, x) * real).sum() / n + z_penalty(logits, real, cfg.z_loss), n


def bare(model):
    """The Model itself, also when DistributedDataParallel wraps it (as .module)."""
    return getattr(model, "module", model)


def clip_loss(model, imgs, x, noise, cfg):
    """CLIP: symmetric cross-entropy over the batch's image-text similarities."""
    img, txt = model(imgs, x, x != PAD)                                 # (B, D) each
    logits = bare(model).log_scale.exp().clamp(max=100) * img @ txt.T         # (B, B)
    labels = torch.arange(len(x), device=x.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2, len(x)


def siglip_loss(model, imgs, x, noise, cfg):
    """SigLIP: every image-text pair is a binary problem, +1 on the diagonal, -1 elsewhere."""
    img, txt = model(imgs, x, x != PAD)
    logits = bare(model).log_scale.exp() * img @ txt.T + bare(model).logit_bias   # (B, B)
    z = 2 * torch.eye(len(x), device=x.device) - 1
    return -F.logsigmoid(z * logits).sum() / len(x), len(x)


# =============================================================================
# The masked-image relatives: mae, umd, milan, rils
#
# The encoder sees a subset of the patches (ViT(imgs, keep)) and a light PatchDecoder fills in the rest: pixels
# (mae, umd), a frozen teacher's features (milan), or distributions over the batch's captions (rils, which also
# trains clip_loss). Which patches are hidden is decided by Noise.patches, so the masks are a pure function of
# (seed, step). Nothing above depends on this section; MaskedImageModel holds the parts only these objectives use.
# VLMAE (He et al. 2022, arXiv 2208.09374) is not here: a vision-language model with a fusion encoder, judged on
# VQA, retrieval and visual grounding, whose visual losses this repository does not reproduce.
# =============================================================================

def time_embedding(t, dim):
    """(B,) diffusion steps -> (B, dim) sin-cos features of t (the DDPM/ADM timestep embedding)."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2))  # (dim/2,)
    ang = t.float()[:, None] * freqs[None]                                  # (B, dim/2)
    return torch.cat([ang.cos(), ang.sin()], 1)                             # (B, dim)


class PatchDecoder(nn.Module):
    """The light decoder of the masked-image objectives (MAE, He et al. 2021, models_mae.py): tokens of the visible
    patches v (B, K, D) at indices keep (B, K) -> a prediction (B, N, out) for every patch. Masked positions start as
    one learned mask token, told apart by fixed sin-cos positions. time=True (umd): t (B,) enters as a token prepended
    in every block (UMD's adaln=False variant, no change to Block; UMD's default is AdaLN). prompting=True (milan):
    only the mask tokens are updated, the visible ones stay fixed keys and values (MILAN's "prompting decoder")."""

    def __init__(self, cfg, out, depth, time=False, prompting=False):
        super().__init__()
        W = cfg.mim_width
        self.embed = nn.Linear(cfg.width, W)
        self.mask_token = nn.Parameter(torch.randn(1, 1, W) * 0.02)        # MAE: normal, std 0.02
        self.register_buffer("pos", sincos_2d(cfg.img_size // cfg.patch_size, W), persistent=False)
        self.time = nn.Sequential(nn.Linear(W, W), nn.GELU(), nn.Linear(W, W)) if time else None
        self.prompting = prompting
        self.blocks = nn.ModuleList(Block(W, W // 32, cfg.mlp_ratio, cfg.qk_norm) for _ in range(depth))
        self.ln = nn.LayerNorm(W)
        self.head = nn.Linear(W, out)

    def forward(self, v, keep, t=None):
        B, K, _ = v.shape
        _, N, W = self.pos.shape
        h = self.embed(v)                                                    # (B, K, W)
        idx = keep[..., None].expand(B, K, W)                                # (B, K, W)
        x = self.mask_token.to(h.dtype).expand(B, N, W).scatter(1, idx, h) + self.pos  # (B, N, W) back in place
        visible = torch.zeros(B, N, 1, dtype=torch.bool, device=v.device).scatter(1, keep[..., None], True)
        fixed = x
        tt = None if self.time is None else self.time(time_embedding(t, W))[:, None]  # (B, 1, W)
        for blk in self.blocks:
            x = blk(x) if tt is None else blk(torch.cat([tt, x], 1))[:, 1:]   # (B, N, W)
            if self.prompting:  # the visible tokens are keys and values, never queries that change
                x = torch.where(visible, fixed, x)
        return self.head(self.ln(x))                                          # (B, N, out)


class MaskedImageModel(Model):
    """Model plus a PatchDecoder that predicts every patch: its pixels (mae), x0 and eps (umd), the frozen teacher's
    features (milan, which also holds the teacher), or features of the encoder's width (rils, which keeps Model's
    contrastive text encoder). forward takes keep, the (B, K) indices of the visible patches, and umd's t."""

    def add_parts(self, cfg, teacher_cfg):
        if cfg.objective in TAUGHT:
            if teacher_cfg is None:
                raise ValueError("milan's Model needs its teacher's Config (load_teacher or the checkpoint has it)")
            # the teacher: a clip/siglip image encoder and its projection, frozen, stored in every checkpoint
            # (a few MB at these sizes), so a milan checkpoint loads on its own
            self.teacher_cfg = teacher_cfg
            self.teacher = ViT(teacher_cfg).requires_grad_(False).eval()
            self.teacher_proj = nn.Linear(teacher_cfg.width, teacher_cfg.width, bias=False).requires_grad_(False)
        P = 3 * cfg.patch_size ** 2                                          # pixels per patch
        out, depth, kw = {"mae": (P, cfg.mim_depth, {}),                                 # pixels
                          "umd": (2 * P, cfg.mim_depth, dict(time=True)),                # x0 and eps, told t
                          "milan": (getattr(teacher_cfg, "width", 0), cfg.mim_depth, dict(prompting=True)),
                          "rils": (cfg.width, 1, {})}[cfg.objective]                     # RILS: one block
        self.decoder = PatchDecoder(cfg, out, depth, **kw)

    def train(self, mode=True):
        super().train(mode)
        if hasattr(self, "teacher"):  # milan's teacher stays in eval mode whatever the student does
            self.teacher.eval()
        return self

    def copy_teacher(self, clip):
        """milan: take a clip/siglip Model's image encoder and image projection as the frozen teacher."""
        self.teacher.load_state_dict(clip.encoder.state_dict())
        self.teacher_proj.load_state_dict(clip.img_proj.state_dict())

    def forward(self, imgs, tokens=None, real=None, keep=None, t=None):
        if self.contrastive:  # rils: two encoder passes, the whole image and its visible patches
            full = self.encoder(imgs)                                        # (B, N, D)
            return (*self.embed(full, tokens, real), self.decoder(self.encoder(imgs, keep), keep), full)
        return self.decoder(self.encoder(imgs, keep), keep, t)              # (B, N, out)


def keep_first(keys, ratio):
    """Patches ordered by keys (B, N), smallest first; the first N(1 - ratio) stay visible (MAE's random_masking:
    argsort of uniforms). Returns (keep (B, K) indices, masked (B, N) bool, True = hidden from the encoder)."""
    B, N = keys.shape
    keep = keys.argsort(dim=1, stable=True)[:, :int(N * (1 - ratio))]          # (B, K)
    masked = torch.ones(B, N, dtype=torch.bool, device=keys.device).scatter(1, keep, False)
    return keep, masked


def patchify(imgs, p):
    """(B, 3, S, S) -> (B, N, p*p*3): each patch's pixels, patches row-major like the ViT's tokens."""
    B, C, S, _ = imgs.shape
    h = S // p
    x = imgs.reshape(B, C, h, p, h, p)                                       # (B, 3, h, p, w, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, h * h, p * p * C)          # (B, N, p*p*3)


def mae_loss(model, imgs, x, noise, cfg):
    """MAE (He et al. 2021, facebookresearch/mae models_mae.py): the encoder sees a random quarter of the patches;
    the decoder predicts the pixels of every patch, each normalised by its own mean and variance (norm_pix_loss);
    the MSE is averaged over the masked patches only. The targets are the pixels as the encoder sees them (per
    channel ImageNet-normalised), as MAE's are: its data pipeline normalises, the model patchifies that."""
    keep, masked = keep_first(noise.patches, cfg.mask_ratio)                # (B, K), (B, N)
    pred = model(imgs, keep=keep)                                            # (B, N, p*p*3)
    target = patchify(bare(model).encoder.normalize(imgs), cfg.patch_size)   # (B, N, p*p*3)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    err = ((pred.float() - target) ** 2).mean(-1)                           # (B, N) per patch
    n = masked.sum()
    return (err * masked).sum() / n, n


def cosine_alpha_bar(T=1000, s=0.008):
    """abar[k], k = 0..T-1 (k = 0: one step of noise), of the cosine schedule (Nichol & Dhariwal 2021) built as UMD
    does (gaussian_diffusion.py): f(i) = cos((i/T + s)/(1 + s) pi/2)^2, beta_k = min(1 - f(k+1)/f(k), 0.999)."""
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return torch.cumprod(1 - (1 - f[1:] / f[:-1]).clamp(max=0.999), 0).float()   # (T,)


def pixel_noise(seeds, shape):
    """Standard normal noise (B, *shape), image i's from a generator seeded by its own two uniforms seeds[i] (B, 2):
    the same on whichever DDP rank, or in a resumed run. Reading the seeds waits for the device once per step."""
    ints = (seeds.double() * 2 ** 24).long().tolist()                         # 24 bits from each uniform
    gens = [torch.Generator(seeds.device).manual_seed(a * 2 ** 24 + b) for a, b in ints]
    return torch.stack([torch.randn(shape, generator=g, device=seeds.device) for g in gens])


def umd_loss(model, imgs, x, noise, cfg):
    """UMD (philippe-eecs/small-vision, trainers/train_ae.py): half of the batch is an MAE step (clean, 75% masked,
    MSE to the clean pixels x0 on masked patches); the other half is noised at a diffusion step t ~ U{0..999}
    (cosine schedule, x_t = sqrt(abar) x0 + sqrt(1 - abar) eps) and 37.5% masked, and the decoder, told t,
    predicts eps on the visible patches and x0 on the masked ones, each half-weighted. Total 0.5 L_noised +
    0.5 L_clean; pixels in [-1, 1], no per-patch normalisation. Two deviations: only the decoder is told t (UMD tells
    its encoder too), so the encoder is the shared ViT; and this ViT has no class and register tokens (UMD's mean of
    them feeds its decoder and is its probe feature): the decoder reads the visible patch tokens, and the probe
    feature is ViT.features of the clean, unmasked image (UMD too probes at t = 0, unmasked)."""
    noised = noise.u < 0.5                                # (B,) half the global batch: exactly, with antithetic u, B even
    step = (2 * noise.u * 1000).long().clamp(max=999)     # (B,) t ~ U{0..999} for the noised rows
    abar = torch.where(noised, cosine_alpha_bar().to(noised.device)[step], 1.0).view(-1, 1, 1, 1)  # clean: 1
    x0 = 2 * imgs - 1                                     # (B, 3, S, S) in [-1, 1]
    eps = pixel_noise(noise.pixels, imgs.shape[1:])       # (B, 3, S, S), its own uniforms
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * eps       # the clean rows stay x0
    x0p, epsp = patchify(x0, cfg.patch_size), patchify(eps, cfg.patch_size)   # (B, N, P) targets
    P = x0p.shape[2]
    total = 0.0
    # one pass per half (their numbers of visible patches differ); the decoder is told 0 for the clean half and
    # t + 1 for the noised one, as UMD does
    for is_noised, ratio in ((False, cfg.mask_ratio), (True, cfg.umd_mask_noised)):
        rows = noised if is_noised else ~noised
        if not rows.any():
            continue
        keep, masked = keep_first(noise.patches[rows], ratio)               # (b, K), (b, N)
        tell = torch.where(noised, step + 1, 0)[rows]                        # (b,)
        pred = model((xt[rows] + 1) / 2, keep=keep, t=tell).float()         # (b, N, 2P); the ViT takes [0, 1]
        x0_err = ((pred[..., :P] - x0p[rows]) ** 2).mean(-1)                 # (b, N)
        per_image = (x0_err * masked).sum(1) / masked.sum(1)                 # (b,) x0 MSE on masked patches
        if is_noised:
            eps_err = ((pred[..., P:] - epsp[rows]) ** 2).mean(-1)           # (b, N)
            per_image = 0.5 * per_image + 0.5 * (eps_err * ~masked).sum(1) / (~masked).sum(1)
        total = total + per_image.sum()
    # the mean over images is 0.5 L_noised + 0.5 L_clean when the halves are equal, and a mean over images is
    # what DDP's renormalisation by the global count keeps exact
    return total / len(x), len(x)


@torch.no_grad()
def teacher_tokens(model, imgs):
    """milan's targets and mask weights from the frozen teacher: (its image tokens after the final norm, projected by
    its img_proj (B, N, Dt), as MILAN's CLIP tokens are; importance (B, N)). MILAN weights patches by the teacher's
    last-block attention from [CLS]; this ViT has no [CLS], so (an adaptation) the query is the mean of the last
    block's normalised input tokens, its attention over the patches averaged over heads."""
    enc = model.teacher
    h = enc.embed(imgs)                                                      # (B, N, Dt)
    for blk in enc.blocks[:-1]:
        h = blk(h)
    last = enc.blocks[-1]
    z = last.ln1(h)
    q, k, _ = last.attn.heads_qkv(torch.cat([z.mean(1, keepdim=True), z], 1))   # (B, H, 1 + N, hd)
    att = (q[:, :, :1] @ k[:, :, 1:].transpose(-1, -2) / q.shape[-1] ** 0.5).float().softmax(-1)  # (B, H, 1, N)
    return model.teacher_proj(enc.ln(last(h))), att.mean(1)[:, 0]


def proportional_keys(u, w):
    """Sampling without replacement in proportion to weights w (B, N) from uniforms u (B, N): the order of the keys
    -log(u) / w, smallest first, is such a sample (Efraimidis & Spirakis 2006; Gumbel-top-k in another form)."""
    return -torch.log(u) / w.clamp(min=1e-12)


def milan_loss(model, imgs, x, noise, cfg):
    """MILAN (zejiangh/MILAN, models_milan.py): the targets are a frozen language-aligned teacher's patch features
    (--teacher, a clip/siglip run of this project). 75% masked, semantic-aware: patches are ordered by sampling without
    replacement in proportion to the teacher's importance, the first quarter visible, so important patches are seen
    more often; the prompting decoder updates only the mask tokens. Loss 2 - 2 cos(prediction, target) averaged over
    all patch tokens, visible and masked, as MILAN's forward_loss."""
    target, importance = teacher_tokens(bare(model), imgs)                  # (B, N, Dt), (B, N)
    keep, _ = keep_first(proportional_keys(noise.patches, importance), cfg.mask_ratio)   # (B, K)
    pred = model(imgs, keep=keep)                                           # (B, N, Dt)
    loss = 2 - 2 * F.cosine_similarity(pred.float(), target.float(), dim=-1)   # (B, N)
    return loss.mean(), loss.numel()


def sentence_logits(patches, proj, txt, tau):
    """RILS: patch features (B, N, D) -> logits over the batch's captions (B, N, B): the cosine of the projected
    patch to each normalised caption embedding txt (B, D'), over a temperature tau."""
    return F.normalize(proj(patches), dim=-1) @ txt.T / tau


def rils_loss(model, imgs, x, noise, cfg):
    """RILS (hustvl/RILS, models_rils.py, losses.py): CLIP plus masked modelling in sentence space. The full image
    gives the contrastive embedding and, detached, the teacher patches; 75% masked, the visible patches go through
    a one-block decoder that predicts every patch. Student and teacher patches become distributions over the
    batch's captions (temperatures 0.1 and 0.04); loss = L_clip + 0.5 KL(teacher || student), averaged over the
    masked patches of the images whose best-scoring caption is their own (none in the batch: that term is 0). The
    caption embeddings enter that term as constants, so it trains the image side only (RILS's captions are
    gathered across GPUs, without gradient). Under DDP each rank's captions are its own, as in clip_loss."""
    keep, masked = keep_first(noise.patches, cfg.mask_ratio)                # (B, K), (B, N)
    img, txt, pred, full = model(imgs, x, x != PAD, keep=keep)              # (B, D') x 2, (B, N, D) x 2
    m = bare(model)
    logits = m.log_scale.exp().clamp(max=100) * img @ txt.T                 # (B, B), as clip_loss
    labels = torch.arange(len(x), device=x.device)
    l_clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    student = sentence_logits(pred, m.img_proj, txt.detach(), 0.1).float()  # (B, N, B)
    with torch.no_grad():  # the teacher distribution gets no gradient (RILS detaches its logits)
        teacher = sentence_logits(full, m.img_proj, txt, 0.04).float()
    kl = (teacher.softmax(-1) * (teacher.log_softmax(-1) - student.log_softmax(-1))).sum(-1)  # (B, N)
    w = masked & (logits.argmax(1) == labels)[:, None]                      # (B, N)
    return l_clip + 0.5 * (kl * w).sum() / w.sum().clamp(min=1), len(x)


# =============================================================================
# (end of the masked-image relatives)
# =============================================================================


# -----------------------------------------------------------------------------
# Training: the objectives by name (their families are under Config), the optimiser, a step, the loop

LOSSES = {"mdc": mdc_loss, "ar": ar_loss, "cappa": cappa_loss, "clip": clip_loss, "siglip": siglip_loss,
          "mae": mae_loss, "umd": umd_loss, "milan": milan_loss, "rils": rils_loss}


def build_model(cfg, vocab_size, len_hist=None, teacher_cfg=None):
    """The Model of cfg.objective, MaskedImageModel for the masked-image objectives (milan's needs its teacher's Config)."""
    return (MaskedImageModel if cfg.objective in MASKED_IMAGE else Model)(cfg, vocab_size, len_hist, teacher_cfg)


def precision(device, dtype="auto"):
    """--dtype resolved: 'auto' is bf16 on CUDA, fp32 on a CPU."""
    return ("bf16" if device.type == "cuda" else "fp32") if dtype == "auto" else dtype


def autocast(device, dtype="auto"):
    """bf16 autocast where precision(device, dtype) is bf16 (on a CPU too); else a no-op, fp32. The parameters stay
    fp32 either way: autocast runs matmuls and attention in bf16, losses in fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision(device, dtype) == "bf16" else nullcontext()


def lr_at(step, cfg):
    """Linear warm-up, then cosine decay to zero; or (wsd) constant, then linear to zero over the last cooldown
    fraction of the steps (warm-up, stable, decay: MiniCPM, Hu et al. 2024)."""
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "wsd":
        return cfg.lr * min(1.0, (cfg.steps - step) / max(1, int(cfg.cooldown * cfg.steps)))
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm)))


@torch.no_grad()
def ema_update(ema, model, decay, step):
    """ema <- d * ema + (1 - d) * weights, in place, over every floating tensor of model.state_dict() (the others
    copied). d = min(decay, (1 + step) / (10 + step)): the ramp (timm's ModelEmaV3) keeps the random init from
    lingering in the average of a short run. Training does not see it."""
    d = min(decay, (1 + step) / (10 + step))
    for k, w in model.state_dict().items():
        if w.is_floating_point():
            ema[k].lerp_(w, 1 - d)
        else:
            ema[k].copy_(w)


def make_optimizer(model, cfg, device):
    """AdamW; no weight decay on norms, biases, embeddings, positional tables and the mask token (1-D or lookup).
    Frozen parameters (milan's teacher, --freeze_encoder) are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "tok." in name or name.endswith(("pos", "mask_token")) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), fused=device.type == "cuda")


def caption_data(cfg):
    """(train set, val set, tokenizer, the training captions): the tokenizer is built from them."""
    train, val = data.build_caption_data(cfg.data, img_size=cfg.img_size, seed=stream_seed(cfg, "data"), all_captions=cfg.all_captions,
                                         image_col=cfg.image_col, caption_col=cfg.caption_col, val_frac=cfg.val_frac,
                                         tie=cfg.tie, order=cfg.order, alias=cfg.alias, p_single=cfg.p_single,
                                         obj_scale=cfg.obj_scale)
    caps = train.vocab_captions()
    return train, val, data.Tokenizer.build(caps, cfg.vocab_min_count), caps


def length_histogram(caps, max_len):
    """(max_len + 1,) counts of caption lengths in tokens, [EOS] included (mdc's length prior)."""
    lengths = [min(len(data.split_words(c)), max_len - 1) + 1 for c in caps]
    return torch.bincount(torch.tensor(lengths), minlength=max_len + 1)[:max_len + 1]


def device_batch(imgs, caps, tok, cfg, step, rank=0, world=1):
    """A batch of data.batches -> (images (b, 3, S, S), augmented if asked, ids (b, L)), on the images' device. The
    augmentation is seeded by (seed, step, rank), so a resumed run repeats it."""
    x = tok.batch(caps, cfg.max_len).to(imgs.device, non_blocking=True)
    if cfg.augment:
        imgs = data.augment(imgs, torch.Generator(device=imgs.device).manual_seed(stream_seed(cfg, "data") * 7919 + step * world + rank))
    return imgs, x


def train_step(model, opt, imgs, x, step, cfg, rank=0, world=1):
    """One optimisation step at `step` on this process's share of the global batch: images (b, 3, S, S) and ids
    (b, L) on the device. The noise is drawn for the global batch and sliced, so a resumed or a DDP run sees the
    same draws. Returns (loss, gradient norm before clipping) as tensors: reading them would wait for the GPU."""
    b = len(x)
    noise = Noise(*(a[rank * b:(rank + 1) * b] for a in draw_noise(cfg, b * world, step))).to(x.device)  # this rank's rows
    for g in opt.param_groups:
        g["lr"] = lr_at(step, cfg)
    with autocast(x.device, cfg.dtype):
        loss, n = LOSSES[cfg.objective](model, imgs, x, noise, cfg)
    scaled = loss
    if world > 1:  # DDP averages gradients; rescale so the result is normalised by the global count
        total = torch.as_tensor(n, dtype=torch.float, device=x.device).clone()
        dist.all_reduce(total)
        scaled = loss * n / (total / world)
    opt.zero_grad(set_to_none=True)
    scaled.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
    opt.step()
    return loss.detach(), gnorm


@torch.no_grad()
def evaluate(model, cfg, val, tok, n_batches=4):
    """Mean validation loss on fixed batches with fixed noise, comparable across steps and runs."""
    device = next(model.parameters()).device
    model.eval()
    losses = []
    n_batches = min(n_batches, len(val) // cfg.batch_size) or 1
    for i in range(n_batches):
        imgs, caps = val.batch(np.arange(i * cfg.batch_size, min((i + 1) * cfg.batch_size, len(val))))
        x = tok.batch(caps, cfg.max_len).to(device)
        noise = draw_noise(cfg, len(x), i, salt=999).to(device)
        with autocast(device, cfg.dtype):
            losses.append(LOSSES[cfg.objective](model, imgs.to(device), x, noise, cfg)[0].item())
    model.train()
    return sum(losses) / len(losses)


LOG_COLUMNS = ("step", "loss", "grad_norm_median", "grad_norm_max", "lr", "img_s", "val_loss")


def build(cfg, device):
    """(model on device, optimizer, tokenizer, train set, val set, the training captions the tokenizer was built from):
    the model initialised from --init_seed (or --seed), milan's frozen teacher loaded from --teacher."""
    torch.manual_seed(stream_seed(cfg, "init"))
    train_set, val_set, tok, caps = caption_data(cfg)
    clip, tcfg = load_teacher(cfg, device) if cfg.objective in TAUGHT else (None, None)
    model = build_model(cfg, len(tok), length_histogram(caps, cfg.max_len), tcfg).to(device)
    if clip is not None:
        model.copy_teacher(clip)
    model.encoder.requires_grad_(not cfg.freeze_encoder)
    model.alias_ids = torch.tensor([tok.stoi[w] for w in data.ALIAS_WORDS if w in tok.stoi], dtype=torch.long, device=device)
    return model, make_optimizer(model, cfg, device), tok, train_set, val_set, caps


def train(cfg, callback=None):
    """Train cfg.objective from scratch or, with --resume, from out_dir/ckpt.pt. Every log interval a row (a dict with
    the keys LOG_COLUMNS; val_loss where measured) goes to out_dir/log.csv and to callback(row). Returns (model in
    eval mode, tokenizer, validation set) on the main process, None on the others (bench's figures with --bench)."""
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on Ampere+ (DiT)
    torch.backends.cudnn.allow_tf32 = True
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = resumable(cfg, ckpt_path) if cfg.resume else None    # before any work: another run's checkpoint stops here
    rank, world, device = setup_distributed(pick_device(cfg.device))
    if cfg.batch_size % world:
        raise UsageError(f"--batch_size={cfg.batch_size} must divide by the number of processes ({world})")
    master = rank == 0
    model, opt, tok, train_set, val_set, caps = build(cfg, device)
    start, ema = restore(ckpt, ckpt_path, model, opt, tok, cfg, device, master)
    if master:
        print(f"tokenizer: {len(tok)} words; " + data.truncation_report(caps, cfg.max_len))
        print(f"{cfg.objective} | {cfg.model}: encoder {sum(p.numel() for p in model.encoder.parameters()) / 1e6:.2f}M "
              f"params, total {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M | vocab {len(tok)} | "
              f"data {cfg.data} | device {device} x{world}")
    train_model = model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    train_model = torch.compile(train_model) if cfg.compile else train_model
    stream = data.batches(train_set, start, cfg.batch_size, stream_seed(cfg, "data"), rank, world, cfg.num_workers, device)
    if cfg.bench:
        return bench(cfg, train_model, opt, tok, stream, rank, world)

    log = RunLog(cfg, ckpt, ckpt_path, world, device, master)
    end = min(cfg.steps, start + cfg.stop_after) if cfg.stop_after else cfg.steps
    bar = tqdm(initial=start, total=cfg.steps, disable=None if master else True, dynamic_ncols=True)
    for step in range(start, end):
        imgs, x = device_batch(*next(stream), tok, cfg, step, rank, world)
        loss, gnorm = train_step(train_model, opt, imgs, x, step, cfg, rank, world)
        if ema is not None:
            ema_update(ema, model, cfg.ema, step)
        log.add(loss, gnorm)
        bar.update()
        done = step + 1
        save = done % cfg.ckpt_every == 0 or done == end
        evaluate_now = cfg.eval_every and (done % cfg.eval_every == 0 or done == end)
        if not (done % cfg.log_every == 0 or save or evaluate_now):
            continue
        row = log.row(done, step)       # checked for a non-finite loss only here: no GPU sync every step
        if not master:
            continue
        if evaluate_now:
            row["val_loss"] = evaluate(model, cfg, val_set, tok)
            bar.write(f"step {done}: val loss {row['val_loss']:.4f}")
        bar.set_postfix(loss=f"{row['loss']:.4f}", gnorm=f"{row['grad_norm_max']:.2f}", img_s=f"{row['img_s']:.0f}",
                        lr=f"{row['lr']:.2e}")
        log.write(row)
        if callback:
            callback(row)
        if save:
            made = log.provenance()
            save_checkpoint(ckpt_path, model, opt, cfg, tok, done, ema, made)
            if cfg.keep_ckpts:  # the model alone: enough to probe, a fifth of the size
                save_checkpoint(os.path.join(cfg.out_dir, f"step{done}.pt"), model, None, cfg, tok, done, ema, made)
    bar.close()
    if world > 1:
        check_ranks_in_sync(model, master)
        dist.destroy_process_group()
    if not master:
        return None
    print(f"trained {end - start} steps in {time.time() - log.t0:.0f} s; checkpoint {ckpt_path}")
    print(f"training data: {train_set.report()}")  # corrupt images are only found as they are decoded
    return model.eval(), tok, val_set


class RunLog:
    """The loop's bookkeeping: losses and gradient norms since the last row, the rows of out_dir/log.csv (appended
    to on resume), and how the run was made (provenance, in every checkpoint and copied into probe.py's results)."""

    def __init__(self, cfg, ckpt, ckpt_path, world, device, master):
        self.cfg, self.path, self.ckpt_path = cfg, os.path.join(cfg.out_dir, "log.csv"), ckpt_path
        self.losses, self.norms, self.t0, self.seen = [], [], time.time(), 0
        self.spent = (ckpt.get("provenance") or {}).get("train_seconds", 0.0) if ckpt else 0.0   # before a resume
        self.made = dict(threads=torch.get_num_threads(), processes=world, device=str(device), commit=code_version(),
                         cpu=cpu_name(), torch=str(torch.__version__))
        os.makedirs(cfg.out_dir, exist_ok=True)
        if master and not (ckpt and os.path.exists(self.path)):
            with open(self.path, "w") as f:
                f.write(",".join(LOG_COLUMNS) + "\n")

    def add(self, loss, gnorm):
        self.losses.append(loss)
        self.norms.append(gnorm)
        self.seen += self.cfg.batch_size

    def row(self, done, step):
        """The row since the last one; a non-finite loss stops the run, naming its first bad step."""
        vals, g = torch.stack(self.losses).float().cpu(), torch.stack(self.norms).float().cpu()
        self.losses, self.norms = [], []
        if not torch.isfinite(vals).all():
            first_bad = done - len(vals) + 1 + int((~torch.isfinite(vals)).nonzero()[0])  # counted from 1
            last = f"the last good checkpoint is {self.ckpt_path}" if os.path.exists(self.ckpt_path) else "no checkpoint was written"
            raise SystemExit(f"non-finite loss at step {first_bad}; stopping, {last} (lower --lr, or try --qk_norm / --z_loss)")
        return dict(step=done, loss=vals.mean().item(), grad_norm_median=g.median().item(), grad_norm_max=g.max().item(),
                    lr=lr_at(step, self.cfg), img_s=self.seen / (time.time() - self.t0))

    def write(self, row):
        with open(self.path, "a") as f:
            f.write(",".join("" if k not in row else str(row[k]) if k == "step" else f"{row[k]:.6g}" for k in LOG_COLUMNS) + "\n")

    def provenance(self):
        return {**self.made, "train_seconds": self.spent + time.time() - self.t0}


# -----------------------------------------------------------------------------
# Checkpoints and resume

def save_checkpoint(path, model, opt, cfg, tok, step, ema=None, provenance=None, int8=False, **extra):
    """Plain tensors, numbers and strings only, so torch.load(..., weights_only=True) reads it. Written to a temporary
    file and renamed: a crash never leaves half a checkpoint. provenance: how the run was made (RunLog). int8: the
    weights as int8 with a scale per row (a quarter of fp32: copies small enough to share, e.g. the tutorial's)."""
    weights = model.state_dict()
    ckpt = {"model": quantize(weights) if int8 else weights, "optimizer": opt.state_dict() if opt else None, "ema": ema,
            "config": asdict(cfg), "vocab": tok.itos, "step": step, "provenance": provenance, "int8": int8,
            "rng": torch.get_rng_state(), "torch_version": str(torch.__version__),
            "teacher_config": asdict(model.teacher_cfg) if hasattr(model, "teacher_cfg") else None,  # milan
            **extra}                                                    # e.g. the tutorial's loss history
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)


def quantize(weights):
    """Every float matrix w (rows, ...) -> int8 round(w / s) and s = max |w| per row / 127, its key + '@scale'."""
    out = {}
    for k, w in weights.items():
        if w.is_floating_point() and w.dim() >= 2:
            s = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True).clamp_min(1e-12) / 127   # (rows, 1, ...)
            out[k], out[k + "@scale"] = (w / s).round().to(torch.int8), s.float()
        else:
            out[k] = w
    return out


def dequantize(weights):
    """quantize's output -> float32 weights (each within half a step, s / 2, of the original)."""
    return {k: w.float() * weights[k + "@scale"] if k + "@scale" in weights else w
            for k, w in weights.items() if not k.endswith("@scale")}


def code_version():
    """The git commit of this checkout, '+dirty' where a tracked .py file differs from it; '' outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    git = lambda *a: subprocess.run(["git", "-C", here, *a], capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "*.py").stdout.strip()
    except (OSError, subprocess.SubprocessError):  # no git here
        return ""
    return head.stdout.strip() + ("+dirty" if dirty else "") if head.returncode == 0 else ""


def cpu_name():
    """The CPU's model name (Linux's /proc/cpuinfo), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor() or platform.machine()


def read_checkpoint(path, device="cpu"):
    """(the checkpoint dict at path, the Config it was trained with), or a UsageError that says what the file is
    not. Config fields it predates take their defaults; state dicts of an earlier mdc.py get today's names."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # not a torch file, or one with pickled objects in it
        why = (str(e).splitlines() or [""])[0][:120]
        raise UsageError(f"{path} is not a checkpoint written by mdc.py ({type(e).__name__}: {why})") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "vocab", "step"} <= set(ckpt):
        raise UsageError(f"{path} is not a checkpoint written by mdc.py (no model, config, vocab and step in it)")
    if ckpt.get("int8"):
        ckpt["model"] = dequantize(ckpt["model"])
    objective = ckpt["config"].get("objective")
    no_bias = objective in CONTRASTIVE and CONTRASTIVE[objective][1] is None     # clip once kept a frozen bias of 0
    for part in ("model", "ema"):   # --ema's moving average has the same names
        if ckpt.get(part):          # an earlier mdc.py called cross-attention's query projection qkv
            ckpt[part] = {k.replace(".xattn.qkv.", ".xattn.q."): v for k, v in ckpt[part].items()
                          if not (no_bias and k == "logit_bias")}
    if unknown := sorted(set(ckpt["config"]) - {f.name for f in fields(Config)}):
        raise UsageError(f"the checkpoint has flags this mdc.py does not know ({', '.join(unknown)}): a newer version wrote it")
    return ckpt, Config(**ckpt["config"])


def load_checkpoint(path, device="cpu", ema=False):
    """-> (model in eval mode, Config, Tokenizer, checkpoint dict); ema=True loads --ema's moving average instead."""
    ckpt, cfg = read_checkpoint(path, device)
    tok = data.Tokenizer(ckpt["vocab"])
    teacher_cfg = Config(**ckpt["teacher_config"]) if ckpt.get("teacher_config") else None   # milan
    model = build_model(cfg, len(tok), teacher_cfg=teacher_cfg).to(device)
    if ema and not ckpt.get("ema"):
        raise UsageError(f"{path} has no moving average of its weights: it was trained without --ema")
    model.load_state_dict(ckpt["ema"] if ema else ckpt["model"])
    return model.eval(), cfg, tok, ckpt


def load_teacher(cfg, device):
    """milan: the frozen teacher's checkpoint cfg.teacher -> (its Model, its Config). It must be a clip or siglip run
    of this project with the student's img_size and patch_size (one token per patch)."""
    if not os.path.exists(cfg.teacher):
        raise UsageError(f"--teacher: no checkpoint at {cfg.teacher}")
    clip, tcfg, _, _ = load_checkpoint(cfg.teacher, device)
    if tcfg.objective not in TEACHERS:
        raise UsageError(f"--teacher must be a clip or siglip checkpoint; {cfg.teacher} was trained with --objective={tcfg.objective}")
    if (tcfg.img_size, tcfg.patch_size) != (cfg.img_size, cfg.patch_size):
        raise UsageError(f"--teacher has img_size {tcfg.img_size} and patch_size {tcfg.patch_size}; "
                         f"this run has {cfg.img_size} and {cfg.patch_size}: they must match")
    return clip, tcfg


# the flags that do not change the trained weights (probe.py does not tell runs apart by them)
BOOKKEEPING = ("out_dir", "resume", "stop_after", "eval_every", "ckpt_every", "keep_ckpts", "log_every", "probe", "data_root",
               "num_workers", "device", "compile", "bench", "bench_steps", "sample_steps", "sample_order", "ema")

# the flags a --resume may change: how long and how the run goes on, not what it trains
RESUMABLE = ("steps", "stop_after", "resume", "lr", "grad_clip", "z_loss", "eval_every", "ckpt_every", "keep_ckpts", "log_every",
             "sample_steps", "sample_order", "probe", "data_root", "out_dir", "num_workers", "device", "compile", "dtype", "bench", "bench_steps")


def resumable(cfg, path):
    """--resume: the checkpoint at path, if it is one of this run (every flag but those in RESUMABLE the same) and
    has steps left to train; else a UsageError that says what to change."""
    if not os.path.exists(path):
        raise UsageError(f"--resume: no checkpoint at {path} (set --out_dir to the run's folder)")
    ckpt, saved = read_checkpoint(path)
    saved, now = asdict(saved), asdict(cfg)
    if diff := [k for k in now if k not in RESUMABLE and saved[k] != now[k]]:
        raise UsageError(f"--resume: {path} was trained with " + ", ".join(f"--{k}={saved[k]!r}" for k in diff)
                         + ", this run has " + ", ".join(f"--{k}={now[k]!r}" for k in diff)
                         + "; only " + " ".join(f"--{k}" for k in RESUMABLE) + " may change on resume")
    if ckpt["step"] >= cfg.steps:
        raise UsageError(f"--resume: {path} is already at step {ckpt['step']} of --steps={cfg.steps}; raise --steps to train on")
    return ckpt


def restore(ckpt, path, model, opt, tok, cfg, device, master):
    """(first step, --ema's moving average or None) from --resume's checkpoint, else (0, a copy of the fresh weights)."""
    if ckpt is None:
        return 0, {k: v.clone() for k, v in model.state_dict().items()} if cfg.ema else None
    if ckpt["vocab"] != tok.itos:
        raise UsageError(f"--resume: {path} has another vocabulary than this data's; did --data change?")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    if master:
        print(f"resumed from {path} at step {ckpt['step']}")
    return ckpt["step"], {k: v.to(device) for k, v in ckpt["ema"].items()} if cfg.ema else None


# -----------------------------------------------------------------------------
# The device and DDP

def pick_device(name="auto"):
    """auto = CUDA when there is one, else the CPU."""
    return torch.device(name if name != "auto" else "cuda" if torch.cuda.is_available() else "cpu")


def setup_distributed(device):
    """torchrun sets RANK/WORLD_SIZE: nccl on CUDA, gloo on CPU. Returns (rank, world, device)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def check_ranks_in_sync(model, master):
    """DDP keeps replicas identical; verify it (cheap) and say so."""
    vec = torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])
    hi, lo = vec.clone(), vec.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    if master:
        print(f"ranks in sync: max parameter difference across ranks {float((hi - lo).max()):.3g}")


# -----------------------------------------------------------------------------
# Benchmark: images/s and model FLOPs utilisation (nanoGPT's estimate_mfu, measured)

def median_time(fn, n, sync=lambda: None):
    """The median seconds of fn(i), i = 0..n-1, each timed between two sync() calls (CUDA runs ahead of Python)."""
    times = []
    for i in range(n):
        sync()
        t = time.perf_counter()
        fn(i)
        sync()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def matmul_peak(device, n=2048, reps=10):
    """Measured fp32 matmul FLOP/s on this CPU (the CPU 'peak' to compare against)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):  # warm-up
        a @ b
    return 2 * n ** 3 / median_time(lambda i: a @ b, reps)


# dense tensor-core peaks from NVIDIA's datasheets (H100/H200 SXM): bf16 under autocast, TF32 for fp32 matmuls
# (train() allows TF32); a card not listed gets no MFU. Names are matched in this order (L40S before L4)
GPU_PEAK = {"bf16": {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12},
            "fp32": {"H100": 495e12, "H200": 495e12, "A100": 156e12, "L40S": 183e12, "L4": 60e12, "A10": 62.5e12}}


def gpu_peak(name, prec):
    """(FLOP/s, its description) of the card called name at precision prec (bf16 or fp32), or (None, ...)."""
    peak = next((v for k, v in GPU_PEAK[prec].items() if k in name), None)
    return peak, f"nominal {'bf16' if prec == 'bf16' else 'TF32'} peak of {name}"


def bench(cfg, model, opt, tok, stream, rank=0, world=1):
    """Median time of train_step (with device_batch, as in the loop) on one precomputed batch, images/s and MFU:
    FLOPs counted by FlopCounterMode (forward + backward) against the card's nominal peak at the run's precision on
    CUDA (bf16, or TF32 for fp32), or a fp32 matmul peak measured now on a CPU; then the median time data.batches
    takes to produce a batch, which a single process adds to every step."""
    from torch.utils.flop_counter import FlopCounterMode
    imgs, caps = next(stream)
    device = imgs.device
    step = lambda i: train_step(model, opt, *device_batch(imgs, caps, tok, cfg, i, rank, world), i, cfg, rank, world)
    with FlopCounterMode(display=False) as fc:
        step(0)
    flops = fc.get_total_flops()
    for _ in range(2):  # warm-up (and compilation)
        step(0)
    dt = median_time(step, cfg.bench_steps, torch.cuda.synchronize if device.type == "cuda" else lambda: None)
    # producing a batch (rendering shapes, or reading and decoding images) happens before the step
    data_s = median_time(lambda i: next(stream), cfg.bench_steps)
    if device.type == "cuda":
        peak, peak_txt = gpu_peak(torch.cuda.get_device_name(), precision(device, cfg.dtype))
    else:
        peak, peak_txt = matmul_peak(device), f"measured fp32 matmul peak, {torch.get_num_threads()} threads"
    B = len(imgs)
    mfu = flops / dt / peak if peak else float("nan")
    if rank == 0:
        print(f"bench {cfg.objective} {cfg.model} img {cfg.img_size} batch {B}: median step {dt * 1000:.1f} ms | "
              f"{B / dt:.1f} img/s | {B * cfg.max_len / dt:.0f} caption tokens/s | {flops / B / 1e9:.2f} GFLOP/img | "
              f"{flops / dt / 1e12:.3f} TFLOP/s | MFU {100 * mfu:.1f}% of {peak_txt} ({(peak or 0) / 1e12:.3f} TFLOP/s)")
        print(f"data: median {data_s * 1000:.1f} ms to produce a batch of {cfg.data} ({100 * data_s / dt:.0f}% of a step); "
              f"with it, {B / (dt + data_s):.1f} img/s in one process")
        if device.type == "cuda":
            print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    return dict(step_s=dt, img_s=B / dt, flops=flops, mfu=mfu, peak=peak, data_s=data_s)


# -----------------------------------------------------------------------------
# The end-of-run check of python mdc.py: the ridge probe of the trained encoder against its floors

def random_encoder(cfg, seed, device):
    """The floor: the same ViT at its (seeded) random initialisation, in eval mode."""
    torch.manual_seed(seed)
    return ViT(cfg).apply(Model._init).to(device).eval()


def ridge_accuracy(featurize, train, test, n_classes, img_size, device, batch_size=256, num_workers=0, dtype="auto"):
    """Ridge-probe top-1 (a fraction) of featurize ((B, 3, S, S) in [0, 1] -> (B, D)) on labelled (train, test)."""
    a, b = (extract(featurize, ds, img_size, device, batch_size, num_workers=num_workers, dtype=dtype) for ds in (train, test))
    return ridge_probe(*a, *b, n_classes, log=lambda s: None)["ridge top1"]


QUICK_PROBE_SEED = 0      # quick_probe's scenes and hold-out: the same for every training seed (as probe.py --seed=0)
FLOOR_INITS = (0, 1, 2)   # the random-init floor moves by points with the init seed: the mean over these


def quick_probe(model, cfg):
    """Ridge probe on cfg.probe of the trained encoder, the same ViT at random init (the mean over FLOOR_INITS) and
    raw pixels, printed on one line; the closed-form fitter keeps it to seconds. The probe scenes do not depend on the
    training seed. Returns {"trained": acc, "random init": acc, "pixels": acc}, fractions."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    tr, te = (data.probe_dataset(cfg.probe, s, cfg.img_size, cfg.data_root, QUICK_PROBE_SEED) for s in ("train", "test"))
    encoders = [("trained", model.encoder.features), *(("random init", random_encoder(cfg, s, device).features) for s in FLOOR_INITS),
                ("pixels", lambda imgs: imgs.flatten(1))]                  # pixels: (B, 3 * S * S)
    accs = {}
    for name, fn in encoders:
        accs.setdefault(name, []).append(ridge_accuracy(fn, tr, te, tr.n_classes, cfg.img_size, device,
                                                             num_workers=cfg.num_workers, dtype=cfg.dtype))
    out = {k: float(np.mean(v)) for k, v in accs.items()}
    print(f"linear probe on {tr.name} ({len(tr)} train / {len(te)} test images; closed-form ridge, "
          f"L2 chosen on a 10% hold-out; random init: the mean of {len(FLOOR_INITS)} inits; "
          f"{time.perf_counter() - t0:.0f} s; probe.py has more): " + " | ".join(f"{k} {100 * v:.1f}%" for k, v in out.items()))
    return out


@torch.no_grad()
def extract(featurize, ds, size, device, batch_size=256, desc="features", num_workers=0, dtype="auto"):
    """Run featurize (images (B, 3, S, S) in [0, 1] -> (B, D)) over a labelled dataset batch by batch (data.probe_batches:
    an ImageFolder is decoded by num_workers DataLoader workers as it goes, never all at once), under autocast(device,
    dtype), with a progress bar. Returns (features float32 (N, D) on the CPU, labels int64 (N,))."""
    out, labels = [], []
    bar = tqdm(total=len(ds), desc=desc, leave=False, disable=len(ds) < 4 * batch_size or None)
    for imgs, y in data.probe_batches(ds, batch_size, num_workers):
        with autocast(device, dtype):
            out.append(featurize(data.to_input(imgs.to(device), size)).float().cpu())
        labels.append(y)
        bar.update(len(y))
    bar.close()
    return torch.cat(out), torch.cat(labels).long()


def standardize(xtr, *others):
    """Zero mean, unit variance with the training set's statistics (fitted on train only)."""
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    return [(x - mu) / sd for x in (xtr, *others)]


def stratified_holdout(y, frac=0.1, seed=0):
    """Indices (fit, hold-out) with frac of every class held out (at least one per class)."""
    g = torch.Generator().manual_seed(seed)
    fit, hold = [], []
    for c in y.unique():
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = max(1, round(frac * len(idx))) if len(idx) > 1 else 0
        hold.append(idx[:n])
        fit.append(idx[n:])
    return torch.cat(fit).sort().values, torch.cat(hold).sort().values


def topk(logits, y, k=1):
    """Fraction of rows whose label is among the k highest logits."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, 1).indices == y[:, None].to(logits.device)).any(1).float().mean().item()


def accuracies(prefix, logits, y, n_classes):
    out = {f"{prefix} top1": topk(logits, y, 1)}
    if n_classes >= 20:  # top-5 means little with few classes
        out[f"{prefix} top5"] = topk(logits, y, 5)
    return out


RIDGE_GRID = [10.0 ** e for e in np.arange(-7, 4.01, 0.5)]


def ridge_fit(x, y, n_classes):
    """Closed-form ridge on standardised x (N, D): W(lam) = (X^T X + N lam I)^-1 X^T (Y - mean Y) by one Cholesky
    factorisation per lam (for wide features such as raw pixels far faster than one eigendecomposition for every
    lam). Returns solve(lam) -> (W (D, C), bias (C,)), in float64."""
    x = x.double()
    Y = F.one_hot(y, n_classes).double()
    ybar = Y.mean(0)                                        # the free bias: x is centred
    G, XtY = x.T @ x, x.T @ (Y - ybar)                      # (D, D), (D, C)
    eye = torch.eye(len(G), dtype=G.dtype)

    def solve(lam):
        L, info = torch.linalg.cholesky_ex(G + len(x) * lam * eye)
        if info:  # not positive definite in floating point (lam far below the smallest eigenvalue)
            return torch.full_like(XtY, float("nan")), ybar
        return torch.cholesky_solve(XtY, L), ybar
    return solve


def ridge_probe(xtr, ytr, xte, yte, n_classes, grid=RIDGE_GRID, seed=0, log=print):
    """Linear probe by ridge regression onto one-hot labels, mean ||XW - Y||^2 + lam ||W||^2 on standardised features
    (big_vision's few-shot probe): lam picked on a stratified 10% hold-out, refit on all, test once. A lam whose
    system could not be factorised scores as no lam."""
    xtr, xte = standardize(xtr, xte)
    fit, hold = stratified_holdout(ytr, 0.1, seed)
    solve = ridge_fit(xtr[fit], ytr[fit], n_classes)
    xh = xtr[hold].double()
    accs = [topk(xh @ W + b, ytr[hold]) if W.isfinite().all() else -1.0 for W, b in map(solve, grid)]
    best = max(range(len(grid)), key=lambda i: (accs[i], i))  # ties -> the stronger regularisation
    lam = grid[best]
    if best in (0, len(grid) - 1):
        log(f"ridge: best lam {lam:.0e} is on the edge of the grid {grid[0]:.0e}..{grid[-1]:.0e}")
    W, b = ridge_fit(xtr, ytr, n_classes)(lam)
    return {**accuracies("ridge", xte.double() @ W + b, yte, n_classes), "ridge lambda": float(lam)}


# -----------------------------------------------------------------------------
# The command line: flags -> Config, checked; then train, show captions, the end-of-run probe

def parse_args(argv):
    """--key=value flags -> Config. --model=NAME applies a preset first; explicit flags win. A bad flag or value is a
    UsageError that names it; every check runs before any work starts."""
    names = {f.name: f for f in fields(Config)}
    if "--help" in argv or "-h" in argv:  # every flag, its default (at --model=tiny) and the comment beside it in Config
        notes = dict(re.findall(r"^\s+(\w+): \w+ = [^#\n]*#\s*(.*)$", inspect.getsource(Config), re.M))
        flags = (f"  {f'--{k}={v!r}':<28} {notes.get(k, '')}" for k, v in asdict(Config(**PRESETS["tiny"])).items())
        print("python mdc.py --key=value ...  (a bare --flag means --flag=True)\n" + "\n".join(flags))
        raise SystemExit(0)
    overrides = {}
    for arg in argv:
        key, eq, val = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean --{close[0]}?" if close else ""
            raise UsageError(f"unknown flag {arg!r}{hint} (python mdc.py --help lists every flag)")
        typ = names[key].type   # bool, int, float or str
        try:
            if typ is not bool and not eq:  # only a bool flag may be bare: --flag means --flag=True
                raise ValueError
            overrides[key] = {"": True, "1": True, "true": True, "0": False, "false": False}[val.lower()] if typ is bool else typ(val)
        except (KeyError, ValueError):
            raise UsageError(f"--{key} expects a {typ.__name__}, got {val!r}") from None
    preset = overrides.get("model", Config.model)
    if preset not in PRESETS:
        raise UsageError(f"--model must be one of {list(PRESETS)}, got {preset!r}")
    cfg = Config(**{**PRESETS[preset], **overrides})
    check_config(cfg)
    return cfg


def check_config(c):
    """Every value in range, or a UsageError naming the flag, the value and what it must be."""
    kind = c.data.partition(":")[0]
    n_patches = (c.img_size // max(c.patch_size, 1)) ** 2
    rules = [
        ("objective", c.objective in OBJECTIVES, f"one of {', '.join(OBJECTIVES)}"),
        ("data", kind in data.CAPTION_KINDS_LIST, data.CAPTION_KINDS),
        ("mdc_weight", c.mdc_weight in ("elbo", "none"), "elbo or none"),
        ("sample_order", c.sample_order in ("confidence", "random"), "confidence or random"),
        ("order", c.order in data.ORDERS, " or ".join(data.ORDERS)), ("tie", 0 <= c.tie <= 1, "a probability, in [0, 1]"),
        ("p_single", 0 <= c.p_single <= 1, "a fraction, in [0, 1]"), ("obj_scale", 0 < c.obj_scale <= 2, "in (0, 2]"),
        ("alias", 0 <= c.alias <= data.MAX_ALIAS and (c.alias == 0 or kind == "shapes"),
         f"in 0..{data.MAX_ALIAS}, and 0 unless --data=shapes"),
        ("alias", kind != "shapes" or c.alias == 0 or data.longest_caption(c.order, c.alias) < c.max_len,
         f"small enough that the longest caption ({data.longest_caption(c.order, c.alias)} words and [EOS]) "
         f"fits --max_len={c.max_len} (raise --max_len)"),
        ("alias_loss", c.alias_loss or (c.objective in ALIAS_LOSS and c.alias > 0),
         f"true unless {' or '.join(f'--objective={o}' for o in ALIAS_LOSS)} with --alias > 0"),
        ("device", c.device in ("auto", "cpu") or c.device.startswith("cuda"), "auto, cpu or cuda"),
        ("dtype", c.dtype in DTYPES, " or ".join(DTYPES)), ("t_min", 0 < c.t_min <= 1, "in (0, 1]"),
        ("cappa_frac", 0 <= c.cappa_frac <= 1, "in [0, 1]"), ("val_frac", 0 <= c.val_frac < 1, "in [0, 1)"),
        ("warmup", 0 <= c.warmup <= 1, "a fraction of the steps, in [0, 1]"),
        ("schedule", c.schedule in ("cosine", "wsd"), "cosine or wsd"),
        ("cooldown", 0 < c.cooldown <= 1 and (c.schedule != "wsd" or c.warmup + c.cooldown <= 1),
         "a fraction of the steps, in (0, 1], that leaves room for --warmup"),
        ("beta2", 0 <= c.beta2 < 1, "in [0, 1)"), ("ema", 0 <= c.ema < 1, "in [0, 1) (0 = no moving average)"),
        ("lr", c.lr > 0, "> 0"), ("batch_size", c.batch_size >= 1, ">= 1 (the global batch)"), ("steps", c.steps >= 1, ">= 1"),
        ("max_len", c.max_len >= 2, ">= 2 (a word and [EOS])"),
        ("img_size", c.img_size >= c.patch_size >= 1 and c.img_size % c.patch_size == 0,
         f"a multiple of --patch_size={c.patch_size}"),
        ("width", c.heads >= 1 and c.width % c.heads == 0 and c.width % 4 == 0 and c.width > 0,
         f"a multiple of 4 and of --heads={c.heads}"),
        ("enc_depth", c.enc_depth >= 1, ">= 1"), ("dec_depth", c.dec_depth >= 1, ">= 1"),
        ("mlp_ratio", c.mlp_ratio > 0, "> 0"), ("vocab_min_count", c.vocab_min_count >= 1, ">= 1"),
        ("weight_decay", c.weight_decay >= 0, ">= 0"), ("grad_clip", c.grad_clip >= 0, ">= 0 (0 = no clipping)"),
        ("z_loss", c.z_loss >= 0, ">= 0"), ("num_workers", c.num_workers >= 0, ">= 0"),
        ("eval_every", c.eval_every >= 0, ">= 0 (0 = never)"), ("ckpt_every", c.ckpt_every >= 1, ">= 1"),
        ("log_every", c.log_every >= 1, ">= 1"), ("sample_steps", c.sample_steps >= 0, ">= 0 (0 = one token per step)"),
        *((f"{k}_seed", getattr(c, f"{k}_seed") >= -1, ">= 0, or -1 for --seed") for k in ("init", "data", "noise")),
        ("stop_after", c.stop_after >= 0, ">= 0 (0 = run to --steps)"), ("bench_steps", c.bench_steps >= 1, ">= 1"),
        ("mask_ratio", all(1 <= int(n_patches * (1 - m)) < n_patches for m in (c.mask_ratio, c.umd_mask_noised)),
         f"such that at least one of the {n_patches} patches is visible and one hidden (so must --umd_mask_noised)"),
        ("mim_width", c.mim_width > 0 and c.mim_width % 32 == 0, "a multiple of 32 (decoder heads of 32 channels)"),
        ("teacher", c.objective not in TAUGHT or os.path.isfile(c.teacher),
         "a clip or siglip checkpoint of this project trained on the same data (--objective=milan needs it)"),
    ]
    for key, ok, want in rules:
        if not ok:
            raise UsageError(f"--{key}={getattr(c, key)!r}: must be {want}")
    if c.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device={c.device}: no CUDA device is available here (use --device=cpu or auto)")
    if c.probe:
        data.check_probe(c.probe, c.data_root)


def show_samples(model, cfg, tok, val_set, n=6):
    """Captions of n validation images next to the true ones (the captioners)."""
    if cfg.objective not in CAPTIONERS:
        return
    device = next(model.parameters()).device
    imgs, caps = val_set.batch(np.arange(n))
    imgs = imgs.to(device)
    if cfg.objective in CAUSAL:
        out, note = generate_ar(model, imgs, cfg.max_len), ""
    else:  # the caption length L' of the true caption, where the decoder is told the length (feed)
        length = (tok.batch(caps, cfg.max_len) != PAD).sum(1).to(device)
        out = generate_mdc(model, imgs, length, cfg.sample_steps, cfg.sample_order, torch.Generator().manual_seed(0))
        told = not feed(torch.tensor([[PAD]]), cfg).keys.any()          # is [PAD] hidden from the decoder?
        note = f" ({cfg.objective}: caption length L' taken from the true caption)" if told else ""
    print(f"\nsample captions on validation images{note}:")
    for c, o in zip(caps, out):
        print(f"  true: {c}\n  gen:  {tok.decode(o)}")


def main(argv):
    cfg = parse_args(argv)
    out = train(cfg)
    if out is None or cfg.bench:
        return
    model, tok, val_set = out
    show_samples(model, cfg, tok, val_set)
    if cfg.probe:
        quick_probe(model, cfg)


if __name__ == "__main__":
    data.command_line(main, sys.argv[1:], "mdc.py")
