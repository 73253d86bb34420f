"""The experiment's images, held in memory: Fashion-MNIST's idx files or an ImageFolder read as the trainer reads
one; the subsets of a ratio, the augmentation and the batches of a seed."""

from __future__ import annotations

import gzip
import math
import os

import torch
import torch.nn.functional as F

from ...train.data import LinkSafeImageFolder, image_folder_classes, load_image
from ...train.errors import TrainError
from .options import VALIDATION_SEED

FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MISSING_DATA = (
    "install Debian's package (apt-get install dataset-fashion-mnist), or give --fashion-mnist DIR "
    "(its 4 idx files, gzipped or not) or --data-path ROOT (an ImageFolder with train/ and val/)"
)
SPLITS = ("train", "val")  # an ImageFolder's: val/ is the test split
EVAL_BATCH = 500  # test images per forward when scoring


class Images:
    """A training and a test split held in memory: uint8 N x C x H x W images, int64 labels; `hold_out` then
    sets the validation images apart from the pool that the subsets are drawn from."""

    def __init__(self, train_x, train_y, test_x, test_y, name):
        self.train_x, self.train_y, self.test_x, self.test_y, self.name = train_x, train_y, test_x, test_y, name
        pixels = train_x.float().div_(255)
        self.mean = pixels.mean(dim=(0, 2, 3), keepdim=True)
        self.std = pixels.std(dim=(0, 2, 3), keepdim=True).clamp_min(1 / 255)  # a constant channel: no division by 0
        self.classes = int(train_y.max()) + 1
        self.validation, self.pool = torch.zeros(0, dtype=torch.long), torch.arange(len(train_y))

    def hold_out(self, per_class: int, seed: int) -> None:
        """Set `per_class` training images of every class apart for validation, drawn by `seed`; the rest is the
        pool of the subsets."""
        generator = torch.Generator().manual_seed(seed)
        validation, pool = [], []
        for label in self.train_y.unique(sorted=True).tolist():
            members = (self.train_y == label).nonzero().flatten()
            if len(members) <= per_class:
                raise TrainError(
                    f"--validation-per-class {per_class} leaves no training image of class {label} "
                    f"({len(members)} images): lower it"
                )
            members = members[torch.randperm(len(members), generator=generator)]
            validation.append(members[:per_class])
            pool.append(members[per_class:])
        self.validation, self.pool = torch.cat(validation).sort().values, torch.cat(pool).sort().values

    def scored(self, count: int) -> int:
        """How many test images a run is scored on: the first `count` (0: all)."""
        return min(count or len(self.test_y), len(self.test_y))

    def normalise(self, images_01: torch.Tensor) -> torch.Tensor:
        return (images_01 - self.mean) / self.std

    def test_batches(self, count: int):
        """(normalised images, labels) of the first `count` test images (0: all), EVAL_BATCH at a time."""
        images, labels = (self.test_x, self.test_y) if not count else (self.test_x[:count], self.test_y[:count])
        return self.scored_batches(images, labels)

    def validation_batches(self):
        return self.scored_batches(self.train_x[self.validation], self.train_y[self.validation])

    def scored_batches(self, images: torch.Tensor, labels: torch.Tensor):
        for start in range(0, len(labels), EVAL_BATCH):
            yield (
                self.normalise(images[start : start + EVAL_BATCH].float().div_(255)),
                labels[start : start + EVAL_BATCH],
            )


def read_idx(folder: str, name: str) -> torch.Tensor:
    """One idx file (name or name.gz in folder): uint8 images N x 28 x 28 or labels N."""
    for path in (os.path.join(folder, name), os.path.join(folder, name + ".gz")):
        if os.path.isfile(path):
            break
    else:
        raise TrainError(f"Fashion-MNIST not found: no {name}[.gz] in {folder!r}: {MISSING_DATA}")
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as error:
        raise TrainError(f"cannot read {path!r}: {error}") from None
    # idx: two zero bytes, the type (0x08: unsigned byte), the number of dimensions, then each size (4 bytes, big end)
    dims = raw[3] if len(raw) >= 4 and raw[:3] == b"\x00\x00\x08" else 0
    sizes = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    expected_dims = 3 if "images" in name else 1
    what = "images" if expected_dims == 3 else "labels"
    if dims != expected_dims or len(raw) != 4 + 4 * dims + math.prod(sizes):
        raise TrainError(f"{path!r} is not an idx file of {what}")
    if math.prod(sizes) == 0:
        raise TrainError(f"{path!r} holds no {what}")
    return torch.frombuffer(bytearray(raw[4 + 4 * dims :]), dtype=torch.uint8).reshape(sizes)


