"""Move folders between the laptop and a host over one SSH channel, incrementally.

Both sides list their files as a manifest (path -> size, mtime in whole seconds); only files that
differ travel, as one `tar` stream through one SSH connection (the OpenSSH client when the laptop
has it, paramiko otherwise; faster than rsync for the first copy of many small files and for a
no-change re-sync: see benchmarks/bench_sync.py), and
files gone from the source are deleted at the destination. Each file that arrived whole gets its
source mtime, so it matches on the next comparison; a file cut off by a dropped connection does
not, and is sent again on the retry, while everything that arrived is not. Pulls treat the host as
untrusted (see "Host -> laptop" below).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import subprocess
import tarfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, cast

import paramiko
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from gpu_run.errors import BackendError
from gpu_run.remote import Remote, quote

Manifest = dict[str, tuple[int, int]]  # relative path -> (size, mtime seconds)
CHUNK = 1 << 20


@dataclass
class SyncStats:
    files_sent: int = 0
    bytes_sent: int = 0
    deleted: int = 0
    attempts: int = 0
    left_behind: list[str] = field(default_factory=list)  # what a pull's size cap left on the host
    left_behind_bytes: int = 0


# Manifests (pure where they can be) -----------------------------------------------------------


def local_manifest(root: str | os.PathLike[str]) -> Manifest:
    """Every regular file below root, hidden names left out (temp files and OS litter such as
    .DS_Store or .last.pth.tmp-123); a symlinked folder is not walked into. One scandir pass with
    relative paths built by concatenation: four times faster than os.walk + os.path.relpath on
    10,000 files, and it runs on every sync."""
    out: Manifest = {}
    root = os.fspath(root)
    if not os.path.isdir(root):
        return out
    folders = [("", root)]
    while folders:
        prefix, folder = folders.pop()
        try:
            entries = os.scandir(folder)
        except OSError:
            continue  # as os.walk: a folder that cannot be listed is left out
        with entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                rel = prefix + entry.name
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    is_dir = False
                if is_dir:
                    if not entry.is_symlink():
                        folders.append((rel + os.sep, entry.path))
                    continue
                st = entry.stat()  # follows a symlinked file, as tar -c does
                # Whole seconds by integer division: int(st_mtime) goes through a float, which rounds
                # x.9999999 up to the next second, while tar and find's %Ts keep x.
                out[rel] = (st.st_size, st.st_mtime_ns // 1_000_000_000)
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


def manifest_digest(manifest: Manifest) -> str:
    """sha256 of the manifest as the host's `_PUSH_MANIFEST` script hashes its own: one
    `path TAB size TAB mtime` record per file, sorted bytewise, each ended by NUL. Size and mtime
    are digits, so a record reads back one way only, and equal digests mean equal manifests."""
    records = sorted(os.fsencode(path) + b"\t%d\t%d" % meta for path, meta in manifest.items())
    return hashlib.sha256(b"".join(r + b"\0" for r in records)).hexdigest()


def parse_manifest_records(raw: bytes, host: str = "the host") -> Manifest:
    """`find -printf '%P\\t%s\\t%Ts\\0'` output -> manifest. A path may hold tabs: size and mtime
    are the last two fields."""
    out: Manifest = {}
    for record in raw.split(b"\0"):
        if not record:
            continue
        fields = record.rsplit(b"\t", 2)
        if len(fields) != 3 or not fields[1].isdigit() or not fields[2].lstrip(b"-").isdigit():
            raise BackendError(
                f"{host} listed its files in a form gpu-run cannot read ({record[:80]!r}); "
                f"it needs GNU find, sort and sha256sum"
            )
        path = os.fsdecode(fields[0])
        if path and not any(p.startswith(".") for p in path.split("/")):
            out[path] = (int(fields[1]), int(fields[2]))
    return out


# The host's side of a push's only round trip before the data: it reads the laptop's manifest
# digest from stdin and answers `same` when its own manifest hashes the same (a re-sync with no
# change moves 5 bytes), else its manifest. The laptop walks its folder while this command starts
# (on a host whose ~/.bashrc runs conda or pyenv init, that alone takes 0.1 s), so the two overlap.
# Listed twice when they differ (a second find of a folder just read is cheap): the shell cannot
# hold NULs in a variable, and a temp file would be one more thing left on the host.
_PUSH_MANIFEST = r"""IFS= read -r want
[ -d "$1" ] || exit 0
list() { find "$1" -mindepth 1 -name '.*' -prune -o -type f -printf '%P\t%s\t%Ts\0'; }
have=$(list "$1" | LC_ALL=C sort -z | sha256sum)
if [ "${have%% *}" = "$want" ]; then echo same; else list "$1"; fi"""


def push_manifests(
    remote: Remote, local_root: Path, remote_root: str, manifest: Manifest | None = None
) -> tuple[Manifest, Manifest]:
    """(laptop's manifest, host's manifest) in one SSH exec, the laptop's computed while the host
    starts the command (or the one the caller made: a project less what it leaves out)."""
    host = remote.target.alias
    channel = remote.open(quote(["sh", "-c", _PUSH_MANIFEST, "sh", remote_root]))
    try:
        local = manifest if manifest is not None else local_manifest(local_root)
        channel.sendall(f"{manifest_digest(local)}\n".encode())
        channel.shutdown_write()
        out = channel.makefile("rb").read()
        err = channel.makefile_stderr("rb").read().decode(errors="replace").strip()
        code = channel.recv_exit_status()
    finally:
        channel.close()
    if code == -1:  # no exit status: the connection went (the callers that reconnect retry this)
        raise ConnectionResetError(f"the connection to {host} dropped")
    if code != 0:
        shown = err.splitlines()[-1] if err else f"exit code {code}"
        raise BackendError(f"listing {remote_root} on {host} failed: {shown}")
    if out == b"same\n":
        return local, dict(local)
    return local, parse_manifest_records(out, host)


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
            self.proc = subprocess.Popen(
                [*argv, command], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, bufsize=0
            )
        else:
            self.channel = remote.open(command)

    def write(self, chunk: bytes) -> None:
        if self.proc:
            assert self.proc.stdin is not None  # opened with stdin=PIPE
            try:
                self.proc.stdin.write(chunk)
            except BrokenPipeError:
                raise ConnectionError(f"the connection to {self.remote.target.alias} dropped") from None
        else:
            assert self.channel is not None  # opened when there is no OpenSSH client
            self.channel.sendall(chunk)

    def close(self) -> tuple[int, str]:
        if self.proc:
            assert self.proc.stdin is not None and self.proc.stderr is not None  # both PIPE
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            code = self.proc.wait()
            err = self.proc.stderr.read().decode(errors="replace").strip()
            if code == 255:  # ssh's own failure: the connection, not the command
                raise ConnectionError(f"the connection to {self.remote.target.alias} dropped: {err}")
            return code, err
        assert self.channel is not None  # opened when there is no OpenSSH client
        self.channel.shutdown_write()
        code = self.channel.recv_exit_status()
        return code, self.channel.makefile_stderr("rb").read().decode(errors="replace").strip()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _send_once(
    remote: Remote,
    local_root: Path,
    remote_root: str,
    stats: SyncStats,
    progress: Callable[..., None],
    manifest: Manifest | None = None,
    delete_extra: bool = True,
) -> None:
    send, delete = diff_manifests(*push_manifests(remote, local_root, remote_root, manifest))
    if delete and delete_extra:
        remote.run(f"cd {quote([remote_root])} && xargs -0 rm -f --", input=b"\0".join(map(os.fsencode, delete)))
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
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )
    assert tar.stdin is not None and tar.stdout is not None and tar.stderr is not None  # all PIPE
    # The file list goes in on a thread so a long list cannot block on tar's full output pipe.
    # os.fsencode: a name that is not UTF-8 goes as the bytes it has on disk (str.encode would
    # raise in the thread, leave tar's stdin open, and hang the sync).
    names = b"\0".join(map(os.fsencode, send))

    def feed() -> None:
        assert tar.stdin is not None  # narrowed above, but not inside this function
        try:
            tar.stdin.write(names)
        except BrokenPipeError:
            pass  # tar stopped early: its exit status says why
        finally:
            tar.stdin.close()

    feeder = threading.Thread(target=feed)
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
        if "No space left on device" in err:
            raise BackendError(
                f"no space left on device on {remote.target.alias} while syncing into {remote_root}; "
                f"free space there (df -h) or set the host's workdir to a bigger disk"
            )
        shown = err.splitlines()[-1] if err else f"exit code {code}"
        raise BackendError(f"unpacking on {remote.target.alias} failed: {shown}")
    stats.files_sent += len(send)


_RETRYABLE = (paramiko.SSHException, OSError, EOFError)


def push(
    remote: Remote,
    local_root: Path,
    remote_root: str,
    progress: Callable[..., None] | None = None,
    attempts: int = 6,
    manifest: Manifest | None = None,
    delete_extra: bool = True,
) -> SyncStats:
    """Make remote_root equal local_root (the files of `manifest` only, when given); reconnects and
    resumes after a dropped connection. delete_extra=False adds to remote_root and deletes nothing."""
    stats = SyncStats()
    progress = progress or (lambda **_: None)

    @retry(
        retry=retry_if_exception_type(_RETRYABLE),
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=0.5, max=10),
        reraise=True,
    )
    def attempt() -> None:
        stats.attempts += 1
        try:
            _send_once(remote, Path(local_root), remote_root, stats, progress, manifest, delete_extra)
        except _RETRYABLE:
            remote.close()
            raise

    try:
        attempt()
    except _RETRYABLE as e:
        raise BackendError(
            f"lost the connection to {remote.target.alias} while syncing ({e}); run again to resume"
        ) from None
    return stats


# Host -> laptop -------------------------------------------------------------------------------
# The host is not trusted: whoever controls it controls the tar stream, and on some Python
# versions (3.11.7 here, CVE-2025-4517) tarfile's own "data" filter can be talked past. So the
# stream is only *parsed* by tarfile; every byte is written here, and only regular files that the
# laptop asked for, of the size the host listed, whose sha256 matches the one the host's
# sha256sum gave, ever become visible in the run folder.

PULL_HEADER_SLACK = 2048  # bytes of tar headers a file may bring beyond its own (long-name / pax records)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def safe_relpath(name: str) -> bool:
    """A plain relative path below the folder: no absolute path, no `..`, `.` or empty parts."""
    return (
        bool(name)
        and "\0" not in name
        and "\\" not in name
        and not name.startswith("/")
        and all(part not in ("", ".", "..") for part in name.split("/"))
    )


_SHA256SUM_ESCAPES = {"\\": "\\", "n": "\n", "r": "\r"}


def parse_sha256sum(raw: str) -> dict[str, str]:
    """`sha256sum` output -> {path: hex digest}. GNU sha256sum marks a line whose name holds a
    newline or backslash with a leading backslash and escapes them, so each file is one line."""
    out: dict[str, str] = {}
    for line in raw.split("\n"):
        escaped = line.startswith("\\")
        if escaped:
            line = line[1:]
        if len(line) < 66 or line[64:66] not in ("  ", " *"):
            continue
        name = line[66:]
        if escaped:
            chars, i = [], 0
            while i < len(name):
                if name[i] == "\\" and i + 1 < len(name):
                    chars.append(_SHA256SUM_ESCAPES.get(name[i + 1], name[i : i + 2]))
                    i += 2
                else:
                    chars.append(name[i])
                    i += 1
            name = "".join(chars)
        out[name] = line[:64].lower()
    return out


def remote_sha256(remote: Remote, root: str, paths: list[str]) -> dict[str, str]:
    """The host's sha256 of each path (a file it cannot read is simply absent)."""
    out = remote.run(f"cd {quote([root])} && xargs -0 sha256sum --", input="\0".join(paths).encode(), check=False)
    return parse_sha256sum(out.stdout)


