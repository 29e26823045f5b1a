"""What a user's command brings back into runs/<run-id>/, and what it may not.

Everything it wrote into GPU_RUN_OUTPUT lands in the run folder itself (where our trainer's outputs
land, so `report` and `compare` read both alike), except over a name the laptop writes there; the
files it created or changed in its working directory land in runs/<run-id>/work/. All of it within
the run's pull cap, smallest files first; what the cap leaves on the host is said, with the flag
that fetches it. The project's manifest as it was sent is kept in the run folder, so that a later
`gpu-run pull` from another process knows what "changed" means.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from gpu_run.sync.ssh_tar import Manifest, SyncStats, local_manifest, within_cap
from gpu_run.ui import UI

STATE_DIR = ".gpu-run"  # hidden: no pull and no sync ever lists it
# Top-level names in the run folder that the laptop writes: a host's file never replaces them.
LAPTOP_WRITTEN = frozenset({"summary.json", "train.log", "report", "work", STATE_DIR})
DEFAULT_MAX_PULL_MB = 2048


def write_job_record(run_dir: Path, sent: Manifest, max_pull_mb: int) -> None:
    """What the pull needs later: the project as sent, and the cap."""
    state = run_dir / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    (state / "job.json").write_text(json.dumps({"sent": sent, "max_pull_mb": max_pull_mb}))


def set_pull_cap(run_dir: Path, max_pull_mb: int) -> None:
    """`gpu-run pull RUN --max-pull-mb N`: a bigger cap for this run from now on."""
    path = run_dir / STATE_DIR / "job.json"
    record = json.loads(path.read_text()) if path.is_file() else {"sent": {}}
    record["max_pull_mb"] = max_pull_mb
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


class CommandOutputs:
    """The rules of one run's pull (the same for a host over SSH and for this machine)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.work_dir = self.run_dir / "work"
        path = self.run_dir / STATE_DIR / "job.json"
        record = json.loads(path.read_text()) if path.is_file() else {}
        self.sent: dict[str, tuple[int, int]] = {k: (int(v[0]), int(v[1])) for k, v in record.get("sent", {}).items()}
        self.max_pull_mb = int(record.get("max_pull_mb", DEFAULT_MAX_PULL_MB))
        self.cap_bytes = self.max_pull_mb * 1_000_000
        self.refused: list[str] = []

    def keep_output(self, path: str, meta: tuple[int, int]) -> bool:
        if path.split("/", 1)[0] in LAPTOP_WRITTEN:
            self.refused.append(path)
            return False
        return True

    def keep_work(self, path: str, meta: tuple[int, int]) -> bool:
        """Only what the job created or changed: a file as it was sent stays on the laptop already."""
        return self.sent.get(path) != tuple(meta)

    def copy_local(self, out_dir: Path, work_dir: Path) -> SyncStats:
        """This machine: the outputs are in the run folder already; the changed files of the job's
        working copy are copied into work/, within the cap."""
        now = local_manifest(work_dir)
        have = local_manifest(self.work_dir)
        send = [p for p, meta in now.items() if self.keep_work(p, meta) and have.get(p) != meta]
        taken, left = within_cap(send, now, self.cap_bytes)
        stats = SyncStats(left_behind=left, left_behind_bytes=sum(now[p][0] for p in left))
        for rel in taken:
            target = self.work_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(work_dir / rel, target)
            stats.files_sent += 1
            stats.bytes_sent += now[rel][0]
        return stats

    def report(self, out: SyncStats, work: SyncStats, ui: UI) -> SyncStats:
        """One line of what came, and a warning for what did not."""
        files, size = out.files_sent + work.files_sent, out.bytes_sent + work.bytes_sent
        ui.info(
            f"pulled {files} file(s), {size / 1e6:.1f} MB ({work.files_sent} changed in the working directory, "
            f"into {self.work_dir}); each transferred intact (sha256)"
        )
        if self.refused:
            ui.warn(
                f"left out {len(self.refused)} file(s) the host put where the laptop writes its own "
                f"({', '.join(sorted(set(self.refused))[:3])})"
            )
        left = out.left_behind + work.left_behind
        if left:
            left_mb = (out.left_behind_bytes + work.left_behind_bytes) / 1e6
            ui.warn(
                f"{len(left)} file(s), {left_mb:.0f} MB, stay on the host: over this run's pull cap of "
                f"{self.max_pull_mb} MB ({', '.join(left[:3])}); "
                f"`gpu-run pull {self.run_dir.name} --max-pull-mb N` fetches them while the machine is up"
            )
        return SyncStats(
            files_sent=files,
            bytes_sent=size,
            left_behind=left,
            left_behind_bytes=out.left_behind_bytes + work.left_behind_bytes,
        )
