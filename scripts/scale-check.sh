#!/usr/bin/env bash
# Preprocessing fanned out over several real hosts: `scripts/scale-check.sh [records] [hosts] [dedup]`
# (default 7,500,000 records, about 1 GiB; 2 hosts; near). Starts Azurite and that many local hosts
# (each the function app's isolated worker under our host, sharing the one storage account as Flex
# instances do), drops a generated labelled JSONL file (planted exact and near duplicates) into
# incoming with a spec asking for 1,000,000 records per partition, waits for the run, then prints the
# run's counts, which host did which parts, each worker's peak resident memory (VmHWM), and the storage
# left under the build's _partitions/. Minutes, not seconds: not part of ./test.sh.
set -euo pipefail
source "$(dirname "$0")/common.sh"
RECORDS=${1:-7500000}
HOSTS=${2:-2}
DEDUP=${3:-near}
RUN_DIR="$ROOT/.run/scale-check"
mkdir -p "$RUN_DIR"
DATA=$(mktemp -d)
trap 'stop_started; rm -rf "$DATA"' EXIT
trap 'exit 130' INT TERM

require_tools
install_azurite
build

say "Generating $RECORDS records"
dotnet "$ROOT/bench/Pipeline.Bench/bin/$CONFIGURATION/net10.0/Pipeline.Bench.dll" generate-scale "$RECORDS" "$DATA/scale.jsonl"
printf '{"preprocess":{"dedup":{"mode":"%s"},"partitionRecords":1000000}}\n' "$DEDUP" >"$DATA/scale.pipeline.json"

say "Starting Azurite and $HOSTS local hosts"
start_azurite "$DATA/azurite" 10100
# A part another instance could take waits 5 s, not the default 20 s, when its instance is busy.
export Pipeline__Messaging__DeferralDelay=00:00:05
HOST_PIDS=()
for ((i = 1; i <= HOSTS; i++)); do
  HOST_LOG="$RUN_DIR/host-$i.log" start_host
  HOST_PIDS+=("${PIDS[-1]}")
done

started=$(date +%s)
# Each worker's resident memory every 5 s, for where the peak came from (elapsed seconds, one column a host).
( while sleep 5; do
    line="$(($(date +%s) - started))"
    for pid in "${HOST_PIDS[@]}"; do
      worker=$(pgrep -P "$pid" | head -n 1 || true)
      line+=" $([[ -n "$worker" ]] && awk '/VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$worker/status" 2>/dev/null || echo -)"
    done
    echo "$line"
  done >"$RUN_DIR/rss.log" ) &
PIDS+=($!)

say "Submitting scale.jsonl ($(du -h "$DATA/scale.jsonl" | cut -f1)), spec: $(cat "$DATA/scale.pipeline.json")"
status=0
pipeline submit "$DATA/scale.jsonl" --spec "$DATA/scale.pipeline.json" --wait --timeout 5400 || status=$?
say "The run ended after $(($(date +%s) - started)) s (exit code $status)"
run_id=$(pipeline runs --output json | node -e 'console.log(JSON.parse(require("fs").readFileSync(0, "utf8"))[0].runId)')
pipeline status "$run_id" || true

say "Per host: parts done and the worker's peak resident memory"
for ((i = 1; i <= HOSTS; i++)); do
  log="$RUN_DIR/host-$i.log"
  worker=$(pgrep -P "${HOST_PIDS[$((i - 1))]}" | head -n 1 || true)
  peak=$([[ -n "$worker" ]] && awk '/VmHWM/ {printf "%.0f MB", $2 / 1024}' "/proc/$worker/status" || echo "unknown")
  printf 'host %d: %s partitions, %s near-dedup parts, assembly %s; worker peak resident memory %s\n' "$i" \
    "$(grep -cE 'Partition [0-9]+ of pp-[0-9a-z]+: [0-9]+ records' "$log" || true)" \
    "$(grep -cE 'Near-dedup (buckets|attach|verify) part [0-9]+ of pp-[0-9a-z]+: [0-9]+ pairs' "$log" || true)" \
    "$(grep -qE 'assembled from [0-9]+ partitions' "$log" && echo yes || echo no)" "$peak"
done
exit "$status"
