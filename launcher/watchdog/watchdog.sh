#!/bin/sh
# gpu-run watchdog: shipped to the host, so that the machine stops when the job ends even if the
# laptop is closed or offline. Every way of leaving goes through the stop path, and a stop counts
# only when the stop command exited 0; a failed one is retried with backoff, never assumed done.
#
#   watchdog.sh RUN_DIR [watch]   follow the job, end it at its limits, then release the host
#   watchdog.sh RUN_DIR backstop  restart a watchdog that died; enforce the deadline without it
#   watchdog.sh RUN_DIR abort     setup failed: end this run's watchers and release the host
#   watchdog.sh RUN_DIR others    print the other runs that still hold this host (one id a line)
#
# It starts when the laptop claims the host for a run, before the sync: until the job's settings
# (watchdog.env) arrive it holds the host for the laptop, and releases it if the laptop goes quiet.
#
# Files in RUN_DIR: host.env and watchdog.env (settings, shell-quoted, written by gpu-run), lease
# (this run holds the host: "setup" while the laptop prepares it, "watch" once the job is watched),
# armed (boot id, uptime and wall time when the watch began), status (how the job ended),
# stop_state (where the release is: waiting, waiting_for, stopping, stop_failed, stopped,
# handed_over, keep_alive, not_needed), hold (a laptop is pulling), pulled (the laptop has the
# outputs), watchdog.log.
#
# The host runs several runs at once, so the stop is host-wide but decided per host: a run stops the
# machine only when no other run there holds a lease; otherwise it hands the stop over to them.
set -u
RUN_DIR=${1:?usage: watchdog.sh RUN_DIR [watch|backstop|abort|others]}
MODE=${2:-watch}
. "$RUN_DIR/host.env"
[ -f "$RUN_DIR/watchdog.env" ] && . "$RUN_DIR/watchdog.env"
WATCHDOG="$RUN_DIR/watchdog.sh"
RUN_ID=${RUN_DIR##*/}
POLL_S=${POLL_S:-2}
MAX_S=${MAX_S:-0}
SILENCE_S=${SILENCE_S:-0}
STOP_TIMEOUT_S=${STOP_TIMEOUT_S:-120}
START_WAIT_S=${START_WAIT_S:-300}     # a job never seen running after this long never started
ENGINE_DOWN_S=${ENGINE_DOWN_S:-600}   # the engine unreachable this long: give up on the job
DOCKER_TIMEOUT_S=${DOCKER_TIMEOUT_S:-60}
UPLOAD_TIMEOUT_S=${UPLOAD_TIMEOUT_S:-3600}
STOP_COMMAND_TIMEOUT_S=${STOP_COMMAND_TIMEOUT_S:-120}
STOP_RETRY_S=${STOP_RETRY_S:-5}       # first wait before retrying a failed stop; doubles up to 300
SETUP_IDLE_S=${SETUP_IDLE_S:-900}      # the laptop renews the setup lease every 30 s
HOLD_S=${HOLD_S:-10}                  # a laptop's hold older than this: the laptop is gone (it renews
                                      # the hold while it follows, stops or pulls the run)
UPLOAD_COMMAND=${UPLOAD_COMMAND:-}
CLEANUP_COMMAND=${CLEANUP_COMMAND:-}
CONTAINER=${CONTAINER:-}
WATCH=${WATCH:-container}

log() { echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) [$MODE $$] $*"; }
wall() { date +%s; }
# Limits use the time since boot: a wall-clock jump must neither disable nor fire --max-hours.
mono() {
  if [ -r /proc/uptime ]; then read -r up _ </proc/uptime; echo "${up%%.*}"; else date +%s; fi
}
boot_id() { cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo unknown; }
# Write a file atomically: whoever reads it sees all of it or nothing.
put() { printf '%s\n' "$2" >"$RUN_DIR/.$1.$$" && mv -f "$RUN_DIR/.$1.$$" "$RUN_DIR/$1"; }
# Every outside command runs under a time limit: a hung daemon must not hang the watchdog.
if command -v timeout >/dev/null 2>&1; then
  bounded() { b_s=$1; shift; timeout -k 5 "$b_s" "$@"; }
else
  bounded() { shift; "$@"; }
fi
dk() { bounded "$DOCKER_TIMEOUT_S" docker "$@"; }

# pid_is FILE PATTERN: the process named in FILE is alive and is the job's: its command line holds
# PATTERN (our trainer names its run folder), or its environment says GPU_RUN_JOB_DIR=PATTERN (a
# user's `python train.py` names nothing of ours). A PID from a file may have been reused since.
pid_is() {
  [ -f "$1" ] || return 1
  read -r p_pid <"$1" 2>/dev/null || return 1
  [ -n "$p_pid" ] && kill -0 "$p_pid" 2>/dev/null || return 1
  [ -r "/proc/$p_pid/cmdline" ] || return 0
  tr '\0' ' ' <"/proc/$p_pid/cmdline" | grep -qF -- "$2" && return 0
  tr '\0' '\n' <"/proc/$p_pid/environ" 2>/dev/null | grep -qxF -- "GPU_RUN_JOB_DIR=$2"
}

stop_done() {  # the release reached an end that needs no more work from us
  [ -f "$RUN_DIR/stop_state" ] || return 1
  read -r s_kind _ <"$RUN_DIR/stop_state"
  case "$s_kind" in stopped|handed_over|keep_alive|not_needed) return 0 ;; esac
  return 1
}

