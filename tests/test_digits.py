"""The offline image data: scikit-learn's digits upsampled for edge CNNs (tasks of five classes), and folders of
images per class, split by a seed and stratified by class."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from pac.data.digits import digits_task
from pac.data.images import read_image_data, read_image_folder
from pac.errors import DataError


@pytest.fixture(scope="module")
def tasks():
    return {
        task: read_image_data(f"digits:{task}", seed=0, val_size=None, train_size=None)
        for task in ("pretrain", "unseen", "shift")
    }


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
        assert not set(task["train"].sample_ids) & set(task["val"].sample_ids)
    images = pretrain["train"].images
    assert images.min() >= -1 and images.max() <= 1 and torch.equal(images[:, 0], images[:, 2])
    assert len(digits_task("all").label_names) == 10 and len(digits_task("all")) == 1797


def test_the_shift_task_is_the_same_digits_corrupted_and_the_same_on_every_run(tasks):
    clean, shifted = tasks["pretrain"], tasks["shift"]
    assert clean["val"].sample_ids == shifted["val"].sample_ids  # same samples, same split
    difference = (shifted["val"].images - clean["val"].images).std()
    assert 0.3 < difference < 0.8  # noise, blur and faded contrast, not a different image set
    again = read_image_data("digits:shift", seed=0, val_size=None, train_size=None)
    assert again["val"].fingerprint() == shifted["val"].fingerprint()
    other = read_image_data("digits:shift", seed=1, val_size=None, train_size=None)
    assert other["train"].sample_ids != shifted["train"].sample_ids


def test_train_size_keeps_every_class_and_a_count_is_a_val_size(tasks):
    small = read_image_data("digits:pretrain", seed=0, val_size=50, train_size=100)
    assert len(small["train"]) == pytest.approx(100, abs=3) and len(small["val"]) == pytest.approx(50, abs=3)
    assert set(small["train"].labels.tolist()) == set(range(5))


def test_bad_task_names_and_fractions_are_refused():
    with pytest.raises(DataError, match="unknown digits task 'rotated': use one of all, pretrain, unseen, shift"):
        read_image_data("digits:rotated", seed=0, val_size=None, train_size=None)
    with pytest.raises(DataError, match="would hold out all 1797 images"):
        read_image_data("digits", seed=0, val_size=3000, train_size=None)


def test_a_folder_of_images_per_class_reads_resized_and_labelled_by_folder(tmp_path):
    for name, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / name).mkdir()
        for i in range(5):
            Image.new("RGB", (20 + i, 17), colour).save(tmp_path / name / f"{i}.png")
    images = read_image_folder(tmp_path)
    assert images.label_names == ["cat", "dog"] and images.images.shape == (10, 3, 32, 32)
    assert images.images[0, 0].eq(1).all() and images.images[0, 2].eq(-1).all()  # red, scaled to [-1, 1]
    assert images.sample_ids[5] == "dog/0.png" and images.labels.tolist() == [0] * 5 + [1] * 5
    split = read_image_data(str(tmp_path), seed=0, val_size=0.2, train_size=None)
    assert len(split["val"]) == 2 and sorted(split["val"].labels.tolist()) == [0, 1]


def test_unreadable_images_and_missing_classes_say_what_to_do(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="1 class sub-folder"):
        read_image_folder(tmp_path)
    (tmp_path / "b").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "ok.png")
    with pytest.raises(DataError, match="holds no images"):
        read_image_folder(tmp_path)
    (tmp_path / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png is not a readable image"):
        read_image_folder(tmp_path)
    with pytest.raises(DataError, match="no such folder"):
        read_image_data(str(tmp_path / "nowhere"), seed=0, val_size=None, train_size=None)
