#!/usr/bin/env bash
# Ferry's benchmark suite: one entry point. Installs what it needs itself
# (oha from crates.io into bench/.tools, MLServer into bench/.venv, nginx and
# HAProxy from Debian's packages), builds
# Ferry in release mode, runs the peers and Ferry side by side in one run,
# writes bench/results/<suite>.json and prints a summary to paste into
# BENCHMARKS.md. Every process it starts is stopped on exit.
#
#   bench/run.sh [--quick] [--no-mlserver] [--repeat N] [--sut-cpus L --load-cpus L] [--suite all|serving|routing|batching|gateways|control|scale|grpc|store|cluster|failover|memory]
set -euo pipefail
cd "$(dirname "$0")/.."

OHA_VERSION=1.16.0
TOOLS=bench/.tools
if ! [ -x "$TOOLS/bin/oha" ]; then
  echo "installing oha $OHA_VERSION into $TOOLS (once)"
  cargo install oha --version "$OHA_VERSION" --locked --root "$TOOLS" --quiet
fi

for tool in nginx haproxy; do
  if ! command -v "$tool" >/dev/null && ! [ -x "/usr/sbin/$tool" ]; then
    echo "installing $tool (Debian package)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx haproxy >/dev/null
  fi
done
export PATH="$PATH:/usr/sbin"

cargo build --release --quiet
python3 bench/bench.py --oha "$TOOLS/bin/oha" --ferry target/release/ferry "$@"
# The tables of BENCHMARKS.md (medians and ranges) from every result present.
python3 bench/summary.py