# The job: a container on the host's engine (WATCH=container), or a process group started from the
# host's own Python (WATCH=process: job.pid is the trainer, job.pgid its group, exit_code its end) --

# running | created | ended | missing | error (the engine did not answer: not the same as gone)
job_state() {
  if [ "$WATCH" = process ]; then
    if [ -f "$RUN_DIR/exit_code" ]; then echo ended
    elif pid_is "$RUN_DIR/job.pgid" "$RUN_DIR"; then echo running
    elif [ -f "$RUN_DIR/job.pgid" ]; then echo missing  # gone without an exit code: killed
    else echo created
    fi
    return
  fi
  j_out=$(dk inspect -f '{{.State.Status}}' "$CONTAINER" 2>&1)
  j_rc=$?
  j_out=$(printf '%s' "$j_out" | tr -d '[:space:]')
  if [ "$j_rc" -eq 0 ]; then
    case "$j_out" in
      exited|dead) echo ended ;;
      created) echo created ;;
      *) echo running ;;
    esac
    return
  fi
  case "$j_out" in
    *[Nn]osuchobject*|*[Nn]osuchcontainer*) echo missing ;;
    *) echo error ;;
  esac
}

# Whether the job printed anything since wall time $1; an error reading the log is not activity.
job_active_since() {
  if [ "$WATCH" = process ]; then
    a_size=$(stat -c %s "$RUN_DIR/train.log" 2>/dev/null) || return 1
    [ "$a_size" != "${LAST_LOG_SIZE:-}" ] || return 1
    LAST_LOG_SIZE=$a_size
    return 0
  fi
  dk logs --since "$1" "$CONTAINER" >"$RUN_DIR/.logprobe" 2>&1 || return 1
  [ -s "$RUN_DIR/.logprobe" ]
}

job_stop() {  # SIGTERM (the trainer saves last.pth at its next step), killed after STOP_TIMEOUT_S
  if [ "$WATCH" = process ]; then
    pid_is "$RUN_DIR/job.pid" "$RUN_DIR" && kill -TERM "$(cat "$RUN_DIR/job.pid")" 2>/dev/null
    s_deadline=$(($(mono) + STOP_TIMEOUT_S))
    while pid_is "$RUN_DIR/job.pgid" "$RUN_DIR" && [ "$(mono)" -lt "$s_deadline" ]; do sleep 1; done
    pid_is "$RUN_DIR/job.pgid" "$RUN_DIR" && kill -KILL -- "-$(cat "$RUN_DIR/job.pgid")" 2>/dev/null
    return 0
  fi
  bounded $((STOP_TIMEOUT_S + 60)) docker stop -t "$STOP_TIMEOUT_S" "$CONTAINER" >/dev/null 2>&1
}

job_exit_code() {
  if [ "$WATCH" = process ]; then
    j_code=$(cat "$RUN_DIR/exit_code" 2>/dev/null | tr -d '[:space:]')
    echo "${j_code:--1}"
    return
  fi
  j_code=$(dk inspect -f '{{.State.ExitCode}}' "$CONTAINER" 2>/dev/null | tr -d '[:space:]')
  echo "${j_code:--1}"
}

