#!/usr/bin/env bash
# Runs the test bed's container instance (image from instance-image.sh), an AutoDL look-alike.
#   instance.sh start NAME PORT [--password PW]   fresh container NAME, sshd on 127.0.0.1:PORT; prints PORT
#   instance.sh stop NAME                          removes it (any state)
#   instance.sh is-running NAME                    exit 0 when running, 1 otherwise
#   instance.sh host-key NAME                      prints its ed25519 host public key
# Key mode (default): root logs in with the test bed's key only. Password mode: root's password is
# PW, password logins are on and authorized_keys starts empty, so onboarding has a key to install.
# The container uses the laptop's network (--network host): when it ends, the port refuses
# connections at once, which is how a stopped host looks to gpu-run.
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
image="${GPU_RUN_TEST_INSTANCE_IMAGE:-gpu-run-testbed:instance}"
key="${GPU_RUN_TEST_SSH_KEY:-$root/.testbed/ssh/id_ed25519}"

usage() { sed -n '3,6p' "$0" | sed 's/^# *//' >&2; exit 2; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
running() { [ "$(docker inspect -f '{{.State.Running}}' "$1" 2>/dev/null)" = true ]; }

cmd="${1:-}"; name="${2:-}"
[ -n "$name" ] || usage
case "$cmd" in
  start)
    port="${3:-}"; [ -n "$port" ] || usage
    password=""
    if [ "${4:-}" = --password ]; then password="${5:?--password needs a value}"; fi
    t0=$(date +%s%N)
    # A second start with the same NAME replaces the old instance (and frees its port).
    docker rm -f "$name" >/dev/null 2>&1 || true
    for _ in $(seq 1 20); do port_open "$port" || break; sleep 0.1; done
    # With host networking a taken port would leave us probing someone else's sshd.
    if port_open "$port"; then echo "port $port on 127.0.0.1 is taken" >&2; exit 1; fi
    authorized=""
    [ -n "$password" ] || authorized="$(cat "$key.pub")"
    # The password goes through the environment, not the command line (ps shows arguments).
    INSTANCE_ROOT_PASSWORD="$password" INSTANCE_AUTHORIZED_KEYS="$authorized" \
      docker run -d --name "$name" --network host --label gpu-run-testbed=instance \
        -e INSTANCE_SSH_PORT="$port" -e INSTANCE_ROOT_PASSWORD -e INSTANCE_AUTHORIZED_KEYS \
        "$image" >/dev/null
    # Ready when sshd on the port sends its banner (works for both modes, needs no login).
    for _ in $(seq 1 100); do
      running "$name" || { docker logs "$name" 2>&1 | tail -5 >&2; echo "instance $name exited" >&2; exit 1; }
      # (The braces keep exec's 2>/dev/null from silencing this script's stderr for good.)
      if { exec 3<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null; then
        banner=""; read -r -t 2 banner <&3 || true; exec 3<&-
        case "$banner" in SSH-2.0-*) break ;; esac
      fi
      sleep 0.1
    done
    case "${banner:-}" in SSH-2.0-*) ;; *) echo "instance $name: sshd did not answer on $port" >&2; exit 1 ;; esac
    echo "instance $name ready on 127.0.0.1:$port in $(( ($(date +%s%N) - t0) / 1000000 )) ms" >&2
    echo "$port"
    ;;
  stop) docker rm -f "$name" >/dev/null 2>&1 || true ;;
  is-running) running "$name" ;;
  host-key) docker exec "$name" cat /etc/ssh/ssh_host_ed25519_key.pub ;;
  *) usage ;;
esac
