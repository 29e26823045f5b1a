"""Move folders between the laptop and a host over one SSH channel, incrementally.

Both sides list their files as a manifest (path -> size, mtime in whole seconds); only files that
differ travel, as one `tar` stream through one SSH connection (the OpenSSH client when the laptop
has it, paramiko otherwise; faster than rsync for the first copy of many small files and for a
no-change re-sync: see benchmarks/bench_sync.py), and
files gone from the source are deleted at the destination. tar restores mtimes, so a file that
arrived whole matches on the next comparison; a file cut off by a dropped connection does not, and
is sent again on the retry, while everything that arrived is not.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import paramiko
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from launcher.errors import BackendError
from launcher.remote import Remote, quote

Manifest = dict[str, tuple[int, int]]  # relative path -> (size, mtime seconds)
CHUNK = 1 << 20


@dataclass
class SyncStats:
    files_sent: int = 0
    bytes_sent: int = 0
    deleted: int = 0
    attempts: int = 0


# Manifests (pure where they can be) -----------------------------------------------------------


def local_manifest(root: Path) -> Manifest:
    out: Manifest = {}
    root = Path(root)
    if not root.is_dir():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue  # temp files and OS litter (.DS_Store, .last.pth.tmp-123)
            full = os.path.join(dirpath, name)
            st = os.stat(full)
            out[os.path.relpath(full, root)] = (st.st_size, int(st.st_mtime))
    return out


def parse_find_output(raw: str) -> Manifest:
    """`find -printf '%P\\0%s\\0%T@\\0'` output -> manifest (NUL-separated: any file name is safe)."""
    parts = raw.split("\0")
    out: Manifest = {}
    for i in range(0, len(parts) - 2, 3):
        path, size, mtime = parts[i : i + 3]
        if path and not any(p.startswith(".") for p in path.split("/")):
            out[path] = (int(size), int(float(mtime)))
    return out


def diff_manifests(source: Manifest, dest: Manifest) -> tuple[list[str], list[str]]:
    """(paths to send, paths to delete) to make dest equal source."""
    send = sorted(p for p, meta in source.items() if dest.get(p) != meta)
    delete = sorted(p for p in dest if p not in source)
    return send, delete


def remote_manifest(remote: Remote, root: str) -> Manifest:
    script = f"[ -d {quote([root])} ] || exit 0; find {quote([root])} -type f -printf '%P\\0%s\\0%T@\\0'"
    return parse_find_output(remote.run(script).stdout)


def tar_size(sizes: list[int]) -> int:
    """Bytes of a tar stream holding files of these sizes: a 512-byte header each, data padded to
    512, two zero blocks at the end, all rounded up to tar's 10 KiB record."""
    body = sum(512 + -(-s // 512) * 512 for s in sizes) + 1024
    return -(-body // 10240) * 10240


# Laptop -> host -------------------------------------------------------------------------------


OPENSSH_FROM_BYTES = 32 << 20  # below this, the open paramiko connection beats a new ssh handshake


class _Sink:
    """Where the tar stream goes: the OpenSSH client for big streams when there is one (it moves
    bytes faster), else a channel on the paramiko connection that is already open."""

    def __init__(self, remote: Remote, command: str, size: int):
        self.remote = remote
        argv = remote.openssh_argv() if size >= OPENSSH_FROM_BYTES else None
        self.proc = self.channel = None
        if argv:
            self.proc = subprocess.Popen([*argv, command], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, bufsize=0)
        else:
            self.channel = remote.open(command)

    def write(self, chunk: bytes) -> None:
        if self.proc:
            try:
                self.proc.stdin.write(chunk)
            except BrokenPipeError:
                raise ConnectionError(f"the connection to {self.remote.target.alias} dropped") from None
        else:
            self.channel.sendall(chunk)

    def close(self) -> tuple[int, str]:
        if self.proc:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            code = self.proc.wait()
            err = self.proc.stderr.read().decode(errors="replace").strip()
            if code == 255:  # ssh's own failure: the connection, not the command
                raise ConnectionError(f"the connection to {self.remote.target.alias} dropped: {err}")
            return code, err
        self.channel.shutdown_write()
        code = self.channel.recv_exit_status()
        return code, self.channel.makefile_stderr("rb").read().decode(errors="replace").strip()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _send_once(remote: Remote, local_root: Path, remote_root: str, stats: SyncStats,
               progress: Callable[..., None]) -> None:
    send, delete = diff_manifests(local_manifest(local_root), remote_manifest(remote, remote_root))
    if delete:
        remote.run(f"cd {quote([remote_root])} && xargs -0 rm -f --", input="\0".join(delete).encode())
        stats.deleted += len(delete)
    if not send:
        return
    size = tar_size([os.path.getsize(local_root / p) for p in send])
    progress(total=stats.bytes_sent + size)
    sink = _Sink(remote, f"mkdir -p {quote([remote_root])} && tar -C {quote([remote_root])} -xf -", size)
    # Unbuffered: each read returns what the pipe holds, so tar, this loop and ssh run
    # concurrently instead of taking turns over 1 MiB buffers.
    tar = subprocess.Popen(
        ["tar", "-C", str(local_root), "--null", "-T", "-", "-cf", "-"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
    )
    # The file list goes in on a thread so a long list cannot block on tar's full output pipe.
    feeder = threading.Thread(target=lambda: (tar.stdin.write("\0".join(send).encode()), tar.stdin.close()))
    feeder.start()
    try:
        while chunk := tar.stdout.read(CHUNK):
            sink.write(chunk)
            stats.bytes_sent += len(chunk)
            progress(completed=stats.bytes_sent)
        code, err = sink.close()
    finally:
        feeder.join()
        sink.kill()
        if tar.poll() is None:
            tar.kill()
        tar.wait()
    if tar.returncode != 0:
        raise BackendError(f"local tar failed: {tar.stderr.read().decode(errors='replace').strip()}")
    if code != 0:
        raise BackendError(f"unpacking on {remote.target.alias} failed: {err or f'exit code {code}'}")
    stats.files_sent += len(send)


_RETRYABLE = (paramiko.SSHException, OSError, EOFError)


def push(remote: Remote, local_root: Path, remote_root: str, progress: Callable[..., None] | None = None,
         attempts: int = 6) -> SyncStats:
    """Make remote_root equal local_root; reconnects and resumes after a dropped connection."""
    stats = SyncStats()
    progress = progress or (lambda **_: None)

    @retry(retry=retry_if_exception_type(_RETRYABLE), stop=stop_after_attempt(attempts),
           wait=wait_exponential(multiplier=0.5, max=10), reraise=True)
    def attempt() -> None:
        stats.attempts += 1
        try:
            _send_once(remote, Path(local_root), remote_root, stats, progress)
        except _RETRYABLE:
            remote.close()
            raise

    try:
        attempt()
    except _RETRYABLE as e:
        raise BackendError(f"lost the connection to {remote.target.alias} while syncing ({e}); run again to resume") from None
    return stats


# Host -> laptop -------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fetch_once(remote: Remote, remote_root: str, local_root: Path, stats: SyncStats) -> None:
    send, _ = diff_manifests(remote_manifest(remote, remote_root), local_manifest(local_root))
    if not send:
        return
    channel = remote.open(f"cd {quote([remote_root])} && tar --null -T - -cf -")
    channel.sendall("\0".join(send).encode())
    channel.shutdown_write()
    stream = channel.makefile("rb")
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        # The 'data' filter refuses absolute paths, '..', links and devices: nothing from the
        # host can land outside the run folder.
        tar.extractall(local_root, filter="data")
    code = channel.recv_exit_status()
    if code != 0:
        err = channel.makefile_stderr("rb").read().decode(errors="replace").strip()
        raise BackendError(f"packing outputs on {remote.target.alias} failed: {err or f'exit code {code}'}")
    stats.files_sent += len(send)
    stats.bytes_sent += sum(os.path.getsize(local_root / p) for p in send)


def pull(remote: Remote, remote_root: str, local_root: Path, verify: list[str] | None = None,
         attempts: int = 6) -> SyncStats:
    """Bring new or changed files from remote_root into local_root; check sha256 of `verify` files."""
    stats = SyncStats()
    local_root = Path(local_root)
    local_root.mkdir(parents=True, exist_ok=True)

    @retry(retry=retry_if_exception_type(_RETRYABLE + (tarfile.ReadError,)), stop=stop_after_attempt(attempts),
           wait=wait_exponential(multiplier=0.5, max=10), reraise=True)
    def attempt() -> None:
        stats.attempts += 1
        try:
            _fetch_once(remote, remote_root, local_root, stats)
        except _RETRYABLE:
            remote.close()
            raise

    try:
        attempt()
    except _RETRYABLE + (tarfile.ReadError,) as e:
        raise BackendError(f"lost the connection to {remote.target.alias} while pulling ({e}); `gpu-run pull` resumes") from None
    present = [p for p in (verify or []) if (local_root / p).is_file()]
    if present:
        out = remote.run(f"cd {quote([remote_root])} && sha256sum -- {quote(present)}").stdout
        remote_sums = {line[66:]: line[:64] for line in out.splitlines() if len(line) > 66}
        for p in present:
            if remote_sums.get(p) != sha256_file(local_root / p):
                (local_root / p).unlink()
                raise BackendError(f"{p} arrived corrupted (sha256 differs from the host's copy); `gpu-run pull` fetches it again")
    return stats
