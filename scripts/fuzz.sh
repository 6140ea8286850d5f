#!/usr/bin/env bash
# Fuzzes every decoder of bytes from a peer or from disk (fuzz/fuzz_targets).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     (default 20)
#
# Builds the targets (cargo +nightly fuzz build -O: AddressSanitizer,
# debug assertions), replays the known crash inputs of each target
# (fuzz/crashers/<target>-*), then fuzzes each target for the given time
# from a temporary copy of its seed corpus (fuzz/corpus/<target>/), so the
# repository stays clean. Prints executions and exec/s per target; exits
# non-zero if any target crashed, with the input copied to
# fuzz/artifacts/<target>/.
#
# FUZZ_SKIP="sync_receive ..." skips targets (space-separated).
# FUZZ_JOBS=2 fuzzes two targets at a time (one core each); default 1.
# FUZZ_RUNS=N runs N executions per target instead of a time (the
# documented long run: FUZZ_RUNS=10000000 scripts/fuzz.sh).
# Without a nightly toolchain it says so and exits 0; a missing cargo-fuzz
# is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

secs=${1:-20}
case $secs in '' | *[!0-9]*)
  echo "usage: $0 [SECONDS_PER_TARGET]" >&2
  exit 2
  ;;
esac

if ! command -v rustup >/dev/null || ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "skipping fuzzing: no nightly toolchain (rustup toolchain install nightly)"
  exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

echo "== cargo +nightly fuzz build -O"
start=$(date +%s)
# the lock file is committed: refuse to change it, as --locked does
(cd fuzz && cargo +nightly fetch --locked -q)
(cd fuzz && cargo +nightly fuzz build -O)
echo "build: $(($(date +%s) - start)) s"

triple=$(rustc +nightly -vV | sed -n 's/^host: //p')
# fuzz/target unless CARGO_TARGET_DIR or a cargo config says otherwise
target_dir=$(cd fuzz && cargo +nightly metadata --format-version 1 --no-deps |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
bin_dir=${target_dir:-fuzz/target}/$triple/release
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Fuzzes one target; writes its report line(s) to $work/$t/report and
# fails if it crashed.
fuzz_one() {
  local t=$1 bin=$bin_dir/$1 rc=0 execs rate
  local out=$work/$t/report
  mkdir -p "$work/$t/corpus" "$work/$t/artifacts"
  # Known crash inputs first: each must now run clean.
  local known=()
  shopt -s nullglob
  known=(fuzz/crashers/"$t"-*)
  shopt -u nullglob
  if ((${#known[@]})) && ! "$bin" -runs=1 "${known[@]}" >"$work/$t/replay.log" 2>&1; then
    {
      printf '%-14s %12s %10s  %s\n' "$t" - - "CRASH on a known input in fuzz/crashers"
      grep -m1 -A1 -E "panicked at|ERROR: " "$work/$t/replay.log" | sed 's/^/    /' || true
    } >"$out"
    return 1
  fi
  if [ -d "fuzz/corpus/$t" ]; then cp -R "fuzz/corpus/$t/." "$work/$t/corpus/"; fi
  local budget=(-max_total_time="$secs")
  if [ -n "${FUZZ_RUNS:-}" ]; then budget=(-runs="$FUZZ_RUNS"); fi
  "$bin" "${budget[@]}" -timeout=10 -print_final_stats=1 \
    -artifact_prefix="$work/$t/artifacts/" "$work/$t/corpus" >"$work/$t/log" 2>&1 || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t/log")
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$work/$t/log")
  if [ "$rc" = 0 ]; then
    printf '%-14s %12s %10s  %s\n' "$t" "${execs:-?}" "${rate:-?}" ok >"$out"
    return 0
  fi
  mkdir -p "fuzz/artifacts/$t"
  cp "$work/$t/artifacts/"* "fuzz/artifacts/$t/" 2>/dev/null || true
  {
    printf '%-14s %12s %10s  %s\n' "$t" "${execs:-?}" "${rate:-?}" "CRASH (exit $rc); input in fuzz/artifacts/$t/"
    grep -m1 -A1 -E "panicked at|ERROR: " "$work/$t/log" | sed 's/^/    /' || true
    echo "    reproduce: $bin fuzz/artifacts/$t/<file>"
  } >"$out"
  return 1
}

# FUZZ_JOBS targets at a time (default 1): each fuzzer uses one core.
jobs=${FUZZ_JOBS:-1}
targets=()
n=0
for t in $(cd fuzz && cargo +nightly fuzz list); do
  targets+=("$t")
  [[ " ${FUZZ_SKIP:-} " == *" $t "* ]] || n=$((n + 1))
done
if [ -n "${FUZZ_RUNS:-}" ]; then
  echo "== fuzzing $n of ${#targets[@]} targets, ${FUZZ_RUNS} executions each, ${jobs} at a time"
else
  echo "== fuzzing $n of ${#targets[@]} targets, ${secs} s each, ${jobs} at a time"
fi
running=0
for t in "${targets[@]}"; do
  [[ " ${FUZZ_SKIP:-} " == *" $t "* ]] && continue
  if ((running >= jobs)); then
    wait -n || true
    running=$((running - 1))
  fi
  (fuzz_one "$t") &
  running=$((running + 1))
done
wait || true

failed=()
printf '%-14s %12s %10s  %s\n' target executions exec/s result
for t in "${targets[@]}"; do
  if [[ " ${FUZZ_SKIP:-} " == *" $t "* ]]; then
    printf '%-14s %12s %10s  %s\n' "$t" - - "skipped (FUZZ_SKIP)"
    continue
  fi
  cat "$work/$t/report" 2>/dev/null || printf '%-14s %12s %10s  %s\n' "$t" - - "no report"
  grep -q ' ok$' "$work/$t/report" 2>/dev/null || failed+=("$t")
done

if ((${#failed[@]})); then
  echo "fuzzing found crashes in: ${failed[*]}" >&2
  exit 1
fi
echo "fuzzing: no crash"
