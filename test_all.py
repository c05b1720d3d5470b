"""All tests: `python -m pytest -q test_all.py`. Offline, CPU, tiny data; every expected value is computed
independently of the code under test (hand computations, torchvision as a reference reader, or the
documented on-disk layout re-derived by hand)."""

import gzip
import json
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import models
import teacher

HERE = os.path.dirname(os.path.abspath(__file__))


def run_cli(args, cwd, timeout=300):
    """Run a CLI of this repository in `cwd`; return its stdout (fails the test with the output otherwise)."""
    proc = subprocess.run([sys.executable] + [os.path.join(HERE, args[0])] + list(args[1:]), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def read_results(cwd):
    runs = sorted(os.listdir(os.path.join(cwd, "runs")))
    with open(os.path.join(cwd, "runs", runs[-1], "results.json")) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def synthetic_teacher(tmp_path_factory):
    """A LeNet-5 teacher trained on the `synthetic` dataset for 3 epochs (a few seconds); returns its path."""
    work = tmp_path_factory.mktemp("teacher")
    out = run_cli(["teacher.py", "--dataset", "synthetic", "--arch", "lenet5", "--epochs", "3", "--device", "cpu",
                   "--checkpoint-dir", str(work / "ckpt"), "--runs-dir", str(work / "runs")], cwd=work)
    assert "RESULT method=teacher dataset=synthetic" in out
    return str(work / "ckpt" / "synthetic-lenet5-seed0.pt")


#### models.py ####

@pytest.mark.parametrize("name", sorted(models.MODELS))
@pytest.mark.parametrize("in_channels", [1, 3])
def test_model_interface(name, in_channels):
    torch.manual_seed(0)
    model = models.build_model(name, num_classes=7, in_channels=in_channels).eval()
    sizes = [32, 64] if name.startswith(("resnet", "vgg", "wrn")) else [32]
    for size in sizes:
        x = torch.randn(2, in_channels, size, size)
        with torch.no_grad():
            logits, feats = model(x), model.features(x)
        assert logits.shape == (2, 7)
        assert feats.shape == (2, model.feat_dim)
        assert isinstance(model.classifier, torch.nn.Linear) and model.classifier.in_features == model.feat_dim
        assert torch.equal(logits, model.classifier(feats))


def test_build_model_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as e:
        models.build_model("resnet1000", 10, 3)
    assert "resnet1000" in str(e.value) and "resnet18" in str(e.value) and "lenet5_half" in str(e.value)


def test_half_networks_are_smaller():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(models.lenet5_half()) < count(models.lenet5()) / 3
    assert count(models.alexnet_half()) < count(models.alexnet()) / 3
    assert count(models.resnet18()) < count(models.resnet34())


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = models.build_model("resnet18", 10, 3).eval()
    path = str(tmp_path / "sub" / "ck.pt")
    models.save_checkpoint(path, model, "resnet18", 10, 3, {"lr": 0.1, "path": tmp_path}, 91.5, image_size=32)
    assert not [f for f in os.listdir(tmp_path / "sub") if f.startswith(".tmp")]  # temp file renamed away
    loaded, ckpt = models.load_checkpoint(path)
    assert ckpt["arch"] == "resnet18" and ckpt["acc"] == 91.5 and ckpt["image_size"] == 32
    assert ckpt["args"]["path"] == str(tmp_path)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))


def test_bad_checkpoint_gives_clear_error(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ValueError, match="not a dfkd-lab checkpoint"):
        models.load_checkpoint(str(junk))
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="missing keys"):
        models.load_checkpoint(str(other))
    with pytest.raises(FileNotFoundError):
        models.load_checkpoint(str(tmp_path / "absent.pt"))


#### data.py: readers on tiny files written here ####

def write_idx(path, array, compress=False):
    array = np.asarray(array, dtype=np.uint8)
    payload = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        with open(path, "wb") as f:
            f.write(payload)


def fake_idx_dataset(folder, n_train=5, n_test=3, compress=False):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), images, compress)
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), labels, compress)
        arrays[prefix] = (images, labels)
    return arrays


def test_idx_reader_matches_torchvision(tmp_path):
    import torchvision
    fake_idx_dataset(tmp_path / "FashionMNIST" / "raw")
    for split, train in (("train", True), ("test", False)):
        ours_x, ours_y = data.load_images("fashionmnist", split, str(tmp_path))
        ref = torchvision.datasets.FashionMNIST(str(tmp_path), train=train, download=False)
        assert ours_x.dtype == torch.uint8 and ours_x.shape == (len(ref.data), 1, 28, 28)
        assert torch.equal(ours_x[:, 0], ref.data) and torch.equal(ours_y, ref.targets)


def test_idx_reader_gz_and_debian_layout(tmp_path):
    arrays = fake_idx_dataset(tmp_path / "fashion-mnist", compress=True)
    x, y = data.load_images("fashionmnist", "test", str(tmp_path))
    assert torch.equal(x[:, 0], torch.from_numpy(arrays["t10k"][0]))
    assert y.tolist() == arrays["t10k"][1].tolist() and y.dtype == torch.int64
    xs, _ = data.load_dataset("fashionmnist", "train", str(tmp_path))
    assert xs.shape == (5, 1, 32, 32)  # resized to LeNet-5's input


