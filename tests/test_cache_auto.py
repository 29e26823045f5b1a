"""--cache-size auto and the resized copy's reduced-scale decode: parsing, the size training needs,
the decision on small and large images, the savings arithmetic and message, and a copy that is
the same size, upright and near-identical whether its JPEG was decoded whole or at reduced scale."""

from __future__ import annotations

import dataclasses
import io
import random

import pytest
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageOps, ImageStat

import gpu_run.cache as cache
from gpu_run.errors import ConfigError

# Parsing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [("auto", "auto"), (" AUTO ", "auto"), ("0", 0), ("256", 256), (915, 915)])
def test_parse_cache_size(text, value):
    assert cache.parse_cache_size(text) == value


@pytest.mark.parametrize("text", ["-1", "1.5", "", "big", "0x10", "256px", "auto256"])
def test_parse_cache_size_refuses_in_one_line(text):
    with pytest.raises(ConfigError) as e:
        cache.parse_cache_size(text)
    message = str(e.value)
    assert message.startswith("--cache-size must be 0") and "auto" in message and repr(text) in message
    assert "\n" not in message


# What training needs --------------------------------------------------------------------------


def test_needed_short_side_per_recipe():
    assert [cache.needed_short_side(224, r) for r in ("standard", "light", "none")] == [915, 334, 256]
    assert cache.needed_short_side(128, "none") == cache.eval_short_side(128) == 146


@pytest.mark.parametrize("image_size", [64, 160, 224, 384])
@pytest.mark.parametrize("augment", ["standard", "light", "none"])
def test_needed_short_side_is_the_trainers_own_rule(image_size, augment):
    """The launcher's torch-free copy of the recipe's crop scales must not drift from the trainer's."""
    train = pytest.importorskip("gpu_run.trainer.train")
    train_tf, eval_tf = train.build_transforms(image_size, augment)
    trainer_needs = max(train.decode_short_side(train_tf), train.decode_short_side(eval_tf))
    assert cache.needed_short_side(image_size, augment) == trainer_needs


# Generated photos -----------------------------------------------------------------------------


def photo(path, size, seed, orientation=1, mode="RGB"):
    """A textured JPEG: coloured shapes and noise, so it compresses like a photo and resampling shows."""
    rng = random.Random(seed)
    w, h = size
    im = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(im)
    for _ in range(12):
        x, y, r = rng.randrange(w), rng.randrange(h), rng.randrange(w // 20 + 1, w // 3 + 2)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    noise = Image.merge("RGB", [Image.effect_noise((w // 4 + 1, h // 4 + 1), 40).resize(size) for _ in range(3)])
    im = ImageChops.overlay(im.filter(ImageFilter.BoxBlur(2)), noise).convert(mode)
    exif = Image.Exif()
    if orientation != 1:
        exif[cache.EXIF_ORIENTATION] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, "JPEG", quality=90, exif=exif)
    return path


def dataset(root, size, per_class=2):
    seed = 0
    for split in ("train", "val"):
        for cls in ("a", "b"):
            for i in range(per_class):
                seed += 1
                photo(root / split / cls / f"{i}.jpg", size, seed)
    return root


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    return dataset(tmp_path_factory.mktemp("large"), (2000, 1500))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return dataset(tmp_path_factory.mktemp("small"), (320, 240))


# The decision ---------------------------------------------------------------------------------


def test_large_images_get_a_copy_at_the_needed_size(large):
    advice = cache.advise_cache(large, 224, "light")
    assert (advice.images, advice.median_short_side, advice.needed_short_side) == (8, 1500, 334)
    assert advice.helps and advice.cache_size == 334
    assert 0 < advice.sample_cached_bytes < advice.sample_bytes and advice.cached_bytes < advice.dataset_bytes
    assert advice.decode_speedup > 1 and advice.decode_s_saved_per_epoch > 0 and advice.make_s > 0
    assert "median short side is 1500 px" in advice.message and "--cache-size 334 would upload" in advice.message
    assert advice.message.endswith("--cache-size auto does it")


