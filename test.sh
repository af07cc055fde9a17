#!/usr/bin/env bash
# Installs what the tests need and runs every check: build without warnings, formatting, the Bicep
# templates, and the test suite (against Azurite instances the tests start on free ports).
set -euo pipefail
source "$(dirname "$0")/scripts/common.sh"
RUN_DIR="$ROOT/.run"

require_tools
install_azurite
install_chromium
say "Restoring packages"
dotnet restore "$ROOT/Pipeline.sln" -nologo -v quiet
build --no-restore
say "Checking formatting (dotnet format --verify-no-changes)"
dotnet format "$ROOT/Pipeline.sln" --verify-no-changes --no-restore
say "Building and linting the Bicep templates"
"$ROOT/infra/lint.sh"
say "Checking the publish layout (what Core Tools and Azure start)"
publish_dir=$(mktemp -d)
trap 'rm -rf "$publish_dir"' EXIT
dotnet publish "$ROOT/functions/Pipeline.Functions.csproj" -c "$CONFIGURATION" -o "$publish_dir/functions" -nologo -v quiet "${WARNINGS_AS_ERRORS[@]}"
for file in host.json worker.config.json functions.metadata Pipeline.Functions.dll extensions.json .azurefunctions/Microsoft.Azure.WebJobs.Extensions.Storage.Queues.dll; do
  [[ -f "$publish_dir/functions/$file" ]] || die "the function app's publish output lacks $file"
done
for page in index.html app.js api.js chart.js app.css; do
  grep -q "dashboard/$page" "$publish_dir/functions/Pipeline.Functions.dll" || die "the function app's assembly lacks the dashboard's $page"
done
grep -q '"dotnet-isolated"' "$publish_dir/functions/worker.config.json" || die "worker.config.json does not declare dotnet-isolated"
grep -q 'AzureStorageQueues' "$publish_dir/functions/extensions.json" || die "extensions.json lacks the storage queues extension"
node -e 'const f=JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")); if (f.length < 20 || !f.some(x => x.name === "Ingest")) { console.error("functions.metadata lists " + f.length + " functions"); process.exit(1); }' "$publish_dir/functions/functions.metadata"
! find "$publish_dir/functions" -name function.json | grep -q . || die "the publish output has function.json files (the worker indexes its functions)"
say "Checking the trainer image's publish (trainer/Dockerfile) and linting the Dockerfile"
dotnet publish "$ROOT/trainer/Pipeline.Trainer.csproj" -c "$CONFIGURATION" -r linux-x64 --self-contained true -o "$publish_dir/trainer" -nologo -v quiet "${WARNINGS_AS_ERRORS[@]}"
[[ -x "$publish_dir/trainer/Pipeline.Trainer" && -f "$publish_dir/trainer/libonnxruntime.so" ]] || die "the trainer's self-contained publish lacks Pipeline.Trainer or libonnxruntime.so"
"$ROOT/node_modules/.bin/dockerfile-utils" lint "$ROOT/trainer/Dockerfile"
say "Smoke-running every benchmark once at a tiny size (no figures asserted: each must run to its summary line)"
bench_dll="$ROOT/bench/Pipeline.Bench/bin/$CONFIGURATION/net10.0/Pipeline.Bench.dll"
smoke_bench() {
  local last_line=$1 output
  shift
  output=$(dotnet "$bench_dll" "$@" 2>&1) || { printf '%s\n' "$output" | tail -n 30; die "the benchmark 'bench -- $*' failed"; }
  [[ "$(printf '%s\n' "$output" | tail -n 1)" =~ $last_line ]] || { printf '%s\n' "$output" | tail -n 5; die "the benchmark 'bench -- $*' did not end with its summary line"; }
  echo "  bench -- $*: $(printf '%s\n' "$output" | tail -n 1)"
}
smoke_bench '^ingestion/read: [0-9]+\.[0-9]{2}x$' ingest 1
smoke_bench '^stage/tokenizer: [0-9]+\.[0-9]{2}x on 1 core; stage [0-9]+ cores/1 core: ([0-9]+\.[0-9]{2}|n/a)x \(free sink\)$' preprocess 1500
smoke_bench '^\| 2,000 \|' neardup 1000 2000
smoke_bench '^preprocess scale: [0-9]+ records/s, peak [0-9]+ MB per partition, duplicates found [0-9]+ of [0-9]+$' preprocess-scale 3000
smoke_bench '^Stage / naive: ' infer 16
smoke_bench '^Stage / naive: ' infer real 16
smoke_bench '^\| whole job: ' finetune generated '{"epochs":1}'
say "Running the tests"
dotnet test "$ROOT/Pipeline.sln" -c "$CONFIGURATION" --no-build -nologo --logger "console;verbosity=normal" "$@"
