"""The weights a run starts from, found or fetched on the laptop, so no host needs the internet.

`--weights imagenet` means torchvision's default weights file for the model (resnet18 ->
resnet18-f37072fd.pth). The laptop looks for it in its own cache (the torch hub layout under
torch_cache_dir(), then the user's torch hub folder), downloads it there once if it is missing,
and from then on it travels like a weights file the user named: mounted read-only on the local
host, and sent to an SSH host once, content-addressed (<workdir>/weights/<sha256>.pth).

Torch is imported only to download a missing file or to check a file the user named (it must load
as the trainer loads it, on the laptop, not after the upload): the CLI stays light (model_zoo.py has
the URLs).
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import re
import secrets
import socket
import warnings
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from gpu_run.errors import BackendError, ConfigError
from gpu_run.model_zoo import IMAGENET_WEIGHTS
from gpu_run.paths import torch_cache_dir

DOWNLOAD_TIMEOUT_S = 30  # per connect/read: with no network the download fails fast, not after minutes
UPLOAD_TIMEOUT_S = 3600
HASH_PREFIX = re.compile(r"-([a-f0-9]{6,})\.")  # torchvision names files <model>-<sha256 prefix>.pth


@dataclass(frozen=True)
class Weights:
    """What the trainer starts from: source is none, imagenet, file or resumed (from last.pth); path
    is the file on the laptop."""

    source: str
    path: Path | None = None
    sha256: str | None = None

    def record(self) -> dict:
        """For the run's plan and summary.json."""
        return {
            "source": self.source,
            "file": self.path.name if self.path else None,
            "path": str(self.path) if self.path else None,
            "sha256": self.sha256,
        }


def imagenet_url(model: str) -> str:
    """The URL of torchvision's default (ImageNet) weights for a model; a one-line error if it has none."""
    url = IMAGENET_WEIGHTS.get(model)
    if not url:
        raise ConfigError(
            f"--weights imagenet: torchvision has no pretrained weights for {model}; use --weights none or a .pth file"
        )
    return url


def imagenet_file_name(model: str) -> str:
    """The file name torchvision's weights for a model have (the URL's basename), e.g. resnet18-f37072fd.pth."""
    return os.path.basename(urlparse(imagenet_url(model)).path)


def cache_file(name: str) -> Path:
    """Where gpu-run keeps (and downloads) a torchvision weights file: torch hub layout under its cache."""
    return torch_cache_dir() / "hub" / "checkpoints" / name


def cached_candidates(name: str) -> list[Path]:
    """Places a torchvision weights file may already be on the laptop, gpu-run's own cache first."""
    return [
        cache_file(name),
        torch_cache_dir() / "torch" / "hub" / "checkpoints" / name,  # where the trainer used to download it
        user_torch_hub() / "checkpoints" / name,  # the user's own torch hub cache
    ]