job_remove() {
  # A sweep's queue leaves its points' trainers to clean up (and stops any still running).
  [ -n "${CLEANUP_COMMAND:-}" ] && bounded $((STOP_TIMEOUT_S + 60)) sh -c "$CLEANUP_COMMAND" </dev/null >/dev/null 2>&1
  [ "$WATCH" = process ] && return 0  # the process is its own record; nothing to remove
  dk rm -f "$CONTAINER" >/dev/null 2>&1
}

# Leases: which runs still hold this host ----------------------------------------------------------

# A lease counts while the run's watchdog (or its backstop, which restarts it) lives: a run whose
# watchers are gone cannot stop the host itself, so it must not keep others from stopping it.
lease_live() {
  [ -f "$1/lease" ] || return 1
  pid_is "$1/watchdog.pid" "$1" || pid_is "$1/backstop.pid" "$1"
}

other_runs() {
  for o_dir in "$WORKDIR"/runs/*; do
    [ -d "$o_dir" ] || continue
    [ "${o_dir##*/}" = "$RUN_ID" ] && continue
    lease_live "$o_dir" && echo "${o_dir##*/}"
  done
}

# Reboots: re-arm after a reboot where the host allows it (a user crontab) ---------------------------

arm_reboot() {
  command -v crontab >/dev/null 2>&1 || return 0
  { crontab -l 2>/dev/null | grep -vF "$WATCHDOG"
    echo "@reboot sh $WATCHDOG $RUN_DIR watch >>$RUN_DIR/watchdog.log 2>&1"; } | crontab - 2>/dev/null
}

disarm_reboot() {
  command -v crontab >/dev/null 2>&1 || return 0
  crontab -l 2>/dev/null | grep -qF "$WATCHDOG" || return 0
  crontab -l 2>/dev/null | grep -vF "$WATCHDOG" | crontab - 2>/dev/null
}

# The release: stop the machine unless another run holds it -----------------------------------------

run_stop_command() {
  attempt=1
  wait_s=$STOP_RETRY_S
  while :; do
    put stop_state "stopping $(wall) attempt=$attempt"
    log "running stop command (attempt $attempt): $STOP_COMMAND"
    out=$(bounded "$STOP_COMMAND_TIMEOUT_S" sh -c "$STOP_COMMAND" 2>&1 </dev/null)
    rc=$?
    if [ "$rc" -eq 0 ]; then
      put stop_state "stopped $(wall)"
      log "stop command exited 0"
      return 0
    fi
    detail=$(printf '%s' "$out" | tail -n 1 | tr -d '\r' | cut -c1-300)
    put stop_state "stop_failed $(wall) attempt=$attempt exit=$rc ${detail:-no output}"
    log "STOP FAILED (exit $rc): ${detail:-no output}; retrying in ${wait_s}s"
    sleep "$wait_s"
    attempt=$((attempt + 1))
    wait_s=$((wait_s * 2))
    [ "$wait_s" -gt 300 ] && wait_s=300
  done
}

release_host() {
  rm -f "$RUN_DIR/lease"
  disarm_reboot
  if [ "${KEEP_ALIVE:-0}" = 1 ]; then
    put stop_state "keep_alive $(wall)"
    log "keep-alive: not stopping the host"
    return 0
  fi
  if [ "$STOP_COMMAND" = none ]; then
    put stop_state "not_needed $(wall)"
    log "stop_command = none: this host is never stopped"
    return 0
  fi
  while :; do
    others=$(other_runs | tr '\n' ' ')
    [ -z "$others" ] && break
    for o in $others; do
      read -r o_kind _ <"$WORKDIR/runs/$o/lease" 2>/dev/null || continue
      if [ "$o_kind" = watch ]; then
        put stop_state "handed_over $(wall) $o"
        log "run $o still uses the host: its watchdog stops it"
        return 0
      fi
    done
    put stop_state "waiting_for $(wall) $others"
    sleep "$POLL_S"
  done
  run_stop_command
}

upload_outputs() {
  [ -n "$UPLOAD_COMMAND" ] || return 0
  log "uploading outputs"
  if bounded "$UPLOAD_TIMEOUT_S" sh -c "$UPLOAD_COMMAND" </dev/null; then
    put uploaded "$(wall)"
  else
    log "upload failed"
  fi
}

