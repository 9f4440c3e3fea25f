"""What pac trains for (plain names, no torch: `pac --help` quotes them)."""

from __future__ import annotations

TEXT_TASKS = ("classify", "lm")  # a language model: predict the label, or learn to write like the text
IMAGE_TASK = "image-classify"  # an edge CNN predicts the class of an image (pac.data.images)
