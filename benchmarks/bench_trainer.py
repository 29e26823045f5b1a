"""Trainer benchmark: gpu-run's trainer against the plain loop of a typical tutorial.

Claim: on a GPU our trainer (mixed precision, channels-last, cudnn benchmark, pinned memory,
persistent workers, non-blocking copies) trains faster than the tutorial loop (fp32, default
DataLoader, no channels-last), on the same model, data, batch size, workers and epochs.
How: both run in one invocation, on one generated dataset; the figure is training images/s of
the epochs after the first (warm-up), the ratio is ours / tutorial. On the CPU the GPU features
do nothing and the ratio shows the cost of our extras (skipping corrupt images, seeded
augmentation), which should be about 1.
Run: .venv/bin/python benchmarks/bench_trainer.py [--device cuda --models resnet18 resnet50 --image-size 224]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision import datasets, transforms

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpu_run.demo_data import make_dataset  # noqa: E402


def tutorial_loop(data: Path, model_name: str, epochs: int, batch_size: int, image_size: int,
                  workers: int, device: str) -> list[float]:
    """The loop most tutorials show; returns training images/s per epoch."""
    tf = transforms.Compose([
        transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(data / "train", tf), batch_size=batch_size,
                                         shuffle=True, num_workers=workers)
    model = torchvision.models.get_model(model_name, num_classes=len(loader.dataset.classes)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    speeds = []
    for _ in range(epochs):
        model.train()
        seen, t0 = 0, time.perf_counter()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            seen += len(x)
        if device == "cuda":
            torch.cuda.synchronize()
        speeds.append(seen / (time.perf_counter() - t0))
    return speeds


def our_trainer(data: Path, model_name: str, epochs: int, batch_size: int, image_size: int,
                workers: int, device: str) -> tuple[list[float], dict]:
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run(
            [sys.executable, "-m", "gpu_run.trainer.train", "--data", str(data), "--out", out, "--model", model_name,
             "--epochs", str(epochs), "--batch-size", str(batch_size), "--image-size", str(image_size),
             "--workers", str(workers), "--device", device, "--weights", "none", "--log-every", "1000"],
            capture_output=True, text=True, cwd=ROOT, check=True,
        )
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    epochs_ = [e for e in events if e["event"] == "epoch"]
    start = next(e for e in events if e["event"] == "start")
    return [e["train_images_per_s"] for e in epochs_], {"amp": start["amp"], "peak_mb": epochs_[-1].get("gpu_mem_peak_mb")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=["resnet18"])
    p.add_argument("--image-size", type=int, default=None, help="default: 224 on GPU, 64 on CPU")
    p.add_argument("--images", type=int, default=None, help="training images (default: 4000 on GPU, 400 on CPU)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4)
    args = p.parse_args()
    gpu = args.device == "cuda"
    size = args.image_size or (224 if gpu else 64)
    n = args.images or (4000 if gpu else 400)
    data = ROOT / "build" / f"bench-trainer-{n}-{size}"
    if not (data / "train").is_dir():
        make_dataset(data, classes=4, train_per_class=n // 4, val_per_class=max(8, n // 40), size=max(size, 64) + 32)
    name = torch.cuda.get_device_name() if gpu else "CPU"
    print(f"{name}, torch {torch.__version__}, {n} images at {size}px, batch {args.batch_size}, "
          f"{args.workers} workers, {args.epochs} epochs (first is warm-up)")
    print(f"{'model':<12} {'tutorial img/s':>15} {'gpu-run img/s':>14} {'ratio':>6}  notes")
    for model in args.models:
        base = tutorial_loop(data, model, args.epochs, args.batch_size, size, args.workers, args.device)
        ours, info = our_trainer(data, model, args.epochs, args.batch_size, size, args.workers, args.device)
        b, o = statistics.mean(base[1:] or base), statistics.mean(ours[1:] or ours)
        notes = f"amp {info['amp']}" + (f", peak {info['peak_mb']:.0f} MiB" if info["peak_mb"] else "")
        print(f"{model:<12} {b:>15.1f} {o:>14.1f} {o / b:>6.2f}  {notes}")


if __name__ == "__main__":
    main()
