# Sourced by tune.sh and study.sh: run NAME ARGS... trains `cmae pretrain --out $R/NAME ARGS`
# unless $R/NAME/summary.json exists (a finished run); an unfinished one resumes
# (train.resume=auto in ARGS). Logs to $R/NAME.log, wall time included.
run() { name=$1; shift
  [ -f "$R/$name/summary.json" ] && { echo "skip $name"; return; }
  echo "start $name $(date -u +%T)"
  /usr/bin/time -f "$name %e s wall" "$PY" -m cmae pretrain --out "$R/$name" "$@" > "$R/$name.log" 2>&1
  echo "end $name rc=$? $(date -u +%T)"; }
