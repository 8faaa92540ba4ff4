"""Data sources, subsets and the batch order."""

import os
import pickle

import numpy as np
import pytest
import torch

from sphrun import SphrunError
from sphrun.data import BatchOrder, load_data, stratified_subset, synthetic_data


def write_torchvision_cifar(root, dataset, per_split):
    """A small folder in torchvision's pickled CIFAR format; returns the (train, test) images and labels."""
    rng = np.random.default_rng(0)
    classes = 10 if dataset == "cifar10" else 100
    if dataset == "cifar10":
        folder, files, key = "cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)],
                                                      "test": ["test_batch"]}, "labels"
    else:
        folder, files, key = "cifar-100-python", {"train": ["train"], "test": ["test"]}, "fine_labels"
    os.makedirs(os.path.join(root, folder))
    written = {}
    for split, names in files.items():
        images, labels = [], []
        for name in names:
            data = rng.integers(0, 256, (per_split, 3072), dtype=np.uint8)
            y = list(rng.integers(0, classes, per_split))
            with open(os.path.join(root, folder, name), "wb") as f:
                pickle.dump({"data": data, key: y}, f)
            images.append(data)
            labels += y
        written[split] = (np.concatenate(images), np.array(labels))
    return written


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_torchvision_format(tmp_path, dataset):
    written = write_torchvision_cifar(tmp_path, dataset, per_split=6)
    data = load_data(dataset, str(tmp_path))
    assert data.num_classes == (10 if dataset == "cifar10" else 100)
    assert data.train_x.shape == (6 * len(written["train"][0]) // 6, 3, 32, 32)
    assert torch.equal(data.train_y, torch.from_numpy(written["train"][1]))
    assert torch.equal(data.test_y, torch.from_numpy(written["test"][1]))
    # the pixel (channel 1, row 2, col 3) of image 4: CIFAR rows are 1024 R, then G, then B values
    raw = written["train"][0][4].reshape(3, 32, 32)[1, 2, 3] / 255
    mean, std = (0.4822, 0.1994) if dataset == "cifar10" else (0.4865, 0.2564)
    assert data.train_x[4, 1, 2, 3].item() == pytest.approx((raw - mean) / std, rel=1e-5)


def test_image_folder_on_the_shared_subset(shared_subset):
    data = load_data("cifar10", shared_subset)
    assert data.train_x.shape == (5000, 3, 32, 32) and data.test_x.shape == (1000, 3, 32, 32)
    assert torch.bincount(data.train_y).tolist() == [500] * 10
    assert torch.bincount(data.test_y).tolist() == [100] * 10
    # normalized with the paper's statistics: roughly zero mean; its std values (0.2023, ...) are the
    # customary ones, a little below the pixel spread, so the channels come out with std about 1.25
    assert data.train_x.mean((0, 2, 3)).abs().max() < 0.1
    assert ((data.train_x.std((0, 2, 3)) - 1.25).abs() < 0.1).all()
    assert data.source.startswith("imagefolder:")


def test_missing_data_with_failed_download_names_the_ways_out(tmp_path, monkeypatch):
    import torchvision

    def no_network(root, **kwargs):
        os.makedirs(root, exist_ok=True)  # as torchvision does before it fetches
        open(os.path.join(root, "cifar-10-python.tar.gz"), "wb").close()
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_network)
    with pytest.raises(SphrunError) as error:
        load_data("cifar10", str(tmp_path / "nothing"))
    text = str(error.value)
    assert "download failed" in text and "--data-dir" in text and "--dataset synthetic" in text
    assert "train/<class>/" in text and "network unreachable" in text
    assert not (tmp_path / "nothing").exists()  # nothing left behind
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "mine.txt").write_text("the user's file")
    with pytest.raises(SphrunError):
        load_data("cifar10", str(tmp_path / "kept"))
    assert os.listdir(tmp_path / "kept") == ["mine.txt"]


