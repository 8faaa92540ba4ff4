"""sphrun without a working torchvision: missing, or built for another torch (pip can install such a
pair, and then `import torchvision` fails with "operator torchvision::nms does not exist"). Training on
the synthetic set and on image folders goes on; only the CIFAR download needs torchvision, and it says
so in one line with the way to matching builds."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from sphrun import SphrunError
from sphrun.data import load_data

BROKEN = 'raise RuntimeError("operator torchvision::nms does not exist")\n'
# Runs sphrun commands in a fresh interpreter, where sphrun's modules are imported with torchvision
# broken: an `import torchvision` at the top of any of them fails the first command.
DRIVER = """
import sys
from sphrun.cli import main
for command in sys.argv[1:]:
    print("== " + command, file=sys.stderr, flush=True)
    sys.argv = ["sphrun", *command.split()]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    print(code)
"""
TINY_RUN = "--subset 20 --width 4 --batch-size 10 --iters 2 --eval-every 2 --device cpu --elr 1e-3"


def hide_torchvision(monkeypatch, tmp_path, how):
    """Make `import torchvision` fail in this process as it fails when missing or broken."""
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)
    if how == "missing":
        monkeypatch.setitem(sys.modules, "torchvision", None)
    else:
        (tmp_path / "fake" / "torchvision").mkdir(parents=True)
        (tmp_path / "fake" / "torchvision" / "__init__.py").write_text(BROKEN)
        monkeypatch.syspath_prepend(str(tmp_path / "fake"))


def image_folder(root, per_class=2):
    """A 10-class ImageFolder tree of random 32x32 PNGs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in range(10):
            os.makedirs(root / split / f"class{label}")
            for i in range(per_class):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"class{label}" / f"{i}.png")
    return root


@pytest.mark.parametrize("how", ["missing", "broken"])
def test_the_cifar_download_names_the_broken_install_in_one_line(tmp_path, monkeypatch, how):
    hide_torchvision(monkeypatch, tmp_path, how)
    with pytest.raises(SphrunError) as error:
        load_data("cifar10", str(tmp_path / "empty"))
    text = str(error.value)
    assert "\n" not in text
    assert "torchvision" in text and "missing or broken" in text and "matching versions" in text
    assert f"pip install torch=={torch.__version__.split('+')[0]} torchvision" in text
    if how == "broken":
        assert "operator torchvision::nms does not exist" in text
    assert not (tmp_path / "empty").exists()  # nothing made for a download that never started
    (tmp_path / "empty").mkdir()  # an empty --data-dir: the same line, the folder left as it was
    with pytest.raises(SphrunError, match="missing or broken"):
        load_data("cifar10", str(tmp_path / "empty"))
    assert os.listdir(tmp_path / "empty") == []


def test_training_goes_on_without_torchvision(tmp_path):
    """In a fresh interpreter with a torchvision built for another torch (the missing one is the same
    ImportError path as above), the synthetic set and an image folder train; CIFAR stops in one line."""
    fake = tmp_path / "fake" / "torchvision"
    fake.mkdir(parents=True)
    fake.joinpath("__init__.py").write_text(BROKEN)
    folder = image_folder(tmp_path / "images")
    commands = [f"train --dataset synthetic {TINY_RUN} --out {tmp_path / 'synthetic'}",
                f"train --data-dir {folder} {TINY_RUN} --out {tmp_path / 'folder'}",
                f"train --data-dir {tmp_path / 'none'} {TINY_RUN} --out {tmp_path / 'cifar'}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "fake"), REPO]))
    result = subprocess.run([sys.executable, "-c", DRIVER, *commands], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "0", "2"], result.stderr
    assert (tmp_path / "synthetic" / "metrics.csv").exists() and (tmp_path / "folder" / "metrics.csv").exists()
    cifar = result.stderr.split("== ")[-1].strip().splitlines()[1:]
    assert len(cifar) == 1 and cifar[0].startswith("error: no cifar10 data") and "missing or broken" in cifar[0]
    assert "operator torchvision::nms does not exist" in cifar[0]
