"""A small image task that ships offline: scikit-learn's 1,797 handwritten digits (8x8, 0-16 grey levels), for
fine-tuning edge CNNs (issue 25).

The images are upsampled to `size` x `size` (bilinear) and repeated over three channels, so ImageNet-shaped networks
take them; pixels scale to [-1, 1]. Four tasks share the images:

    all        digits 0-9
    pretrain   digits 0-4                    what a network learns first
    unseen     digits 5-9, labelled 0-4      adaptation to classes it never saw
    shift      digits 0-4, corrupted         adaptation to a distribution shift: noise, blur and low contrast

The corruption is drawn from a fixed seed, so a task is the same tensors on every run and every device; `pac train`
splits it into train and val (pac.data.images.read_image_data), so shift's split by a seed is pretrain's.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pac.data.images import IMAGE_SIZE, ImageSet
from pac.errors import DataError

TASKS = ("all", "pretrain", "unseen", "shift")
NOISE_STD, CONTRAST, BLUR_SIGMA = 0.4, 0.5, 1.0  # on [-1, 1] pixels; the blur's Gaussian in upsampled pixels
CORRUPTION_SEED = 1_000_003


def digits_file() -> Path:
    """The digits as scikit-learn ships them (a CSV of 64 grey levels and the digit per row), found without
    importing scikit-learn, which would add 135 MB to a run's resident memory for 1,797 tiny images."""
    spec = importlib.util.find_spec("sklearn")
    file = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if file is None or not file.exists():
        raise DataError("the bundled digits come with scikit-learn: pip install scikit-learn")
    return file


def digit_images(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Every digit as a [N, 3, size, size] tensor in [-1, 1], and its digit 0-9."""
    rows = torch.from_numpy(np.loadtxt(digits_file(), delimiter=",", dtype=np.float32))
    grey = rows[:, :-1].reshape(-1, 1, 8, 8) / 16.0 * 2 - 1
    upsampled = F.interpolate(grey, size=(size, size), mode="bilinear", align_corners=False)
    return upsampled.expand(-1, 3, -1, -1).contiguous(), rows[:, -1].long()


def digits_task(task: str, size: int = IMAGE_SIZE) -> ImageSet:
    """Every image of one of TASKS, labelled 0..classes-1 (sample ids: the digit's index in scikit-learn's set)."""
    if task not in TASKS:
        raise DataError(f"unknown digits task {task!r}: use one of {', '.join(TASKS)} (--data digits:TASK)")
    images, digits = digit_images(size)
    first, classes = (5, 5) if task == "unseen" else (0, 10 if task == "all" else 5)
    keep = ((digits >= first) & (digits < first + classes)).nonzero().reshape(-1)
    images, labels = images[keep], digits[keep] - first
    if task == "shift":
        images = corrupt(images, torch.Generator().manual_seed(CORRUPTION_SEED))
    names = [str(first + k) for k in range(classes)]
    return ImageSet(images, labels, names, [f"digit-{i}" for i in keep.tolist()])


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
