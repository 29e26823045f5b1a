"""The S3 (or S3-compatible) data path, laptop side: upload the dataset, fetch run outputs.

The dataset goes to s3://bucket/prefix/datasets/<dataset-id>/ with a manifest object beside it
(path -> size, mtime) so a re-run uploads only new or changed files and deletes removed ones; the
uploads run in parallel through boto3's transfer manager. The host fetches it with
`trainer/s3sync.py` in a helper container; the watchdog uploads outputs to
s3://bucket/prefix/runs/<run-id>/, from where `gpu-run pull` fetches them when the host is gone.

Credentials come from boto3's standard chain (environment, .env, shared config/profile). The host
gets short-lived keys from STS that reach only s3://bucket/prefix/ (or, where a host table says
s3_host_credentials = "laptop", the laptop's own), and only as process environment for the helper
containers and the watchdog, never as a file.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import boto3
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from s3transfer.manager import TransferManager

from gpu_run.config import Host
from gpu_run.errors import BackendError, ConfigError
from gpu_run.sync.ssh_tar import diff_manifests, local_manifest, sha256_file

MANIFEST = ".gpu-run-manifest.json"
FEDERATION_TOKEN_S = 129600  # the longest a federation token lives (36 h)
ROLE_SESSION_S = 43200  # the longest a role session lives, where the role allows it (12 h)


@dataclass
class UploadStats:
    uploaded: int = 0
    bytes: int = 0
    deleted: int = 0


class S3Store:
    def __init__(self, host: Host):
        if not host.bucket:
            raise ConfigError(f'[hosts.{host.name}]: sync = "s3" needs bucket = "..."')
        self.host = host
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
            raise ConfigError(
                "no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or a profile) in the environment or .env"
            )
        frozen = creds.get_frozen_credentials()
        env = {
            "AWS_ACCESS_KEY_ID": frozen.access_key,
            "AWS_SECRET_ACCESS_KEY": frozen.secret_key,
            "AWS_DEFAULT_REGION": self.session.region_name,
        }
        if frozen.token:
            env["AWS_SESSION_TOKEN"] = frozen.token
        return env

    @functools.cached_property
    def _host_env(self) -> dict[str, str]:
        if self.host.s3_host_credentials == "laptop":
            return self.credentials_env()
        return self._scoped_credentials_env()

    def host_credentials_env(self) -> dict[str, str]:
        """What the host gets to move this store's data (the helper containers, the watchdog's
        upload): short-lived keys that reach only s3://bucket/prefix/, made once per store, or
        the laptop's own keys where the host table says s3_host_credentials = "laptop". The
        host is rented: whoever controls it must not walk away with keys to the whole account."""
        return dict(self._host_env)

    def session_policy(self) -> str:
        """The most the host's keys may do: read, write and delete objects under the prefix, and
        list only there. (Keys are `<prefix>/...` even for an empty prefix: see dataset_prefix.)"""
        partition = self.session.get_partition_for_region(self.session.region_name) or "aws"
        return json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
                        "Resource": f"arn:{partition}:s3:::{self.bucket}/{self.prefix}/*",
                    },
                    {
                        "Effect": "Allow",
                        "Action": "s3:ListBucket",
                        "Resource": f"arn:{partition}:s3:::{self.bucket}",
                        "Condition": {"StringLike": {"s3:prefix": [f"{self.prefix}/*"]}},
                    },
                ],
            }
        )

    def _scoped_credentials_env(self) -> dict[str, str]:
        if self.session.get_credentials() is None:
            raise ConfigError(
                "no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or a profile) in the environment or .env"
            )
        # STS sits beside S3 on the same endpoint for moto, MinIO and other S3-compatible stores
        # that have it; without s3_endpoint_url this is AWS's own STS.
        sts = self.session.client("sts", endpoint_url=self.host.s3_endpoint_url)
        policy = self.session_policy()
        try:
            if self.host.s3_role_arn:
                creds = self._assume_role(sts, policy)
            else:
                # Works with an IAM user's long-lived keys (not with temporary ones): 36 h, the
                # most STS gives, so a long run can still upload its outputs at the end.
                creds = sts.get_federation_token(Name="gpu-run", Policy=policy, DurationSeconds=FEDERATION_TOKEN_S)[
                    "Credentials"
                ]
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            if isinstance(e, botocore.exceptions.ClientError):
                reason = e.response.get("Error", {}).get("Code") or "error"
            else:
                reason = type(e).__name__
            raise ConfigError(
                f"[hosts.{self.host.name}]: could not get short-lived S3 keys for the host from STS "
                f'({reason}); set s3_role_arn = "arn:aws:iam::ACCOUNT:role/NAME" (a role your keys may assume), or '
                f's3_host_credentials = "laptop" to hand the host your own keys (only for a host you trust)'
            ) from None
        return {
            "AWS_ACCESS_KEY_ID": creds["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": creds["SecretAccessKey"],
            "AWS_SESSION_TOKEN": creds["SessionToken"],
            "AWS_DEFAULT_REGION": self.session.region_name,
        }

    def _assume_role(self, sts, policy: str) -> dict:
        """The role's keys for as long as the role allows: 12 h when its MaxSessionDuration says
        so, else the 1 h every role grants."""

        def assume(duration_s: int) -> dict:
            return sts.assume_role(
                RoleArn=self.host.s3_role_arn, RoleSessionName="gpu-run", Policy=policy, DurationSeconds=duration_s
            )["Credentials"]

        try:
            return assume(ROLE_SESSION_S)
        except botocore.exceptions.ClientError as e:
            if "MaxSessionDuration" not in str(e) and "DurationSeconds" not in str(e):
                raise
        return assume(3600)

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except botocore.exceptions.NoCredentialsError:
            raise ConfigError(
                "no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or a profile) in the environment or .env"
            ) from None
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

    def upload_dataset(
        self, local_root: Path, dataset_id: str, progress: Callable[..., None] | None = None
    ) -> UploadStats:
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
            self._call(
                "manifest upload",
                self.client.put_object,
                Bucket=self.bucket,
                Key=f"{prefix}/{MANIFEST}",
                Body=json.dumps(local).encode(),
            )
        return stats

    # Outputs down -----------------------------------------------------------------------------

    def download_run(self, run_id: str, local_root: Path, warn: Callable[[str], None] | None = None) -> int:
        """Fetch s3://.../runs/<run-id>/ into local_root, checking each file's sha256 metadata.
        Anyone who can write to the bucket can add keys: one that would land outside local_root is
        skipped and reported (through `warn`), never written."""
        prefix = self.run_prefix(run_id)
        paginator = self.client.get_paginator("list_objects_v2")
        # Keys ending in / are the empty "folder" objects S3 consoles create: no file to fetch.
        keys = [
            obj["Key"]
            for page in self._call("listing", lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=prefix + "/")))
            for obj in page.get("Contents", [])
            if not obj["Key"].endswith("/")
        ]
        if not keys:
            raise BackendError(f"nothing under {self.uri(prefix)}/: the watchdog has not uploaded this run's outputs")
        local_root.mkdir(parents=True, exist_ok=True)
        root = local_root.resolve()
        targets = {key: confined(root, key[len(prefix) + 1 :]) for key in keys}
        for key in [k for k, target in targets.items() if target is None]:
            (warn or _warn_stderr)(f"skipped S3 key {key!r}: it would land outside {root}")

        def fetch(key: str) -> None:
            target = targets[key]
            assert target is not None  # only the keys that land inside root are fetched
            target.parent.mkdir(parents=True, exist_ok=True)
            if confined(root, key[len(prefix) + 1 :]) != target:  # a folder on the way became a symlink
                raise BackendError(f"refusing S3 key {key!r}: a symlink under {root} would take it elsewhere")
            tmp = target.with_name(f".{target.name}.part-{secrets.token_hex(4)}")
            try:
                self._call("download", self.client.download_file, self.bucket, key, str(tmp))
                expected = self._call("head", self.client.head_object, Bucket=self.bucket, Key=key)["Metadata"].get(
                    "sha256"
                )
                if expected and sha256_file(tmp) != expected:
                    raise BackendError(f"{key} arrived corrupted (sha256 differs); run `gpu-run pull` again")
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)

        fetched = [k for k, target in targets.items() if target is not None]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(fetch, fetched))
        return len(fetched)


def confined(root: Path, key: str) -> Path | None:
    """Where `key` lands below root (already resolved), or None when it would land elsewhere: an
    absolute key, a `..` part, or a folder on the way that is a symlink pointing out."""
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        return None
    target = (root / key).resolve()
    return target if root in target.parents else None


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
