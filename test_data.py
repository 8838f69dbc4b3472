"""Tests of data.py on fixtures written into a temporary folder: every loader gives the
right pairs, the right split and the right skip counts; the batch stream resumes exactly."""
import csv
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data

SHARED = Path(__file__).parent.parent / "shared" / "data"


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
    with pytest.raises(ValueError, match="unknown dataset kind 'laion'.*coco:ROOT"):
        data.build_caption_data("laion:/x")
    with pytest.raises(FileNotFoundError, match="Kaggle layout"):
        data.build_caption_data(f"flickr:{tmp_path}/nowhere")
    (tmp_path / "Images").mkdir()
    with pytest.raises(FileNotFoundError, match="captions.txt"):  # a folder without the expected files
        data.build_caption_data(f"flickr:{tmp_path}")
    with pytest.raises(FileNotFoundError, match="captions_train2017.json"):
        data.build_caption_data(f"coco:{tmp_path}")
    with pytest.raises(FileNotFoundError, match=r"\*\.tar"):
        data.build_caption_data(f"wds:{tmp_path}")
    with pytest.raises(FileNotFoundError, match="data.py prepare"):
        data.build_caption_data(f"cache:{tmp_path}")
    with pytest.raises(ValueError, match="unknown probe dataset"):
        data.probe_dataset("mnist", "train")
    with pytest.raises(FileNotFoundError, match="ImageFolder"):
        data.probe_dataset(f"imagefolder:{tmp_path}/nowhere", "train")
