#!/bin/sh
# gpu-run watchdog: shipped to the host and started detached from the SSH session, so that the
# machine stops when the job ends even if the laptop is closed or offline.
#
# It waits for the training container to end, or stops it when the run exceeds its max runtime or
# prints nothing for too long; records the outcome in $RUN_DIR/status; gives a connected client
# GRACE_S seconds to pull (a client that has pulled creates $RUN_DIR/pulled, which ends the wait at
# once); then runs the host's stop command unless the run keeps the host alive.
#
# Settings come from $RUN_DIR/watchdog.env (written by gpu-run, shell-quoted):
#   CONTAINER GRACE_S MAX_S SILENCE_S STOP_TIMEOUT_S POLL_S STOP_COMMAND KEEP_ALIVE UPLOAD_COMMAND
set -u
RUN_DIR=$1
. "$RUN_DIR/watchdog.env"

log() { echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) $*"; }
now() { date +%s; }
# Write a file atomically: whoever reads it sees all of it or nothing.
put() { printf '%s\n' "$2" > "$RUN_DIR/.$1.tmp" && mv "$RUN_DIR/.$1.tmp" "$RUN_DIR/$1"; }

echo $$ > "$RUN_DIR/watchdog.pid"
started=$(now)
last_activity=$started
last_check=$started
outcome=""
log "watching $CONTAINER (max ${MAX_S}s, silence ${SILENCE_S}s, grace ${GRACE_S}s)"

while :; do
  state=$(docker inspect -f '{{.State.Status}}' "$CONTAINER" 2>/dev/null || echo gone)
  case "$state" in
    exited|dead|gone) outcome=finished; break ;;
  esac
  t=$(now)
  if [ -n "$(docker logs --since "$last_check" "$CONTAINER" 2>&1 | head -c 1)" ]; then
    last_activity=$t
  fi
  last_check=$t
  if [ "$MAX_S" -gt 0 ] && [ $((t - started)) -ge "$MAX_S" ]; then
    outcome=max_runtime; break
  fi
  if [ "$SILENCE_S" -gt 0 ] && [ $((t - last_activity)) -ge "$SILENCE_S" ]; then
    outcome=silent; break
  fi
  sleep "$POLL_S"
done

if [ "$outcome" != finished ]; then
  log "$outcome: stopping $CONTAINER (SIGTERM, the trainer saves last.pth; killed after ${STOP_TIMEOUT_S}s)"
  docker stop -t "$STOP_TIMEOUT_S" "$CONTAINER" >/dev/null 2>&1
fi
exit_code=$(docker inspect -f '{{.State.ExitCode}}' "$CONTAINER" 2>/dev/null || echo -1)
ended=$(now)
put status "outcome=$outcome exit_code=$exit_code ended_at=$ended"
log "container ended: outcome=$outcome exit_code=$exit_code"

if [ -n "${UPLOAD_COMMAND:-}" ]; then
  log "uploading outputs"
  sh -c "$UPLOAD_COMMAND" && put uploaded "$(now)" || log "upload failed"
fi

deadline=$((ended + GRACE_S))
while [ ! -e "$RUN_DIR/pulled" ] && [ "$(now)" -lt "$deadline" ]; do
  sleep 1
done
[ -e "$RUN_DIR/pulled" ] && log "outputs pulled by the client" || log "grace period over"

if [ "$KEEP_ALIVE" = 1 ]; then
  log "keep-alive: not stopping the host"
  put stopped "keep_alive $(now)"
  exit 0
fi
log "running stop command: $STOP_COMMAND"
put stopped "stop_command $(now)"
sh -c "$STOP_COMMAND"
log "stop command exited $?"
