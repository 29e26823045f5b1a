"""The push's manifest exchange: the host's script and the laptop's digest agree byte for byte
(odd file names included), and a re-sync with no change is one SSH exec that moves a few bytes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from gpu_run.errors import BackendError
from gpu_run.remote import Remote, SshTarget
from gpu_run.sync import ssh_tar
from tests.conftest import missing_test_bed
from tests.conftest import testbed_env as bed_env

ODD_NAMES = ["plain.jpg", "a b/c d.jpg", "tab\there.jpg", "new\nline.jpg", "same", "deep/er/x.png",
             "ünï/çödé.jpg", "back\\slash.jpg"]


def make_tree(root: Path) -> Path:
    for i, name in enumerate(ODD_NAMES):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * (i + 1))
    (root / os.fsdecode(b"latin1-\xe9.jpg")).write_bytes(b"not utf-8 name")
    # Left out on both sides: hidden files and everything under a hidden folder.
    (root / ".DS_Store").write_bytes(b"litter")
    (root / ".cache").mkdir()
    (root / ".cache" / "inside.jpg").write_bytes(b"hidden")
    (root / "deep" / ".last.pth.tmp-1").write_bytes(b"temp")
    return root


def host_script(root: Path, digest: str) -> bytes:
    """The host's side of the exchange, run here by sh as sshd would run it."""
    proc = subprocess.run(["sh", "-c", ssh_tar._PUSH_MANIFEST, "sh", str(root)], input=f"{digest}\n".encode(),
                          capture_output=True, check=True)
    return proc.stdout


def test_host_script_and_laptop_digest_agree_on_odd_names(tmp_path):
    root = make_tree(tmp_path / "data")
    local = ssh_tar.local_manifest(root)
    assert len(local) == len(ODD_NAMES) + 1 and not any("." == p[0] or "/." in p for p in local)
    assert host_script(root, ssh_tar.manifest_digest(local)) == b"same\n"
    # Any other digest: the host lists its files, and they read back as the laptop's manifest.
    listed = host_script(root, "0" * 64)
    assert ssh_tar.parse_manifest_records(listed) == local


def test_a_changed_mtime_or_size_changes_the_answer(tmp_path):
    root = make_tree(tmp_path / "data")
    digest = ssh_tar.manifest_digest(ssh_tar.local_manifest(root))
    os.utime(root / "plain.jpg", (1_600_000_000, 1_600_000_000))
    changed = ssh_tar.parse_manifest_records(host_script(root, digest))
    assert changed["plain.jpg"] == (1, 1_600_000_000)
    assert changed == ssh_tar.local_manifest(root)


def test_missing_folder_is_an_empty_manifest(tmp_path):
    assert host_script(tmp_path / "nothing-here", ssh_tar.manifest_digest({})) == b""


def test_whole_seconds_are_floored_like_tar_and_find(tmp_path):
    path = tmp_path / "f.jpg"
    path.write_bytes(b"x")
    ns = 1_700_000_000 * 10**9 + 999_999_999  # a float would round it up to the next second
    os.utime(path, ns=(ns, ns))
    assert ssh_tar.local_manifest(tmp_path) == {"f.jpg": (1, 1_700_000_000)}
    assert ssh_tar.parse_manifest_records(host_script(tmp_path, "x")) == {"f.jpg": (1, 1_700_000_000)}


def test_a_symlinked_folder_is_not_walked(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.jpg").write_bytes(b"a")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert ssh_tar.local_manifest(tmp_path) == {os.path.join("real", "a.jpg"): (1, ssh_tar.local_manifest(
        tmp_path / "real")["a.jpg"][1])}


@pytest.mark.parametrize("raw", [b"no-tabs\0", b"name\tx\t5\0", b"name\t5\0"])
def test_unreadable_listing_is_refused(raw):
    with pytest.raises(BackendError, match="cannot read"):
        ssh_tar.parse_manifest_records(raw, "odd-box")


@pytest.fixture
def bed_remote(tmp_path):
    bed = bed_env()
    if not bed:
        missing_test_bed("no .testbed/env (sshd not set up)")
    known = tmp_path / "known_hosts"
    port = int(bed["GPU_RUN_TEST_SSH_PORT"])
    host_key = Path(bed["GPU_RUN_TEST_SSH_HOST_KEY"]).read_text().split()[:2]
    known.write_text(f"[127.0.0.1]:{port} {' '.join(host_key)}\n")
    remote = Remote(SshTarget("bed", "127.0.0.1", port, bed["GPU_RUN_TEST_SSH_USER"],
                              (bed["GPU_RUN_TEST_SSH_KEY"],), str(known)))
    try:
        remote.connect()
    except BackendError as e:
        missing_test_bed(f"cannot log in to the test sshd ({e})")
    yield remote
    remote.close()


@pytest.mark.integration
def test_no_change_resync_is_one_exec_over_ssh(bed_remote, tmp_path, monkeypatch):
    data = make_tree(tmp_path / "data")
    dest = tmp_path / "host" / "data"
    first = ssh_tar.push(bed_remote, data, str(dest))
    assert first.files_sent == len(ODD_NAMES) + 1
    assert ssh_tar.local_manifest(dest) == ssh_tar.local_manifest(data)

    execs: list[str] = []
    real_open = Remote.open
    monkeypatch.setattr(Remote, "open", lambda self, command, *a, **k: (execs.append(command),
                                                                          real_open(self, command, *a, **k))[1])
    again = ssh_tar.push(bed_remote, data, str(dest))
    assert (again.files_sent, again.deleted) == (0, 0)
    assert len(execs) == 1  # the manifest exchange, and nothing else

    # A change still travels: one file touched, one removed, one left only on the host.
    os.utime(data / "plain.jpg", (1_600_000_000, 1_600_000_000))
    (data / "same").unlink()
    changed = ssh_tar.push(bed_remote, data, str(dest))
    assert (changed.files_sent, changed.deleted) == (1, 1)
    assert ssh_tar.local_manifest(dest) == ssh_tar.local_manifest(data)
