// GPU fine-tuning on Azure Machine Learning: a workspace (with the key vault and storage account it
// requires) and a GPU compute cluster that scales to zero nodes when idle. The FineTune dispatch stage
// submits a command job to the cluster through the workspace's ARM API and the monitor stage polls
// its status. The cluster runs as the trainer identity, so jobs reach the pipeline storage with
// {"identity": {"type": "managed"}} and no keys.
//
// The workspace's own storage account keeps shared-key access on, because Azure Machine Learning's
// system datastores use it by default; no key from it is ever handed to the function app.

import { tagsType } from 'types.bicep'

@description('Location of the workspace and its dependencies.')
param location string

@description('Tags applied to every resource.')
param tags tagsType

@description('Azure Machine Learning workspace name.')
param workspaceName string

@description('Key vault the workspace requires.')
@minLength(3)
@maxLength(24)
param keyVaultName string

@description('Storage account the workspace requires (not the pipeline storage).')
@minLength(3)
@maxLength(24)
param workspaceStorageName string

@description('Application Insights component the workspace reports to.')
param applicationInsightsName string

@description('Container registry for the trainer image (attached to the workspace).')
param registryName string

@description('Compute cluster name.')
@minLength(2)
@maxLength(16)
param computeName string

@description('GPU VM size of the cluster nodes.')
param vmSize string

@description('Most nodes the cluster scales to.')
@minValue(1)
param maxNodes int

@description('Dedicated or LowPriority (spot: cheaper, may be pre-empted).')
@allowed([
  'Dedicated'
  'LowPriority'
])
param vmPriority string

@description('Identity the cluster (and so the training jobs) runs as.')
param trainerIdentityName string

@description('Identity of the function app, which submits and watches jobs.')
param functionsIdentityName string

// AzureML Data Scientist: submit and manage jobs in the workspace, no compute or workspace changes.
var dataScientistRoleId = 'f6c7c914-8db3-469d-8ca1-694a8f32e121'

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

resource registry 'Microsoft.ContainerRegistry/registries@2025-11-01' existing = {
  name: registryName
}

resource trainerIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2024-11-30' existing = {
  name: trainerIdentityName
}

resource functionsIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2024-11-30' existing = {
  name: functionsIdentityName
}

resource keyVault 'Microsoft.KeyVault/vaults@2026-05-15' = {
  name: keyVaultName
  location: location
  tags: tags
  properties: {
    tenantId: tenant().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 7
    publicNetworkAccess: 'Enabled'
  }
}

resource workspaceStorage 'Microsoft.Storage/storageAccounts@2026-06-01' = {
  name: workspaceStorageName
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    allowBlobPublicAccess: false
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
  }
}

resource workspace 'Microsoft.MachineLearningServices/workspaces@2026-07-01' = {
  name: workspaceName
  location: location
  tags: tags
  kind: 'Default'
  sku: {
    name: 'Basic'
    tier: 'Basic'
  }
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    friendlyName: workspaceName
    storageAccount: workspaceStorage.id
    keyVault: keyVault.id
    applicationInsights: applicationInsights.id
    containerRegistry: registry.id
    publicNetworkAccess: 'Enabled'
  }
}

resource compute 'Microsoft.MachineLearningServices/workspaces/computes@2026-07-01' = {
  parent: workspace
  name: computeName
  location: location
  tags: tags
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${trainerIdentity.id}': {}
    }
  }
  properties: {
    computeType: 'AmlCompute'
    properties: {
      vmSize: vmSize
      vmPriority: vmPriority
      osType: 'Linux'
      scaleSettings: {
        minNodeCount: 0
        maxNodeCount: maxNodes
        nodeIdleTimeBeforeScaleDown: 'PT10M'
      }
      remoteLoginPortPublicAccess: 'Disabled'
    }
  }
}

resource dataScientistRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(workspace.id, functionsIdentity.id, dataScientistRoleId)
  scope: workspace
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', dataScientistRoleId)
    principalId: functionsIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

output workspaceId string = workspace.id
output workspaceName string = workspace.name
output computeName string = compute.name
