#!/usr/bin/env bash
# Coverage-guided fuzzing of Ferry's decoders with libFuzzer (cargo fuzz).
#
#   fuzz/run.sh                 every target for 20 s (what CI runs)
#   fuzz/run.sh --long          every target for 30 min (FUZZ_SECONDS to change)
#   fuzz/run.sh v2_request      one target
#
# Installs cargo-fuzz when missing. cargo fuzz needs nightly compiler flags;
# the stable toolchain allows them with RUSTC_BOOTSTRAP=1. The targets are
# built without a sanitizer: Ferry forbids unsafe code, so a crash is a panic
# (an assertion of the target, an overflow or an index out of range), which
# libFuzzer catches either way; this keeps the build to a few minutes.
#
# Inputs that grow coverage are kept in fuzz/corpus/<target> (not committed);
# fuzz/seeds/<target> holds the committed starting points. A crash leaves its
# input in fuzz/artifacts/<target>/: make it a regression test, fix, re-run.
set -euo pipefail
cd "$(dirname "$0")"

seconds=${FUZZ_SECONDS:-20}
targets=()
for arg in "$@"; do
  case $arg in
    --long) seconds=${FUZZ_SECONDS:-1800} ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) targets+=("$arg") ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(v2_request v2_response grpc_request rollout_spec route_policy model_check)

CARGO_FUZZ_VERSION=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

export RUSTC_BOOTSTRAP=1
# The fuzz build does not need ONNX Runtime.
export FERRY_SKIP_ORT_FETCH=1
echo "== building the fuzz targets"
cargo fuzz build --sanitizer none

for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  echo "== $t for ${seconds}s"
  cargo fuzz run --sanitizer none "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$seconds" -max_len=4096 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    2>&1 | grep -E "^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::new_units_added|==|INFO: seed corpus)|panicked|Error|SUMMARY|crash-|Test unit written" || true
  # cargo fuzz's exit status is lost in the pipe: a crash leaves an artifact.
  if compgen -G "artifacts/$t/crash-*" >/dev/null || compgen -G "artifacts/$t/oom-*" >/dev/null || compgen -G "artifacts/$t/timeout-*" >/dev/null; then
    echo "FAILED: $t found an input that breaks it:" artifacts/"$t"/*
    exit 1
  fi
done
echo "== no crash in ${#targets[@]} target(s), ${seconds}s each"
