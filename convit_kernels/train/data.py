"""Datasets, transforms and samplers: an ImageFolder tree (train/ and val/) or the embedded digits.

The ImageFolder path follows the DeiT/ConViT code: timm's ``create_transform``
(RandAugment, random erasing) for training, resize + centre crop for
evaluation. Without a data folder, scikit-learn's 8x8 digits (shipped inside
scikit-learn, so no download) stand in, upscaled to the input size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import datasets
from torchvision.transforms import v2

from .errors import TrainError, UnreadableImage

# Digits: 1797 images; a fixed, stratified fifth is the validation split.
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int
    name: str


# ---------------------------------------------------------------------------------------------- digits


class TensorImages(Dataset):
    """Images held as one C x H x W float tensor each, with a per-sample transform (tensor in, tensor out)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, transform=None):
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


def digits(input_size: int, augment: bool) -> DataBundle:
    """scikit-learn's 8x8 digits, upscaled once to input_size (bilinear), normalised; light affine augmentation.

    The ImageNet recipe (RandAugment, random erasing, Mixup/CutMix, flips) is too
    strong for 8x8 digits: a flipped or erased digit is another digit or none, and
    the model does not learn in a few minutes with it. A small random affine
    (rotation, shift, scale) is what helps on this data.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    images = torch.from_numpy(raw.images).float().div_(16.0)[:, None]  # N x 1 x 8 x 8 in [0, 1]
    images = F.interpolate(images, size=(input_size, input_size), mode="bilinear", align_corners=False)
    images = (images - images.mean()) / images.std()
    targets = torch.from_numpy(raw.target).long()
    train_idx, val_idx = train_test_split(
        range(len(targets)), test_size=DIGITS_VAL_FRACTION, stratify=raw.target, random_state=DIGITS_SPLIT_SEED
    )
    train_tf = v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)) if augment else None
    train = TensorImages(images[train_idx], targets[train_idx], train_tf)
    val = TensorImages(images[val_idx], targets[val_idx])
    return DataBundle(train, val, num_classes=10, in_chans=1, name="digits (sklearn, 8x8 upscaled)")


# ---------------------------------------------------------------------------------------------- folders


def _split_classes(root: str, split: str) -> list:
    """Class names of root/split (class folders may be links)."""
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise TrainError(f"data folder {root!r} has no {split}/ folder (expected {root}/{split}/<class>/<image>)")
    classes = sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
    if not classes:
        raise TrainError(f"{path!r} has no class folders (expected {path}/<class>/<image>)")
    return classes


def _image_folders(top: str, folders: dict):
    """(folder, its image names) for `top` and every folder below it, links followed, in any order.

    `folders`: the real path of every folder met so far in this split, to the path it was met by. Refused: a link
    back up its own folder, a loop (ImageFolder walks it 40 levels deep), and a folder met a second time (its
    images, two labels); either would inflate the count.
    """
    pending = [top]
    while pending:
        folder = pending.pop()
        real = os.path.realpath(folder)
        if real in folders:
            raise TrainError(f"data folder {folders[real]!r} is reached twice, also as {folder!r} (a link)")
        folders[real] = folder
        try:
            entries = list(os.scandir(folder))
        except OSError as error:
            raise TrainError(f"cannot list data folder {folder!r}: {error.strerror}") from None
        images = []
        for entry in entries:
            if entry.is_dir():
                if entry.is_symlink() and (real + os.sep).startswith(os.path.realpath(entry.path) + os.sep):
                    raise TrainError(f"data folder link {entry.path!r} is a loop: it leads back up its own folder")
                pending.append(entry.path)
            elif datasets.folder.has_file_allowed_extension(entry.name, datasets.folder.IMG_EXTENSIONS):
                images.append(entry.name)
        yield folder, images


def list_images(split_path: str, classes: list) -> list:
    """(path, class index) of every image under split_path/<class>/, links followed; a file reached twice refused.

    ImageFolder's order (folders sorted by path, names sorted within one), which --sampling-ratio keeps the
    first images of. A file reached twice by a symbolic link or a hard link (one image, two labels) is refused.
    """
    samples, folders, files_seen = [], {}, {}
    for index, name in enumerate(classes):
        top = os.path.join(split_path, name)
        found = sorted(_image_folders(top, folders))
        if not any(images for _, images in found):
            extensions = ", ".join(datasets.folder.IMG_EXTENSIONS)
            raise TrainError(f"class folder {top!r} has no images (extensions {extensions})")
        for folder, images in found:
            for image in sorted(images):
                path = os.path.join(folder, image)
                _count_once(path, files_seen)
                samples.append((path, index))
    return samples


def _count_once(path: str, files_seen: dict) -> None:
    """Refuse a file met a second time: its (device, inode) pair is that of one already listed."""
    try:
        status = os.stat(path)
    except OSError as error:
        raise TrainError(f"cannot read image {path!r}: {error.strerror}") from None
    key = (status.st_dev, status.st_ino)
    if key in files_seen:
        how = "a link" if os.path.islink(path) or os.path.islink(files_seen[key]) else "a hard link"
        raise TrainError(f"image {files_seen[key]!r} is reached twice, also as {path!r} ({how})")
    files_seen[key] = path


class LinkSafeImageFolder(datasets.ImageFolder):
    """ImageFolder whose file list is list_images': one line for a link loop or a file reached twice."""

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False) -> list:
        return list_images(str(directory), sorted(class_to_idx, key=class_to_idx.get))


