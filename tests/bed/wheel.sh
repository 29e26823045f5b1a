#!/usr/bin/env bash
# The package as a user gets it: build the wheel, install it into a fresh venv outside the checkout,
# and run `gpu-run demo-data` + `gpu-run train --host local` from there (the image is built from the
# wheel's package data, not from the source tree). Then the launcher on the lowest Python we claim
# (3.10, when this machine has one): install, parse a gpu-run.toml (tomli), make a dataset.
# Needs the test bed's Docker engine and base image (tests/bed/up.sh). Usage: tests/bed/wheel.sh
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
work="$(mktemp -d /tmp/gpu-run-wheel.XXXXXX)"
trap 'rm -rf "$work"' EXIT
say() { printf '[wheel] %s\n' "$*"; }

say "building the wheel"
rm -rf "$root/build/lib"  # setuptools never deletes there: a moved module would ship twice
"$root/.venv/bin/pip" wheel -q --no-deps --no-build-isolation -w "$work/dist" "$root"
wheel="$(ls "$work"/dist/gpu_run-*.whl)"
# The wheel must carry what the program reads at run time, and no generic top-level names.
"$root/.venv/bin/python" - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
for needed in ("gpu_run/docker/Dockerfile", "gpu_run/docker/build-base-cpu.sh", "gpu_run/watchdog/watchdog.sh",
               "gpu_run/trainer/train.py", "gpu_run/trainer/s3sync.py", "gpu_run/sweep/queue.sh"):
    assert needed in names, f"{needed} is missing from the wheel"
tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
assert tops == {"gpu_run"}, f"the wheel installs top-level names other than gpu_run: {sorted(tops)}"
PY

say "installing it into a fresh venv in $work (torch from pip's cache or disk)"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
"$work/venv/bin/pip" install -q "$wheel"

cd "$work"  # nowhere near the checkout: nothing may be read from the source tree
export GPU_RUN_HOME="$work/home"
"$work/venv/bin/gpu-run" demo-data data --train-per-class 20 --val-per-class 8 --size 48
"$work/venv/bin/gpu-run" train --host local --data data --epochs 1 --weights none --image-size 32 \
  --batch-size 8 --runs-dir runs --json >summary.json
"$work/venv/bin/python" - <<'PY'
import json
s = json.load(open("summary.json"))
assert s["status"] == "succeeded" and s["epochs_completed"] == 1, s
print(f"[wheel] trained from the wheel: {s['run_id']} on {s['backend']} ({s['runtime']}), image {s['image_tag']}")
PY

# pyenv's shim for python3.10 may be on the PATH without a 3.10 selected: take one that answers.
py310=""
for candidate in $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10.*/bin/python3.10 2>/dev/null) $(command -v python3.10 || true); do
  if "$candidate" --version >/dev/null 2>&1; then py310="$candidate"; break; fi
done
if [ -z "$py310" ]; then
  say "no Python 3.10 on this machine: the lowest-version check did not run"
  exit 0
fi
say "the launcher on $("$py310" --version)"
"$py310" -m venv "$work/venv310"
# Everything but torch/torchvision (a multi-GB download for this Python): the launcher's commands
# that run here must not need them.
"$work/venv310/bin/pip" install -q --no-deps "$wheel"
"$work/venv310/bin/pip" install -q "click>=8.1" "rich>=13" "docker>=7.0" "paramiko>=3.4" "boto3>=1.34" \
  "platformdirs>=4" "python-dotenv>=1.0" "tenacity>=8.2" pillow "matplotlib>=3.7" "tomli>=1.1"
cat >gpu-run.toml <<'TOML'
[hosts.box]
ssh = "root@127.0.0.1:2222"
price_per_hour = 1.25
currency = "CNY"
stop_command = "none"
TOML
"$work/venv310/bin/gpu-run" --version
"$work/venv310/bin/gpu-run" hosts --json | "$work/venv310/bin/python" -c \
  "import json, sys; h = {r['name']: r for r in json.load(sys.stdin)}; assert h['box']['price_per_hour'] == 1.25, h"
"$work/venv310/bin/gpu-run" demo-data data310 --train-per-class 4 --val-per-class 2 --size 32
say "Python 3.10: installed, gpu-run.toml parsed, dataset written"
