"""Data sets as device-resident tensors, and the batch order.

Sources, detected in --data-dir: torchvision's CIFAR folders (cifar-10-batches-py/, cifar-100-python/),
downloaded through torchvision when absent, or an ImageFolder tree DIR/{train,test}/<class>/<image>.
The whole set is normalized once and kept on the device; a batch is an index slice of a permutation
that depends on the data seed and the epoch alone, so every run of a sweep sees the same batches and a
resumed run continues the same stream.
"""

import os
import pickle
import shutil
from dataclasses import dataclass

import numpy as np
import torch

from sphrun import SphrunError

NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "synthetic": 10}
# Per-channel mean and std of the train images: CIFAR-10's are the paper's (docs/science.md, Data).
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
TORCHVISION_FOLDER = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


@dataclass
class Data:
    train_x: torch.Tensor  # (N, 3, 32, 32) float32, normalized
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    source: str  # where the images came from, for config.json

    def to(self, device):
        move = lambda t: t.to(device)
        return Data(move(self.train_x), move(self.train_y), move(self.test_x), move(self.test_y),
                    self.num_classes, self.source)


def load_data(dataset, data_dir, subset=None, device="cpu"):
    """The train and test sets of `dataset`, the train set cut to `subset`, resident on `device`."""
    if dataset == "synthetic":
        data = synthetic_data()
    else:
        data = load_images(dataset, data_dir)
    if subset is not None:
        keep = stratified_subset(data.train_y, subset, data.num_classes)
        data.train_x, data.train_y = data.train_x[keep], data.train_y[keep]
    return data.to(device)


