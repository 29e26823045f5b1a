#!/bin/sh
# gpu-run sweep queue: shipped to the host, it runs a sweep's points there one after another (or
# PARALLEL side by side, each on its own GPUs), so that the sweep goes on while the laptop is
# closed. The sweep's watchdog watches this script as its job: when the queue ends the machine is
# released once, and when the watchdog ends the queue (the budget) the running points are stopped
# with a resumable last.pth and the rest are not started.
#
#   queue.sh SWEEP_DIR run       run the queue (the watchdog's job)
#   queue.sh SWEEP_DIR cleanup   stop what still runs and remove the points' containers
#
# SWEEP_DIR holds queue.env (PARALLEL, BUDGET_S: seconds the budget leaves for points, 0 none;
# POINT_MAX_S, SILENCE_S: per-point limits, 0 none; STOP_TIMEOUT_S) and `points`, a line per point:
# RUN_DIR SLOT EST_S. Each point's RUN_DIR has start.sh (starts its trainer detached), state.sh
# (prints running, its exit code, or gone), stop.sh (SIGTERM, killed after the stop timeout), and
# maybe logs.sh (copies a container's log into train.log), upload.sh, remove.sh, and trainer.env
# (the --env values, private to the user; start.sh removes it once read). The queue writes
# there: started_at, and status ("outcome=... exit_code=... ended_at=...", what the laptop and
# `gpu-run sweep status` read).
set -u
SWEEP_DIR=${1:?usage: queue.sh SWEEP_DIR run|cleanup}
MODE=${2:-run}
. "$SWEEP_DIR/queue.env"
PARALLEL=${PARALLEL:-1}
BUDGET_S=${BUDGET_S:-0}
POINT_MAX_S=${POINT_MAX_S:-0}
SILENCE_S=${SILENCE_S:-0}
POLL_S=${POLL_S:-1}

log() { echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) [queue $$] $*"; }
wall() { date +%s; }
mono() { if [ -r /proc/uptime ]; then read -r up _ </proc/uptime; echo "${up%%.*}"; else date +%s; fi; }
put() { printf '%s\n' "$2" >"$1.tmp.$$" && mv -f "$1.tmp.$$" "$1"; }
stopping() { [ -e "$SWEEP_DIR/stopping" ]; }
ended() { [ -f "$1/status" ]; }

# One point, start to end: started_at, the trainer, its limits, its status.
run_point() {  # run_point DIR
  d=$1
  put "$d/started_at" "$(wall)"
  if ! sh "$d/start.sh" >>"$d/queue.log" 2>&1 </dev/null; then
    log "point ${d##*/} did not start: $(tail -n 1 "$d/queue.log" 2>/dev/null)"
    put "$d/status" "outcome=start_failed exit_code=-1 ended_at=$(wall)"
    return
  fi
  log "point ${d##*/} started"
  lp=""
  if [ -f "$d/logs.sh" ]; then sh "$d/logs.sh" >>"$d/train.log" 2>&1 </dev/null & lp=$!; fi
  began=$(mono); quiet_since=$began; size=""; outcome=finished
  while :; do
    state=$(sh "$d/state.sh" 2>/dev/null)
    [ "$state" = running ] || [ -z "$state" ] || break
    t=$(mono)
    now_size=$(stat -c %s "$d/train.log" 2>/dev/null || echo 0)
    if [ "$now_size" != "$size" ]; then size=$now_size; quiet_since=$t; fi
    if [ "$POINT_MAX_S" -gt 0 ] && [ $((t - began)) -ge "$POINT_MAX_S" ]; then outcome=max_runtime; sh "$d/stop.sh"; fi
    if [ "$SILENCE_S" -gt 0 ] && [ $((t - quiet_since)) -ge "$SILENCE_S" ]; then outcome=silent; sh "$d/stop.sh"; fi
    sleep "$POLL_S"
  done
  stopping && outcome=stopped
  case "$state" in gone|"") code=-1 ;; *) code=$state ;; esac
  [ -n "$lp" ] && { sleep 1; kill "$lp" 2>/dev/null; }
  [ -f "$d/upload.sh" ] && { sh "$d/upload.sh" >>"$d/queue.log" 2>&1 </dev/null || log "upload of ${d##*/} failed"; }
  put "$d/status" "outcome=$outcome exit_code=$code ended_at=$(wall)"
  log "point ${d##*/} ended: outcome=$outcome exit_code=$code"
}

# A worker runs the points dealt to its slot (its GPUs), in the grid's order.
worker() {  # worker SLOT
  while read -r dir slot est; do
    [ "$slot" = "$1" ] || continue
    ended "$dir" && continue
    if stopping; then
      rm -f "$dir/trainer.env"  # the --env values of a point that never starts do not stay on the host
      put "$dir/status" "outcome=not_started exit_code=-1 ended_at=$(wall)"
      continue
    fi
    if [ "$BUDGET_S" -gt 0 ] && [ "${est:-0}" -gt 0 ] && [ $(($(mono) - QUEUE_START + est)) -gt "$BUDGET_S" ]; then
      log "point ${dir##*/} needs about ${est}s, more than the budget leaves: not started"
      rm -f "$dir/trainer.env"
      put "$dir/status" "outcome=over_budget exit_code=-1 ended_at=$(wall)"
      continue
    fi
    run_point "$dir"
  done <"$SWEEP_DIR/points"
}

# SIGTERM (the watchdog at the budget's end, or `gpu-run stop SWEEP`): no new points, and the
# running ones are stopped the way a single run is (the trainer saves last.pth).
on_term() {
  trap '' TERM INT HUP
  put "$SWEEP_DIR/stopping" "$(wall)"
  log "asked to stop: stopping the running points, starting no more"
  while read -r dir _ _; do
    if [ -f "$dir/started_at" ] && ! ended "$dir"; then sh "$dir/stop.sh" >/dev/null 2>&1 & fi
  done <"$SWEEP_DIR/points"
  wait
}

run() {
  QUEUE_START=$(mono)
  trap on_term TERM INT HUP
  log "running $(wc -l <"$SWEEP_DIR/points") point(s), $PARALLEL at a time"
  slot=0; workers=""
  while [ "$slot" -lt "$PARALLEL" ]; do
    worker "$slot" &
    workers="$workers $!"
    slot=$((slot + 1))
  done
  # `wait` returns early when a signal arrives; wait again until every worker has recorded its ends.
  for w in $workers; do
    while kill -0 "$w" 2>/dev/null; do wait "$w"; done
  done
  log "queue done"
  stopping && exit 75
  exit 0
}

cleanup() {
  while read -r dir _ _; do
    if [ -f "$dir/started_at" ] && ! ended "$dir"; then sh "$dir/stop.sh" >/dev/null 2>&1; fi
    [ -f "$dir/remove.sh" ] && sh "$dir/remove.sh" >/dev/null 2>&1
    rm -f "$dir/trainer.env"  # a point the queue never reached (killed) leaves no secret behind
  done <"$SWEEP_DIR/points"
  return 0
}

case "$MODE" in
  run) run ;;
  cleanup) cleanup ;;
  *) echo "unknown mode $MODE" >&2; exit 2 ;;
esac