class _Capped:
    """A read-only stream that refuses to deliver more than `limit` bytes: tarfile buffers whole
    pax and long-name headers in memory, so a hostile host could otherwise make it swallow gigabytes."""

    def __init__(self, raw, limit: int, host: str):
        self.raw, self.limit, self.host, self.count = raw, limit, host, 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n if n is not None and n >= 0 else self.limit - self.count + 1)
        self.count += len(data)
        if self.count > self.limit:
            raise BackendError(
                f"{self.host} sent more than the {self.limit} bytes the asked files take; "
                f"refusing the pull: the host is misbehaving"
            )
        return data


def _safe_parent(root: Path, name: str) -> Path:
    """The folder `name` goes in, created as needed; a symlink (or a file) on the way is refused,
    since writing through it could land anywhere on the laptop."""
    current = root
    for part in name.split("/")[:-1]:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            try:
                os.mkdir(current, 0o755)
            except OSError as e:
                raise BackendError(f"cannot create {current}: {e.strerror}") from None
            continue
        if not stat.S_ISDIR(st.st_mode):  # lstat: a symlink to a folder is not a folder here
            raise BackendError(
                f"{current} is a symlink or a file, not a folder; refusing to write {name} through it. "
                f"Remove it and run `gpu-run pull` again"
            )
    return current


