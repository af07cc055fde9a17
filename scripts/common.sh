#!/usr/bin/env bash
# Shared by run.sh and test.sh: install what the project needs, start and stop Azurite and the local host.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIGURATION="${CONFIGURATION:-Release}"
FUNCTION_APP="$ROOT/functions/bin/$CONFIGURATION/net10.0"
LOCAL_HOST="$ROOT/localhost/bin/$CONFIGURATION/net10.0/Pipeline.LocalHost.dll"
TRAINER="$ROOT/trainer/bin/$CONFIGURATION/net10.0/Pipeline.Trainer.dll"
CLI="$ROOT/cli/bin/$CONFIGURATION/net10.0/pipeline.dll"
export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1 DOTNET_SKIP_FIRST_TIME_EXPERIENCE=1

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

require_tools() {
  command -v dotnet >/dev/null || die "the .NET 10 SDK is needed (dotnet on PATH): https://dot.net"
  command -v node >/dev/null || die "Node.js 20 or later is needed for Azurite (node on PATH)"
  command -v npm >/dev/null || die "npm is needed for Azurite"
}

# Azurite, pinned in package-lock.json; reinstalled only when the lock file changes.
install_azurite() {
  local stamp="$ROOT/node_modules/.package-lock.json"
  if [[ ! -x "$ROOT/node_modules/.bin/azurite" || "$ROOT/package-lock.json" -nt "$stamp" ]]; then
    say "Installing Azurite (npm ci)"
    (cd "$ROOT" && npm ci --no-audit --no-fund --loglevel=error)
  fi
}

# Debian's chromium for the dashboard's browser tests (Playwright drives it through ExecutablePath; Playwright's
# own browser download is never used). Installed with apt-get when missing, as on a clean CI machine.
CHROMIUM=/usr/bin/chromium
install_chromium() {
  [[ -x "$CHROMIUM" ]] && return
  command -v apt-get >/dev/null || die "$CHROMIUM is missing and apt-get is not available: install Chromium there (the browser tests use it)"
  local sudo=()
  [[ $(id -u) -eq 0 ]] || sudo=(sudo)
  say "Installing chromium (apt-get) for the browser tests"
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends chromium >/dev/null
  [[ -x "$CHROMIUM" ]] || die "apt-get installed chromium but $CHROMIUM is missing"
}

# Warnings are errors, except NU1603 (the registry here serves the nearest newer version of some
# dependencies): the worker SDK's inner extensions project does not read Directory.Build.props.
WARNINGS_AS_ERRORS=(-warnaserror -warnnotaserror:NU1603)

build() {
  say "Building ($CONFIGURATION)"
  dotnet build "$ROOT/Pipeline.sln" -c "$CONFIGURATION" -nologo -clp:ErrorsOnly "${WARNINGS_AS_ERRORS[@]}" "$@"
}