# After the job: record how it ended, upload, give the laptop its grace to pull, release the host.
end_job() {
  DONE=1
  if [ ! -f "$RUN_DIR/status" ] && [ ! -f "$RUN_DIR/watchdog.env" ]; then
    put status "outcome=$outcome exit_code=-1 ended_at=$(wall)"  # ended before the job was set up
  fi
  if [ ! -f "$RUN_DIR/status" ]; then
    case "$outcome" in
      finished|never_started|rebooted) ;;
      *) log "$outcome: stopping the job (SIGTERM, the trainer saves last.pth; killed after ${STOP_TIMEOUT_S}s)"
         job_stop ;;
    esac
    code=$(job_exit_code)
    put status "outcome=$outcome exit_code=$code ended_at=$(wall)"
    log "job ended: outcome=$outcome exit_code=$code"
    upload_outputs
  fi
  put stop_state "waiting $(wall)"
  e_deadline=$(($(mono) + ${GRACE_S:-0}))
  # A connected laptop that is pulling holds the stop a little longer than the grace (hold is
  # touched when its pull begins): the outputs are worth more than a minute of idle.
  while [ ! -e "$RUN_DIR/pulled" ]; do
    if [ "$(mono)" -ge "$e_deadline" ]; then
      h_at=$(stat -c %Y "$RUN_DIR/hold" 2>/dev/null || echo 0)
      [ $(($(wall) - h_at)) -lt "$HOLD_S" ] || break
    fi
    sleep 1
  done
  if [ -e "$RUN_DIR/pulled" ]; then log "outputs pulled by the client"; else log "grace period over"; fi
  [ -f "$RUN_DIR/watchdog.env" ] && job_remove
  release_host
  if pid_is "$RUN_DIR/backstop.pid" "$RUN_DIR" && [ "$MODE" != backstop ]; then
    kill "$(cat "$RUN_DIR/backstop.pid")" 2>/dev/null
  fi
}

start_detached() {  # start_detached MODE: another copy of this script, in its own session
  nohup setsid sh "$WATCHDOG" "$RUN_DIR" "$1" >>"$RUN_DIR/watchdog.log" 2>&1 </dev/null &
}

on_exit() {
  x_rc=$?
  trap - EXIT TERM INT HUP
  if [ "${DONE:-0}" != 1 ] && ! stop_done; then
    log "leaving early (exit $x_rc): taking the stop path"
    outcome=${outcome:-watchdog_exit}
    end_job
  fi
}

# Modes ---------------------------------------------------------------------------------------------

watch() {
  echo $$ >"$RUN_DIR/watchdog.pid"
  if stop_done; then log "this run was already released"; DONE=1; return 0; fi
  trap on_exit EXIT
  trap 'log "signal received"; exit 143' TERM INT HUP
  arm_reboot
  if [ ! -f "$RUN_DIR/watchdog.env" ]; then
    wait_for_job || return 0
    . "$RUN_DIR/watchdog.env"
  fi
  boot=$(boot_id)
  if [ -f "$RUN_DIR/armed" ]; then
    read -r a_boot a_mono _ <"$RUN_DIR/armed"
  else
    a_boot=$boot
    a_mono=$(mono)
    put armed "$a_boot $a_mono $(wall)"
  fi
  put lease "watch $(wall)"
  if [ "$a_boot" != "$boot" ]; then
    # The job died with the old boot; its uptime-based times mean nothing now.
    outcome=rebooted
    log "the host rebooted during the run"
    end_job
    return 0
  fi
  if [ -f "$RUN_DIR/status" ]; then
    outcome=finished  # an earlier watchdog recorded the end and died before the release
    end_job
    return 0
  fi
  started=$a_mono
  last_activity=$(mono)
  last_probe=$(wall)
  seen=0
  [ -f "$RUN_DIR/seen" ] && seen=1
  err_since=""
  outcome=""
  log "watching the $WATCH ${CONTAINER:-of this run} (max ${MAX_S}s, silence ${SILENCE_S}s, grace ${GRACE_S:-0}s)"
  while :; do
    pid_is "$RUN_DIR/backstop.pid" "$RUN_DIR" || start_detached backstop
    state=$(job_state)
    t=$(mono)
    case "$state" in
      error)
        [ -n "$err_since" ] || { err_since=$t; log "the Docker engine does not answer; waiting for it"; }
        if [ $((t - err_since)) -ge "$ENGINE_DOWN_S" ]; then outcome=engine_down; break; fi
        sleep "$POLL_S"
        continue ;;
      ended) outcome=finished; break ;;
      missing)
        if [ "$seen" = 1 ]; then outcome=finished; break; fi ;;
      running)
        if [ "$seen" = 0 ]; then seen=1; put seen "$(wall)"; fi
        if job_active_since "$last_probe"; then last_activity=$t; fi
        last_probe=$(($(wall) - 1)) ;;
    esac
    [ -n "$err_since" ] && log "the Docker engine answers again"
    err_since=""
    if [ "$seen" = 0 ] && [ $((t - started)) -ge "$START_WAIT_S" ]; then outcome=never_started; break; fi
    if [ "$MAX_S" -gt 0 ] && [ $((t - started)) -ge "$MAX_S" ]; then outcome=max_runtime; break; fi
    if [ "$SILENCE_S" -gt 0 ] && [ $((t - last_activity)) -ge "$SILENCE_S" ]; then outcome=silent; break; fi
    sleep "$POLL_S"
  done
  end_job
}