def _write_verified(root: Path, name: str, source, size: int, mtime: int, digest: str, host: str) -> None:
    """Copy one member into a fresh temp file beside its target; it replaces the target only once
    its size and sha256 are right (a cut-off or corrupted copy never shows)."""
    parent = _safe_parent(root, name)
    base = name.rsplit("/", 1)[-1]
    target = parent / base
    # Dot-named: local_manifest ignores it, so a leftover never counts as having arrived.
    tmp = parent / f".{base}.part-{secrets.token_hex(4)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        try:
            fd = os.open(tmp, flags, 0o644)
        except OSError as e:
            raise BackendError(f"cannot write {tmp}: {e.strerror}") from None
        h = hashlib.sha256()
        written = 0
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(CHUNK):  # a dropped connection raises here: retried
                written += len(chunk)
                h.update(chunk)
                try:
                    out.write(chunk)
                except OSError as e:
                    raise BackendError(f"cannot write {tmp}: {e.strerror}") from None
        if written != size:
            raise tarfile.ReadError(f"{name} arrived with {written} of {size} bytes")
        if h.hexdigest() != digest:
            raise BackendError(
                f"{name} from {host} does not match the sha256 the host gave for it; nothing was "
                f"replaced. Run `gpu-run pull` again; if it repeats, the host is corrupting data"
            )
        try:
            os.utime(tmp, (mtime, mtime))  # the next manifest comparison sees it as arrived
            if target.is_dir() and not target.is_symlink():
                raise BackendError(f"{target} is a folder where {host} has a file; move it away and pull again")
            os.replace(tmp, target)
        except OSError as e:
            raise BackendError(f"cannot write {target}: {e.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _refusal(member: tarfile.TarInfo, expected: dict[str, tuple[int, int, str]], seen: set[str]) -> str | None:
    """Why this member must not be written, or None when it is a file that was asked for."""
    if not safe_relpath(member.name):
        return "a path outside the run folder"
    if member.issym() or member.islnk():
        return f"a link (to {member.linkname!r})"
    if not member.isreg() or member.issparse():
        return "something that is not a regular file"
    if member.name not in expected:
        return "a file that was not asked for"
    if member.name in seen:
        return "the same file twice"
    if member.size != expected[member.name][0]:
        return f"{member.size} bytes where its listing said {expected[member.name][0]}"
    return None


class _Incomplete(BackendError):
    """The stream ended cleanly without every asked file (the host's tar failed, or lied)."""


def extract_stream(
    stream,
    local_root: Path,
    expected: dict[str, tuple[int, int, str]],
    host: str = "the host",
    stats: SyncStats | None = None,
) -> SyncStats:
    """Write the files of a tar stream into local_root. `expected` maps each asked path to (size,
    mtime, sha256) as the host listed them; any other member (a link, a device, a folder, a path
    outside, a file not asked for or sent twice, a size that differs) aborts with BackendError
    before a byte of it is written. Files already written stay: they were verified."""
    stats = stats or SyncStats()
    limit = tar_size([size for size, _, _ in expected.values()]) + sum(
        PULL_HEADER_SLACK + 2 * len(p.encode()) for p in expected
    )
    capped = _Capped(stream, limit, host)
    seen: set[str] = set()
    try:
        # A stream ("r|") only reads its fileobj: typeshed asks for a whole file object.
        with tarfile.open(fileobj=cast("IO[bytes]", capped), mode="r|") as tar:
            for member in tar:
                why = _refusal(member, expected, seen)
                if why:
                    raise BackendError(
                        f"{host} sent {why}: {member.name!r}; refusing the pull (nothing of it "
                        f"was written): the host is misbehaving"
                    )
                seen.add(member.name)
                size, mtime, digest = expected[member.name]
                _write_verified(local_root, member.name, tar.extractfile(member), size, mtime, digest, host)
                stats.files_sent += 1
                stats.bytes_sent += size
        while capped.read(CHUNK):  # the rest of tar's last record: bounded like the rest
            pass
    except tarfile.ReadError:
        raise
    except tarfile.TarError as e:
        raise BackendError(f"{host} sent an unreadable archive ({e}); refusing the pull") from None
    missing = sorted(set(expected) - seen)
    if missing:
        raise _Incomplete(f"{host} sent {len(seen)} of the {len(expected)} files asked for ({missing[0]} is missing)")
    return stats


def within_cap(send: list[str], manifest: Manifest, max_bytes: int) -> tuple[list[str], list[str]]:
    """(files to pull, files left behind): the smallest first while they fit in max_bytes, so that
    a host listing one huge file cannot crowd out the many small ones (a script's checkpoints)."""
    taken, left, total = [], [], 0
    for path in sorted(send, key=lambda p: (manifest[p][0], p)):
        if total + manifest[path][0] <= max_bytes:
            taken.append(path)
            total += manifest[path][0]
        else:
            left.append(path)
    return sorted(taken), left


def _fetch_once(
    remote: Remote,
    remote_root: str,
    local_root: Path,
    stats: SyncStats,
    keep: Callable[[str, tuple[int, int]], bool] | None = None,
    max_bytes: int | None = None,
) -> None:
    host = remote.target.alias
    manifest = remote_manifest(remote, remote_root)
    send, _ = diff_manifests(manifest, local_manifest(local_root))
    if keep is not None:
        send = [p for p in send if keep(p, manifest[p])]
    if max_bytes is not None:
        send, left = within_cap(send, manifest, max_bytes)
        stats.left_behind, stats.left_behind_bytes = left, sum(manifest[p][0] for p in left)
    if not send:
        return
    unsafe = [p for p in send if not safe_relpath(p)]
    if unsafe:
        raise BackendError(
            f"{host} listed a file outside its output folder ({unsafe[0]!r}); refusing the pull: "
            f"the host is misbehaving"
        )
    # A second round trip, before the stream: the hashes every file must match to be kept.
    sums = remote_sha256(remote, remote_root, send)
    unhashed = [p for p in send if p not in sums]
    if unhashed:
        raise BackendError(
            f"{host} gave no sha256 for {unhashed[0]} (it vanished or is unreadable there); `gpu-run pull` tries again"
        )
    expected = {p: (manifest[p][0], manifest[p][1], sums[p]) for p in send}
    channel = remote.open(f"cd {quote([remote_root])} && tar --null -T - -cf -")
    channel.sendall("\0".join(send).encode())
    channel.shutdown_write()
    try:
        extract_stream(channel.makefile("rb"), local_root, expected, host, stats)
    except (tarfile.ReadError, _Incomplete):
        # A tar that failed on the host explains a short stream better than a dropped connection.
        channel.status_event.wait(5)
        if channel.exit_status_ready() and (code := channel.recv_exit_status()) != 0:
            err = channel.makefile_stderr("rb").read().decode(errors="replace").strip()
            raise BackendError(f"packing outputs on {host} failed: {err or f'exit code {code}'}") from None
        raise
    finally:
        channel.close()


def pull(
    remote: Remote,
    remote_root: str,
    local_root: Path,
    verify: list[str] | None = None,
    attempts: int = 6,
    keep: Callable[[str, tuple[int, int]], bool] | None = None,
    max_bytes: int | None = None,
) -> SyncStats:
    """Bring new or changed files from remote_root into local_root, every one sha256-verified;
    reconnects and resumes after a dropped connection. `keep(path, (size, mtime))` picks which of
    them to take, and at most max_bytes of them come (the rest is named in stats.left_behind).
    `verify` is still accepted from callers that named the files to check: every pulled file is
    checked now."""
    stats = SyncStats()
    local_root = Path(local_root)
    local_root.mkdir(parents=True, exist_ok=True)

    @retry(
        retry=retry_if_exception_type(_RETRYABLE + (tarfile.ReadError,)),
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=0.5, max=10),
        reraise=True,
    )
    def attempt() -> None:
        stats.attempts += 1
        try:
            _fetch_once(remote, remote_root, local_root, stats, keep, max_bytes)
        except _RETRYABLE:
            remote.close()
            raise

    try:
        attempt()
    except _RETRYABLE + (tarfile.ReadError,) as e:
        raise BackendError(
            f"lost the connection to {remote.target.alias} while pulling ({e}); `gpu-run pull` resumes"
        ) from None
    return stats