def load_image(path: str):
    """An image file as 8-bit RGB; 16-bit images scaled to 8 bits (Pillow's RGB conversion clips them to white)."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()
    except Exception as error:  # PIL raises several types for a bad file; all mean the same to the user
        raise UnreadableImage(f"cannot read image {path!r}: {error}") from None
    if image.mode.startswith("I;16"):  # 16-bit grey: its 8 high bits
        pixels = np.asarray(image).astype(np.uint16) >> 8
        image = Image.fromarray(pixels.astype(np.uint8), mode="L")
    elif image.mode in ("I", "F"):  # 32-bit integer or float grey: no range to scale by that holds for every file
        raise UnreadableImage(
            f"cannot read image {path!r}: its pixels are 32-bit ({image.mode} mode), of no known range: "
            "save it with 8 or 16 bits"
        )
    return image.convert("RGB")


def train_transform(input_size: int, recipe):
    """DeiT/ConViT's training transform through timm: random resized crop, flip, RandAugment, erasing."""
    from timm.data import create_transform

    transform = create_transform(
        input_size,
        is_training=True,
        no_aug=not recipe.augment,
        color_jitter=recipe.color_jitter,
        auto_augment=recipe.auto_augment or None,
        interpolation="bicubic",
        re_prob=recipe.reprob,
        re_mode="pixel",
        re_count=1,
    )
    for op in _augment_ops(transform):
        if "Posterize" in op.name:
            op.aug_fn = posterize_any_bits
    return transform


def _augment_ops(transform) -> list:
    """timm's AugmentOps inside a training transform: those of its RandAugment, AutoAugment or AugMix."""
    ops = []
    for t in getattr(transform, "transforms", [transform]):
        ops += getattr(t, "ops", [])
        ops += [op for sub_policy in getattr(t, "policy", []) for op in sub_policy]
    return ops


def posterize_any_bits(image, bits_to_keep: int, **_):
    """timm's posterize, 0 bits included, on every Pillow.

    The recipe's rand-m9-mstd0.5-inc1 draws magnitudes up to 10, where its increasing posterize keeps 0 bits:
    Pillow 12 returns an image of zeros, Pillow 13 refuses (mid-epoch). Here both give Pillow 12's image.
    """
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


def validate_augmentation(recipe) -> None:
    """Before any work: --auto-augment is a policy timm can parse (it raises mid-setup otherwise)."""
    if not (recipe.augment and recipe.auto_augment):
        return
    try:
        train_transform(32, recipe)
    except Exception as error:  # timm's parser raises assertion and key errors on a malformed spec
        raise TrainError(
            f"--auto-augment {recipe.auto_augment!r} is not a timm policy: {type(error).__name__}: {error}"
        ) from None


def image_folder_classes(root: str) -> list:
    """The class names of the DeiT/ConViT layout, root/train/<class>/* and root/val/<class>/* with the same class
    folders; TrainError where `root` is not one."""
    if not os.path.isdir(root):
        problem = "is not a folder" if os.path.exists(root) else "does not exist"
        raise TrainError(f"--data-path {root!r} {problem}")
    train_classes = _split_classes(root, "train")
    val_classes = _split_classes(root, "val")
    if val_classes != train_classes:
        missing = sorted(set(train_classes) ^ set(val_classes))
        raise TrainError(f"train/ and val/ in {root!r} have different class folders: {', '.join(missing[:5])}")
    return train_classes


def image_folder(root: str, input_size: int, recipe) -> DataBundle:
    """The DeiT/ConViT layout (image_folder_classes), with the recipe's training and evaluation transforms."""
    from timm.data import create_transform

    train_classes = image_folder_classes(root)
    train_tf = train_transform(input_size, recipe)
    val_tf = create_transform(input_size, is_training=False, interpolation="bicubic", crop_pct=0.875)
    train = LinkSafeImageFolder(os.path.join(root, "train"), transform=train_tf, loader=load_image)
    val = LinkSafeImageFolder(os.path.join(root, "val"), transform=val_tf, loader=load_image)
    return DataBundle(train, val, num_classes=len(train_classes), in_chans=3, name=f"ImageFolder {root}")


