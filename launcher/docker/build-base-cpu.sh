#!/usr/bin/env bash
# Builds the offline CPU base image gpu-run-base:cpu without any container registry:
# debootstrap a minimal Debian trixie with Debian's own torch/torchvision/boto3, then `docker import`.
# Usage: build-base-cpu.sh [TAG]   (needs root, debootstrap, a Docker engine; about 2 minutes)
set -euo pipefail

tag="${1:-gpu-run-base:cpu}"
mirror="${GPU_RUN_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
packages="python3,python3-torch,python3-torchvision,python3-pil,python3-numpy,python3-boto3,ca-certificates"

if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base image $tag already exists"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "building the base image needs root (debootstrap)" >&2; exit 2; }

rootfs="$(mktemp -d /var/tmp/gpu-run-rootfs.XXXXXX)"
trap 'rm -rf --one-file-system "$rootfs"' EXIT

echo "debootstrap trixie into $rootfs (about 2 minutes)"
debootstrap --variant=minbase --include="$packages" trixie "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
  || { tail -20 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"

# Docs, man pages and apt lists are dead weight in a training image.
rm -rf "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/var/lib/apt/lists/* \
       "$rootfs"/var/cache/apt/archives/*.deb

echo "docker import as $tag"
tar -C "$rootfs" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  - "$tag" >/dev/null
docker run --rm "$tag" python3 -c "import torch, torchvision, PIL, boto3; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
