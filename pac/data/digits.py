"""A small image task that ships offline: scikit-learn's 1,797 handwritten digits (8x8, 0-16 grey levels), for
fine-tuning edge CNNs (issue 25).

The images are upsampled to `size` x `size` (bilinear) and repeated over three channels, so ImageNet-shaped networks
take them; pixels scale to [-1, 1]. Three tasks share the images:

    pretrain   digits 0-4                    what a network learns first
    unseen     digits 5-9, labelled 0-4      adaptation to classes it never saw
    shift      digits 0-4, corrupted         adaptation to a distribution shift: noise, blur and low contrast

Each task splits into train and val by `split_seed`, stratified by class (shift's split is pretrain's); the
corruption is drawn from the split seed too, so a task is the same tensors on every run and every device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pac.errors import DataError

TASKS = ("pretrain", "unseen", "shift")
NOISE_STD, CONTRAST, BLUR_SIGMA = 0.4, 0.5, 1.0  # on [-1, 1] pixels; the blur's Gaussian in upsampled pixels


@dataclass
class ImageSet:
    images: torch.Tensor  # [N, 3, size, size], float32 in [-1, 1] (corrupted ones may leave it)
    labels: torch.Tensor  # [N], int64
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def digit_images(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Every digit as a [N, 3, size, size] tensor in [-1, 1], and its digit 0-9."""
    from sklearn.datasets import load_digits  # ships its data inside the package: no download

    digits = load_digits()
    grey = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0 * 2 - 1
    upsampled = F.interpolate(grey, size=(size, size), mode="bilinear", align_corners=False)
    return upsampled.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(digits.target).long()


def digits_task(task: str, split_seed: int = 0, val_fraction: float = 0.2, size: int = 32) -> dict[str, ImageSet]:
    """The train and val splits of one of TASKS."""
    if task not in TASKS:
        raise DataError(f"unknown digits task {task!r}: use one of {', '.join(TASKS)}")
    if not 0 < val_fraction < 1:
        raise DataError(f"the validation fraction must be between 0 and 1, not {val_fraction}")
    images, digits = digit_images(size)
    first = 5 if task == "unseen" else 0
    keep = (digits >= first) & (digits < first + 5)
    images, labels = images[keep], digits[keep] - first
    if task == "shift":  # its own generator: the split stays pretrain's, so shift's val is pretrain's, corrupted
        images = corrupt(images, torch.Generator().manual_seed(split_seed + 1_000_003))
    generator = torch.Generator().manual_seed(split_seed)
    names = [str(first + k) for k in range(5)]
    train, val = [], []
    for label in range(5):  # stratified: every class keeps its share in both splits
        members = (labels == label).nonzero().reshape(-1)
        members = members[torch.randperm(len(members), generator=generator)]
        cut = round(len(members) * val_fraction)
        val.append(members[:cut])
        train.append(members[cut:])
    return {
        name: ImageSet(images[index], labels[index], names)
        for name, index in (("train", torch.cat(train).sort().values), ("val", torch.cat(val).sort().values))
    }


def corrupt(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A Gaussian blur, contrast cut to CONTRAST around each image's mean, then Gaussian noise."""
    radius = int(3 * BLUR_SIGMA)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * BLUR_SIGMA**2))
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    along_rows = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)  # separable: rows, then columns
    blurred = F.conv2d(images, along_rows, padding=(0, radius), groups=channels)
    blurred = F.conv2d(blurred, along_rows.transpose(2, 3), padding=(radius, 0), groups=channels)
    mean = blurred.mean(dim=(1, 2, 3), keepdim=True)
    faded = mean + CONTRAST * (blurred - mean)
    return faded + NOISE_STD * torch.randn(faded.shape, generator=generator)
