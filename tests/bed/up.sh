#!/usr/bin/env bash
# Brings up the test bed, idempotently: Docker engine, offline CPU base image, an OpenSSH server on
# 127.0.0.1 playing the rented GPU host, and moto's S3/EC2 server. Writes .testbed/env for the tests.
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
bed="$root/.testbed"
ssh_port="${GPU_RUN_TEST_SSH_PORT:-2222}"
moto_port="${GPU_RUN_TEST_MOTO_PORT:-5055}"
gpu_run="$root/.venv/bin/gpu-run"
mkdir -p "$bed"

say() { printf '[test bed] %s\n' "$*"; }

# 1. Packages -------------------------------------------------------------------------------------
need=()
command -v dockerd >/dev/null || need+=(docker.io)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v rsync >/dev/null || need+=(rsync)
command -v debootstrap >/dev/null || need+=(debootstrap)
# A CJK font, so the report test can check that Chinese class names render.
[ -f /usr/share/fonts/truetype/wqy/wqy-zenhei.ttc ] || need+=(fonts-wqy-zenhei)
# Debian's headless browser and its driver, for the dashboard's browser tests (nothing downloaded then).
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "the test bed needs ${need[*]}: run as root or install them (apt-get install ${need[*]})" >&2
    exit 1
  fi
  say "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# 2. Docker engine --------------------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
  say "starting dockerd"
  nohup dockerd >"$bed/dockerd.log" 2>&1 &
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { tail -20 "$bed/dockerd.log" >&2; echo "dockerd did not start" >&2; exit 1; }
fi
say "docker engine $(docker version --format '{{.Server.Version}}')"

# 3. Offline CPU base image -----------------------------------------------------------------------
"$gpu_run" image build-base

# 4. sshd on 127.0.0.1 as the rented host ---------------------------------------------------------
ssh_dir="$bed/ssh"
mkdir -p "$ssh_dir"
[ -f "$ssh_dir/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$ssh_dir/host_ed25519"
[ -f "$ssh_dir/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$ssh_dir/id_ed25519"
# sshd reads authorized_keys as the login user; the clone may sit under a folder other users
# cannot enter (/root), so the file goes to a world-readable place.
keys_dir="$ssh_dir"
[ "$(id -u)" = 0 ] && keys_dir=/etc/gpu-run-testbed
mkdir -p "$keys_dir"
cp "$ssh_dir/id_ed25519.pub" "$keys_dir/authorized_keys"
chmod 600 "$ssh_dir/id_ed25519" "$ssh_dir/host_ed25519"
chmod 755 "$keys_dir"
chmod 644 "$keys_dir/authorized_keys"
cat >"$ssh_dir/sshd_config" <<CONF
Port $ssh_port
ListenAddress 127.0.0.1
HostKey $ssh_dir/host_ed25519
AuthorizedKeysFile $keys_dir/authorized_keys
PidFile $ssh_dir/sshd.pid
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
# Keys live under the work tree, whose parents may be group/world writable.
StrictModes no
UsePAM no
# The Docker SDK opens one SSH session per HTTP connection.
MaxSessions 100
MaxStartups 100:30:200
ClientAliveInterval 15
Subsystem sftp internal-sftp
CONF
mkdir -p /run/sshd
# A login that has no access to the Docker engine, for the "host without Docker" test.
# (password '*': no password login, but not "locked", which sshd without PAM would refuse.)
id gpurun-nodocker >/dev/null 2>&1 || useradd -m -s /bin/sh gpurun-nodocker
usermod -p '*' gpurun-nodocker
if (exec 3<>"/dev/tcp/127.0.0.1/$ssh_port") 2>/dev/null; then
  if [ -f "$ssh_dir/sshd.pid" ] && kill -HUP "$(cat "$ssh_dir/sshd.pid")" 2>/dev/null; then
    say "sshd on 127.0.0.1:$ssh_port reloaded its config"
  else
    echo "port $ssh_port is taken by another process; set GPU_RUN_TEST_SSH_PORT to a free one" >&2
    exit 1
  fi
else
  say "starting sshd on 127.0.0.1:$ssh_port"
  /usr/sbin/sshd -f "$ssh_dir/sshd_config" -E "$bed/sshd.log"
  for _ in $(seq 1 20); do (exec 3<>"/dev/tcp/127.0.0.1/$ssh_port") 2>/dev/null && break; sleep 0.25; done
fi

# 5. moto server (S3, EC2) ------------------------------------------------------------------------
if ! (exec 3<>"/dev/tcp/127.0.0.1/$moto_port") 2>/dev/null; then
  say "starting moto_server on 127.0.0.1:$moto_port"
  nohup "$root/.venv/bin/moto_server" -H 127.0.0.1 -p "$moto_port" >"$bed/moto.log" 2>&1 &
  for _ in $(seq 1 40); do (exec 3<>"/dev/tcp/127.0.0.1/$moto_port") 2>/dev/null && break; sleep 0.25; done
fi

cat >"$bed/env" <<ENV
GPU_RUN_TEST_SSH_HOST=127.0.0.1
GPU_RUN_TEST_SSH_PORT=$ssh_port
GPU_RUN_TEST_SSH_USER=$(id -un)
GPU_RUN_TEST_SSH_KEY=$ssh_dir/id_ed25519
GPU_RUN_TEST_SSH_HOST_KEY=$ssh_dir/host_ed25519.pub
GPU_RUN_TEST_MOTO_URL=http://127.0.0.1:$moto_port
ENV
say "ready (.testbed/env)"

# 6. A hostile host, for tests/test_hostile_host.py ----------------------------------------------
# The login `gpurun-evil` answers gpu-run's pull (`... tar --null -T - -cf -`) with whatever archive
# the test put at /tmp/gpu-run-evil/archive.tar; every other command (the manifest, sha256sum) runs
# as on an honest host. sshd runs a login shell as `SHELL -c COMMAND`.
if [ "$(id -u)" = 0 ]; then
  mkdir -p /usr/local/lib/gpu-run-testbed
  cat >/usr/local/lib/gpu-run-testbed/evil-shell <<'EVIL'
#!/bin/sh
case "$2" in
  *"tar --null -T - -cf -"*) cat >/dev/null; exec cat /tmp/gpu-run-evil/archive.tar ;;
esac
exec /bin/sh -c "$2"
EVIL
  chmod 755 /usr/local/lib/gpu-run-testbed/evil-shell
  id gpurun-evil >/dev/null 2>&1 || useradd -m -s /usr/local/lib/gpu-run-testbed/evil-shell gpurun-evil
  usermod -s /usr/local/lib/gpu-run-testbed/evil-shell -p '*' gpurun-evil
  say "hostile login gpurun-evil ready"
fi

# 7. container instance image ---------------------------------------------------------------------
# An AutoDL-like rented container (no Docker inside, conda-like Python, `shutdown` ends it), derived
# from the base image above; tests start one with tests/bed/instance.sh. Quick when it exists.
bash "$root/tests/bed/instance-image.sh"