def write_cifar10(folder, bytes_keys=False):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(1)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        flat = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 4).tolist()
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({key("data"): flat, key("labels"): labels}, f, protocol=2)
        batches[name] = (flat, labels)
    return batches


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar_pickle_reader(tmp_path, bytes_keys):
    batches = write_cifar10(tmp_path / "cifar-10-batches-py", bytes_keys)
    x, y = data.load_images("cifar10", "test", str(tmp_path))
    flat, labels = batches["test_batch"]
    # Documented layout: each row is 1024 R, then 1024 G, then 1024 B, each plane row-major.
    for n in range(4):
        for c in range(3):
            for row in (0, 5, 31):
                assert x[n, c, row].tolist() == flat[n, c * 1024 + row * 32: c * 1024 + row * 32 + 32].tolist()
    assert y.tolist() == labels
    x_train, y_train = data.load_images("cifar10", "train", str(tmp_path))
    assert x_train.shape == (20, 3, 32, 32) and y_train.shape == (20,)


def test_svhn_mat_reader(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(2)
    X = rng.integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)  # MATLAB (H, W, C, N)
    y = np.array([[10], [1], [2], [9], [10]], dtype=np.uint8)
    scipy_io.savemat(str(tmp_path / "test_32x32.mat"), {"X": X, "y": y}, do_compression=True)
    scipy_io.savemat(str(tmp_path / "train_32x32.mat"), {"y": y.astype(np.float64), "X": X}, do_compression=False)
    for split in ("test", "train"):
        images, labels = data.load_images("svhn", split, str(tmp_path))
        for n in range(5):
            assert torch.equal(images[n], torch.from_numpy(X[:, :, :, n]).permute(2, 0, 1))  # (C, H, W)
        assert labels.tolist() == [0, 1, 2, 9, 0]  # 10 means digit 0


def test_stl10_binary_reader(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 256, (2, 3, 96, 96), dtype=np.uint8)  # (N, C, H, W)
    imgs.transpose(0, 1, 3, 2).tofile(folder / "test_X.bin")    # on disk each channel is column-major
    np.array([1, 10], dtype=np.uint8).tofile(folder / "test_y.bin")
    x, y = data.load_images("stl10", "test", str(tmp_path))
    assert torch.equal(x, torch.from_numpy(imgs)) and y.tolist() == [0, 9]


def test_folder_and_imagenet32_readers(tmp_path):
    from torchvision.io import write_png
    imgs = {}
    for cls in ("b_cls", "a_cls"):
        os.makedirs(tmp_path / "folder" / cls)
        img = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
        write_png(img, str(tmp_path / "folder" / cls / "0.png"))
        imgs[cls] = img
    x, y = data.load_images(f"folder:{tmp_path / 'folder'}")
    assert y.tolist() == [0, 1] and torch.equal(x[0], imgs["a_cls"]) and torch.equal(x[1], imgs["b_cls"])

    folder = tmp_path / "Imagenet32_val_npz"
    folder.mkdir()
    flat = np.arange(2 * 3072).reshape(2, 3072).astype(np.uint8)
    np.savez(folder / "val_data.npz", data=flat, labels=np.array([1, 1000]))
    x, y = data.load_images("imagenet32", "test", str(tmp_path))
    assert y.tolist() == [0, 999] and x[1, 2, 0, 5].item() == flat[1, 2048 + 5]


@pytest.mark.parametrize("name,expected", [("fashionmnist", "--download"), ("cifar10", "cifar-10-batches-py"),
                                           ("tinyimagenet", "tiny-imagenet-200"), ("imagenet32", "Imagenet32_train_npz"),
                                           ("svhn", "train_32x32.mat")])
def test_missing_dataset_error_names_path_and_remedy(tmp_path, name, expected):
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.load_images(name, "train", str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path) in msg and expected in msg
    assert ("--download" in msg) == (name in data.DOWNLOADABLE)


def test_unknown_source_lists_valid_names():
    with pytest.raises(ValueError, match="valid sources"):
        data.load_images("imagenet1k", "train")


#### data.py: generated sources, conversion, mixtures ####

def test_to_shape_gray_rgb_resize():
    rgb = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    rgb[0, 0], rgb[0, 1], rgb[0, 2] = 100, 200, 50
    gray = data.to_shape(rgb, 1, 4)
    assert gray.shape == (1, 1, 4, 4) and gray[0, 0, 0, 0].item() == round(0.299 * 100 + 0.587 * 200 + 0.114 * 50)
    back = data.to_shape(gray, 3, 8)
    assert back.shape == (1, 3, 8, 8) and torch.equal(back[:, 0], back[:, 2])
    assert back.float().std() == 0  # a constant image stays constant under resizing


