// The pipeline's storage account: blob containers, queues (each trigger queue with its -poison twin)
// and tables, named from names.json. Also the Flex Consumption deployment container.
//
// Shared key access is disabled: the function host, the bindings, the handler's SDK clients, Event Grid
// delivery and the Flex Consumption deployment all authenticate with Entra ID (managed identities).

import { tagsType } from 'types.bicep'

@description('Location of the storage account.')
param location string

@description('Tags applied to every resource.')
param tags tagsType

@description('Storage account name.')
@minLength(3)
@maxLength(24)
param storageAccountName string

@description('Storage account SKU.')
@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_RAGRS'
  'Standard_GZRS'
  'Standard_RAGZRS'
])
param skuName string

@description('Blob containers the pipeline uses (names.json "containers").')
param containerNames string[]

@description('Storage queues the pipeline uses (names.json "queues").')
param queueNames string[]

@description('Tables the pipeline uses (names.json "tables").')
param tableNames string[]

@description('Container that holds the Flex Consumption deployment package.')
param deploymentContainerName string

@description('Name of the function app identity.')
param functionsIdentityName string

@description('Name of the GPU trainer identity.')
param trainerIdentityName string

@description('Containers the trainer may read (a subset of containerNames).')
param trainerReadContainers string[]

@description('Containers the trainer may read and write (a subset of containerNames).')
param trainerWriteContainers string[]

@description('Object id of a user or group to grant data access for the CLI and testing. Empty for none.')
param principalId string

@description('Type of principalId.')
@allowed([
  'User'
  'Group'
  'ServicePrincipal'
])
param principalType string

@description('Days deleted blobs and containers can be restored.')
@minValue(1)
@maxValue(365)
param softDeleteDays int

// Built-in role definitions.
var roles = {
  blobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  blobDataContributor: 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
  blobDataReader: '2a2b9908-6ea1-4ae2-8e65-a410df84e7d1'
  queueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  tableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
}

// The function app identity: the host needs Blob Data Owner for its own containers (leases, keys,
// deployment package); queue and table contributor for triggers, poison queues, output bindings and
// the runs/poisonmessages tables.
var functionsRoles = [
  roles.blobDataOwner
  roles.queueDataContributor
  roles.tableDataContributor
]

// A developer running the CLI: upload data, send commands on the storage queue, read runs.
var principalRoles = [
  roles.blobDataContributor
  roles.queueDataContributor
  roles.tableDataContributor
]

resource storage 'Microsoft.Storage/storageAccounts@2026-06-01' = {
  name: storageAccountName
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: skuName
  }
  properties: {
    accessTier: 'Hot'
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    allowCrossTenantReplication: false
    defaultToOAuthAuthentication: true
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2026-06-01' = {
  parent: storage
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: softDeleteDays
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: softDeleteDays
    }
  }
}

resource containers 'Microsoft.Storage/storageAccounts/blobServices/containers@2026-06-01' = [
  for name in containerNames: {
    parent: blobService
    name: name
    properties: {
      publicAccess: 'None'
    }
  }
]

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2026-06-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2026-06-01' = {
  parent: storage
  name: 'default'
}

resource queues 'Microsoft.Storage/storageAccounts/queueServices/queues@2026-06-01' = [
  for name in queueNames: {
    parent: queueService
    name: name
  }
]

resource tableService 'Microsoft.Storage/storageAccounts/tableServices@2026-06-01' = {
  parent: storage
  name: 'default'
}

resource tables 'Microsoft.Storage/storageAccounts/tableServices/tables@2026-06-01' = [
  for name in tableNames: {
    parent: tableService
    name: name
  }
]

resource functionsIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2024-11-30' existing = {
  name: functionsIdentityName
}

resource trainerIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2024-11-30' existing = {
  name: trainerIdentityName
}

resource functionsRoleAssignments 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for roleId in functionsRoles: {
    name: guid(storage.id, functionsIdentity.id, roleId)
    scope: storage
    properties: {
      roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleId)
      principalId: functionsIdentity.properties.principalId
      principalType: 'ServicePrincipal'
    }
  }
]

// The trainer gets blob access per container only: read datasets, write job state and models.
resource trainerRoleAssignments 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for (name, i) in containerNames: if (contains(trainerReadContainers, name) || contains(trainerWriteContainers, name)) {
    name: guid(containers[i].id, trainerIdentity.id, contains(trainerWriteContainers, name) ? roles.blobDataContributor : roles.blobDataReader)
    scope: containers[i]
    properties: {
      roleDefinitionId: subscriptionResourceId(
        'Microsoft.Authorization/roleDefinitions',
        contains(trainerWriteContainers, name) ? roles.blobDataContributor : roles.blobDataReader
      )
      principalId: trainerIdentity.properties.principalId
      principalType: 'ServicePrincipal'
    }
  }
]

resource principalRoleAssignments 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for roleId in principalRoles: if (!empty(principalId)) {
    name: guid(storage.id, principalId, roleId)
    scope: storage
    properties: {
      roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleId)
      principalId: principalId
      principalType: principalType
    }
  }
]

output storageAccountId string = storage.id
output blobEndpoint string = storage.properties.primaryEndpoints.blob
output queueEndpoint string = storage.properties.primaryEndpoints.queue
output tableEndpoint string = storage.properties.primaryEndpoints.table
