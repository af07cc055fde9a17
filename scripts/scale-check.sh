#!/usr/bin/env bash
# Preprocessing fanned out over several real hosts: `scripts/scale-check.sh [records] [hosts] [dedup]
# [compare]` (default 7,500,000 records, about 1 GiB; 2 hosts; near). Starts Azurite and that many local hosts
# (each the function app's isolated worker under our host, sharing the one storage account as Flex
# instances do), drops a generated labelled JSONL file (planted exact and near duplicates) into
# incoming with a spec asking for 1,000,000 records per partition (PARTITION_RECORDS sets another),
# waits for the run, then prints the run's counts, which host did which parts and each worker's peak
# resident memory (VmHWM). With `compare` it then prepares the same file once more, in a fresh Azurite
# with one host and `"partitions":1` (the single pass), and compares the two runs' shards and
# stats.json byte for byte.
# Minutes, not seconds: not part of ./test.sh.
set -euo pipefail
source "$(dirname "$0")/common.sh"
RECORDS=${1:-7500000}
HOSTS=${2:-2}
DEDUP=${3:-near}
COMPARE=${4:-}
[[ -z "$COMPARE" || "$COMPARE" == compare ]] || die "the fourth argument is either absent or 'compare', not '$COMPARE'"
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
printf '{"preprocess":{"dedup":{"mode":"%s"},"partitionRecords":%d}}\n' "$DEDUP" "${PARTITION_RECORDS:-1000000}" >"$DATA/scale.pipeline.json"

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
[[ $status -eq 0 && -n "$COMPARE" ]] || exit "$status"

say "Downloading the fanned-out run's artifacts"
pipeline artifacts "$run_id" --out "$DATA/fanout" >/dev/null
stop_started

say "Preparing the same file by the single pass (a fresh Azurite, one host, \"partitions\":1)"
printf '{"preprocess":{"dedup":{"mode":"%s"},"partitions":1}}\n' "$DEDUP" >"$DATA/scale.pipeline.json"
start_azurite "$DATA/azurite-single" 10200
HOST_LOG="$RUN_DIR/host-single.log" start_host
single_host=${PIDS[-1]}
started=$(date +%s)
pipeline submit "$DATA/scale.jsonl" --spec "$DATA/scale.pipeline.json" --wait --timeout 5400
say "The single-pass run ended after $(($(date +%s) - started)) s"
single_run=$(pipeline runs --output json | node -e 'console.log(JSON.parse(require("fs").readFileSync(0, "utf8"))[0].runId)')
pipeline status "$single_run" || true
worker=$(pgrep -P "$single_host" | head -n 1 || true)
echo "single-pass worker peak resident memory: $([[ -n "$worker" ]] && awk '/VmHWM/ {printf "%.0f MB", $2 / 1024}' "/proc/$worker/status" || echo unknown)"
pipeline artifacts "$single_run" --out "$DATA/single" >/dev/null

say "Comparing the prepared outputs (shards and stats.json) byte for byte"
fanout=$(find "$DATA/fanout" -type d -path '*/prepared/pp-*' -prune | head -n 1)
single=$(find "$DATA/single" -type d -path '*/prepared/pp-*' -prune | head -n 1)
[[ -n "$fanout" && -n "$single" ]] || die "a run has no prepared/pp-* artifacts (fanned out: '$fanout', single pass: '$single')"
[[ "$(basename "$fanout")" == "$(basename "$single")" ]] || die "the prepared ids differ: $(basename "$fanout") and $(basename "$single")"
compared=() differ=()
while IFS= read -r file; do
  compared+=("$file")
  cmp -s "$fanout/$file" "$single/$file" || differ+=("$file")
done < <(cd "$single" && find . -maxdepth 1 -type f \( -name stats.json -o -name '*-[0-9][0-9][0-9][0-9][0-9].jsonl' \) | sort)
[[ "$(cd "$fanout" && find . -maxdepth 1 -type f \( -name stats.json -o -name '*-[0-9][0-9][0-9][0-9][0-9].jsonl' \) | sort)" == "$(printf '%s\n' "${compared[@]}")" ]] ||
  die "the two runs wrote different sets of shard files"
[[ ${#compared[@]} -gt 1 ]] || die "found only ${#compared[@]} file(s) to compare under $single"
printf '%s  %s\n' "$(cat "$single/stats.json" "$single"/*-[0-9][0-9][0-9][0-9][0-9].jsonl | sha256sum | cut -d' ' -f1)" "sha256 of stats.json and every shard, single pass"
printf '%s  %s\n' "$(cat "$fanout/stats.json" "$fanout"/*-[0-9][0-9][0-9][0-9][0-9].jsonl | sha256sum | cut -d' ' -f1)" "sha256 of stats.json and every shard, fanned out"
[[ ${#differ[@]} -eq 0 ]] || die "${#differ[@]} of ${#compared[@]} files differ: ${differ[*]}"
say "$(basename "$single"): all ${#compared[@]} files (stats.json and $((${#compared[@]} - 1)) shards, $(wc -c "$single"/*-[0-9][0-9][0-9][0-9][0-9].jsonl | tail -n 1 | awk '{print $1}') bytes) are identical"
