// GPU fine-tuning on Azure Container Apps: an environment with a serverless GPU workload profile and a
// manually triggered job for the trainer. The FineTune dispatch stage starts one execution per
// fine-tune job (POST {jobResourceId}/start, overriding the container's env with the job's spec path)
// and the monitor stage polls the execution; nothing runs, and nothing is billed, between executions.
//
// Logs go to Log Analytics through a diagnostic setting (destination "azure-monitor"), so the
// environment holds no workspace key.

import { tagsType } from 'types.bicep'

@description('Location of the environment and job.')
param location string

@description('Tags applied to every resource.')
param tags tagsType

@description('Container Apps environment name.')
param environmentName string

@description('Container Apps job name.')
@maxLength(32)
param jobName string

@description('Log Analytics workspace that receives the environment logs.')
param logAnalyticsName string

@description('Serverless GPU workload profile type.')
@allowed([
  'Consumption-GPU-NC8as-T4'
  'Consumption-GPU-NC24-A100'
])
param gpuWorkloadProfileType string

@description('vCPUs for the trainer container (within the GPU profile: 8 for T4, 24 for A100).')
param trainerCpu string

@description('Memory for the trainer container (56Gi for T4, 220Gi for A100).')
param trainerMemory string

@description('Trainer image. Empty: a public placeholder that only proves the job can start; push a real trainer and set trainerImage.')
param trainerImage string

@description('Longest a single training execution may run, in seconds.')
@minValue(60)
param replicaTimeoutSeconds int

@description('Container registry the trainer image is pulled from.')
param registryName string

@description('Identity the trainer runs as (reads datasets, writes job state and models).')
param trainerIdentityName string

@description('Identity of the function app, which starts and watches executions.')
param functionsIdentityName string

@description('Storage account the trainer reads and writes.')
param storageAccountName string

// Container Apps Jobs Operator: read, start and stop jobs and their executions; nothing else.
var jobsOperatorRoleId = 'b9a307c4-5aa3-4b52-ba60-2b17c136cd7b'
var gpuProfileName = 'gpu'
var placeholderImage = 'mcr.microsoft.com/k8se/quickstart-jobs:latest'
var image = empty(trainerImage) ? placeholderImage : trainerImage

resource logAnalytics 'Microsoft.OperationalInsights/workspaces@2026-03-01' existing = {
  name: logAnalyticsName
}

resource registry 'Microsoft.ContainerRegistry/registries@2025-11-01' existing = {
  name: registryName
}

resource storage 'Microsoft.Storage/storageAccounts@2026-06-01' existing = {
  name: storageAccountName
}

resource trainerIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2024-11-30' existing = {
  name: trainerIdentityName
}

resource functionsIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2024-11-30' existing = {
  name: functionsIdentityName
}

resource environment 'Microsoft.App/managedEnvironments@2026-07-01' = {
  name: environmentName
  location: location
  tags: tags
  properties: {
    appLogsConfiguration: {
      destination: 'azure-monitor'
    }
    workloadProfiles: [
      {
        name: 'Consumption'
        workloadProfileType: 'Consumption'
      }
      {
        name: gpuProfileName
        workloadProfileType: gpuWorkloadProfileType
      }
    ]
  }
}

// 2021-05-01-preview is the newest diagnosticSettings version for extension resources; the only GA
// one (2016-09-01) is the legacy per-resource form.
#disable-next-line use-recent-api-versions
resource environmentLogs 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: environment
  properties: {
    workspaceId: logAnalytics.id
    logs: [
      {
        categoryGroup: 'allLogs'
        enabled: true
      }
    ]
  }
}

resource job 'Microsoft.App/jobs@2026-07-01' = {
  name: jobName
  location: location
  tags: tags
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${trainerIdentity.id}': {}
    }
  }
  properties: {
    environmentId: environment.id
    workloadProfileName: gpuProfileName
    configuration: {
      triggerType: 'Manual'
      replicaTimeout: replicaTimeoutSeconds
      replicaRetryLimit: 0 // the monitor stage decides about retries, from the job's heartbeats
      manualTriggerConfig: {
        parallelism: 1
        replicaCompletionCount: 1
      }
      registries: [
        {
          server: registry.properties.loginServer
          identity: trainerIdentity.id
        }
      ]
    }
    template: {
      containers: [
        {
          name: 'trainer'
          image: image
          resources: {
            cpu: json(trainerCpu)
            memory: trainerMemory
          }
          env: [
            {
              name: 'AZURE_CLIENT_ID'
              value: trainerIdentity.properties.clientId
            }
            {
              name: 'AzureWebJobsStorage__accountName'
              value: storage.name
            }
            {
              name: 'AzureWebJobsStorage__blobServiceUri'
              value: storage.properties.primaryEndpoints.blob
            }
            {
              name: 'AzureWebJobsStorage__credential'
              value: 'managedidentity'
            }
            {
              name: 'AzureWebJobsStorage__clientId'
              value: trainerIdentity.properties.clientId
            }
          ]
        }
      ]
    }
  }
}

resource jobsOperatorRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(job.id, functionsIdentity.id, jobsOperatorRoleId)
  scope: job
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', jobsOperatorRoleId)
    principalId: functionsIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

output jobResourceId string = job.id
output jobName string = job.name
output environmentId string = environment.id
output trainerImage string = image
