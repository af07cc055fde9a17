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
say "Running the tests"
dotnet test "$ROOT/Pipeline.sln" -c "$CONFIGURATION" --no-build -nologo --logger "console;verbosity=normal" "$@"
