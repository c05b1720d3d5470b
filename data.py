"""Offline image data: readers for the standard on-disk formats, sources built from them, and a
device-resident batch iterator with batched augmentation.

    # uint8 (N, C, H, W), int64 (N,)
    images, labels = load_images("cifar10", "train", root)
    # ... converted to the model's input format
    images, labels = load_dataset("fashionmnist", "test", root)
    web, web_labels, web_source = load_source(
        "svhn,noise-uniform:5000", "train", root, channels=1, size=32
    )
    for x, y in DeviceLoader(images, labels, batch_size=256, mean=..., std=..., device=device): ...

Reading never downloads; `download(name, root)` (the CLIs' `--download`) fetches what torchvision
can fetch into the same layout the readers expect. Labels are -1 for unlabelled sources. A source's
labels are its *own* classes (an SVHN digit, an ImageNet class), not the teacher's. Nothing here
knows about distillation.
"""

import gzip
import math
import os
import pickle
import struct
import zlib

import numpy as np
import torch
import torch.nn.functional as F

#### Metadata: one table for every dataset a teacher can be trained on ####
# train_size is |D_o|, the teacher's training-set size (the papers' rho and N are relative to it).
# channels/size are the *model input* format (MNIST-family images are resized 28 -> 32 for LeNet-5,
# as in DAFL/ZSKD); crop_pad/flip are the training augmentation of the teacher recipes.

FASHION_CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
SYNTHETIC_CLASSES = (
    "disk",
    "square",
    "ring",
    "plus",
    "x-cross",
    "triangle",
    "h-stripes",
    "v-stripes",
    "diamond",
    "two-dots",
)

DATASETS = {
    "mnist": dict(
        num_classes=10,
        train_size=60000,
        channels=1,
        size=32,
        mean=(0.1307,),
        std=(0.3081,),
        crop_pad=0,
        flip=False,
        classes=tuple(str(i) for i in range(10)),
        family="mnist",
    ),
    "fashionmnist": dict(
        num_classes=10,
        train_size=60000,
        channels=1,
        size=32,
        mean=(0.2860,),
        std=(0.3530,),
        crop_pad=0,
        flip=False,
        classes=FASHION_CLASSES,
        family="mnist",
    ),
    "kmnist": dict(
        num_classes=10,
        train_size=60000,
        channels=1,
        size=32,
        mean=(0.1918,),
        std=(0.3483,),
        crop_pad=0,
        flip=False,
        classes=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
        family="mnist",
    ),
    "cifar10": dict(
        num_classes=10,
        train_size=50000,
        channels=3,
        size=32,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        crop_pad=4,
        flip=True,
        classes=CIFAR10_CLASSES,
        family="cifar",
    ),
    "cifar100": dict(
        num_classes=100,
        train_size=50000,
        channels=3,
        size=32,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        crop_pad=4,
        flip=True,
        classes=None,
        family="cifar",
    ),
    "cinic10": dict(
        num_classes=10,
        train_size=90000,
        channels=3,
        size=32,
        mean=(0.4789, 0.4723, 0.4305),
        std=(0.2421, 0.2383, 0.2587),
        crop_pad=4,
        flip=True,
        classes=CIFAR10_CLASSES,
        family="cifar",
    ),
    "tinyimagenet": dict(
        num_classes=200,
        train_size=100000,
        channels=3,
        size=64,
        mean=(0.4802, 0.4481, 0.3975),
        std=(0.2770, 0.2691, 0.2821),
        crop_pad=8,
        flip=True,
        classes=None,
        family="cifar",
    ),
    "synthetic": dict(
        num_classes=10,
        train_size=5000,
        channels=3,
        size=32,
        mean=(0.45, 0.45, 0.45),
        std=(0.30, 0.30, 0.30),
        crop_pad=2,
        flip=True,
        classes=SYNTHETIC_CLASSES,
        family="synthetic",
    ),
}


# Named web / transfer mixtures, documented once here and usable wherever a source list is accepted.
# fashionmnist-web: a Fashion-MNIST-like "webly collected" set with a distribution shift: 30,000
# training images (disjoint from the teacher's test set) under `style_shift`, mixed with 10,000
# unrelated procedural shapes (grayscaled `synthetic`) and 10,000 uniform-noise images. 60%
# in-distribution content, all shifted.
# kmnist-web: the same recipe for KMNIST. Both are offline proxies of web data, not web data.
NAMED_MIXES = {
    "fashionmnist-web": "shifted:fashionmnist:30000,synthetic:10000,noise-uniform:10000",
    "kmnist-web": "shifted:kmnist:30000,synthetic:10000,noise-uniform:10000",
}

# Sources that can be read (teacher datasets above, plus web / transfer sources).
SOURCES = (
    sorted(
        list(DATASETS)
        + ["svhn", "stl10", "imagenet32", "imagenet64", "mnistm", "noise-uniform", "noise-gaussian"]
    )
    + ["folder:<path>", "shifted:<source>"]
    + list(NAMED_MIXES)
)

