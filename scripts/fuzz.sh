#!/usr/bin/env bash
# Fuzzes every target in fuzz/ for a bounded time, on the stable toolchain, starting from
# the committed seed corpus (fuzz/corpus/<target>/seed-*). scripts/test.sh runs it; alone:
#
#   scripts/fuzz.sh                        # every target, IAMPROXY_FUZZ_SECS each
#   IAMPROXY_FUZZ_SECS=300 scripts/fuzz.sh # longer
#   IAMPROXY_FUZZ_SECS=0 scripts/fuzz.sh   # skip
#
# A crash fails the run and prints where libFuzzer saved the input, the command that
# replays it, and the input itself in base64 (so a crash on a CI machine can be replayed
# from its log).
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${IAMPROXY_FUZZ_SECS:-40}
log() { printf '\n== %s\n' "$*"; }

if [ "$secs" = 0 ]; then
  echo "fuzzing skipped (IAMPROXY_FUZZ_SECS=0)"
  exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

# cargo-fuzz builds with flags only a nightly compiler accepts (-Zsanitizer=address and
# sancov instrumentation). The machines here have the stable toolchain only, and no other
# can be fetched; RUSTC_BOOTSTRAP=1 lets stable rustc accept them. It is confined to this
# test-only build of the fuzz/ workspace: nothing that ships is built this way.
export RUSTC_BOOTSTRAP=1

log "cargo fuzz build (every target)"
cargo fuzz build

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()
for target in $(cargo fuzz list); do
  log "cargo fuzz run $target (${secs} s)"
  # New inputs go to a scratch directory first on the list; the seeds are only read.
  mkdir -p "$work/$target"
  if cargo fuzz run "$target" "$work/$target" "fuzz/corpus/$target" -- \
    -max_total_time="$secs" -print_final_stats=1 >"$work/$target.log" 2>&1; then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$target.log" | tail -n 1)
    corpus=$(find "$work/$target" -type f | wc -l)
    echo "$target: ${runs:-?} inputs in ${secs} s, no crash (${corpus} new corpus entries, not kept)"
  else
    failed+=("$target")
    tail -n 40 "$work/$target.log"
    for artifact in fuzz/artifacts/"$target"/*; do
      [ -f "$artifact" ] || continue
      echo "crash input: $artifact"
      echo "replay with: RUSTC_BOOTSTRAP=1 cargo fuzz run $target $artifact"
      echo "input (base64): $(base64 -w0 "$artifact")"
    done
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzzing found crashes in: ${failed[*]}" >&2
  exit 1
fi
