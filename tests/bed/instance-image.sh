#!/usr/bin/env bash
# Builds gpu-run-testbed:instance: a "container instance" like AutoDL / vast.ai / RunPod rent out.
# The rented machine is itself a container: sshd is its only service, there is no docker CLI or
# socket, the Python that has torch sits at a conda path that a non-interactive SSH login does not
# have on its PATH, data goes to /root/autodl-tmp, and `shutdown` ends the container.
# Derived from the offline base gpu-run-base:cpu (Debian trixie, torch/torchvision/boto3/PIL);
# openssh-server and procps come from the same Debian mirror debootstrap used for the base (no
# container registry). Idempotent: does nothing when the image exists. Usage: instance-image.sh
set -euo pipefail

tag="${GPU_RUN_TEST_INSTANCE_IMAGE:-gpu-run-testbed:instance}"
base="gpu-run-base:cpu"
mirror="${GPU_RUN_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
root="$(cd "$(dirname "$0")/../.." && pwd)"

if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "instance image $tag already exists"
  exit 0
fi
t0=$(date +%s)
if ! docker image inspect "$base" >/dev/null 2>&1; then
  # The base is normally built by step 3 of up.sh; build it here too so this script stands alone.
  bash "$root/launcher/docker/build-base-cpu.sh" "$base"
fi

ctx="$(mktemp -d /var/tmp/gpu-run-instance.XXXXXX)"
trap 'rm -rf "$ctx"' EXIT

# PID 1. A PID 1 without a handler ignores SIGTERM, so `kill -TERM 1` would do nothing: this one
# traps it and exits, and the kernel then kills everything else in the container, which drops
# every SSH connection (the client exits 255), as when AutoDL's `shutdown` stops an instance.
# dash's `wait` also reaps orphans (detached trainers re-parented to PID 1), so none stay zombies.
cat >"$ctx/init" <<'EOF'
#!/bin/sh
set -eu
port="${INSTANCE_SSH_PORT:-22}"
# A fresh host key per container, as each rented instance has its own.
[ -f /etc/ssh/ssh_host_ed25519_key ] || ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key
mkdir -p /run/sshd /root/.ssh
chmod 700 /root/.ssh
printf '%s\n' "${INSTANCE_AUTHORIZED_KEYS:-}" >/root/.ssh/authorized_keys
chmod 600 /root/.ssh/authorized_keys
password=no
if [ -n "${INSTANCE_ROOT_PASSWORD:-}" ]; then
  # The console's password, for the `hosts add --password-stdin` onboarding test.
  printf 'root:%s\n' "$INSTANCE_ROOT_PASSWORD" | chpasswd
  password=yes
fi
unset INSTANCE_ROOT_PASSWORD INSTANCE_AUTHORIZED_KEYS
# The container shares the laptop's network (--network host), so listen on loopback only.
# Sessions and startups keep sshd's defaults (MaxSessions 10), as the platforms' images do; the
# per-source penalties of OpenSSH 9.8+ are off, as on those (older) sshds, so that a test's failed
# logins from 127.0.0.1 do not get the next test's connections refused.
cat >/etc/ssh/instance_sshd_config <<CONF
Port $port
ListenAddress 127.0.0.1
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin yes
PubkeyAuthentication yes
PasswordAuthentication $password
KbdInteractiveAuthentication no
UsePAM no
PerSourcePenalties no
Subsystem sftp internal-sftp
CONF
trap 'exit 0' TERM INT
/usr/sbin/sshd -D -e -f /etc/ssh/instance_sshd_config &
wait $!
EOF

# AutoDL's `shutdown`, whatever its arguments: end the container. It never returns, so the
# caller sees its connection drop rather than a clean exit status.
cat >"$ctx/shutdown" <<'EOF'
#!/bin/sh
kill -TERM 1
sleep 60
EOF

cat >"$ctx/Dockerfile" <<EOF
FROM $base
# The base keeps no apt lists; fetch trixie's from the mirror the base came from. python3-venv
# gives the interpreter ensurepip, as conda's Python has, for a venv layered on its site-packages.
RUN printf 'deb $mirror trixie main\n' >/etc/apt/sources.list \\
 && apt-get update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server procps python3-venv >/dev/null \\
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb /etc/ssh/ssh_host_* /usr/share/doc/* /usr/share/man/*
COPY init /usr/local/sbin/instance-init
COPY shutdown /usr/sbin/shutdown
# The interpreter moves to a conda-like path; with no lib/python3.13 next to it, Python falls back
# to its built-in prefix /usr and still finds Debian's torch. No python/python3/python3.13 is left
# on the PATH, so only a probe of the usual places finds it (as with AutoDL's /root/miniconda3).
# Interactive shells get it on PATH, as conda's init block in .bashrc does on the platforms.
RUN chmod 755 /usr/local/sbin/instance-init /usr/sbin/shutdown \\
 && mkdir -p /root/miniconda3/bin /root/autodl-tmp \\
 && mv /usr/bin/python3.13 /root/miniconda3/bin/python3.13 \\
 && rm -f /usr/bin/python3 /usr/bin/python \\
 && ln -s python3.13 /root/miniconda3/bin/python3 && ln -s python3.13 /root/miniconda3/bin/python \\
 && printf '\n# conda (interactive shells only, as on AutoDL)\ncase \$- in *i*) export PATH=/root/miniconda3/bin:\$PATH ;; esac\n' >>/root/.bashrc \\
 && /root/miniconda3/bin/python -c "import torch, torchvision, boto3, PIL" \\
 && ! ls /usr/bin /usr/local/bin | grep -qx 'python[0-9.]*' \\
 && ! command -v docker
CMD ["/usr/local/sbin/instance-init"]
EOF

echo "docker build $tag from $base"
# (The legacy builder's deprecation notice goes to stderr: show stderr only when the build fails.)
docker build -q -t "$tag" "$ctx" >/dev/null 2>"$ctx.log" || { cat "$ctx.log" >&2; rm -f "$ctx.log"; exit 1; }
rm -f "$ctx.log"
echo "instance image $tag built in $(( $(date +%s) - t0 )) s"