MNIST_FOLDERS = {"mnist": "MNIST", "fashionmnist": "FashionMNIST", "kmnist": "KMNIST"}
DOWNLOADABLE = ("mnist", "fashionmnist", "kmnist", "cifar10", "cifar100", "svhn", "stl10")
MANUAL_SOURCES = {
    "tinyimagenet": "http://cs231n.stanford.edu/tiny-imagenet-200.zip (unzip into the data root)",
    "cinic10": "https://github.com/BayesWatch/cinic-10 "
    "(CINIC-10.tar.gz, extract to <root>/CINIC-10)",
    "imagenet32": "https://image-net.org/download-images (Downsampled ImageNet 32x32, npz release)",
    "imagenet64": "https://image-net.org/download-images (Downsampled ImageNet 64x64, npz release)",
    "mnistm": "the DANN release mnist_m.tar.gz (extract to <root>/mnist_m)",
}


# Where the downloadable datasets come from when fetched by hand (what --download fetches, and the
# files the readers expect under <root>).
DOWNLOAD_SOURCES = {
    "mnist": (
        "http://yann.lecun.com/exdb/mnist/",
        "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
    ),
    "fashionmnist": (
        "https://github.com/zalandoresearch/fashion-mnist "
        "(or apt-get install dataset-fashion-mnist)",
        "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
    ),
    "kmnist": (
        "https://github.com/rois-codh/kmnist",
        "KMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
    ),
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/cifar.html (python version)",
        "cifar-10-batches-py/{data_batch_1..5,test_batch}",
    ),
    "cifar100": (
        "https://www.cs.toronto.edu/~kriz/cifar.html (python version)",
        "cifar-100-python/{train,test}",
    ),
    "svhn": ("http://ufldl.stanford.edu/housenumbers/ (format 2)", "{train,test}_32x32.mat"),
    "stl10": (
        "https://cs.stanford.edu/~acoates/stl10/ (binary)",
        "stl10_binary/{train,test,unlabeled}_X.bin, *_y.bin",
    ),
}

# Where `apt-get install dataset-fashion-mnist` puts the IDX files; read when <root> has none.
SYSTEM_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


class DatasetNotFoundError(FileNotFoundError):
    pass


def _missing(name, path, files):
    if name in DOWNLOADABLE:
        how = f"run with --download (or data.download({name!r}, root)) to fetch it"
        if name == "fashionmnist":
            how += (
                f", or `apt-get install dataset-fashion-mnist` (read from {SYSTEM_FASHION_MNIST})"
            )
    else:
        how = f"download it manually from {MANUAL_SOURCES.get(name, 'its official source')}"
    return DatasetNotFoundError(f"dataset {name!r} not found: expected {files} in {path}; {how}")


#### Readers (one per on-disk format) ####

REPLACE_FILE = "replace it with a complete copy (--download fetches the MNIST family again)"
REPLACE_DATA = "replace it with a complete copy of the dataset's release (docs/data.md says where)"