def load_images(dataset, data_dir):
    mean, std = NORMALIZATION[dataset]
    if not os.path.isdir(data_dir) and os.path.exists(data_dir):
        raise SphrunError(f"--data-dir {data_dir} is not a folder")
    if is_image_folder(data_dir):
        train, test, source = read_image_folder(data_dir, NUM_CLASSES[dataset])
    else:
        folder = os.path.join(data_dir, TORCHVISION_FOLDER[dataset])
        if not os.path.isdir(folder):
            download_torchvision(dataset, data_dir)
        train, test = read_torchvision_folder(dataset, folder)
        source = f"torchvision:{os.path.abspath(folder)}"
    normalize = lambda images: ((torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
                                - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return Data(normalize(train[0]), torch.from_numpy(train[1]).long(),
                normalize(test[0]), torch.from_numpy(test[1]).long(), NUM_CLASSES[dataset], source)


def is_image_folder(data_dir):
    """Whether `data_dir` is an ImageFolder tree; one with train/ or test/ alone is refused, not
    taken for a missing CIFAR download."""
    present = [split for split in ("train", "test") if os.path.isdir(os.path.join(data_dir, split))]
    if len(present) == 1:
        missing = "test" if present == ["train"] else "train"
        raise SphrunError(f"{data_dir} has {present[0]}/ but no {missing}/ folder: an ImageFolder tree "
                          f"needs both, {missing}/<class>/<image> beside {present[0]}/<class>/<image>")
    return bool(present)


def read_image_folder(data_dir, num_classes):
    """Images of DIR/train/<class>/* and DIR/test/<class>/*, classes in alphabetical order."""
    from PIL import Image, UnidentifiedImageError

    splits = []
    for split in ("train", "test"):
        root = os.path.join(data_dir, split)
        try:
            classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        except OSError as e:
            raise SphrunError(f"cannot read data folder {root}: {e.strerror}")
        if len(classes) != num_classes:
            raise SphrunError(f"{root} has {len(classes)} class folders, the data set needs {num_classes}")
        if splits and classes != splits[0][2]:
            raise SphrunError(f"{data_dir}: train/ and test/ have different class folders")
        images, labels = [], []
        for label, name in enumerate(classes):
            for file in sorted(os.listdir(os.path.join(root, name))):
                path = os.path.join(root, name, file)
                try:
                    with Image.open(path) as image:
                        pixels = np.asarray(image.convert("RGB"))
                except (UnidentifiedImageError, OSError):
                    raise SphrunError(f"{path} is not a readable image")
                if pixels.shape != (32, 32, 3):
                    raise SphrunError(f"{path} is {pixels.shape[1]}x{pixels.shape[0]}, sphrun needs 32x32 images")
                images.append(pixels)
                labels.append(label)
        if not images:
            raise SphrunError(f"{root} holds no images")
        splits.append((np.stack(images), np.array(labels), classes))
    return splits[0][:2], splits[1][:2], f"imagefolder:{os.path.abspath(data_dir)}"


def read_torchvision_folder(dataset, folder):
    """torchvision's pickled CIFAR batches, read without its checksum so small test copies work too."""
    if dataset == "cifar10":
        names = ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"])
        label_key = "labels"
    else:
        names = (["train"], ["test"])
        label_key = "fine_labels"
    splits = []
    for files in names:
        images, labels = [], []
        for name in files:
            path = os.path.join(folder, name)
            try:
                with open(path, "rb") as f:
                    entry = pickle.load(f, encoding="latin1")
                images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.append(np.asarray(entry[label_key], dtype=np.int64))
            except FileNotFoundError:
                raise SphrunError(f"{path} is missing: the torchvision CIFAR folder is incomplete")
            except Exception as e:  # a foreign or truncated pickle: name the file, not the traceback
                raise SphrunError(f"{path} is not a torchvision CIFAR batch ({type(e).__name__})")
        splits.append((np.concatenate(images).transpose(0, 2, 3, 1), np.concatenate(labels)))
    return splits[0], splits[1]


def import_torchvision(dataset):
    """torchvision, which only the CIFAR download needs: missing, or built for another torch (its C++
    operators then fail to register), it is named in one line with the way to matching builds."""
    try:
        import torchvision
    except Exception as e:  # ImportError when missing; RuntimeError "operator torchvision::nms does not exist"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        torch_release = torch.__version__.split("+")[0]
        raise SphrunError(
            f"no {dataset} data to read and torchvision, which downloads it, is missing or broken ({reason}): "
            f"install matching versions of torch and torchvision from one index, e.g. "
            f"pip install torch=={torch_release} torchvision (pip then picks the torchvision built for it), "
            f"or point --data-dir at a folder with {TORCHVISION_FOLDER[dataset]}/ or with train/<class>/ and "
            f"test/<class>/ image folders, or use --dataset synthetic")
    return torchvision


def download_torchvision(dataset, data_dir):
    torchvision = import_torchvision(dataset)
    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[dataset]
    before = set(os.listdir(data_dir)) if os.path.isdir(data_dir) else None
    try:
        cls(root=data_dir, train=True, download=True)  # downloads and extracts with torchvision's progress
    except Exception as e:
        # a failed download leaves nothing behind: not the folder it made, nor a partial archive
        if before is None:
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            for name in set(os.listdir(data_dir)) - before:
                path = os.path.join(data_dir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.unlink(path)
        raise SphrunError(
            f"no {dataset} data in {data_dir} and the download failed ({type(e).__name__}: {e}); "
            f"point --data-dir at a folder with {TORCHVISION_FOLDER[dataset]}/ or with train/<class>/ and "
            f"test/<class>/ image folders, or use --dataset synthetic")


def stratified_subset(labels, subset, num_classes):
    """Indices of the first images of each class, in proportion to the class sizes.

    `subset` is a fraction in (0, 1] or a count. Deterministic: at 10 % of CIFAR-10 it takes the first
    500 images of each class, as the paper's subset.
    """
    n = len(labels)
    count = round(subset * n) if subset <= 1 else int(subset)
    if count > n:
        raise SphrunError(f"--subset {count} is larger than the train set ({n} images)")
    if count < num_classes:
        raise SphrunError(f"--subset {subset:g} leaves {count} images, fewer than the {num_classes} classes")
    sizes = torch.bincount(labels, minlength=num_classes).double()
    quota = sizes * count / n
    take = quota.floor().long()
    leftover = count - int(take.sum())
    take[torch.argsort(quota - quota.floor(), descending=True, stable=True)[:leftover]] += 1
    chosen = [torch.nonzero(labels == c).flatten()[: int(take[c])] for c in range(num_classes)]
    return torch.sort(torch.cat(chosen)).values


def synthetic_data(train_size=5000, test_size=1000, seed=0, label_noise=0.4):
    """A CIFAR-shaped 10-class set: one smooth random pattern per class plus per-image noise, and a
    share `label_noise` of the train images with their labels shuffled among them (test labels clean).

    The patterns alone are learnt in a few hundred steps, so without the shuffled labels every ELR either
    fits the train set or random-walks. The shuffled ones must be memorized, as much of CIFAR-10 must: small
    ELRs do it slowly (phase 1), larger ones settle at a level instead (phase 2). Class sizes stay equal.
    Fully determined by `seed`.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(10, 3, 4, 4, generator=g)
    prototypes = torch.nn.functional.interpolate(coarse, size=32, mode="bilinear", align_corners=False)

    def sample(size):
        y = torch.arange(size) % 10
        y = y[torch.randperm(size, generator=g)]
        contrast = 0.5 + torch.rand(size, 1, 1, 1, generator=g)
        x = contrast * prototypes[y] + 1.5 * torch.randn(size, 3, 32, 32, generator=g)
        return x, y

    train_x, train_y = sample(train_size)
    test_x, test_y = sample(test_size)
    noisy = torch.randperm(train_size, generator=g)[:round(label_noise * train_size)]
    train_y[noisy] = train_y[noisy[torch.randperm(len(noisy), generator=g)]]
    return Data(train_x, train_y, test_x, test_y, 10, "synthetic")


class BatchOrder:
    """Mini-batches as index slices of a per-epoch permutation that depends on (data_seed, epoch) only.

    An epoch is n // batch_size steps; the last partial batch is dropped (its images come up in other
    epochs), which keeps batch shapes static.
    """

    def __init__(self, n, batch_size, data_seed, device):
        if batch_size > n:
            raise SphrunError(f"--batch-size {batch_size} is larger than the train set ({n} images)")
        self.n, self.batch_size, self.data_seed, self.device = n, batch_size, data_seed, device
        self.steps_per_epoch = n // batch_size
        self._epoch, self._perm = None, None

    def permutation(self, epoch):
        seed = int(np.random.SeedSequence([self.data_seed, epoch]).generate_state(1)[0])
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(seed)).to(self.device)

    def indices(self, step):
        """The image indices of the batch at SGD step `step` (0-based, counted over the lineage)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, self.permutation(epoch)
        return self._perm[within * self.batch_size:(within + 1) * self.batch_size]