def test_noise_sources_statistics():
    u, labels = data.load_images("noise-uniform", n=2000, shape=(1, 8, 8))
    assert u.shape == (2000, 1, 8, 8) and (labels == -1).all()
    assert abs(u.float().mean().item() / 255 - 0.5) < 0.01 and u.min() == 0 and u.max() == 255
    g, _ = data.load_images("noise-gaussian", n=2000, shape=(1, 8, 8))
    assert abs(g.float().mean().item() / 255 - 0.5) < 0.01 and abs(g.float().std().item() / 255 - 0.1) < 0.01


def test_synthetic_and_shift_are_deterministic_and_balanced():
    x1, y1 = data.load_images("synthetic", "train", n=200)
    x2, y2 = data.load_images("synthetic", "train", n=200)
    xt, _ = data.load_images("synthetic", "test", n=200)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, xt)
    assert y1.bincount().tolist() == [20] * 10
    s1, sy = data.load_images("shifted:synthetic", "train", n=200)
    assert s1.shape == x1.shape and torch.equal(sy, y1) and (s1 != x1).float().mean() > 0.5


def test_load_source_mixture_counts_and_shapes():
    x, y, src = data.load_source("synthetic:30,noise-uniform:20", "train", "unused", channels=1, size=16)
    assert x.shape == (50, 1, 16, 16) and src.bincount().tolist() == [30, 20]
    assert (y[30:] == -1).all() and (y[:30] >= 0).all()
    assert data.parse_source("folder:/a/b:1") == ("folder:/a/b:1", None)
    assert data.parse_source("shifted:fashionmnist:300") == ("shifted:fashionmnist", 300)


#### data.py: device batches ####

def test_device_loader_normalisation_and_extra_tensors():
    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    labels = torch.arange(10)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    batches = list(data.DeviceLoader(images, labels, batch_size=4, shuffle=False, mean=mean, std=std))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    x, y = batches[1]
    assert x.dtype == torch.float32 and x.shape == (4, 3, 4, 4) and y.tolist() == [4, 5, 6, 7]
    expected = (images[4:8, 1].float() / 255 - 0.2) / 0.25
    assert torch.allclose(x[:, 1], expected, atol=1e-6)
    assert len(data.DeviceLoader(images, batch_size=4, drop_last=True)) == 2


def test_device_loader_seeded_shuffle_and_subset():
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1)
    order = lambda seed: torch.cat([b[1] for b in data.DeviceLoader(images, torch.arange(20), batch_size=6, seed=seed)])  # noqa: E731
    assert torch.equal(order(3), order(3)) and not torch.equal(order(3), order(4))
    assert sorted(order(3).tolist()) == list(range(20))
    subset = torch.tensor([2, 5, 7])
    seen = torch.cat([b[1] for b in data.DeviceLoader(images, torch.arange(20), batch_size=2, indices=subset)])
    assert sorted(seen.tolist()) == [2, 5, 7]


def test_augmentation_crop_and_flip_are_windows_of_the_input():
    torch.manual_seed(0)
    x = torch.randint(1, 256, (64, 2, 6, 5), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    out = data.augment_batch(x, crop_pad=2, flip=True, generator=g)
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):  # every output is some padded window, possibly mirrored
        windows = [padded[i, :, r:r + 6, c:c + 5] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
    flipped = data.augment_batch(x, 0, True, torch.Generator().manual_seed(1))
    n_flipped = sum(torch.equal(flipped[i], x[i].flip(-1)) for i in range(64))
    assert 16 < n_flipped < 48 and all(torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1)) for i in range(64))


#### teacher.py ####

def test_teacher_trains_on_synthetic_and_caches(synthetic_teacher):
    model, ckpt = models.load_checkpoint(synthetic_teacher)
    assert ckpt["arch"] == "lenet5" and ckpt["dataset"] == "synthetic" and ckpt["image_size"] == 32
    x, y = data.load_dataset("synthetic", "test")
    meta = data.DATASETS["synthetic"]
    acc = teacher.evaluate(model, x, y, meta["mean"], meta["std"])
    assert acc > 60  # chance is 10%
    assert abs(acc - ckpt["acc"]) < 1e-6  # the stored accuracy is the final test accuracy, recomputed here


def test_get_teacher_loads_cache_and_rejects_mismatch(synthetic_teacher, tmp_path):
    model, ckpt = teacher.get_teacher("synthetic", path=synthetic_teacher, device=torch.device("cpu"))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="classes"):
        teacher.get_teacher("fashionmnist", path=synthetic_teacher, device=torch.device("cpu"))


def test_run_log_files(tmp_path, capsys):
    log = teacher.RunLog("unit", {"lr": 0.1}, str(tmp_path))
    log.log_epoch(0, 2, {"loss": torch.tensor(0.5), "acc": 80.0}, num_images=100, seconds=0.5)
    res = log.finish("unit", "synthetic", {"student_acc": 81.25})
    lines = open(log.path("metrics.jsonl")).read().splitlines()
    assert json.loads(lines[0])["loss"] == 0.5 and json.loads(lines[0])["images_per_s"] == 200.0
    assert json.load(open(log.path("results.json")))["student_acc"] == 81.25 == res["student_acc"]
    assert json.load(open(log.path("config.json"))) == {"lr": 0.1}
    assert "RESULT method=unit dataset=synthetic" in capsys.readouterr().out
