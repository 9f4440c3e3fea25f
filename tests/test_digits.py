"""The offline image task: scikit-learn's digits upsampled for edge CNNs, in three tasks of five classes."""

from __future__ import annotations

import pytest
import torch

from pac.data.digits import digits_task
from pac.errors import DataError


@pytest.fixture(scope="module")
def tasks():
    return {task: digits_task(task, split_seed=0) for task in ("pretrain", "unseen", "shift")}


def test_three_tasks_of_five_classes_split_by_class(tasks):
    pretrain, unseen = tasks["pretrain"], tasks["unseen"]
    assert pretrain["train"].images.shape[1:] == (3, 32, 32)
    assert pretrain["train"].label_names == ["0", "1", "2", "3", "4"]
    assert unseen["train"].label_names == ["5", "6", "7", "8", "9"]  # labelled 0-4 for a five-way head
    for task in tasks.values():
        sizes = {name: len(split) for name, split in task.items()}
        assert 880 < sizes["train"] + sizes["val"] < 920 and sizes["val"] == pytest.approx(0.2 * 900, abs=5)
        for split in task.values():
            assert set(split.labels.tolist()) == set(range(5))  # every class in both splits
    images = pretrain["train"].images
    assert images.min() >= -1 and images.max() <= 1 and torch.equal(images[:, 0], images[:, 2])


def test_the_shift_task_is_the_same_digits_corrupted_and_the_same_on_every_run(tasks):
    clean, shifted = tasks["pretrain"], tasks["shift"]
    assert torch.equal(clean["val"].labels, shifted["val"].labels)  # same samples, same split
    difference = (shifted["val"].images - clean["val"].images).std()
    assert 0.3 < difference < 0.8  # noise, blur and faded contrast, not a different image set
    again = digits_task("shift", split_seed=0)
    assert torch.equal(again["val"].images, shifted["val"].images)
    other = digits_task("shift", split_seed=1)
    assert not torch.equal(other["train"].labels, shifted["train"].labels)


def test_bad_task_names_and_fractions_are_refused():
    with pytest.raises(DataError, match="unknown digits task 'rotated': use one of pretrain, unseen, shift"):
        digits_task("rotated")
    with pytest.raises(DataError, match="between 0 and 1, not 1.5"):
        digits_task("pretrain", val_fraction=1.5)
