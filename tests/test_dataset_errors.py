"""Every dataset problem is one clear line, a non-zero exit, and nothing started."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gpu_run.demo_data import make_dataset


def build(tmp_path: Path, case: str) -> Path:
    root = tmp_path / "data"
    if case == "file":
        root.write_text("not a folder")
        return root
    if case == "missing":
        return root
    make_dataset(root, classes=2, train_per_class=6, val_per_class=3, size=32)
    if case == "no-train":
        shutil.rmtree(root / "train")
    elif case == "no-val":
        shutil.rmtree(root / "val")
    elif case == "no-classes":
        for d in (root / "train").iterdir():
            shutil.rmtree(d)
    elif case == "empty-class":
        (root / "train" / "empty").mkdir()
        (root / "val" / "empty").mkdir()
    elif case == "class-mismatch":
        (root / "val" / "vertical").rename(root / "val" / "diagonal")
    elif case == "mostly-corrupt":
        for p in (root / "train").rglob("*.jpg"):
            p.write_bytes(b"not a jpeg")
        # one good image per class keeps every class "non-empty"; the split is still mostly corrupt
        make_dataset(tmp_path / "good", classes=2, train_per_class=1, val_per_class=1, size=32)
        for c in ("horizontal", "vertical"):
            shutil.copy(tmp_path / "good" / "train" / c / "00000.jpg", root / "train" / c / "good.jpg")
    elif case == "class-all-corrupt":
        for p in (root / "val" / "vertical").glob("*.jpg"):
            p.write_bytes(b"\x00garbage")
    return root


CASES = {
    "missing": "does not exist; pass --data DIR with train/ and val/ inside",
    "file": "is a file; pass the folder that holds train/ and val/",
    "no-train": "has no train/ folder",
    "no-val": "has no val/ folder",
    "no-classes": "has no class folders",
    "empty-class": "class 'empty' in",
    "class-mismatch": "train/ and val/ must have the same class folders (only in train/: vertical; only in val/: diagonal)",
    "mostly-corrupt": "images in",
    "class-all-corrupt": "class 'vertical' in",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_dataset_error_is_one_line(case, cli, tmp_path, gpu_run_home):
    data = build(tmp_path, case)
    proc = cli("train", "--weights", "none", "--data", str(data), "--epochs", "1")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert CASES[case] in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (cli.cwd / "runs").exists()  # nothing was started
    if case == "mostly-corrupt":
        assert "unreadable; the dataset looks corrupt" in lines[0]


@pytest.mark.slow
def test_a_few_corrupt_images_are_skipped_with_a_warning(cli, tmp_path, gpu_run_home):
    data = make_dataset(tmp_path / "data", classes=2, train_per_class=12, val_per_class=4, size=32)
    (data / "train" / "horizontal" / "00003.jpg").write_bytes(b"truncated")
    proc = cli("train", "--weights", "none", "--data", str(data), "--epochs", "1", "--image-size", "32", "--batch-size", "8",
               "--workers", "0", env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    assert proc.returncode == 0, proc.stderr
    assert "1 unreadable image(s) will be skipped: train/horizontal/00003.jpg" in proc.stdout
    assert "skipped unreadable image train/horizontal/00003.jpg" in proc.stdout


def test_debug_shows_the_traceback(cli, tmp_path, gpu_run_home):
    proc = cli("--debug", "train", "--weights", "none", "--data", str(tmp_path / "nope"))
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr


def test_bad_values_are_refused_before_anything_starts(cli, dataset, gpu_run_home):
    for args, message in [
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--model", "resnet19"], "unknown --model 'resnet19'; choose one of:"),
        (["--weights", "/nope.pth"], "--weights /nope.pth: no such file"),
        (["--host", "t4-box"], "unknown host 't4-box'"),
    ]:
        proc = cli("train", "--weights", "none", "--data", str(dataset), *args)
        assert proc.returncode == 2
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (cli.cwd / "runs").exists()


def test_a_second_check_opens_only_the_images_that_changed(tmp_path, gpu_run_home, monkeypatch) -> None:
    """Runs on a big dataset start fast: an image checked before and unchanged (size, mtime) is
    not opened again, and one that changed since is, and is caught when it is now broken."""
    from PIL import Image

    import gpu_run.dataset as ds

    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(tmp_path / split / c / f"{i}.png")
    assert ds.validate_dataset(tmp_path).num_train == 6

    opened = []
    real = ds.is_readable_image
    monkeypatch.setattr(ds, "is_readable_image", lambda p: opened.append(p.name) or real(p))
    assert ds.validate_dataset(tmp_path).num_train == 6
    assert opened == []

    broken = tmp_path / "train" / "a" / "0.png"
    broken.write_bytes(b"not a png any more")
    info = ds.validate_dataset(tmp_path)
    assert opened == ["0.png"] and info.num_train == 5 and info.unreadable == ["train/a/0.png"]