# ---------------------------------------------------------------------------------------------- common


def targets_of(dataset: Dataset) -> torch.Tensor:
    return torch.as_tensor(dataset.targets)


def subsample_per_class(dataset: Dataset, ratio: float) -> Dataset:
    """The first int(n x ratio) images of every class of n, in the dataset's order: the paper's subsets.

    ConViT's datasets.py takes them in sorted file order, which is ImageFolder's order within a class. (It
    counts n as the entries of the class folder, images or not; here n counts the images.)
    """
    if not 0.0 < ratio <= 1.0:
        raise TrainError(f"--sampling-ratio must be in (0, 1], got {ratio}")
    if ratio == 1.0:
        return dataset
    targets = targets_of(dataset)
    keep = []
    for label in targets.unique(sorted=True).tolist():
        members = (targets == label).nonzero().flatten()
        count = int(len(members) * ratio)
        if count == 0:
            raise TrainError(f"--sampling-ratio {ratio} keeps no image of class {label} ({len(members)} images)")
        keep.append(members[:count])
    return Subset(dataset, torch.cat(keep).sort().values.tolist())


def build_data(config) -> DataBundle:
    if config.data_path is None:
        bundle = digits(config.input_size, augment=config.augment)
    else:
        bundle = image_folder(config.data_path, config.input_size, config)
    bundle.train = subsample_per_class(bundle.train, config.sampling_ratio)
    return bundle


def build_loaders(bundle: DataBundle, config, rank: int, world_size: int, pin_memory: bool):
    """Train loader (distributed or repeated-augmentation sampler, seeded by epoch) and this rank's val shard."""
    if config.repeated_aug:
        from timm.data.distributed_sampler import RepeatAugSampler

        sampler = RepeatAugSampler(bundle.train, num_replicas=world_size, rank=rank, shuffle=True)
    else:
        # Also with one process: the order then depends only on (seed, epoch), which makes resume exact.
        sampler = DistributedSampler(bundle.train, num_replicas=world_size, rank=rank, shuffle=True, seed=config.seed)
    common = dict(num_workers=config.workers, pin_memory=pin_memory, persistent_workers=False)
    train = DataLoader(bundle.train, batch_size=config.batch_size, sampler=sampler, drop_last=True, **common)
    if len(train) == 0:
        hint = " (repeated augmentation takes a multiple of 256: --no-repeated-aug)" if config.repeated_aug else ""
        raise TrainError(
            f"the training set has {len(sampler)} images per process{hint}, fewer than --batch-size {config.batch_size}"
        )
    # Every rank evaluates a disjoint shard, no padding: the summed counts are the exact accuracy.
    val_shard = Subset(bundle.val, range(rank, len(bundle.val), world_size))
    val = DataLoader(val_shard, batch_size=config.batch_size * 2, shuffle=False, **common)
    return train, val


class DecodedPaths(Dataset):
    """Image files decoded and dropped: decoding is the whole test (UnreadableImage for a bad one)."""

    def __init__(self, paths: list):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> int:
        load_image(self.paths[index])
        return 0


def decode_every_image(shard: Subset, workers: int) -> None:
    """Before training: decode every image of a shard of an ImageFolder (this rank's validation images).

    The evaluation reads them only after the first epoch; a corrupt one would cost that epoch. Its own generator:
    decoding draws nothing from the training's random streams.
    """
    paths = [shard.dataset.samples[index][0] for index in shard.indices]
    decoded = DataLoader(
        DecodedPaths(paths), batch_size=64, num_workers=workers, collate_fn=len, generator=torch.Generator()
    )
    for _ in decoded:
        pass


def fixed_batch(dataset: Dataset, count: int) -> torch.Tensor | None:
    """The first `count` validation images, stacked: the input on which GPSA statistics are measured."""
    count = min(count, len(dataset))
    return torch.stack([dataset[i][0] for i in range(count)]) if count else None


def steps_per_epoch(loader: DataLoader, limit: int | None, accum_steps: int = 1) -> int:
    """Optimiser steps of an epoch: whole groups of `accum_steps` batches (a last, partial group is left out)."""
    steps = len(loader) // accum_steps
    if steps == 0:
        raise TrainError(
            f"the training set has {len(loader)} batches of --batch-size per process, fewer than "
            f"--accum-steps {accum_steps}"
        )
    return steps if not limit else min(limit, steps)


__all__ = [
    "DataBundle",
    "build_data",
    "build_loaders",
    "decode_every_image",
    "fixed_batch",
    "image_folder_classes",
    "steps_per_epoch",
    "subsample_per_class",
    "validate_augmentation",
]