def read_idx(path):
    """IDX file (MNIST family), gzipped or not -> numpy array. Big-endian dims after a 4-byte magic.
    A damaged file (truncated, not gzip though named .gz, a wrong magic, shorter than its header
    says) is refused in one line that names it."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, OSError, zlib.error) as e:  # cut gzip, BadGzipFile (an OSError), bad deflate
        raise ValueError(
            f"{path} cannot be decompressed ({type(e).__name__}: {e}) — {REPLACE_FILE}"
        ) from None
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(raw) < 4:
        raise ValueError(f"{path} holds {len(raw)} bytes, not an IDX file — {REPLACE_FILE}")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code not in dtypes or ndim == 0:
        raise ValueError(
            f"{path} is not an IDX file (magic {raw[:4].hex()}; MNIST-family files "
            f"start 00000801 or 00000803) — {REPLACE_FILE}"
        )
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path} ends inside its IDX header — {REPLACE_FILE}")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    count = int(np.prod(dims))
    needed = 4 + 4 * ndim + count * np.dtype(dtypes[dtype_code]).itemsize
    if len(raw) < needed:
        raise ValueError(
            f"{path} is truncated: {len(raw)} bytes, its header promises {needed} "
            f"({'x'.join(map(str, dims))} values) — {REPLACE_FILE}"
        )
    return np.frombuffer(raw, dtype=dtypes[dtype_code], count=count, offset=4 + 4 * ndim).reshape(
        dims
    )


def _find_file(folder, stem):
    for candidate in (stem, stem + ".gz"):
        if os.path.isfile(os.path.join(folder, candidate)):
            return os.path.join(folder, candidate)
    return None


def _read_mnist_family(name, split, root):
    prefix = "train" if split == "train" else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    folders = [os.path.join(root, MNIST_FOLDERS[name], "raw")]
    if name == "fashionmnist":
        folders.append(os.path.join(root, "fashion-mnist"))  # Debian's dataset-fashion-mnist layout
        folders.append(
            SYSTEM_FASHION_MNIST
        )  # ... installed system-wide: found whatever --data-root says
    for folder in folders:
        paths = [_find_file(folder, s) for s in stems]
        if all(paths):
            if folder not in _ANNOUNCED:  # once per process, not once per split
                _ANNOUNCED.add(folder)
                system = " (the system install)" if folder == SYSTEM_FASHION_MNIST else ""
                print(f"reading {name} from {folder}{system}", flush=True)
            images, labels = read_idx(paths[0]), read_idx(paths[1])
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                shapes = ["x".join(map(str, a.shape)) for a in (images, labels)]
                raise ValueError(
                    f"{paths[0]} ({shapes[0]}) and {paths[1]} ({shapes[1]}) are not N "
                    f"images of HxW and their N labels — {REPLACE_FILE}"
                )
            return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(
                labels.astype(np.int64)
            )
    raise _missing(name, " or ".join(folders), [s + "[.gz]" for s in stems])


_ANNOUNCED = set()


def _unpickle(path, keys=("data",)):
    """A pickled batch dict (CIFAR, downsampled ImageNet) holding `keys`; damaged: one line."""
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")
    except Exception as e:  # truncated or not a pickle: EOFError, UnpicklingError, ValueError, ...
        raise ValueError(
            f"{path} cannot be unpickled ({type(e).__name__}) — {REPLACE_DATA}"
        ) from None
    d = {
        (k.decode() if isinstance(k, bytes) else k): v
        for k, v in (d.items() if isinstance(d, dict) else ())
    }
    if any(k not in d for k in keys):
        raise ValueError(f"{path} is not a batch file holding {', '.join(keys)} — {REPLACE_DATA}")
    return d


def _read_cifar(name, split, root):
    folder, files, label_key = {
        "cifar10": (
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"],
            "labels",
        ),
        "cifar100": (
            "cifar-100-python",
            ["train"] if split == "train" else ["test"],
            "fine_labels",
        ),
    }[name]
    path = os.path.join(root, folder)
    if not all(os.path.isfile(os.path.join(path, f)) for f in files):
        raise _missing(name, path, files)
    batches = [_unpickle(os.path.join(path, f), ("data", label_key)) for f in files]
    data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches]).reshape(
        -1, 3, 32, 32
    )  # R, G, B planes
    labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    return torch.from_numpy(data), torch.from_numpy(labels)


def read_mat_v5(path):
    """Numeric arrays of a MATLAB v5 file (compressed or not) -> {name: ndarray in
    MATLAB dim order}.

    Only what SVHN needs: numeric matrices, little- or big-endian, miCOMPRESSED elements
    decompressed with zlib.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 128:
        raise ValueError(f"{path} is too short to be a MAT file — {REPLACE_DATA}")
    endian = "<" if raw[126:128] == b"IM" else ">"
    mi_types = {
        1: "i1",
        2: "u1",
        3: "i2",
        4: "u2",
        5: "i4",
        6: "u4",
        7: "f4",
        9: "f8",
        12: "i8",
        13: "u8",
    }
    mx_classes = {
        6: "f8",
        7: "f4",
        8: "i1",
        9: "u1",
        10: "i2",
        11: "u2",
        12: "i4",
        13: "u4",
        14: "i8",
        15: "u8",
    }

    def tag(buf, pos):
        (first,) = struct.unpack(endian + "I", buf[pos : pos + 4])
        if (
            first >> 16
        ):  # small data element: type and size packed in 4 bytes, payload in the next 4
            return first & 0xFFFF, first >> 16, pos + 4, pos + 8
        dtype, nbytes = struct.unpack(endian + "II", buf[pos : pos + 8])
        return dtype, nbytes, pos + 8, pos + 8 + nbytes + (-nbytes % 8)

    def read_matrix(buf):
        pos, out = 0, {}
        _, _, pos, _ = tag(buf, pos)  # miMATRIX tag
        _, n, start, pos = tag(buf, pos)
        (flags,) = struct.unpack(endian + "I", buf[start : start + 4])
        dtype, n, start, pos = tag(buf, pos)
        dims = np.frombuffer(buf, endian + mi_types[dtype], n // 4, start).astype(np.int64)
        _, n, start, pos = tag(buf, pos)
        name = buf[start : start + n].decode("ascii")
        dtype, n, start, pos = tag(buf, pos)
        itemsize = np.dtype(mi_types[dtype]).itemsize
        values = np.frombuffer(buf, endian + mi_types[dtype], n // itemsize, start)
        values = values.astype(mx_classes.get(flags & 0xFF, values.dtype))
        out[name] = values.reshape(tuple(dims[::-1])).transpose(
            tuple(range(len(dims)))[::-1]
        )  # column-major
        return out

    arrays, pos = {}, 128
    try:
        while pos + 8 <= len(raw):
            dtype, nbytes = struct.unpack(endian + "II", raw[pos : pos + 8])
            element = raw[pos + 8 : pos + 8 + nbytes]
            if dtype == 15:  # miCOMPRESSED
                arrays.update(read_matrix(zlib.decompress(element)))
                pos += 8 + nbytes
            else:
                if dtype == 14:
                    arrays.update(read_matrix(raw[pos : pos + 8 + nbytes]))
                pos += 8 + nbytes + (-nbytes % 8)
    except (struct.error, zlib.error, ValueError, KeyError, IndexError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path} is damaged: its element at byte {pos} cannot be read "
            f"({type(e).__name__}) — {REPLACE_DATA}"
        ) from None
    return arrays


def _read_svhn(split, root):
    fname = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}[
        split
    ]
    path = os.path.join(root, fname)
    if not os.path.isfile(path):
        raise _missing("svhn", root, [fname])
    arrays = read_mat_v5(path)
    if "X" not in arrays or "y" not in arrays or arrays["X"].ndim != 4:
        raise ValueError(f"{path} does not hold SVHN's X (32x32x3xN) and y — {REPLACE_DATA}")
    images = np.ascontiguousarray(
        arrays["X"].transpose(3, 2, 0, 1)
    )  # MATLAB (H, W, C, N) -> (N, C, H, W)
    labels = arrays["y"].reshape(-1).astype(np.int64) % 10  # label 10 means digit 0
    return torch.from_numpy(images), torch.from_numpy(labels)