def user_torch_hub() -> Path:
    """torch.hub.get_dir() without importing torch: $TORCH_HOME/hub, else $XDG_CACHE_HOME/torch/hub,
    else ~/.cache/torch/hub."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch"
    )
    return Path(torch_home).expanduser() / "hub"


def download(url: str, dest: Path) -> None:
    """Fetch url into dest once, with a progress bar; the file appears whole or not at all."""
    import torch.hub

    dest.parent.mkdir(parents=True, exist_ok=True)
    match = HASH_PREFIX.search(dest.name)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # urlopen inside torch.hub takes the default timeout
    try:
        # torch.hub writes to a temp name and renames it, and checks the hash prefix in the name.
        torch.hub.download_url_to_file(url, str(dest), hash_prefix=match.group(1) if match else None, progress=True)
    except (OSError, RuntimeError, ValueError) as e:
        reason = " ".join(str(getattr(e, "reason", None) or e).split()) or type(e).__name__
        raise ConfigError(f"cannot download {url} ({reason}); place the file at {dest} or use --weights none") from None
    finally:
        socket.setdefaulttimeout(previous)


def imagenet_weights(model: str, ui=None) -> Path:
    """The laptop's copy of the model's torchvision weights file, downloaded into the cache if missing."""
    url = imagenet_url(model)
    name = os.path.basename(urlparse(url).path)
    for candidate in cached_candidates(name):
        if candidate.is_file() and candidate.stat().st_size > 0:
            return candidate
    dest = cache_file(name)
    if ui is not None:
        ui.info(f"downloading the ImageNet weights of {model} ({name}) once, into {dest.parent}")
    download(url, dest)
    return dest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_weights(weights: str, model: str) -> None:
    """--weights values that cannot work, refused without touching the network."""
    if weights == "none":
        return
    if weights == "imagenet":
        imagenet_url(model)
        return
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"--weights {weights}: no such file; use none, imagenet or a path to a .pth file")
    resolved = path.resolve()
    try:
        found = resolved.stat()
        check_state_dict_file(str(resolved), found.st_size, found.st_mtime_ns)
    except ConfigError as e:
        raise ConfigError(f"--weights {weights}: {e}") from None


@functools.lru_cache(maxsize=16)
def check_state_dict_file(path: str, size: int, mtime_ns: int) -> None:
    """The file loads as the trainer loads it (trainer/train.py load_state_from_file): a dict of
    tensors, or a gpu-run checkpoint holding one under "model". Size and mtime are part of the key
    only, so that the run and each sweep point load an unchanged file once, and a changed one again."""
    import torch

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: the user needs one line
            warnings.simplefilter("ignore")
            # mmap: the tensors are mapped, not read, so a file of gigabytes loads in the time of its index.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except OSError as e:
        raise ConfigError(f"cannot be read ({e.strerror or e}); pass a file you can read") from None
    except pickle.UnpicklingError:
        raise ConfigError(
            "holds more than tensors (a whole model, saved with torch.save(model)?) or is not a "
            "torch.save file; pass one saved with torch.save(model.state_dict(), PATH)"
        ) from None
    except Exception as e:  # truncated, or not a torch.save file at all: torch's own text is pages long
        raise ConfigError(
            f"is not a PyTorch state_dict file, or is cut short ({type(e).__name__}); "
            f"pass a file saved with torch.save(model.state_dict(), PATH)"
        ) from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a gpu-run checkpoint (last.pth, best.pth)
    if not isinstance(state, dict):
        raise ConfigError(
            f"holds a {type(state).__name__}, not a state_dict; "
            f"pass a file saved with torch.save(model.state_dict(), PATH)"
        )
    if not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((k for k, v in state.items() if isinstance(v, dict)), None)
        if inner is not None:
            raise ConfigError(
                f"holds no tensors itself, only a dict under {inner!r}, which the trainer does not "
                f"look in; save that dict alone: torch.save(checkpoint[{inner!r}], PATH)"
            )
        raise ConfigError("holds no tensors; pass a file saved with torch.save(model.state_dict(), PATH)")


def resolve_weights(weights: str, model: str, ui=None, resuming: bool = False) -> Weights:
    """--weights as a file on the laptop (fetched now, before anything starts), or none.
    A resumed run starts from its last.pth, whatever --weights says: nothing to fetch or send."""
    check_weights(weights, model)
    if resuming:
        return Weights("resumed")
    if weights == "none":
        return Weights("none")
    if weights == "imagenet":
        path = imagenet_weights(model, ui)
        source = "imagenet"
    else:
        path = Path(weights).expanduser().resolve()
        source = "file"
    weights_found = Weights(source, path, sha256_file(path))
    if ui is not None:
        ui.info(f"weights: {source} ({path})")
    return weights_found


# On an SSH host ----------------------------------------------------------------------------------

# $1 temp name, $2 final name, $3 size, $4 sha256: the file gets its final name only once the
# bytes that arrived are the whole file, so a cut upload never leaves a bad weights file.
_RECEIVE = (
    'mkdir -p "$(dirname "$2")" && cat > "$1" '
    '&& [ "$(wc -c < "$1")" -eq "$3" ] && [ "$(sha256sum < "$1" | cut -c1-64)" = "$4" ] '
    '&& mv -f "$1" "$2" '
    '|| { rm -f "$1"; echo "nothing was kept: the upload failed or what arrived was not the whole file" >&2; exit 1; }'
)
_PRESENT = 'test -f "$1" && wc -c < "$1" && sha256sum < "$1"'


def weights_on_host(remote, target: str, size: int, digest: str) -> bool:
    """Whether the host already has this exact file (size and sha256 checked there)."""
    out = remote.run(["sh", "-c", _PRESENT, "sh", target], check=False).stdout.split()
    return len(out) >= 2 and out[0] == str(size) and out[1].lower() == digest


def stage_weights(remote, workdir: str, local_file: Path, ui=None) -> str:
    """Put a weights file on the host once, content-addressed; its path there.

    <workdir>/weights/<sha256>.pth: a second run with the same weights (on any run) sends nothing.
    """
    local_file = Path(local_file)
    size = local_file.stat().st_size
    digest = sha256_file(local_file)
    target = f"{workdir}/weights/{digest}.pth"
    host = remote.target.alias
    if weights_on_host(remote, target, size, digest):
        if ui is not None:
            ui.info(f"weights already on {host} ({local_file.name})")
        return target
    temp = f"{target}.partial-{secrets.token_hex(4)}"
    spinner = (
        ui.spinner(f"uploading weights {local_file.name} ({size / 1e6:.1f} MB) to {host}")
        if ui is not None
        else nullcontext()
    )
    with spinner:
        result = remote.run(
            ["sh", "-c", _RECEIVE, "sh", temp, target, str(size), digest],
            input=local_file.read_bytes(),
            check=False,
            timeout_s=UPLOAD_TIMEOUT_S,
        )
    if result.code != 0:
        said = (
            "; ".join(line.strip() for line in result.stderr.splitlines() if line.strip()) or f"exit code {result.code}"
        )
        raise BackendError(f"could not put the weights file {local_file.name} on {host}: {said}")
    if ui is not None:
        ui.info(f"uploaded weights {local_file.name} to {host}")
    return target