def test_large_for_one_recipe_is_not_for_another(large):
    """1500 px is 4.5x what light training reads, but not twice the 915 px of the standard recipe,
    whose smallest crops use them: no copy, decided from headers alone."""
    advice = cache.advise_cache(large, 224, "standard")
    assert (advice.needed_short_side, advice.helps, advice.cache_size) == (915, False, 0)
    assert advice.sample_bytes == 0 and advice.decode_s is None  # nothing decoded for a no
    assert "not over twice the 915 px" in advice.message and "makes none" in advice.message


def test_small_images_get_no_copy(small):
    advice = cache.advise_cache(small, 224, "none")
    assert (advice.median_short_side, advice.cache_size) == (240, 0)
    assert cache.resolve_cache_size("auto", small, 224, "none", measure=True) == (0, advice)


def test_a_number_is_used_as_given(small):
    assert cache.resolve_cache_size(300, small) == (300, None)
    assert cache.resolve_cache_size(0, small) == (0, None)


def test_auto_measures_only_until_the_copy_exists(large, gpu_run_home):
    size, advice = cache.resolve_cache_size("auto", large, 224, "light")
    assert size == 334 and advice.decode_s is not None
    cache.cached_dataset(large, size, workers=1)
    size, again = cache.resolve_cache_size("auto", large, 224, "light")
    assert size == 334 and again.decode_s is None  # a re-run decides from headers: milliseconds
    assert cache.resolve_cache_size("auto", large, 224, "light", measure=True)[1].decode_s is not None


def test_headers_only_without_measure(large):
    advice = cache.advise_cache(large, 224, "light", measure=False)
    assert advice.cache_size == 334 and advice.decode_s is None and advice.cached_bytes is None
    assert advice.message.startswith("the images' median short side is 1500 px, 4.5x the 334 px")
    assert advice.message.endswith("--cache-size 334 would shrink them; --cache-size auto does it")


# The savings arithmetic -----------------------------------------------------------------------


def test_savings_arithmetic_and_message():
    advice = cache.CacheAdvice(image_size=224, augment="none", images=1000, dataset_bytes=3_900_000_000,
                               median_short_side=3024, needed_short_side=256, sample_bytes=96_000_000,
                               sample_cached_bytes=3_840_000, decode_s=0.050, cached_decode_s=0.005, make_s=0.08)
    assert advice.helps and advice.cache_size == 256
    assert advice.bytes_ratio == pytest.approx(0.04)
    assert advice.cached_bytes == 156_000_000
    assert advice.decode_speedup == pytest.approx(10)
    assert advice.decode_s_saved_per_epoch == pytest.approx(45)
    assert advice.message == (
        "the images' median short side is 3024 px, 12x the 256 px that 224 px training with --augment none "
        "reads: --cache-size 256 would upload 0.04x the bytes (3.9 GB -> 156 MB) and decode 10x faster "
        "(45 core-s less per epoch); --cache-size auto does it")


def test_exactly_twice_is_not_enough():
    advice = cache.CacheAdvice(image_size=224, augment="none", images=1, dataset_bytes=1, median_short_side=512,
                               needed_short_side=256)
    assert not advice.helps and advice.cache_size == 0
    assert dataclasses.replace(advice, median_short_side=513).cache_size == 256


# The copy, decoded at reduced scale -----------------------------------------------------------


def full_decode_copy(src, size):
    """The copy as resize_one made it before the reduced-scale decode (full decode, then bicubic),
    before and after its JPEG encoding at quality 90."""
    with Image.open(src) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        scale = size / min(im.size)
        exact = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    exact.save(buf, "JPEG", quality=90)
    return exact, Image.open(buf).convert("RGB")


def mean_diff(a, b) -> float:
    """The largest per-channel mean absolute difference, in levels out of 255."""
    return max(ImageStat.Stat(ImageChops.difference(a.convert("RGB"), b.convert("RGB"))).mean)


def assert_same_copy_within_resampling(copy_path, src, size):
    """Same size as the full-decode copy, and closer to it than that copy is to its own pixels
    before JPEG encoding: the reduced decode changes less than the copy's re-encoding already does."""
    exact, saved = full_decode_copy(src, size)
    with Image.open(copy_path) as copy:
        assert copy.size == saved.size
        assert copy.getexif().get(cache.EXIF_ORIENTATION, 1) == 1
        assert mean_diff(copy, saved) < mean_diff(saved, exact), (mean_diff(copy, saved), mean_diff(saved, exact))
        return copy.size


