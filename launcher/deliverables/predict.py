"""`gpu-run predict RUN IMAGE...` on the laptop's CPU, and `--export onnx|torchscript`."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import cast

from gpu_run.errors import GpuRunError
from gpu_run.host_text import safe

# Far past any classifier's input and class count; a checkpoint asking for more would only exhaust
# the laptop's memory.
MAX_IMAGE_SIZE = 8192
MAX_CLASSES = 100_000


def load_model(run_dir: Path):
    """best.pth -> (eval-mode model on CPU, classes, eval transform), exactly as the trainer built them."""
    import torch
    import torchvision

    from gpu_run.trainer.train import build_transforms, classification_models, replace_head

    path = run_dir / "checkpoints" / "best.pth"
    if not path.is_file():
        raise GpuRunError(f"{path} does not exist; `gpu-run pull` the run first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises pickle, zip and runtime errors for a damaged file
        raise GpuRunError(
            f"{path} is not a readable checkpoint ({type(e).__name__}); `gpu-run pull` the run again"
        ) from None
    # The host wrote the file: its fields are checked before they size a model or a tensor.
    fields = ckpt if isinstance(ckpt, dict) else {}
    name, classes, size = fields.get("model_name"), fields.get("classes"), fields.get("image_size")
    valid = (
        isinstance(name, str)
        and isinstance(classes, list)
        and 0 < len(classes) <= MAX_CLASSES
        and all(isinstance(c, str) for c in classes)
        and isinstance(size, int)
        and not isinstance(size, bool)
        and 1 <= size <= MAX_IMAGE_SIZE
    )
    if not valid:
        raise GpuRunError(
            f"{path} is not a checkpoint the trainer wrote (its model name, classes or image size is "
            f"missing or wrong); `gpu-run pull` the run again"
        )
    name, classes, size = cast(str, name), cast("list[str]", classes), cast(int, size)  # checked just above
    if name not in classification_models():
        raise GpuRunError(
            f"this torchvision has no model {name[:80]!r}; install the version the run used "
            f"({safe(str(fields.get('versions')))[:200]})"
        )
    model = replace_head(torchvision.models.get_model(name, weights=None), len(classes))
    try:
        model.load_state_dict(fields.get("model"))
    except (RuntimeError, TypeError, AttributeError, ValueError) as e:  # missing, misshapen or no dict at all
        raise GpuRunError(
            f"{path} holds weights that do not fit {name} with {len(classes)} classes "
            f"({type(e).__name__}); `gpu-run pull` the run again"
        ) from None
    model.eval()
    _, eval_tf = build_transforms(size)
    return model, classes, eval_tf, size


def predict(run_dir: Path, images: list[Path], top: int = 3) -> list[dict]:
    import torch

    # The trainer's own loader: a phone photo is turned upright here as it was in training.
    from gpu_run.trainer.train import load_image

    if top < 1:
        raise GpuRunError(f"--top must be at least 1, got {top}")
    model, classes, eval_tf, _ = load_model(run_dir)
    results = []
    for image in images:
        try:
            x = eval_tf(load_image(image)).unsqueeze(0)
        except (OSError, ValueError) as e:
            raise GpuRunError(f"cannot read image {image}: {e}") from None
        with torch.no_grad():
            probs = model(x).softmax(1)[0]
        values, indices = probs.topk(min(top, len(classes)))
        # The names came in the host's checkpoint: no escape sequence of theirs reaches the terminal.
        results.append(
            {
                "image": str(image),
                "top": [
                    {"class": safe(classes[i]), "probability": float(v)}
                    for v, i in zip(values.tolist(), indices.tolist())
                ],
            }
        )
    return results


def export(run_dir: Path, fmt: str) -> Path:
    import torch

    model, classes, _, size = load_model(run_dir)
    out = run_dir / "export"
    out.mkdir(exist_ok=True)
    example = torch.randn(1, 3, size, size)
    if fmt == "torchscript":
        path = out / "model.torchscript.pt"
        with torch.no_grad():
            torch.jit.trace(model, example).save(str(path))
    elif fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise GpuRunError(
                "ONNX export needs the onnx and onnxscript packages: pip install 'gpu-run[export]'"
            ) from None
        path = out / "model.onnx"
        # The exporter prints its progress on stdout, which belongs to --json.
        with contextlib.redirect_stdout(sys.stderr):
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={"image": {0: "batch"}},
            )
    else:
        raise GpuRunError(f"unknown export format {fmt!r}; use onnx or torchscript")
    (out / "classes.txt").write_text("\n".join(classes) + "\n")
    return path
