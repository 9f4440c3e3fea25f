"""Image data for fine-tuning edge CNNs (`pac train --task image-classify`): the bundled digits, or a folder with one
sub-folder of images per class. Every image becomes a [3, size, size] float tensor in [-1, 1], and the data splits
into train and val by a seed, stratified by class, so a run is the same tensors on every run and every device.

    --data digits          all ten digits of scikit-learn (pac.data.digits)
    --data digits:TASK     one of its tasks of five classes: pretrain (0-4), unseen (5-9), shift (0-4, corrupted)
    --data FOLDER          FOLDER/<class>/<image>.png|jpg|... (the sub-folder's name is the label)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pac.errors import DataError

IMAGE_SIZE = 32  # pixels per side the images are resized to (the digits are 8x8, upsampled)
DEFAULT_VAL_FRACTION = 0.2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DIGITS = "digits"


@dataclass
class ImageSet:
    """Images with their class indices: a batch source of its own (the trainer draws positions of it)."""

    images: torch.Tensor  # [N, 3, size, size], float32 in [-1, 1] (corrupted ones may leave it)
    labels: torch.Tensor  # [N], int64 class indices into label_names
    label_names: list[str]
    sample_ids: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        index = torch.tensor(indices, dtype=torch.long)
        return {"images": self.images[index], "labels": self.labels[index]}

    def subset(self, rows: Sequence[int]) -> ImageSet:
        index = torch.tensor(list(rows), dtype=torch.long)
        return ImageSet(self.images[index], self.labels[index], self.label_names, [self.sample_ids[i] for i in rows])

    def fingerprint(self) -> str:
        """sha256 hex of everything a model sees (the pixels, labels, names and ids)."""
        h = hashlib.sha256(b"pac.ImageSet.v1\0")
        h.update(json.dumps({"sample_ids": self.sample_ids, "label_names": self.label_names}).encode())
        h.update(self.images.float().contiguous().numpy().astype("<f4", copy=False).tobytes())
        h.update(self.labels.to(torch.int64).numpy().astype("<i8", copy=False).tobytes())
        return h.hexdigest()


def stratified_split(
    labels: torch.Tensor, val_fraction: float, seed: int, classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, val rows), sorted: every class keeps its share of validation rows."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"the validation fraction must be at least 0 and below 1, not {val_fraction}")
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for label in range(classes):
        members = (labels == label).nonzero().reshape(-1)
        members = members[torch.randperm(len(members), generator=generator)]
        cut = round(len(members) * val_fraction)
        val.append(members[:cut])
        train.append(members[cut:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def read_image_folder(folder: Path, size: int = IMAGE_SIZE) -> ImageSet:
    """Every image under FOLDER/<class>/, resized to size x size, RGB, scaled to [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (--data for --task image-classify: digits, digits:TASK or a folder)")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(
            f"{folder} has {len(classes)} class sub-folder(s): put each class's images in a sub-folder named after "
            "the class (at least two classes)"
        )
    images, labels, ids = [], [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{folder / name} holds no images ({', '.join(IMAGE_SUFFIXES)}): add some or remove it")
        for file in files:
            try:
                with Image.open(file) as image:
                    rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            except (UnidentifiedImageError, OSError) as exc:
                raise DataError(f"{file} is not a readable image ({exc}): replace or remove it") from None
            pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(size, size, 3)
            images.append(pixels.permute(2, 0, 1).float() / 127.5 - 1)
            labels.append(label)
            ids.append(f"{name}/{file.name}")
    return ImageSet(torch.stack(images), torch.tensor(labels), classes, ids)


def is_digits(data: str | None) -> bool:
    """Whether --data names the bundled digits (digits or digits:TASK) rather than a folder."""
    spec = data or DIGITS
    return spec.partition(":")[0] == DIGITS and not Path(spec).exists()


def read_images(data: str | None) -> ImageSet:
    """Every image of --data (default: all ten digits)."""
    from pac.data.digits import digits_task

    return (
        digits_task((data or DIGITS).partition(":")[2] or "all") if is_digits(data) else read_image_folder(Path(data))
    )


def read_image_data(data: str | None, seed: int, val_size: float | None, train_size: int | None) -> dict[str, ImageSet]:
    """The train and val splits of --data (default: all digits), as `pac train --task image-classify` reads them:
    `val_size` a fraction (or a count) held out per class, `train_size` the training rows kept (stratified)."""
    whole = read_images(data)
    fraction = DEFAULT_VAL_FRACTION if val_size is None else val_size
    if fraction >= 1:
        if fraction >= len(whole):
            raise DataError(
                f"--val-size {fraction:g} would hold out all {len(whole)} images: give a smaller count or a fraction"
            )
        fraction = fraction / len(whole)
    train_rows, val_rows = stratified_split(whole.labels, fraction, seed, len(whole.label_names))
    if train_size is not None and train_size < len(train_rows):
        kept, _ = stratified_split(
            whole.labels[train_rows], 1 - train_size / len(train_rows), seed, len(whole.label_names)
        )
        train_rows = train_rows[kept]
    return {"train": whole.subset(train_rows.tolist()), "val": whole.subset(val_rows.tolist())}