def fashion_mnist(folder: str) -> Images:
    splits = {}
    for split, (images_name, labels_name) in FASHION_FILES.items():
        images, labels = read_idx(folder, images_name), read_idx(folder, labels_name).long()
        if len(images) != len(labels):
            raise TrainError(f"{folder!r}: {len(images)} {split} images but {len(labels)} labels")
        splits[split] = (images[:, None], labels)
    return Images(*splits["train"], *splits["test"], name=f"Fashion-MNIST ({folder})")


def image_folder(root: str, size: int) -> Images:
    """An ImageFolder's train/ and val/ (the test split), resized and centre-cropped to `size`, in memory.

    The trainer's validation, scan and loader: the same class folders in both splits, a link loop or an image reached
    twice refused, 16-bit images scaled.
    """
    from torchvision.transforms import v2

    image_folder_classes(root)  # for its refusals: a root that is not the DeiT/ConViT layout
    transform = v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    splits = [
        LinkSafeImageFolder(os.path.join(root, split), transform=transform, loader=load_image) for split in SPLITS
    ]
    tensors = []
    for folder in splits:  # both scanned before any image is read
        tensors += [torch.stack([image for image, _ in folder]), torch.as_tensor(folder.targets)]
    return Images(*tensors, name=f"ImageFolder {root}")


def load_data(args) -> Images:
    """The experiment's images, the validation split set apart."""
    if args.data_path is not None:
        data = image_folder(args.data_path, args.input_size or 32)
    else:
        data = fashion_mnist(args.fashion_mnist)
        if args.input_size not in (None, 28):
            data.train_x, data.test_x = (resize(x, args.input_size) for x in (data.train_x, data.test_x))
    data.hold_out(args.validation_per_class, VALIDATION_SEED)
    return data


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    scaled = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return scaled.round_().clamp_(0, 255).to(torch.uint8)


def subset(labels: torch.Tensor, ratio: float, seed: int, pool: torch.Tensor) -> torch.Tensor:
    """Indices of round(n x ratio) of the n images of every class in `pool` (at least one), drawn by the seed,
    sorted."""
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for label in labels.unique(sorted=True).tolist():
        members = pool[labels[pool] == label]
        count = max(1, round(len(members) * ratio))
        keep.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(keep).sort().values


def augment(images_01: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random affine (rotation up to 10 degrees, scale 0.9 to 1.1, shift up to 10%) and a horizontal flip with
    probability 1/2, on [0, 1] images, the border filled with 0: the background of Fashion-MNIST."""
    n = len(images_01)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(10)
    scale = 0.9 + 0.2 * torch.rand(n, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * 0.2  # affine_grid's units: half the image side
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(images_01.shape), align_corners=False)
    return F.grid_sample(images_01, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def batches(indices: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Endless batches of `indices`: reshuffled every pass, the last partial batch of a pass dropped (a pass
    smaller than one batch is drawn with repeats instead)."""
    while True:
        order = indices[torch.randperm(len(indices), generator=generator)]
        if len(order) < batch_size:
            yield indices[torch.randint(len(indices), (batch_size,), generator=generator)]
            continue
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def training_batches(data: Images, indices: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Endless (augmented and normalised images, labels) of the training images at `indices`; `generator` draws
    the batches and their augmentation, so that every model of a seed sees the same."""
    for batch in batches(indices, batch_size, generator):
        yield data.normalise(augment(data.train_x[batch].float().div_(255), generator)), data.train_y[batch]
