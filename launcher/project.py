"""The user's project folder, for a run of their own command: what of it is sent to the host.

The folder the command is started from becomes the job's working directory on the host. What goes
there is the folder's manifest less what never belongs on a training host (the run outputs, virtual
environments, version control, caches), less what `.gitignore` and `.gpu-runignore` name, and less
the `--data` folder when it lies inside (that one is staged on its own, content-addressed, and
appears at the same relative path in the working directory). Pure but for the walk.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from gpu_run.errors import ConfigError
from gpu_run.sync.ssh_tar import Manifest, local_manifest

# Never sent, wherever they are in the project: what a run wrote, environments, caches, VCS.
ALWAYS_IGNORED = ("runs", "__pycache__", "node_modules", "wandb", "mlruns", "lightning_logs", "*.egg-info", "*.pyc")
IGNORE_FILES = (".gitignore", ".gpu-runignore")
# A project bigger than this is almost always a dataset given as code: said before anything starts.
PROJECT_LIMIT_BYTES = 300 * 1000 * 1000


@dataclass
class Project:
    root: Path
    manifest: Manifest  # what is sent (relative path -> size, mtime)
    data_rel: str | None  # where --data lies inside the project ("" when it is not inside)

    @property
    def project_id(self) -> str:
        """One mirror per project folder on a host: a changed file is an incremental update."""
        resolved = str(self.root.resolve())
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.root.resolve().name).strip("-.") or "project"
        return f"{slug[:40]}-{hashlib.sha256(resolved.encode()).hexdigest()[:8]}"

    @property
    def bytes(self) -> int:
        return sum(size for size, _ in self.manifest.values())


def ignore_patterns(root: Path) -> list[str]:
    """The patterns of the project's top-level .gitignore and .gpu-runignore (comments, blank lines
    and negations left out: a negation cannot bring back what the defaults leave out)."""
    patterns: list[str] = []
    for name in IGNORE_FILES:
        path = root / name
        if not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            line = line.strip()
            if line and not line.startswith(("#", "!")):
                patterns.append(line)
    return patterns


def is_ignored(rel: str, patterns: list[str]) -> bool:
    """gitignore's rules as far as a training project needs them: a pattern without a slash
    matches a name at any depth (and everything under it); one with a slash matches from the
    project's top; a trailing slash means the folder."""
    parts = rel.split("/")
    for raw in (*ALWAYS_IGNORED, *patterns):
        pattern = raw.rstrip("/")
        if not pattern:
            continue
        if "/" in pattern.lstrip("/") or raw.startswith("/"):
            anchored = pattern.lstrip("/")
            for depth in range(1, len(parts) + 1):
                if fnmatch.fnmatchcase("/".join(parts[:depth]), anchored):
                    return True
            continue
        folders_only = raw.endswith("/")
        names = parts[:-1] if folders_only else parts
        if any(fnmatch.fnmatchcase(name, pattern) for name in names):
            return True
    return False


def data_inside(root: Path, data: Path | None) -> str | None:
    """--data's path relative to the project, or None when it lies elsewhere; the project
    folder itself as --data is refused (its code would be sent twice, once as data)."""
    if data is None:
        return None
    project, folder = root.resolve(), data.resolve()
    if folder == project:
        raise ConfigError(
            f"--data {data} is the project folder itself; pass the dataset's own folder "
            f"(e.g. --data ./dataset), which is sent once and appears at the same path"
        )
    try:
        return folder.relative_to(project).as_posix()
    except ValueError:
        return None


def scan_project(root: Path, data: Path | None) -> Project:
    """The project as it will be sent: its manifest with the ignored files and --data left out."""
    data_rel = data_inside(root, data)
    patterns = ignore_patterns(root)
    everything = local_manifest(root)
    # A virtual environment is known by its pyvenv.cfg, whatever its folder is called.
    left_out = {rel.rpartition("/")[0] for rel in everything if rel.rpartition("/")[2] == "pyvenv.cfg"}
    if data_rel:
        left_out.add(data_rel)
    manifest = {
        rel: meta
        for rel, meta in everything.items()
        if not is_ignored(rel, patterns)
        and not any(rel == d or rel.startswith(d + "/") for d in left_out if d)
        and "pyvenv.cfg" != rel
    }
    project = Project(root=root, manifest=manifest, data_rel=data_rel)
    if project.bytes > PROJECT_LIMIT_BYTES:
        raise ConfigError(
            f"the project folder {root} would send {project.bytes / 1e6:.0f} MB of code "
            f"({biggest_folders(manifest)}); did you mean --data? Pass the dataset as --data DIR, "
            f"or name what to leave out in .gpu-runignore"
        )
    return project


def biggest_folders(manifest: Manifest, shown: int = 3) -> str:
    sizes: dict[str, int] = {}
    for rel, (size, _) in manifest.items():
        top = rel.split("/", 1)[0] + ("/" if "/" in rel else "")
        sizes[top] = sizes.get(top, 0) + size
    top = sorted(sizes.items(), key=lambda kv: -kv[1])[:shown]
    return ", ".join(f"{name} {size / 1e6:.0f} MB" for name, size in top)


def check_command(command: list[str], root: Path) -> None:
    """A command that cannot work where it will run, refused now: a script named after the
    interpreter that is not in the project folder (it would not be on the host either)."""
    if not command or not command[0].strip():
        raise ConfigError("nothing after --: give the command to run, e.g. -- python train.py --epochs 20")
    program = os.path.basename(command[0])
    if re.fullmatch(r"python[0-9.]*", program) and len(command) > 1 and not command[1].startswith("-"):
        script = Path(command[1])
        if script.is_absolute() or not (root / script).is_file():
            raise ConfigError(
                f"{command[1]} is not in the project folder {root}; run gpu-run from the folder that "
                f"holds it (that folder is what is sent to the host)"
            )


def changed_files(sent: Manifest, now: Manifest) -> list[str]:
    """What the job created or changed in its working directory: every file whose size or mtime
    is not what was sent."""
    return sorted(rel for rel, meta in now.items() if sent.get(rel) != meta)


def describe_command(command: list[str]) -> str:
    """The command as a shell line, for listings and the summary."""
    return shlex.join(command)


def is_python_script(command: list[str]) -> bool:
    """`python SCRIPT ...` or `python -m MODULE ...`: what torchrun can start on every process."""
    from gpu_run.backends.base import is_python

    return len(command) > 1 and is_python(command[0])
