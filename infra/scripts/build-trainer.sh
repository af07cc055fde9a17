#!/usr/bin/env bash
# azd postprovision hook: builds the GPU trainer image (trainer/Dockerfile) in the registry the templates
# created (ACR build: no local Docker needed) and points the Container Apps trainer job at it. Skipped when
# the deployment has no GPU backend (PIPELINE_GPU_BACKEND=none) or no registry.
set -euo pipefail
cd "$(dirname "$0")/../.."

registry="${AZURE_CONTAINER_REGISTRY_NAME:-}"
backend="${PIPELINE_GPU_BACKEND:-none}"
if [[ -z "$registry" || "$backend" == "none" ]]; then
  echo "No GPU backend or registry in this deployment: no trainer image to build." >&2
  exit 0
fi

tag="$(git rev-parse --short=12 HEAD 2>/dev/null || date +%Y%m%d%H%M%S)"
image="$registry.azurecr.io/pipeline-trainer:$tag"
echo "Building $image in $registry (az acr build)" >&2
az acr build --registry "$registry" --image "pipeline-trainer:$tag" --file trainer/Dockerfile .

case "$backend" in
  containerapps)
    az containerapp job update --name "$AZURE_CONTAINER_APPS_JOB_NAME" --resource-group "$AZURE_RESOURCE_GROUP" --image "$image" >/dev/null
    az functionapp config appsettings set --name "$AZURE_FUNCTION_APP_NAME" --resource-group "$AZURE_RESOURCE_GROUP" \
      --settings "Pipeline__FineTune__TrainerImage=$image" >/dev/null
    echo "The Container Apps job and the function app now use $image." >&2
    ;;
  azureml)
    echo "Register $image as an Azure ML environment and set Pipeline__FineTune__AzureML__EnvironmentId (infra/README.md, 'Azure ML')." >&2
    ;;
esac
