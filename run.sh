#!/usr/bin/env bash
# The main job. `./run.sh`: install, start Azurite and the local host, submit the sample dataset, wait for
# its run, print the summary, stop everything. `./run.sh host`: start Azurite and the local host and keep
# them running (Ctrl-C stops them) so you can drop your own files into the `incoming` container.
set -euo pipefail
source "$(dirname "$0")/scripts/common.sh"
MODE="${1:-demo}"
RUN_DIR="$ROOT/.run"
mkdir -p "$RUN_DIR"
trap stop_started EXIT
trap 'exit 130' INT TERM

require_tools
install_azurite
build

case "$MODE" in
  demo)
    DATA=$(mktemp -d)
    trap 'stop_started; rm -rf "$DATA"' EXIT
    say "Starting Azurite and the local host"
    start_azurite "$DATA" 10000
    start_host
    say "Submitting samples/reviews.txt (run spec: samples/reviews.pipeline.json)"
    status=0
    pipeline submit "$ROOT/samples/reviews.txt" --spec "$ROOT/samples/reviews.pipeline.json" --wait --timeout 300 || status=$?
    if [[ $status -ne 0 ]]; then
      say "The run did not succeed (exit code $status); the host log is in $RUN_DIR/host.log"
      exit "$status"
    fi
    say "Generating an embedding model (bag-of-embeddings over cl100k_base, seeded) and scoring samples/to-score.jsonl"
    pipeline models generate demo-embedder --kind bag-of-embeddings --hidden 64
    pipeline infer --model demo-embedder "$ROOT/samples/to-score.jsonl" --normalize --rows-per-shard 500 --wait --timeout 300 || status=$?
    if [[ $status -ne 0 ]]; then
      say "Scoring did not succeed (exit code $status); the host log is in $RUN_DIR/host.log"
      exit "$status"
    fi
    print_batch_summary
    say "Done. Every artifact is listed above as container/path in the storage account; 'pipeline artifacts <runId>' downloads them."
    ;;
  host)
    say "Starting Azurite (data in .azurite/) and the local host"
    start_azurite "$ROOT/.azurite" 10000
    start_host
    cat >&2 <<MSG

Pipeline is running locally (host on port $HOST_PORT, log: .run/host.log).
Drop files into the 'incoming' container, for example:

  export AzureWebJobsStorage='$AzureWebJobsStorage'
  dotnet cli/bin/$CONFIGURATION/net10.0/pipeline.dll submit my-data.jsonl --wait
  dotnet cli/bin/$CONFIGURATION/net10.0/pipeline.dll runs

or upload with Azure Storage Explorer / az storage blob upload using that connection string.
Press Ctrl-C to stop.
MSG
    wait "${PIDS[@]}"
    ;;
  *)
    die "usage: ./run.sh [host]"
    ;;
esac