# Before the job: the laptop is still syncing and building, and renews the lease as it goes. A
# laptop that stops renewing it (killed, offline) has abandoned the run: the host is released.
wait_for_job() {
  log "holding the host while the laptop prepares the run"
  touched=$(mono)
  last_m=""
  while [ ! -f "$RUN_DIR/watchdog.env" ]; do
    pid_is "$RUN_DIR/backstop.pid" "$RUN_DIR" || start_detached backstop
    m=$(stat -c %Y "$RUN_DIR/lease" 2>/dev/null || echo none)
    if [ "$m" != "$last_m" ]; then last_m=$m; touched=$(mono); fi
    if [ $(($(mono) - touched)) -ge "$SETUP_IDLE_S" ]; then
      log "the laptop stopped preparing the run ${SETUP_IDLE_S}s ago: releasing the host"
      DONE=1
      put status "outcome=setup_abandoned exit_code=-1 ended_at=$(wall)"
      release_host
      return 1
    fi
    sleep "$POLL_S"
  done
}

# A second process that does not depend on the watchdog staying alive: it starts it again when it
# died (killed, OOM-killed), and when the run has a max runtime or budget, enforces that deadline
# itself should the watchdog be unable to.
backstop() {
  echo $$ >"$RUN_DIR/backstop.pid"
  while :; do
    stop_done && return 0
    # Released (the lease goes first) and no watchdog left to guard: nothing more to do. (This
    # does not depend on writing a file, which a full disk would refuse.)
    if [ ! -f "$RUN_DIR/lease" ] && ! pid_is "$RUN_DIR/watchdog.pid" "$RUN_DIR"; then return 0; fi
    if [ -f "$RUN_DIR/armed" ] && [ "$MAX_S" -gt 0 ]; then
      read -r b_boot b_mono _ <"$RUN_DIR/armed"
      if [ "$b_boot" = "$(boot_id)" ] && [ "$(mono)" -ge $((b_mono + MAX_S + STOP_TIMEOUT_S + 120)) ]; then
        log "the run is past its deadline and still not released: the backstop ends it"
        pid_is "$RUN_DIR/watchdog.pid" "$RUN_DIR" && kill -9 "$(cat "$RUN_DIR/watchdog.pid")" 2>/dev/null
        trap on_exit EXIT
        outcome=deadline
        end_job
        return 0
      fi
    fi
    if ! pid_is "$RUN_DIR/watchdog.pid" "$RUN_DIR"; then
      log "the watchdog is gone: starting it again"
      start_detached watch
      sleep 3
    fi
    sleep 5
  done
}

abort() {
  for f in watchdog backstop; do
    pid_is "$RUN_DIR/$f.pid" "$RUN_DIR" && kill -9 "$(cat "$RUN_DIR/$f.pid")" 2>/dev/null
  done
  DONE=1
  [ -f "$RUN_DIR/watchdog.env" ] && job_remove
  log "setup failed: releasing the host"
  release_host
}

case "$MODE" in
  watch) watch ;;
  backstop) backstop ;;
  abort) abort ;;
  others) other_runs ;;
  *) echo "unknown mode $MODE" >&2; exit 2 ;;
esac
