"""The S3 (or S3-compatible) data path, laptop side: upload the dataset, fetch run outputs.

The dataset goes to s3://bucket/prefix/datasets/<dataset-id>/ with a manifest object beside it
(path -> size, mtime) so a re-run uploads only new or changed files and deletes removed ones; the
uploads run in parallel through boto3's transfer manager. The host fetches it with
`trainer/s3sync.py` in a helper container; the watchdog uploads outputs to
s3://bucket/prefix/runs/<run-id>/, from where `gpu-run pull` fetches them when the host is gone.

Credentials come from boto3's standard chain (environment, .env, shared config/profile). They
are handed to the host only as process environment for the helper containers, never as a file.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import boto3
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from s3transfer.manager import TransferManager

from launcher.config import Host
from launcher.errors import BackendError, ConfigError
from launcher.sync.ssh_tar import diff_manifests, local_manifest

MANIFEST = ".gpu-run-manifest.json"


@dataclass
class UploadStats:
    uploaded: int = 0
    bytes: int = 0
    deleted: int = 0


class S3Store:
    def __init__(self, host: Host):
        if not host.bucket:
            raise ConfigError(f"[hosts.{host.name}]: sync = \"s3\" needs bucket = \"...\"")
        self.bucket = host.bucket
        self.prefix = host.prefix.strip("/")
        self.session = boto3.Session(region_name=host.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
        self.client = self.session.client("s3", endpoint_url=host.s3_endpoint_url)
        self.endpoint_url = self.client.meta.endpoint_url

    def dataset_prefix(self, dataset_id: str) -> str:
        return f"{self.prefix}/datasets/{dataset_id}"

    def run_prefix(self, run_id: str) -> str:
        return f"{self.prefix}/runs/{run_id}"

    def uri(self, key_prefix: str) -> str:
        return f"s3://{self.bucket}/{key_prefix}"

    def credentials_env(self) -> dict[str, str]:
        """What a helper container on the host needs, from the laptop's credential chain."""
        creds = self.session.get_credentials()
        if creds is None:
            raise ConfigError("no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or a profile) in the environment or .env")
        frozen = creds.get_frozen_credentials()
        env = {"AWS_ACCESS_KEY_ID": frozen.access_key, "AWS_SECRET_ACCESS_KEY": frozen.secret_key,
               "AWS_DEFAULT_REGION": self.session.region_name}
        if frozen.token:
            env["AWS_SESSION_TOKEN"] = frozen.token
        return env

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except botocore.exceptions.NoCredentialsError:
            raise ConfigError("no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or a profile) in the environment or .env") from None
        except botocore.exceptions.EndpointConnectionError as e:
            raise BackendError(f"cannot reach the S3 endpoint {self.endpoint_url}: {e}") from None
        except botocore.exceptions.ClientError as e:
            code = e.response.get("Error", {}).get("Code", "?")
            raise BackendError(f"S3 {what} in bucket {self.bucket!r} failed: {code}") from None

    # Dataset up -------------------------------------------------------------------------------

    def _remote_manifest(self, prefix: str) -> dict[str, tuple[int, int]]:
        """The manifest object, kept only for keys that really exist with the recorded size."""
        listed = {}
        paginator = self.client.get_paginator("list_objects_v2")
        for page in self._call("listing", lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=prefix + "/"))):
            for obj in page.get("Contents", []):
                listed[obj["Key"][len(prefix) + 1 :]] = obj["Size"]
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=f"{prefix}/{MANIFEST}")["Body"].read()
            recorded = {k: tuple(v) for k, v in json.loads(body).items()}
        except botocore.exceptions.ClientError:
            recorded = {}
        manifest = {k: v for k, v in recorded.items() if listed.get(k) == v[0]}
        for key in listed:
            if key != MANIFEST and key not in manifest:
                manifest[key] = (listed[key], -1)  # present but unknown: replaced by the upload
        return manifest

    def upload_dataset(self, local_root: Path, dataset_id: str,
                       progress: Callable[..., None] | None = None) -> UploadStats:
        progress = progress or (lambda **_: None)
        prefix = self.dataset_prefix(dataset_id)
        local = local_manifest(local_root)
        send, delete = diff_manifests(local, self._remote_manifest(prefix))
        stats = UploadStats()
        if delete:
            for i in range(0, len(delete), 1000):
                batch = [{"Key": f"{prefix}/{k}"} for k in delete[i : i + 1000]]
                self._call("delete", self.client.delete_objects, Bucket=self.bucket, Delete={"Objects": batch})
            stats.deleted = len(delete)
        if send:
            total = sum(local[k][0] for k in send)
            progress(total=total)
            config = TransferConfig(max_concurrency=16, use_threads=True)
            with TransferManager(self.client, config) as manager:
                futures = [manager.upload(str(local_root / k), self.bucket, f"{prefix}/{k}") for k in send]
                for k, future in zip(send, futures):
                    self._call("upload", future.result)
                    stats.uploaded += 1
                    stats.bytes += local[k][0]
                    progress(completed=stats.bytes)
        if send or delete:
            # Written last: a cut-off upload leaves the old manifest, and the next run redoes what is missing.
            self._call("manifest upload", self.client.put_object, Bucket=self.bucket, Key=f"{prefix}/{MANIFEST}",
                       Body=json.dumps(local).encode())
        return stats

    # Outputs down -----------------------------------------------------------------------------

    def download_run(self, run_id: str, local_root: Path) -> int:
        """Fetch s3://.../runs/<run-id>/ into local_root, checking each file's sha256 metadata."""
        prefix = self.run_prefix(run_id)
        paginator = self.client.get_paginator("list_objects_v2")
        keys = [obj["Key"] for page in self._call("listing", lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=prefix + "/")))
                for obj in page.get("Contents", [])]
        if not keys:
            raise BackendError(f"nothing under {self.uri(prefix)}/: the watchdog has not uploaded this run's outputs")
        root = local_root.resolve()

        def fetch(key: str) -> None:
            target = (root / key[len(prefix) + 1 :]).resolve()
            if root not in target.parents:
                raise BackendError(f"refusing S3 key {key!r}: it would land outside {root}")
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.part")
            self._call("download", self.client.download_file, self.bucket, key, str(tmp))
            expected = self._call("head", self.client.head_object, Bucket=self.bucket, Key=key)["Metadata"].get("sha256")
            if expected and hashlib.sha256(tmp.read_bytes()).hexdigest() != expected:
                tmp.unlink()
                raise BackendError(f"{key} arrived corrupted (sha256 differs); run `gpu-run pull` again")
            os.replace(tmp, target)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(fetch, keys))
        return len(keys)