@pytest.mark.parametrize("size", [256, 500, 749])
def test_reduced_decode_copy_has_the_full_decode_size_and_pixels_within_noise(tmp_path, size):
    src = photo(tmp_path / "p.jpg", (2001, 1499), seed=3)  # odd sides: rounding differs by scale
    with Image.open(src) as im:
        im.draft("RGB", (size, size))
        assert min(im.size) < 1499  # the JPEG really is decoded at reduced scale for this size
    assert cache.resize_one((str(src), str(tmp_path / "c.jpg"), size)) == str(tmp_path / "c.jpg")
    assert_same_copy_within_resampling(tmp_path / "c.jpg", src, size)


@pytest.mark.parametrize("orientation", [6, 8])
def test_reduced_decode_copy_is_upright_with_the_full_decode_size(tmp_path, orientation):
    src = photo(tmp_path / "p.jpg", (1600, 1200), seed=4, orientation=orientation)
    cache.resize_one((str(src), str(tmp_path / "c.jpg"), 300))
    assert assert_same_copy_within_resampling(tmp_path / "c.jpg", src, 300) == (300, 400)


def test_grey_stays_grey_and_small_stays_its_size(tmp_path):
    grey = photo(tmp_path / "g.jpg", (1200, 900), seed=5, mode="L")
    cache.resize_one((str(grey), str(tmp_path / "g2.jpg"), 200))
    with Image.open(tmp_path / "g2.jpg") as im:
        assert (im.mode, im.size) == ("L", (267, 200))
    small = photo(tmp_path / "s.jpg", (300, 200), seed=6)
    cache.resize_one((str(small), str(tmp_path / "s2.jpg"), 256))
    with Image.open(tmp_path / "s2.jpg") as im:
        assert im.size == (300, 200)  # never enlarged


def test_unreadable_source_is_left_out(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    assert cache.resize_one((str(tmp_path / "bad.jpg"), str(tmp_path / "out.jpg"), 64)) is None
    assert not (tmp_path / "out.jpg").exists()


def test_copies_made_the_full_decode_way_are_kept():
    """The reduced-scale decode changes resampling only: copies made before it stay valid, so
    the copy format (which would re-make every user's copy and upload it again) is unchanged."""
    assert cache.COPY_FORMAT == 2


# Through `gpu-run train` ----------------------------------------------------------------------


@pytest.mark.slow
def test_train_makes_the_copy_by_default_when_the_photos_are_much_larger(cli, tmp_path, gpu_run_home):
    """The default --cache-size auto: photos far larger than training reads are trained from a
    copy at the size it needs (said in one line); the run records the size it used."""
    import json

    from gpu_run.ledger import Ledger
    from gpu_run.paths import ledger_path

    rng = random.Random(0)
    data = tmp_path / "photos"
    for split, n in (("train", 4), ("val", 2)):
        for c, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            (data / split / c).mkdir(parents=True)
            for i in range(n):
                im = Image.new("RGB", (400, 300), colour)
                ImageDraw.Draw(im).ellipse([rng.randint(0, 200), rng.randint(0, 150), 300, 250], fill=(240, 240, 240))
                im.save(data / split / c / f"{i}.jpg", quality=90)
    need = cache.needed_short_side(32, "standard")  # 131 px: the photos' 300 px is over twice that
    proc = cli("train", "--host", "local", "--data", str(data), "--epochs", "1", "--image-size", "32",
               "--batch-size", "4", "--workers", "0", "--weights", "none",
               env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"}, check=True)
    assert f"--cache-size {need} would" in proc.stdout and "--cache-size auto does it" in proc.stdout
    run = Ledger(ledger_path()).list_runs()[0]
    assert run.status == "succeeded"
    assert json.loads(run.args_json)["spec"]["cache_size"] == need
    copy = cache.cache_root(data, need)
    assert min(Image.open(next((copy / "train" / "red").glob("*.jpg"))).size) == need