free_port() {
  node -e "const s=require('net').createServer();s.listen(0,'127.0.0.1',()=>{console.log(s.address().port);s.close()})"
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for_port() {
  local port=$1 what=$2 tries=0
  until port_in_use "$port"; do
    tries=$((tries + 1))
    [[ $tries -gt 150 ]] && die "$what did not start listening on port $port (see the logs in $RUN_DIR)"
    sleep 0.2
  done
}

PIDS=()
# Stops what this script started, last first (the host before the Azurite it talks to); a process that
# has not exited after 10 seconds is killed.
stop_started() {
  local i pid tries
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    pid=${PIDS[$i]}
    kill "$pid" 2>/dev/null || continue
    tries=0
    while kill -0 "$pid" 2>/dev/null && [[ $tries -lt 50 ]]; do sleep 0.2; tries=$((tries + 1)); done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  PIDS=()
}

# start_azurite DATA_DIR [PREFERRED_FIRST_PORT]: the default ports 10000-10002 when free, else free ones.
start_azurite() {
  local data=$1 blob=${2:-10000} queue table
  queue=$((blob + 1)) table=$((blob + 2))
  if port_in_use "$blob" || port_in_use "$queue" || port_in_use "$table"; then
    blob=$(free_port) queue=$(free_port) table=$(free_port)
  fi
  mkdir -p "$data" "$RUN_DIR"
  "$ROOT/node_modules/.bin/azurite" --silent --skipApiVersionCheck --loose --location "$data" \
    --blobHost 127.0.0.1 --blobPort "$blob" --queueHost 127.0.0.1 --queuePort "$queue" --tableHost 127.0.0.1 --tablePort "$table" \
    >"$RUN_DIR/azurite.log" 2>&1 &
  PIDS+=($!)
  wait_for_port "$blob" Azurite; wait_for_port "$queue" Azurite; wait_for_port "$table" Azurite
  local key="Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
  export AzureWebJobsStorage="DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=$key;BlobEndpoint=http://127.0.0.1:$blob/devstoreaccount1;QueueEndpoint=http://127.0.0.1:$queue/devstoreaccount1;TableEndpoint=http://127.0.0.1:$table/devstoreaccount1;"
}

# host_ready PORT: the local host answers GET /admin/host/status with 200 (its worker is ready).
host_ready() {
  node -e "require('http').get('http://127.0.0.1:$1/admin/host/status', r => process.exit(r.statusCode === 200 ? 0 : 1)).on('error', () => process.exit(1))"
}

# start_host: local host mode (localhost/) running the function app's isolated worker, logging to
# $RUN_DIR/host.log; returns once the worker has been initialized and has indexed its functions.
start_host() {
  local port tries=0
  port=$(free_port)
  Pipeline__FineTune__Local__TrainerPath="${Pipeline__FineTune__Local__TrainerPath:-$TRAINER}" \
    dotnet "$LOCAL_HOST" --app "$FUNCTION_APP" --Pipeline:LocalHost:Port="$port" >"${HOST_LOG:-$RUN_DIR/host.log}" 2>&1 &
  PIDS+=($!)
  until host_ready "$port"; do
    kill -0 "${PIDS[-1]}" 2>/dev/null || die "the local host exited while starting; its log: $(tail -n 20 "${HOST_LOG:-$RUN_DIR/host.log}")"
    tries=$((tries + 1))
    [[ $tries -gt 450 ]] && die "the local host's worker was not ready after 90 s (see ${HOST_LOG:-$RUN_DIR/host.log})"
    sleep 0.2
  done
  HOST_PORT=$port
}

pipeline() { dotnet "$CLI" "$@"; }

# print_batch_summary: throughput and outputs of the newest inference batch (from its manifest).
print_batch_summary() {
  pipeline batches --output json | node -e '
    const b = JSON.parse(require("fs").readFileSync(0, "utf8"))[0];
    if (!b) { console.error("no batch found"); process.exit(1); }
    console.error(`Batch ${b.batchId}: ${b.status}, ${b.succeeded} of ${b.rows} rows scored (${b.failed} failed) by ${b.modelId} on ${b.executionProvider}`);
    console.error(`  ${b.rowsPerSecond} rows/s, ${b.tokensPerSecond} tokens/s end to end (model alone: ${b.modelRowsPerSecond} rows/s), padding ${(100 * b.paddingFraction).toFixed(1)}%`);
    console.error(`  results: ${b.results}\n  errors:  ${b.errors}\n  ledger:  ${b.ledger}`);'
}

# print_model_summary MODEL_ID: the fine-tuned model's validation metrics and lineage (from its model.json).
print_model_summary() {
  pipeline models --output json | node -e '
    const id = process.argv[1];
    const m = JSON.parse(require("fs").readFileSync(0, "utf8")).find(x => x.modelId === id);
    if (!m) { console.error(`model ${id} not found`); process.exit(1); }
    const x = m.lineage.metrics || {};
    console.error(`Model ${m.modelId} (${m.task}, labels ${m.labels.join("/")}): validation accuracy ${(100 * x.validationAccuracy).toFixed(1)}% vs majority baseline ${(100 * x.majorityBaselineAccuracy).toFixed(1)}% (+${x.accuracyPointsOverBaseline} points), macro-F1 ${x.validationMacroF1}`);
    console.error(`  trained from ${m.lineage.baseModel} on ${m.lineage.datasetId} / ${m.lineage.preparedId} (job ${m.lineage.source}), ${x.trainExamplesPerSecond} examples/s`);
    console.error(`  folder: models/${m.modelId}/ (model.onnx, model.json)`);' "$1"
}

# print_scored_rows INPUT N: the first N scored rows of the newest run, beside their text (results from its artifacts).
print_scored_rows() {
  local input=$1 count=$2 run_id dir
  run_id=$(pipeline runs --output json | node -e 'console.log(JSON.parse(require("fs").readFileSync(0, "utf8"))[0].runId)')
  dir="$RUN_DIR/artifacts"
  rm -rf "$dir"
  pipeline artifacts "$run_id" --out "$dir" >/dev/null
  node -e '
    const fs = require("fs"), path = require("path");
    const [dir, input, count] = process.argv.slice(1);
    const find = d => fs.readdirSync(d, { withFileTypes: true }).flatMap(e => e.isDirectory() ? find(path.join(d, e.name)) : e.name === "results.jsonl" ? [path.join(d, e.name)] : []);
    const results = find(dir);
    if (results.length === 0) { console.error("no results.jsonl among the run artifacts"); process.exit(1); }
    const texts = new Map(fs.readFileSync(input, "utf8").split("\n").filter(Boolean).map(l => JSON.parse(l)).map(r => [r.custom_id, r.text]));
    const rows = fs.readFileSync(results[0], "utf8").split("\n").filter(Boolean).map(l => JSON.parse(l)).slice(0, Number(count));
    console.error(`First ${rows.length} scored rows (label 1 = positive, 0 = negative):`);
    for (const r of rows) {
      const p = r.probabilities ? Math.max(...Object.values(r.probabilities)) : NaN;
      console.error(`  ${r.custom_id.padEnd(10)} ${String(r.label ?? r.code).padEnd(3)} ${(100 * p).toFixed(1).padStart(5)}%  ${texts.get(r.custom_id) ?? ""}`);
    }' "$dir" "$input" "$count"
}
