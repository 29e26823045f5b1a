"""Move files between a folder and S3 (or any S3-compatible store), incrementally, with boto3.

Runs inside the trainer image on the host: `download` fetches the dataset before training,
`upload` sends the outputs after it (the watchdog calls it, so results survive a terminated
instance). Credentials come from the environment the container was given for this call only.

    python3 -m trainer.s3sync download s3://bucket/prefix/datasets/ID /data [--endpoint-url URL]
    python3 -m trainer.s3sync upload /out s3://bucket/prefix/runs/RUN [--endpoint-url URL]
"""

import argparse
import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3

STATE = ".s3sync-etags.json"  # what was downloaded, so an unchanged object is not fetched again


def split_uri(uri: str):
    if not uri.startswith("s3://"):
        raise SystemExit(f"not an s3:// address: {uri}")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix.rstrip("/")


def list_objects(client, bucket: str, prefix: str) -> dict:
    """relative key -> (size, etag), without the empty "folder" objects (keys ending in /) that
    many S3 consoles create: they are no file."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):
                out[obj["Key"][len(prefix) + 1 :]] = (obj["Size"], obj["ETag"])
    return out


def confined(root: Path, key: str):
    """Where `key` lands below root (already resolved), or None when it would land elsewhere: an
    absolute key, a `..` part, or a folder on the way that is a symlink pointing out."""
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        return None
    target = (root / key).resolve()
    return target if root in target.parents else None


def download(client, uri: str, dest: Path) -> None:
    bucket, prefix = split_uri(uri)
    dest.mkdir(parents=True, exist_ok=True)
    state_path = dest / STATE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    root = dest.resolve()
    remote, refused = {}, []
    for key, meta in list_objects(client, bucket, prefix).items():
        if confined(root, key) is None:
            refused.append(key)
        elif not key.startswith("."):
            remote[key] = meta
    for key in refused:
        print(f"s3sync: skipped {prefix}/{key}: it would land outside {dest}", file=sys.stderr)
    todo = [
        k
        for k, (size, etag) in remote.items()
        if state.get(k) != etag or not (dest / k).is_file() or (dest / k).stat().st_size != size
    ]

    def fetch(key: str) -> None:
        target = confined(root, key)
        if target is None:  # a folder on the way became a symlink since the listing
            raise SystemExit(f"s3sync: refusing {prefix}/{key}: it would land outside {dest}")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        client.download_file(bucket, f"{prefix}/{key}", str(tmp))
        os.replace(tmp, target)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(fetch, todo))
    removed = 0
    for path in [p for p in dest.rglob("*") if p.is_file() and not p.name.startswith(".")]:
        if str(path.relative_to(dest)) not in remote:
            path.unlink()
            removed += 1
    tmp_state = dest / f"{STATE}.tmp"
    tmp_state.write_text(json.dumps({k: etag for k, (_, etag) in remote.items()}))
    os.replace(tmp_state, state_path)
    print(
        json.dumps(
            {
                "event": "s3_download",
                "objects": len(remote),
                "fetched": len(todo),
                "removed": removed,
                "refused": len(refused),
            }
        )
    )


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def upload(client, src: Path, uri: str) -> None:
    bucket, prefix = split_uri(uri)
    files = [
        p
        for p in sorted(src.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(src).parts)
    ]
    sent = 0
    for path in files:
        key = f"{prefix}/{path.relative_to(src)}"
        digest = sha256(path)
        try:
            head = client.head_object(Bucket=bucket, Key=key)
            if head["Metadata"].get("sha256") == digest:
                continue
        except client.exceptions.ClientError:
            pass
        # The sha256 rides along as metadata: multipart ETags are not content hashes.
        client.upload_file(str(path), bucket, key, ExtraArgs={"Metadata": {"sha256": digest}})
        sent += 1
    print(json.dumps({"event": "s3_upload", "files": len(files), "sent": sent}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="incremental S3 download/upload for gpu-run")
    p.add_argument("action", choices=["download", "upload"])
    p.add_argument("source")
    p.add_argument("dest")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (MinIO, OSS, COS, ...)")
    args = p.parse_args(argv)
    client = boto3.client("s3", endpoint_url=args.endpoint_url)
    if args.action == "download":
        download(client, args.source, Path(args.dest))
    else:
        upload(client, Path(args.source), args.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
