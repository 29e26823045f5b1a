"""A user's command: the packages its project's requirements.txt names, on a host without internet.

The laptop resolves them (pip download, for the host's Python version and platform, through the
laptop's own index or mirror: PIP_INDEX_URL, PIP_FIND_LINKS and pip.conf apply), the wheels travel
to the host once, and the host unpacks them into a folder of their own that the job finds on its
PYTHONPATH, keyed by the content of what was asked and for which interpreter: an unchanged
requirements.txt installs nothing the second time. Nothing is installed into the image or into the
platform's own environment, and the host needs no pip and no index (AutoDL's and the test bed's
interpreters have none). torch, torchvision and torchaudio are the image's or the platform's own
(a CUDA build matched to the host's driver): those lines are left out, and said.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from gpu_run.errors import ConfigError
from gpu_run.paths import home_dir

REQUIREMENTS = "requirements.txt"
PROVIDED = {"torch", "torchvision", "torchaudio"}  # the host's own CUDA build: never replaced
PIP_TIMEOUT_S = 900
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")

# Run by the job's interpreter on the host: every wheel unpacked into SITE (a wheel is a zip of
# what goes into site-packages; a NAME.data/purelib or platlib folder is moved up as pip does),
# then .complete, so a cut install is never taken for a finished one.
INSTALL = r"""
import os, shutil, sys, zipfile
wheels, site = sys.argv[1], sys.argv[2]
tmp = site + ".partial"
shutil.rmtree(tmp, ignore_errors=True)
os.makedirs(tmp)
for name in sorted(os.listdir(wheels)):
    if name.endswith(".whl"):
        with zipfile.ZipFile(os.path.join(wheels, name)) as wheel:
            for member in wheel.namelist():
                target = os.path.realpath(os.path.join(tmp, member))
                if not target.startswith(os.path.realpath(tmp) + os.sep):
                    sys.exit(f"{name}: {member} would land outside the package folder")
            wheel.extractall(tmp)
for entry in os.listdir(tmp):
    if entry.endswith(".data"):
        for scheme in ("purelib", "platlib"):
            inner = os.path.join(tmp, entry, scheme)
            if os.path.isdir(inner):
                for item in os.listdir(inner):
                    shutil.move(os.path.join(inner, item), os.path.join(tmp, item))
shutil.rmtree(site, ignore_errors=True)
os.rename(tmp, site)
open(os.path.join(site, ".complete"), "w").close()
print(len([n for n in os.listdir(wheels) if n.endswith(".whl")]))
"""


@dataclass
class Requirements:
    lines: list[str]  # what pip resolves (torch and friends left out)
    left_out: list[str]  # the names left out, said to the user

    def key(self, python_version: str, platform: str) -> str:
        """One package folder per (what is asked, for which interpreter)."""
        text = "\n".join(self.lines) + f"\n{python_version}\n{platform}\n"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_requirements(project_root: Path) -> Requirements | None:
    """The project's requirements.txt, or None when it has none (or names only what the host has)."""
    path = project_root / REQUIREMENTS
    if not path.is_file():
        return None
    lines, left_out = [], []
    for raw in path.read_text(errors="replace").splitlines():
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("-") else raw.strip()
        if not line:
            continue
        match = _NAME.match(line)
        if match and not line.startswith("-") and match.group(1).lower().replace("_", "-") in PROVIDED:
            left_out.append(match.group(1))
            continue
        lines.append(line)
    if not lines:
        return Requirements([], left_out) if left_out else None
    return Requirements(lines, left_out)


def pip_platforms(platform: str) -> list[str]:
    """pip's --platform tags for a host's sysconfig platform (linux-x86_64 -> the manylinux tags)."""
    if platform.startswith("linux-"):
        arch = platform.split("-", 1)[1]
        return [f"manylinux_2_{minor}_{arch}" for minor in (17, 28, 31, 34)] + [
            f"manylinux2014_{arch}",
            f"linux_{arch}",
        ]
    return [platform.replace("-", "_").replace(".", "_")]


def download_wheels(req: Requirements, python_version: str, platform: str, project_root: Path) -> Path:
    """The wheels for the host, resolved here (kept in the laptop's cache by key: a second run
    downloads nothing). A requirement that has no wheel for the host is refused in one line."""
    key = req.key(python_version, platform)
    dest = home_dir() / "wheels" / key
    if (dest / ".complete").is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    listed = dest / "requirements.txt"
    listed.write_text("\n".join(req.lines) + "\n")
    major, minor = python_version.split(".")[:2]
    argv = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--disable-pip-version-check",
        "-q",
        "-r",
        str(listed),
        "-d",
        str(dest),
        "--only-binary=:all:",
        "--python-version",
        f"{major}.{minor}",
        "--implementation",
        "cp",
        *[a for tag in pip_platforms(platform) for a in ("--platform", tag)],
    ]
    try:
        proc = subprocess.run(argv, cwd=project_root, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ConfigError(
            f"pip did not finish resolving {REQUIREMENTS} in {PIP_TIMEOUT_S} s; check the laptop's "
            f"package index (PIP_INDEX_URL) or trim the file"
        ) from None
    if proc.returncode != 0:
        said = [line.strip() for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        reason = next(
            (line for line in said if line.startswith("ERROR")), said[-1] if said else f"exit {proc.returncode}"
        )
        raise ConfigError(
            f"{REQUIREMENTS} cannot be installed on the host (Python {major}.{minor}, {platform}): "
            f"{reason.removeprefix('ERROR: ')}; fix the file or the laptop's package index"
        )
    (dest / ".complete").write_text("")
    return dest


def stage_packages(shell, workdir: str, runtime, project_root: Path, send, ui) -> str:
    """The project's requirements installed where the job finds them; the folder as the host sees
    it ("" when there is nothing to install). `shell` runs commands there (SSH or this machine),
    `send(local_dir, host_dir)` copies the wheels, `runtime` knows the job's interpreter."""
    from gpu_run.remote import quote

    req = read_requirements(project_root)
    if req is None:
        return ""
    if req.left_out:
        ui.info(f"{REQUIREMENTS}: {', '.join(req.left_out)} left out: the job uses the host's own build")
    if not req.lines:
        return ""
    version, platform = runtime.python_tags()
    base = f"{workdir}/pydeps/{req.key(version, platform)}"
    site = f"{base}/site"
    if shell.run(["test", "-f", f"{site}/.complete"], check=False).code == 0:
        ui.info(f"the packages of {REQUIREMENTS} are installed there already (nothing sent)")
        return site
    with ui.spinner(f"resolving {REQUIREMENTS} for Python {version} ({platform})"):
        wheels = download_wheels(req, version, platform, project_root)
    count = len(list(wheels.glob("*.whl")))
    shell.run(f"rm -rf {quote([base + '/wheels'])} && mkdir -p {quote([base + '/wheels'])}")
    send(wheels, f"{base}/wheels")
    with ui.spinner(f"installing {count} package(s) from {REQUIREMENTS}"):
        result = shell.run(runtime.install_packages_command(f"{base}/wheels", site), check=False, timeout_s=1800)
    if result.code != 0:
        said = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or [f"exit code {result.code}"]
        raise ConfigError(f"installing {REQUIREMENTS} failed on the host: {said[0]}")
    ui.info(f"installed {count} package(s) from {REQUIREMENTS} into {site}")
    return site