def _read_stl10(split, root):
    folder = os.path.join(root, "stl10_binary")
    x_file = {"train": "train_X.bin", "test": "test_X.bin", "unlabeled": "unlabeled_X.bin"}[split]
    y_file = None if split == "unlabeled" else x_file.replace("_X", "_y")
    needed = [x_file] + ([y_file] if y_file else [])
    if not all(os.path.isfile(os.path.join(folder, f)) for f in needed):
        raise _missing("stl10", folder, needed)
    raw = np.fromfile(os.path.join(folder, x_file), dtype=np.uint8)
    if len(raw) % (3 * 96 * 96):
        raise ValueError(
            f"{os.path.join(folder, x_file)} is truncated: {len(raw)} bytes is not a "
            f"whole number of 3x96x96 images — {REPLACE_DATA}"
        )
    images = raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
    if y_file:
        labels = (
            np.fromfile(os.path.join(folder, y_file), dtype=np.uint8).astype(np.int64) - 1
        )  # 1-based on disk
    else:
        labels = np.full(len(images), -1, dtype=np.int64)
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif")


def _decode(path, size):
    """One image file -> uint8 RGB (3, size, size) (its own size when `size` is None): every PIL
    mode converted (`_rgb`), the short side resized to `size` and the centre cropped
    (`_resize_crop`). Returns (image, the file's PIL mode). An unreadable file: one line."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            mode = img.mode
            img = ImageOps.exif_transpose(img)  # camera photos: the orientation a viewer shows
            rgb = _rgb(img)
        factor = min(rgb.shape[:2]) // (2 * size) if size else 0
        if factor > 1:  # a large photo: box-averaged by a whole factor first (memory), then resized
            rgb = np.array(Image.fromarray(rgb).reduce(factor))
    except Image.DecompressionBombError as e:
        raise ValueError(
            f"{path} is too large to decode safely ({str(e).split(',')[0]}; PIL's "
            f"decompression-bomb guard) — shrink that image or remove it"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ValueError(
            f"{path} is not a readable image ({type(e).__name__}: {str(e)[:80]}) — "
            f"remove or replace that file"
        ) from None
    img = torch.from_numpy(rgb).permute(2, 0, 1)  # (3, H, W)
    return (img if size is None else _resize_crop(img, size)), mode


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _rgb(img):
    """A PIL image of any mode -> uint8 (H, W, 3). 16-bit gray (I;16*, and I, which holds 16-bit
    PNG data) is scaled 0..65535 -> 0..255; float gray (F) is read as 0..255 and clipped; an alpha
    channel (RGBA, LA, PA, or a palette/gray/RGB transparency key) is composited over white, as a
    browser shows it; every other mode (1, L, P, RGB, CMYK, YCbCr, LAB, HSV, RGBX) goes through
    PIL's own convert("RGB")."""
    if img.mode in SIXTEEN_BIT_MODES + ("F",):
        values = np.asarray(img, dtype=np.float64)
        scale = 1.0 if img.mode == "F" else 257.0  # 65535 / 255
        gray = np.clip(np.round(values / scale), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if "A" in img.getbands() or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float64)
        alpha = rgba[:, :, 3:] / 255
        return np.round(rgba[:, :, :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _resize_crop(img, size):
    """uint8 (C, H, W) -> (C, size, size): the short side resized to `size` (antialiased bilinear,
    the long side in proportion), then the centre size x size cropped, as torchvision's
    Resize(size) + CenterCrop(size) do. No image is stretched; a small image is enlarged."""
    h, w = img.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        new_h, new_w = max(size, int(h * scale)), max(size, int(w * scale))
        x = F.interpolate(
            img[None].float(),
            size=(new_h, new_w),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        img = x[0, :, top : top + size, left : left + size].round().clamp(0, 255).to(torch.uint8)
    return img


def _read_folder(path, size=None):
    """ImageFolder layout (<path>/<class>/**/*.png): classes sorted by name, as torchvision does.
    Each image is brought to size x size on its own (`_decode`); with size None every image must
    already have one size."""
    if not os.path.isdir(path):
        raise DatasetNotFoundError(
            f"image folder {path} does not exist (expected <path>/<class>/<image>.png)"
        )
    classes = sorted(e.name for e in os.scandir(path) if e.is_dir())
    if not classes:
        raise DatasetNotFoundError(
            f"no class folders in {path} (expected <path>/<class>/<image>.png)"
        )
    # imported here, where it is used: torchvision takes a second to import
    from torchvision.datasets.folder import make_dataset

    class_index = {cls: label for label, cls in enumerate(classes)}
    samples = make_dataset(path, class_index, IMAGE_EXTENSIONS, allow_empty=True)  # ImageFolder's
    files, labels = [f for f, _ in samples], [y for _, y in samples]
    if not files:
        raise DatasetNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {path}")
    images, modes = [], {}
    for f in files:  # decoding happens once, at load time
        img, mode = _decode(f, size)
        if size is None and images and img.shape != images[0].shape:
            raise ValueError(
                f"{f} is {img.shape[2]}x{img.shape[1]}, {files[0]} is "
                f"{images[0].shape[2]}x{images[0].shape[1]} — read the folder as a "
                f"source (each image is resized to the teacher's input), or give "
                f"load_images a shape"
            )
        images.append(img)
        modes[mode] = modes.get(mode, 0) + 1
    if size is not None:
        counts = ", ".join(f"{m} {n}" for m, n in modes.items())
        print(
            f"folder {path}: {len(files)} images (PIL modes: {counts}), each resized to {size} "
            f"on its short side and centre-cropped to {size}x{size}",
            flush=True,
        )
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def _read_tinyimagenet(split, root):
    base = os.path.join(root, "tiny-imagenet-200")
    wnids_file = os.path.join(base, "wnids.txt")
    if not os.path.isfile(wnids_file):
        raise _missing(
            "tinyimagenet",
            base,
            ["wnids.txt", "train/<wnid>/images/*.JPEG", "val/val_annotations.txt"],
        )
    wnids = sorted(open(wnids_file).read().split())  # the class order of ImageFolder(train/)
    index = {w: i for i, w in enumerate(wnids)}
    if split == "train":  # train/<wnid>/images/*.JPEG, listed as ImageFolder(train/) lists it
        from torchvision.datasets.folder import make_dataset

        try:
            files = make_dataset(os.path.join(base, "train"), index, (".jpeg",))
        except FileNotFoundError as e:  # a class of wnids.txt with no train/<wnid>/images/*.JPEG
            raise DatasetNotFoundError(
                f"{os.path.join(base, 'train')}: {str(e)[:160]} — {REPLACE_DATA}"
            ) from None
    else:
        ann = os.path.join(base, "val", "val_annotations.txt")
        if not os.path.isfile(ann):
            raise _missing(
                "tinyimagenet", os.path.join(base, "val"), ["val_annotations.txt", "images/*.JPEG"]
            )
        rows = [line.split("\t") for line in open(ann).read().splitlines() if line.strip()]
        files = [(os.path.join(base, "val", "images", r[0]), index[r[1]]) for r in rows]
    images = torch.stack([_decode(f, 64)[0] for f, _ in files])
    return images, torch.tensor([y for _, y in files], dtype=torch.int64)


def _read_downsampled_imagenet(name, split, root):
    s = 32 if name == "imagenet32" else 64
    folder = os.path.join(root, f"Imagenet{s}_{'train' if split == 'train' else 'val'}_npz")
    stems = [f"train_data_batch_{i}" for i in range(1, 11)] if split == "train" else ["val_data"]
    found = [p for p in (os.path.join(folder, st + ".npz") for st in stems) if os.path.isfile(p)]
    found = found or [
        p for p in (os.path.join(folder, st) for st in stems) if os.path.isfile(p)
    ]  # pickle release
    if not found:
        raise _missing(name, folder, [st + ".npz" for st in stems])
    xs, ys = [], []
    for p in found:
        d = _load_npz(p) if p.endswith(".npz") else _unpickle(p, ("data", "labels"))
        xs.append(
            np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, s, s)
        )  # R, G, B planes, like CIFAR
        ys.append(np.asarray(d["labels"], dtype=np.int64) - 1)  # 1-based on disk
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _load_npz(path):
    try:
        d = dict(np.load(path))
    except Exception as e:  # a damaged zip: BadZipFile, EOFError, ValueError, OSError
        raise ValueError(
            f"{path} cannot be read as npz ({type(e).__name__}) — {REPLACE_DATA}"
        ) from None
    if "data" not in d or "labels" not in d:
        raise ValueError(f"{path} does not hold 'data' and 'labels' — {REPLACE_DATA}")
    return d


def _read_mnistm(split, root):
    base = os.path.join(root, "mnist_m")
    label_file = os.path.join(base, f"mnist_m_{split}_labels.txt")
    if not os.path.isfile(label_file):
        raise _missing("mnistm", base, [f"mnist_m_{split}_labels.txt", f"mnist_m_{split}/*.png"])
    rows = [line.split() for line in open(label_file).read().splitlines() if line.strip()]
    folder = os.path.join(base, f"mnist_m_{split}")
    images = torch.stack([_decode(os.path.join(folder, r[0]), 32)[0] for r in rows])
    return images, torch.tensor([int(r[1]) for r in rows], dtype=torch.int64)


#### Generated sources: procedural shapes (tests, offline demo) and noise ####


def make_synthetic(n, seed, size=32):
    """n RGB images of 10 procedurally drawn shape classes (see SYNTHETIC_CLASSES) with random
    position, scale and colours plus pixel noise. Balanced labels. A LeNet learns it to > 90% in
    seconds."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=g)]
    coords = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # (H, W)
    center = (torch.rand(n, 2, generator=g) - 0.5) * 0.6  # (N, 2)
    s = (0.45 + 0.3 * torch.rand(n, generator=g))[:, None, None]  # (N, 1, 1) scale
    dx, dy = xx - center[:, 0, None, None], yy - center[:, 1, None, None]  # (N, H, W)
    r = torch.sqrt(dx**2 + dy**2)
    u, v = (dx + dy) / math.sqrt(2), (dx - dy) / math.sqrt(2)
    box = torch.maximum(dx.abs(), dy.abs()) < s
    masks = torch.stack(
        [
            r < s,  # disk
            torch.maximum(dx.abs(), dy.abs()) < 0.8 * s,  # square
            (r - 0.75 * s).abs() < 0.18 * s,  # ring
            ((dx.abs() < 0.22 * s) & (dy.abs() < s))
            | ((dy.abs() < 0.22 * s) & (dx.abs() < s)),  # plus
            ((u.abs() < 0.22 * s) & (v.abs() < s))
            | ((v.abs() < 0.22 * s) & (u.abs() < s)),  # x-cross
            (dy < 0.6 * s) & (dy > 1.8 * dx.abs() - 0.9 * s),  # triangle
            box & (torch.sin(dy / s * 3 * math.pi) > 0),  # horizontal stripes
            box & (torch.sin(dx / s * 3 * math.pi) > 0),  # vertical stripes
            dx.abs() + dy.abs() < s,  # diamond
            (((dx - 0.5 * s) ** 2 + dy**2) < (0.3 * s) ** 2)
            | (((dx + 0.5 * s) ** 2 + dy**2) < (0.3 * s) ** 2),
        ],
        dim=1,
    )  # (N, 10, H, W)
    mask = masks[torch.arange(n), labels].float()[:, None]  # (N, 1, H, W)
    fg = 0.55 + 0.45 * torch.rand(n, 3, 1, 1, generator=g)
    bg = 0.40 * torch.rand(n, 3, 1, 1, generator=g)
    img = mask * fg + (1 - mask) * bg + 0.05 * torch.randn(n, 3, size, size, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), labels


def make_noise(kind, n, shape, seed):
    """Noise images as uint8: 'uniform' U[0, 1] per pixel, or 'gaussian' N(0.5, 0.1) clipped
    to [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        x = torch.rand((n,) + tuple(shape), generator=g)
    elif kind == "gaussian":
        x = (0.5 + 0.1 * torch.randn((n,) + tuple(shape), generator=g)).clamp(0, 1)
    else:
        raise ValueError(f"unknown noise kind {kind!r} (uniform, gaussian)")
    return (x * 255).round().to(torch.uint8)


def style_shift(images, seed):
    """A deterministic per-image style shift that keeps the content: each image gets one of
    inversion, low contrast + brightness offset, blur, a sinusoidal texture overlay, or (RGB) a
    channel permutation. Used by the `shifted:<source>` sources to build webly-collected-like data
    offline."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = images.shape
    choice = torch.randint(0, 5 if c == 3 else 4, (n,), generator=g)
    gain = 0.2 + 0.3 * torch.rand(n, 1, 1, 1, generator=g)
    offset = 0.4 * torch.rand(n, 1, 1, 1, generator=g)
    freq = 0.3 + 0.9 * torch.rand(n, 1, 1, 1, generator=g)
    angle = math.pi * torch.rand(n, 1, 1, 1, generator=g)
    channel_order = torch.randperm(c, generator=g)
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    kernel = torch.ones(c, 1, 3, 3) / 9

    def blur(x):
        return F.conv2d(F.conv2d(x, kernel, padding=1, groups=c), kernel, padding=1, groups=c)

    def texture(x, sel):
        wave = torch.sin(freq[sel] * (xx * torch.cos(angle[sel]) + yy * torch.sin(angle[sel])))
        return 0.6 * x + 0.4 * (0.5 + 0.5 * wave)

    shifts = [
        lambda x, sel: 1 - x,  # inversion
        lambda x, sel: gain[sel] * x + offset[sel],  # low contrast, brightness offset
        lambda x, sel: blur(x),  # blur
        texture,  # texture overlay
        lambda x, sel: x[:, channel_order],  # colour permutation (RGB only)
    ]
    out = torch.empty_like(images)
    for k, shift in enumerate(shifts):  # one batched op per kind of shift
        sel = (choice == k).nonzero().squeeze(1)
        if len(sel):
            out[sel] = (
                (shift(images[sel].float() / 255, sel).clamp(0, 1) * 255).round().to(torch.uint8)
            )
    return out


#### Public API ####


def load_images(name, split="train", root="data", n=None, shape=None, seed=0):
    """Read a source from disk (never downloads) -> (uint8 (N, C, H, W), int64 (N,) labels or -1).

    name: a key of DATASETS, "svhn", "stl10", "imagenet32", "imagenet64", "mnistm", "folder:<path>",
    "shifted:<name>" (the same images under `style_shift`), "noise-uniform"/"noise-gaussian" (n
    images of `shape`, default 10,000 of 3x32x32). split: "train" or "test" ("unlabeled" for stl10,
    "extra" for svhn).
    """
    if split not in ("train", "test", "unlabeled", "extra"):
        raise ValueError(
            f"unknown split {split!r} (train, test; stl10 also unlabeled, svhn also extra)"
        )
    split_seed = seed + (0 if split == "train" else 1_000_003)
    if name.startswith("shifted:"):
        images, labels = load_images(name[len("shifted:") :], split, root, n, shape, seed)
        return style_shift(images, split_seed + 17), labels
    if name.startswith("folder:"):
        return _read_folder(name[len("folder:") :], None if shape is None else shape[-1])
    if name in MNIST_FOLDERS:
        return _read_mnist_family(name, split, root)
    if name in ("cifar10", "cifar100"):
        return _read_cifar(name, split, root)
    if name == "svhn":
        return _read_svhn(split, root)
    if name == "stl10":
        return _read_stl10(split, root)
    if name == "tinyimagenet":
        return _read_tinyimagenet(split, root)
    if name == "cinic10":
        path = os.path.join(root, "CINIC-10", "train" if split == "train" else "test")
        if not os.path.isdir(path):
            raise _missing(
                "cinic10",
                os.path.join(root, "CINIC-10"),
                ["train/<class>/*.png", "test/<class>/*.png"],
            )
        return _read_folder(path, 32)
    if name in ("imagenet32", "imagenet64"):
        return _read_downsampled_imagenet(name, split, root)
    if name == "mnistm":
        return _read_mnistm(split, root)
    if name == "synthetic":
        return make_synthetic(n or (5000 if split == "train" else 1000), split_seed)
    if name in ("noise-uniform", "noise-gaussian"):
        images = make_noise(name.split("-")[1], n or 10000, shape or (3, 32, 32), split_seed)
        return images, torch.full((len(images),), -1, dtype=torch.int64)
    raise ValueError(f"unknown source {name!r}; valid sources: {', '.join(SOURCES)}")


def _resize(images, size, chunk=4096):
    out = []
    for i in range(0, len(images), chunk):
        x = images[i : i + chunk].float()
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        out.append(x.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out) if out else images.new_zeros((0, images.shape[1], size, size))


def to_shape(images, channels, size):
    """Convert uint8 images to (N, channels, size, size): RGB -> gray by ITU-R 601 luma (as KD3
    grayscales SVHN for an MNIST teacher), gray -> RGB by repetition, bilinear (antialiased)
    resize."""
    if images.shape[1] == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        images = (
            (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        )
    elif images.shape[1] == 1 and channels == 3:
        images = images.repeat(1, 3, 1, 1)
    elif images.shape[1] != channels:
        raise ValueError(f"cannot convert {images.shape[1]} channels to {channels}")
    if images.shape[-1] != size or images.shape[-2] != size:
        images = _resize(images, size)
    return images.contiguous()


def load_dataset(name, split, root="data"):
    """A teacher dataset in its model-input format (DATASETS[name] channels and size)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(sorted(DATASETS))}")
    images, labels = load_images(name, split, root)
    meta = DATASETS[name]
    return to_shape(images, meta["channels"], meta["size"]), labels


def parse_source(spec):
    """'svhn' -> ('svhn', None); 'noise-uniform:5000' -> ('noise-uniform', 5000). folder:/shifted:
    keep their colon."""
    head, _, tail = spec.rpartition(":")
    if head and tail.isdigit() and not spec.startswith("folder:"):
        if int(tail) == 0:
            raise ValueError(
                f"source {spec!r} asks for 0 images — drop it from the list or give a count >= 1"
            )
        return head, int(tail)
    return spec, None


def load_source(spec, split, root, channels, size, seed=0):
    """A comma-separated list of sources ('svhn,noise-uniform:5000'), each converted to
    (channels, size) and concatenated; a source that needed converting is named in one printed
    line with its original shape. An ':N' suffix takes N images (a seeded random subset for
    datasets; N draws for noise).
    Returns (images uint8 (N, C, H, W), labels int64 (N,) in each source's own classes,
    source_index (N,))."""
    spec = ",".join(NAMED_MIXES.get(s.strip(), s.strip()) for s in spec.split(","))
    all_images, all_labels, all_index = [], [], []
    for i, part in enumerate(s.strip() for s in spec.split(",") if s.strip()):
        name, count = parse_source(part)
        images, labels = load_images(
            name, split, root, n=count, shape=(channels, size, size), seed=seed + i
        )
        if count is not None and count < len(images):
            keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + i))[
                :count
            ]
            images, labels = images[keep], labels[keep]
        if tuple(images.shape[1:]) != (channels, size, size):
            print(
                f"source {part}: converted {'x'.join(map(str, images.shape[1:]))} images to "
                f"{channels}x{size}x{size}",
                flush=True,
            )
        all_images.append(to_shape(images, channels, size))
        all_labels.append(labels)
        all_index.append(torch.full((len(images),), i, dtype=torch.int64))
    if not all_images:
        raise ValueError(f"empty source list {spec!r}")
    return torch.cat(all_images), torch.cat(all_labels), torch.cat(all_index)


