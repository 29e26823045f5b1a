"""Defaults for the GPU-rental platforms, so a student need not find them out: where data goes, how
the machine stops itself, how it bills, in which currency, and how pip reaches a mirror.

A preset only fills defaults: every value can be set in the host's table instead, and no code
outside this table branches on a platform's name. Each entry says where its values come from.
"""

from __future__ import annotations

PRESETS: dict[str, dict[str, str]] = {
    # AutoDL (www.autodl.com/docs/env/): a container instance; the data disk is /root/autodl-tmp (the
    # system disk is small); `shutdown` inside the instance ends it (the SSH connection then drops,
    # which is the success); billed by the second in CNY while on; `source /etc/network_turbo`
    # reaches the academic mirrors. A stopped instance still pays for its data disk and is released
    # after 15 days off.
    "autodl": {
        "workdir": "/root/autodl-tmp/gpu-run",
        "stop_command": "shutdown",
        "billing": "per_second",
        "currency": "CNY",
        "setup_command": "source /etc/network_turbo",
        "runtime": "auto",
    },
    # RunPod (docs.runpod.io, "Manage Pods"): a pod stops itself with `runpodctl stop pod
    # $RUNPOD_POD_ID` (the CLI and the variable are in the pod); /workspace is the volume that
    # survives a stop. A stopped pod still pays for its volume.
    "runpod": {
        "workdir": "/workspace/gpu-run",
        "stop_command": 'runpodctl stop pod "$RUNPOD_POD_ID"',
        "currency": "USD",
        "runtime": "auto",
    },
    # vast.ai (docs.vast.ai, "vastai stop instance"): an instance stops itself with `vastai stop
    # instance $CONTAINER_ID` (the instance has the id and an API key in its environment);
    # /workspace is where data is kept across a stop.
    "vastai": {
        "workdir": "/workspace/gpu-run",
        "stop_command": 'vastai stop instance "$CONTAINER_ID"',
        "currency": "USD",
        "runtime": "auto",
    },
}

# Where a platform's image keeps the Python that has torch, when it is not on the PATH of a
# non-interactive SSH login (conda is not initialised there): probed in this order.
PYTHON_CANDIDATES = (
    "/root/miniconda3/bin/python",
    "/opt/conda/bin/python",
    "/root/anaconda3/bin/python",
    "/usr/local/bin/python3",
    "/usr/bin/python3",
    "python3",
    "python",
)