def test_download_goes_through_torchvision(tmp_path, monkeypatch):
    import torchvision

    calls = []

    def fake_cifar10(root, train, download):
        calls.append((root, train, download))
        write_torchvision_cifar(root, "cifar10", per_split=2)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10)
    data = load_data("cifar10", str(tmp_path))
    assert calls == [(str(tmp_path), True, True)] and len(data.train_y) == 10


def test_foreign_image_folder_is_refused(tmp_path):
    for split in ("train", "test"):
        for name in ("a", "b", "c"):
            os.makedirs(tmp_path / split / name)
    with pytest.raises(SphrunError, match="3 class folders"):
        load_data("cifar10", str(tmp_path))


def test_stratified_subset_fraction_and_count():
    labels = torch.arange(1000) % 10
    by_fraction = stratified_subset(labels, 0.1, 10)
    assert len(by_fraction) == 100 and torch.bincount(labels[by_fraction]).tolist() == [10] * 10
    assert torch.equal(by_fraction, stratified_subset(labels, 0.1, 10))  # deterministic
    by_count = stratified_subset(labels, 95, 10)
    assert len(by_count) == 95 and torch.bincount(labels[by_count]).min() >= 9
    with pytest.raises(SphrunError, match="larger than the train set"):
        stratified_subset(labels, 1001, 10)


def test_synthetic_is_deterministic_and_cifar_shaped():
    a, b = synthetic_data(), synthetic_data()
    assert a.train_x.shape == (5000, 3, 32, 32) and torch.equal(a.train_x, b.train_x)
    assert torch.bincount(a.train_y).tolist() == [500] * 10


def test_synthetic_shuffles_a_share_of_the_train_labels_only():
    noisy, clean = synthetic_data(), synthetic_data(label_noise=0)
    assert torch.equal(noisy.train_x, clean.train_x) and torch.equal(noisy.test_y, clean.test_y)
    wrong = (noisy.train_y != clean.train_y).float().mean().item()
    assert 0.33 < wrong < 0.39  # 40 % shuffled, a tenth of those keep their class by chance
    assert torch.bincount(noisy.train_y).tolist() == [500] * 10  # class sizes stay equal


def test_batch_order_depends_on_data_seed_alone():
    a = BatchOrder(100, 10, data_seed=3, device="cpu")
    b = BatchOrder(100, 10, data_seed=3, device="cpu")
    c = BatchOrder(100, 10, data_seed=4, device="cpu")
    steps = [0, 5, 9, 10, 37]
    assert all(torch.equal(a.indices(s), b.indices(s)) for s in reversed(steps))
    assert not torch.equal(a.indices(0), c.indices(0))
    epoch = torch.cat([a.indices(s) for s in range(10)])  # one epoch sees every image once
    assert sorted(epoch.tolist()) == list(range(100))


def test_half_an_image_folder_names_the_missing_split(tmp_path, monkeypatch):
    import torchvision

    def no_download(*args, **kwargs):
        raise AssertionError("a folder with train/ is no missing download")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_download)
    os.makedirs(tmp_path / "train" / "cat")
    with pytest.raises(SphrunError, match="has train/ but no test/ folder"):
        load_data("cifar10", str(tmp_path))
    os.rename(tmp_path / "train", tmp_path / "test")
    with pytest.raises(SphrunError, match="has test/ but no train/ folder"):
        load_data("cifar10", str(tmp_path))


def test_image_folder_reads_whatever_pil_opens(tmp_path):
    from PIL import Image

    formats = ["png", "jpeg", "bmp", "gif", "webp"]
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in range(10):
            os.makedirs(tmp_path / split / f"class{label}")
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            extension = formats[label % len(formats)]
            Image.fromarray(pixels).save(tmp_path / split / f"class{label}" / f"0.{extension}")
    data = load_data("cifar10", str(tmp_path))
    assert data.train_x.shape == (10, 3, 32, 32) and data.train_y.tolist() == list(range(10))
