#!/usr/bin/env bash
# Installs what the tests need and runs every check: build without warnings, formatting, the Bicep
# templates, and the test suite (against Azurite instances the tests start on free ports).
set -euo pipefail
source "$(dirname "$0")/scripts/common.sh"
RUN_DIR="$ROOT/.run"

require_tools
install_azurite
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
dotnet publish "$ROOT/functions/Pipeline.Functions.csproj" -c "$CONFIGURATION" -o "$publish_dir" -nologo -v quiet -warnaserror
[[ -f "$publish_dir/host.json" && -x "$publish_dir/Pipeline.Functions" ]] || die "publish output lacks host.json or the Pipeline.Functions executable"
for function_json in "$ROOT"/functions/*/function.json; do
  name=$(basename "$(dirname "$function_json")")
  [[ -f "$publish_dir/$name/function.json" ]] || die "publish output lacks $name/function.json"
done
say "Running the tests"
dotnet test "$ROOT/Pipeline.sln" -c "$CONFIGURATION" --no-build -nologo --logger "console;verbosity=normal" "$@"