def download(name, root):
    """Fetch a dataset with torchvision's downloaders into the layout the readers above expect. A
    failed download (no network, say) removes the folders it created and names where the files can
    be fetched by hand."""
    name = name.split(":")[0]
    if name not in DOWNLOADABLE:
        raise ValueError(
            f"{name!r} cannot be downloaded automatically — get it from "
            f"{MANUAL_SOURCES.get(name, 'its source')}"
        )
    existing = set()
    for folder, _, _ in os.walk(root):
        existing.add(os.path.abspath(folder))
    try:
        _fetch(name, root)
    except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError
        for folder, _, _ in sorted(os.walk(root, topdown=False), reverse=True):
            if os.path.abspath(folder) not in existing and not os.listdir(folder):
                os.rmdir(folder)
        url, files = DOWNLOAD_SOURCES[name]
        reason = str(getattr(e, "reason", e)).splitlines()[0][:120]
        raise ValueError(
            f"--download of {name} failed ({reason}) — fetch the files by hand from {url} and put "
            f"{files} under {root}"
        ) from None


def _fetch(name, root):
    import torchvision.datasets as tvd

    if name in MNIST_FOLDERS:
        cls = {"mnist": tvd.MNIST, "fashionmnist": tvd.FashionMNIST, "kmnist": tvd.KMNIST}[name]
        for train in (True, False):
            cls(root, train=train, download=True)
    elif name in ("cifar10", "cifar100"):
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        for train in (True, False):
            cls(root, train=train, download=True)
    elif name == "svhn":
        for split in ("train", "test"):
            tvd.SVHN(root, split=split, download=True)
    elif name == "stl10":
        tvd.STL10(root, split="train", download=True)


