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
    with pytest.raises(FileNotFoundError, match="ROOT/train/<class>"):  # a folder, but no train/ in it
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
    with pytest.raises(ValueError, match="--image_col"):
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
    frac, msg = data.truncation_report(tok, ["a b c d e f", "a b", "a b c", "a"], max_len=4)
    assert frac == 0.25 and "1 of 4 captions (25.00%)" in msg
    ids, n = tok.batch(["a b c d e f"], 4)
    assert n == 1 and ids[0, -1].item() == data.EOS


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


def test_cifar_offline_message(tmp_path, monkeypatch):
    import torchvision
    def offline(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(RuntimeError, match="cifar-10-batches-py"):
        data.probe_dataset("cifar10", "train", data_root=str(tmp_path))


@pytest.mark.skipif(not (SHARED / "flickr8k" / "captions.txt").exists(), reason="no ../shared/data/flickr8k")
def test_real_flickr8k():
    train, val = data.build_caption_data(f"flickr:{SHARED / 'flickr8k'}", img_size=32)
    assert train.log.total == 40455 and len(train) + len(val) == 8091
    assert not set(train.srcs) & set(val.srcs)
    imgs, caps = next(data.batches(train, 0, 8, seed=0))
    assert imgs.shape == (8, 3, 32, 32) and len(caps) == 8 and all(caps)


@pytest.mark.skipif(not (SHARED / "cifar10" / "train").exists(), reason="no ../shared/data/cifar10")
def test_real_cifar10_imagefolder():
    tr = data.probe_dataset(f"imagefolder:{SHARED / 'cifar10'}", "train", per_class=20)
    te = data.probe_dataset(f"imagefolder:{SHARED / 'cifar10'}", "val", per_class=20)  # val -> test/
    assert tr.n_classes == te.n_classes == 10 and len(tr) == len(te) == 200
    x, y = te[0]
    assert x.shape == (3, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1 and y == 0
