"""The data path from file to batch: the ImageFolder rules the launcher and the trainer share,
reduced-scale JPEG decoding, and the choice of CPU or GPU decoding."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps
from torchvision.transforms.functional import pil_to_tensor

import gpu_run.trainer.train as train_module
from gpu_run.dataset import validate_dataset
from gpu_run.trainer.imagefolder import class_folders, image_files, is_image_file, open_image
from gpu_run.trainer.train import (
    JpegBytes,
    SafeImageFolder,
    build_transforms,
    collate_skipping,
    decode_short_side,
    gpu_batch,
    list_samples,
    measure_decode,
    pick_decode,
    upright,
)
from tests.conftest import events, trainer

EXIF_ORIENTATION = 0x0112
# torchvision 0.29 deprecates decode_jpeg (for TorchCodec); the trainer imports it lazily and falls
# back to the CPU path without it.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


# The ImageFolder rules, one copy -------------------------------------------------------------------


@pytest.fixture
def with_mac_litter(dataset, tmp_path) -> Path:
    """The test dataset as it arrives from a Mac: an AppleDouble `._x.jpg` beside a photo (a resource
    fork, not a JPEG), a hidden folder inside a class, and a hidden folder beside the classes."""
    root = tmp_path / "data"
    shutil.copytree(dataset, root)
    for split in ("train", "val"):
        cls = sorted(p for p in (root / split).iterdir())[0]
        (cls / "._00000.jpg").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 78)  # AppleDouble magic
        (cls / ".thumbnails").mkdir()
        shutil.copy(cls / "00000.jpg", cls / ".thumbnails" / "00000.jpg")
        (root / split / ".hidden").mkdir()
        shutil.copy(cls / "00000.jpg", root / split / ".hidden" / "00000.jpg")
    return root


def test_dot_files_and_hidden_folders_are_not_data_for_the_launcher_or_the_trainer(dataset, with_mac_litter):
    assert not is_image_file("train/a/._00000.jpg") and is_image_file("train/a/00000.JPG")

    info = validate_dataset(with_mac_litter)
    clean = validate_dataset(dataset)
    assert info.classes == clean.classes and ".hidden" not in info.classes
    assert info.counts == clean.counts and not info.unreadable  # the AppleDouble file was not even looked at

    for split in ("train", "val"):
        classes = class_folders(with_mac_litter / split)
        assert classes == info.classes
        samples = list_samples(with_mac_litter / split, classes)
        expected = list_samples(dataset / split, classes)
        assert [Path(p).relative_to(with_mac_litter) for p, _ in samples] == \
               [Path(p).relative_to(dataset) for p, _ in expected]


def test_image_files_follows_a_symlinked_folder_once(tmp_path):
    cls = tmp_path / "a"
    (cls / "sub").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(cls / "sub" / "x.jpg")
    (cls / "sub" / "loop").symlink_to("..")  # a loop back to the class folder
    assert image_files(cls) == [cls / "sub" / "x.jpg"]


# Reduced-scale JPEG decoding -----------------------------------------------------------------------


def big_photo(path: Path, size=(1600, 1200), orientation: int = 1) -> Path:
    """A JPEG as a phone writes it: left half red, right half blue, and an EXIF orientation tag."""
    im = Image.new("RGB", size, (20, 20, 230))
    im.paste((230, 20, 20), (0, 0, size[0] // 2, size[1]))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, "JPEG", quality=90, exif=exif)
    return path


@pytest.mark.parametrize("min_short_side, expected", [
    (None, (1600, 1200)),  # not asked: full size
    (1200, (1600, 1200)),  # no reduced scale keeps 1200: full size
    (599, (800, 600)),  # 1/2
    (300, (400, 300)),  # 1/4
    (150, (200, 150)),  # 1/8, the smallest the decoder has
    (10, (200, 150)),
])
def test_open_image_decodes_a_big_jpeg_smaller_but_never_below_the_short_side_asked(tmp_path, min_short_side, expected):
    path = big_photo(tmp_path / "p.jpg")
    assert open_image(path, min_short_side).size == expected
    assert open_image(path, 601).size == (1600, 1200)  # 1/2 would give 600 < 601


def test_open_image_at_reduced_scale_applies_the_exif_orientation(tmp_path):
    # Orientation 6: the stored pixels are turned 90 degrees; shown upright the photo is 1200 x 1600,
    # red on top (the stored left half), and the short side is the stored height.
    path = big_photo(tmp_path / "p.jpg", orientation=6)
    im = open_image(path, min_short_side=300)
    assert im.size == (300, 400) and im.mode == "RGB"
    top, bottom = im.getpixel((150, 50)), im.getpixel((150, 350))
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0], (top, bottom)


def test_open_image_leaves_other_formats_whole(tmp_path):
    path = tmp_path / "p.png"
    Image.new("L", (800, 600)).save(path)
    im = open_image(path, min_short_side=100)
    assert im.size == (800, 600) and im.mode == "RGB"


# Reduced-scale decoding in the trainer ------------------------------------------------------------


def test_the_trainer_decodes_no_smaller_than_each_transform_needs(tmp_path):
    standard, evaluation = build_transforms(224)
    light, _ = build_transforms(224, "light")
    # The smallest standard crop (8% of the area, aspect 3:4) of a 915 px short side is 224 px a side.
    assert (decode_short_side(standard), decode_short_side(light), decode_short_side(evaluation)) == (915, 334, 256)
    # A 12 MP phone photo: 1/2 scale for the standard recipe, 1/8 for light training and eval.
    photo = big_photo(tmp_path / "phone.jpg", size=(4032, 3024))
    for transform, scaled in ((standard, (2016, 1512)), (light, (504, 378)), (evaluation, (504, 378))):
        assert open_image(photo, decode_short_side(transform)).size == scaled


@pytest.mark.slow
def test_the_trainer_trains_on_big_jpegs_decoded_at_reduced_scale(tmp_path):
    data = tmp_path / "big"
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("a", "b"):
            for i in range(n):
                big_photo(data / split / cls / f"{i}.jpg", orientation=6 if i == 0 else 1)
    train_tf, eval_tf = build_transforms(32)
    train = SafeImageFolder(data / "train", ["a", "b"], lambda im: im.size, seed=0,
                            min_short_side=decode_short_side(train_tf))
    val = SafeImageFolder(data / "val", ["a", "b"], lambda im: im.size, min_short_side=decode_short_side(eval_tf))
    # 131 px needed for training at 32 px, 37 for eval: both get the decoder's smallest, 1/8.
    assert train[(0, 0)][0] == (150, 200) and train[(1, 0)][0] == (200, 150) and val[1][0] == (200, 150)

    out = tmp_path / "out"
    proc = trainer("--data", str(data), "--out", str(out), "--epochs", "1", "--image-size", "32", "--batch-size", "4",
                   "--workers", "0", "--weights", "none", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    evs = events(proc.stdout)
    assert evs[-1]["event"] == "done" and not [e for e in evs if e["event"] == "skipped_image"]
    assert (out / "checkpoints" / "last.pth").is_file()


# Decoding on the GPU, with the CPU as fallback ----------------------------------------------------
# This machine has no GPU: the GPU path's own code runs here on the CPU device (torchvision's
# decode_jpeg decodes on either), and the trainer asked for --decode gpu falls back to the CPU.


@pytest.mark.slow
def test_decode_gpu_without_a_gpu_trains_on_the_cpu_path_and_says_so(dataset, tmp_path):
    proc = trainer("--data", str(dataset), "--out", str(tmp_path / "out"), "--epochs", "1", "--image-size", "32",
                   "--batch-size", "8", "--workers", "0", "--weights", "none", "--device", "cpu", "--decode", "gpu")
    assert proc.returncode == 0, proc.stderr
    said = [line for line in proc.stderr.splitlines() if line.startswith("decode:")]
    assert said == ["decode: cpu (reduced-scale JPEG, 0 workers; --decode gpu needs a CUDA device and this run has none)"]
    evs = events(proc.stdout)
    start = next(e for e in evs if e["event"] == "start")
    assert (start["decode"], start["decode_note"]) == ("cpu", said[0].split(" (", 1)[1][:-1])
    assert evs[-1]["event"] == "done"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_upright_turns_a_tensor_as_exif_transpose_turns_the_image(tmp_path, orientation):
    path = big_photo(tmp_path / "p.jpg", size=(40, 24), orientation=orientation)
    with Image.open(path) as im:
        stored = pil_to_tensor(im.convert("RGB"))
        expected = pil_to_tensor(ImageOps.exif_transpose(im).convert("RGB"))
    assert torch.equal(upright(stored, orientation), expected)


def gpu_dataset(root: Path, transform) -> SafeImageFolder:
    images = SafeImageFolder(root, ["a"], transform, seed=3)
    images.decode = "gpu"
    return images


def test_the_gpu_path_decodes_orients_and_transforms_as_the_cpu_path(tmp_path, monkeypatch):
    cls = tmp_path / "train" / "a"
    big_photo(cls / "0.jpg", orientation=6)  # red on top once upright
    Image.open(big_photo(cls / "1.jpg")).save(cls / "2.png")  # not a JPEG: decoded by the worker
    (cls / "3.jpg").write_bytes(b"not a jpeg")  # unreadable: skipped
    _, evaluation = build_transforms(32)
    images = gpu_dataset(tmp_path / "train", evaluation)
    items = [images[i] for i in range(4)]
    assert isinstance(items[0][0][0], JpegBytes) and items[0][0][0].orientation == 6
    assert isinstance(items[2][0][0], torch.Tensor) and items[3] == ("skip", str(cls / "3.jpg"))
    batch = collate_skipping(items)

    def on_cpu(decoded):
        x, targets, indices, skipped = decoded
        assert x.shape == (3, 3, 32, 32) and indices.tolist() == [0, 1, 2] and skipped == [str(cls / "3.jpg")]
        cpu = torch.stack([evaluation(open_image(p)) for p, _ in images.samples[:3]])
        assert (x - cpu).abs().mean() < 0.02  # the same pictures (resized from another decode)
        red = x[0, 0]  # normalised red channel of the turned photo
        assert red[:8].mean() > 1 > -1 > red[-8:].mean()

    on_cpu(gpu_batch(batch, images.gpu_transform, torch.device("cpu")))
    on_cpu(gpu_batch(batch, images.gpu_transform, torch.device("cpu"), chunk=2))  # decoded two at a time

    def failing(jpegs, device):
        raise RuntimeError("nvjpeg: unsupported")
    monkeypatch.setattr(train_module, "nvjpeg", failing)  # GPU decode raises: the CPU decodes instead
    on_cpu(gpu_batch(batch, images.gpu_transform, torch.device("cpu")))


def test_the_gpu_path_augments_each_sample_by_its_seed(tmp_path):
    for i in range(3):
        big_photo(tmp_path / "train" / "a" / f"{i}.jpg", orientation=1 + 5 * (i % 2))
    train_tf, _ = build_transforms(32)
    images = gpu_dataset(tmp_path / "train", train_tf)
    batch = collate_skipping([images[(i, 1)] for i in range(3)])
    first, again = (gpu_batch(batch, images.gpu_transform, torch.device("cpu"))[0] for _ in range(2))
    assert first.shape == (3, 3, 32, 32) and torch.equal(first, again)
    other_epoch = collate_skipping([images[(i, 2)] for i in range(3)])
    assert not torch.equal(first, gpu_batch(other_epoch, images.gpu_transform, torch.device("cpu"))[0])


def test_the_start_up_measurement_times_both_paths(tmp_path):
    for i in range(4):
        big_photo(tmp_path / "train" / "a" / f"{i}.jpg")
    train_tf, _ = build_transforms(32)
    images = SafeImageFolder(tmp_path / "train", ["a"], train_tf, seed=0, min_short_side=decode_short_side(train_tf))
    cpu_rate, gpu_rate = measure_decode(images, torch.device("cpu"), workers=2)
    assert cpu_rate > 0 and gpu_rate > 0 and images.decode == "cpu"
    choice = pick_decode("auto", torch.device("cpu"), images, 2)  # no CUDA: no measurement, the CPU
    assert choice == ("cpu", "reduced-scale JPEG, 2 workers")