#### Device-resident batches with batched augmentation ####


def augment_batch(x, crop_pad=0, flip=False, generator=None):
    """Random crop with zero padding and random horizontal flip, for a whole batch (B, C, H, W) at
    once."""
    b, _, h, w = x.shape
    if crop_pad > 0:
        padded = F.pad(x, (crop_pad,) * 4)
        off = torch.randint(0, 2 * crop_pad + 1, (2, b), device=x.device, generator=generator)
        rows = (off[0, :, None] + torch.arange(h, device=x.device))[
            :, None, :, None
        ]  # (B, 1, H, 1)
        cols = (off[1, :, None] + torch.arange(w, device=x.device))[
            :, None, None, :
        ]  # (B, 1, 1, W)
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chan, rows, cols]
    if flip:
        do_flip = torch.rand(b, device=x.device, generator=generator) < 0.5
        x = torch.where(do_flip[:, None, None, None], x.flip(3), x)
    return x


def normalize(x_uint8, mean, std):
    """uint8 (B, C, H, W) -> float (x / 255 - mean) / std."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=x_uint8.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=x_uint8.device).view(1, -1, 1, 1)
    return (x_uint8.float() / 255 - mean) / std


class DeviceLoader:
    """Batches from uint8 images kept on `device`; gather, augment and normalise happen on
    the device.

    DeviceLoader(images, labels, probs, batch_size=256, ...) yields (x, labels_batch, probs_batch):
    any extra tensors aligned with `images` are gathered with the same indices. `indices` restricts
    to a subset. Shuffling and augmentation are seeded; each pass over the loader draws a new order.

    Sharding (rank, world_size; for multi-process training): every rank draws the same seeded order
    and takes every world_size-th sample from position `rank`, in batches of
    batch_size // world_size, so step i of the ranks together covers the single-process batch i.
    Without drop_last the order is first padded by repeating its head to a multiple of world_size
    (as torch's DistributedSampler does), so every rank has as many batches of the same sizes. Each
    rank augments with its own stream; rank 0's is the single-process one.
    """

    def __init__(
        self,
        images,
        *tensors,
        batch_size=256,
        shuffle=True,
        drop_last=False,
        crop_pad=0,
        flip=False,
        mean=(0.5,),
        std=(0.5,),
        device="cpu",
        seed=0,
        indices=None,
        rank=0,
        world_size=1,
    ):
        if batch_size % world_size:
            raise ValueError(
                f"batch size {batch_size} is not divisible by the {world_size} processes"
            )
        device = torch.device(device)
        self.images = images.to(device)
        self.tensors = [t.to(device) for t in tensors]
        self.indices = None if indices is None else indices.to(device)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.rank, self.world_size, self.local_batch_size = (
            rank,
            world_size,
            batch_size // world_size,
        )
        self.crop_pad, self.flip = crop_pad, flip
        self.device = device
        # on the device once: a host-to-device copy per batch would stall the GPU queue
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=device)
        self.order_gen = torch.Generator().manual_seed(seed)
        self.aug_gen = torch.Generator(device=device).manual_seed(seed + 1 + 1_000_003 * rank)
        self.channels_last = device.type == "cuda"

    def generators(self):
        """Its random generators (shuffling order, augmentation), for saving and restoring a run's
        state."""
        return {"order": self.order_gen, "aug": self.aug_gen}

    @property
    def num_samples(self):
        return len(self.images) if self.indices is None else len(self.indices)

    def __len__(self):
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        n = self.num_samples
        order = torch.randperm(n, generator=self.order_gen) if self.shuffle else torch.arange(n)
        if self.world_size > 1:
            if not self.drop_last and n:
                order = order[torch.arange(math.ceil(n / self.world_size) * self.world_size) % n]
            order = order[self.rank :: self.world_size]
        order = order.to(self.device)
        if self.indices is not None:
            order = self.indices[order]
        b = self.local_batch_size
        for i in range(len(self)):
            idx = order[i * b : (i + 1) * b]
            x = self.images[idx]
            if self.crop_pad or self.flip:
                x = augment_batch(x, self.crop_pad, self.flip, self.aug_gen)
            x = normalize(x, self.mean, self.std)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield (x, *(t[idx] for t in self.tensors))
