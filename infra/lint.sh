#!/usr/bin/env bash
# Builds and lints every Bicep file in infra/ with the Bicep CLI from NuGet
# (Azure.Bicep.CommandLine.linux-x64), warnings treated as errors, then checks that the templates and
# infra/names.json agree. Quiet on success; prints the problems and exits non-zero otherwise.
#
#   infra/lint.sh            # from anywhere
#   BICEP=/path/to/bicep infra/lint.sh   # use another bicep binary
#
# The only download is the NuGet restore of the Bicep package (once; it then lives in the NuGet
# global packages folder, $NUGET_PACKAGES or ~/.nuget/packages).
set -euo pipefail

BICEP_PACKAGE=Azure.Bicep.CommandLine.linux-x64
BICEP_VERSION=0.49.2

infra_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1 DOTNET_SKIP_FIRST_TIME_EXPERIENCE=1

fail() {
  echo "infra/lint.sh: $*" >&2
  exit 1
}

# --- 1. The Bicep CLI -------------------------------------------------------------------------------
find_bicep() {
  local packages="${NUGET_PACKAGES:-$HOME/.nuget/packages}"
  local package_dir="$packages/${BICEP_PACKAGE,,}/$BICEP_VERSION"
  local candidate
  for candidate in "$package_dir/tools/bicep" "$package_dir"/tools/*/bicep; do
    if [[ -f "$candidate" ]]; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

restore_bicep() {
  local project="$work/restore"
  local sdk_major
  sdk_major="$(dotnet --version | cut -d. -f1)" || fail "dotnet is needed to restore $BICEP_PACKAGE"
  mkdir -p "$project"
  # A throwaway project outside the repository, so no Directory.Build.props or NuGet.config of ours
  # applies; PackageDownload fetches the package without referencing it.
  cat >"$project/restore.csproj" <<EOF
<Project Sdk="Microsoft.NET.Sdk">
  <PropertyGroup>
    <TargetFramework>net${sdk_major}.0</TargetFramework>
  </PropertyGroup>
  <ItemGroup>
    <PackageDownload Include="$BICEP_PACKAGE" Version="[$BICEP_VERSION]" />
  </ItemGroup>
</Project>
EOF
  if ! dotnet restore "$project/restore.csproj" >"$work/restore.log" 2>&1; then
    cat "$work/restore.log" >&2
    fail "could not restore $BICEP_PACKAGE $BICEP_VERSION from NuGet"
  fi
}

if [[ -n "${BICEP:-}" ]]; then
  bicep="$BICEP"
else
  bicep="$(find_bicep)" || {
    restore_bicep
    bicep="$(find_bicep)" || fail "$BICEP_PACKAGE $BICEP_VERSION restored, but no bicep binary found in it"
  }
fi
[[ -x "$bicep" ]] || chmod +x "$bicep" || fail "cannot make $bicep executable"

# --- 2. Build and lint every template ---------------------------------------------------------------
# infra/bicepconfig.json raises every analyzer rule to "error" (and turns on the opt-in ones); compiler
# warnings (BCPxxx) cannot be raised by configuration, so any diagnostic printed at all is a failure.
# Compiled templates go to a temporary folder, never into the repository.
[[ -n "$(find "$infra_dir" -name '*.bicep' -print -quit)" ]] || fail "no .bicep files under $infra_dir"
problems=0
for command in build lint; do
  args=("$command" --pattern '**/*.bicep')
  [[ $command == build ]] && args+=(--outdir "$work/build")
  if ! output="$(cd "$infra_dir" && "$bicep" "${args[@]}" 2>&1)"; then
    echo "bicep $command failed:" >&2
    echo "$output" >&2
    problems=$((problems + 1))
  elif [[ -n "$output" ]]; then
    echo "bicep $command reported diagnostics (warnings are errors here):" >&2
    echo "$output" >&2
    problems=$((problems + 1))
  fi
done
[[ $problems -eq 0 ]] || fail "Bicep build/lint found problems"
[[ -f "$work/build/main.json" ]] || fail "bicep build did not produce main.json"

# --- 3. Templates and names.json agree --------------------------------------------------------------
command -v python3 >/dev/null || fail "python3 is needed for the names.json checks"
python3 - "$infra_dir" "$work/build/main.json" <<'PY'
import json
import pathlib
import sys

infra = pathlib.Path(sys.argv[1])
template = json.loads(pathlib.Path(sys.argv[2]).read_text())
names = json.loads((infra / "names.json").read_text())
parameters = json.loads((infra / "main.parameters.json").read_text())
errors = []

# names.json is the one list: main.bicep must load it (loadJsonContent), not copy it.
loaded = [v for k, v in template.get("variables", {}).items() if k.startswith("$fxv#")]
if names not in loaded:
    errors.append("main.bicep does not load names.json with loadJsonContent('names.json')")

for key in ("containers", "queues", "tables", "serviceBusQueues", "appSettings"):
    values = names.get(key)
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
        errors.append(f"names.json {key!r} must be a non-empty list of names")
    elif len(set(values)) != len(values):
        errors.append(f"names.json {key!r} has duplicates")

# Every trigger queue has its -poison twin; every -poison queue has its trigger queue.
queues = set(names.get("queues", []))
for queue in sorted(queues):
    if queue.endswith("-poison"):
        if queue[: -len("-poison")] not in queues:
            errors.append(f"poison queue {queue!r} has no trigger queue")
    elif queue != "events" and f"{queue}-poison" not in queues:
        errors.append(f"queue {queue!r} has no {queue}-poison queue")

# The app settings main.bicep sets are the properties of functionAppSettingsType (a sealed type, so the
# compiler rejects any other); they must be exactly names.json "appSettings".
settings_type = template.get("definitions", {}).get("functionAppSettingsType", {})
typed = list(settings_type.get("properties", {}).keys())
if not typed:
    errors.append("functionAppSettingsType not found in the compiled main.bicep")
elif settings_type.get("additionalProperties") is not False:
    errors.append("functionAppSettingsType must be @sealed()")
listed = names.get("appSettings", [])
for name in sorted(set(typed) - set(listed)):
    errors.append(f"app setting {name!r} is set by main.bicep but missing from names.json appSettings")
for name in sorted(set(listed) - set(typed)):
    errors.append(f"app setting {name!r} is in names.json appSettings but main.bicep does not set it")

# Fixed roles in the flow name things that exist.
variables = template.get("variables", {})
containers = set(names.get("containers", []))
for var, pool, kind in (
    ("incomingContainer", containers, "containers"),
    ("blobCreatedQueue", queues, "queues"),
    ("trainerReadContainers", containers, "containers"),
    ("trainerWriteContainers", containers, "containers"),
):
    value = variables.get(var)
    if value is None:
        errors.append(f"variable {var} not found in the compiled main.bicep")
        continue
    for item in value if isinstance(value, list) else [value]:
        if item not in pool:
            errors.append(f"{var} names {item!r}, which is not in names.json {kind}")

# Every parameter in main.parameters.json exists in main.bicep.
declared = set(template.get("parameters", {}).keys())
for name in parameters.get("parameters", {}):
    if name not in declared:
        errors.append(f"main.parameters.json sets {name!r}, which main.bicep does not declare")

if errors:
    print("names.json / template checks failed:", file=sys.stderr)
    for error in errors:
        print(f"  - {error}", file=sys.stderr)
    sys.exit(1)
PY
