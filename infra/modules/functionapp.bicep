// The function app: the .NET isolated worker (functions/, `dotnet publish` output deployed as the package)
// on Linux in the Flex Consumption plan (FC1).
//
// Why Flex Consumption: it runs the isolated worker (functionAppConfig.runtime name "dotnet-isolated",
// version "10.0", the .NET the app targets, in the regional runtime catalog), scales each trigger group on its event source (storage
// queue length, Service Bus queue, HTTP concurrency) from zero to maximumInstanceCount, bills per
// execution, supports identity-only storage (no account keys, no Azure Files content share) and
// deploys from a blob container with the app's managed identity. Elastic Premium (EP1) also fits
// (the isolated worker, queue-driven scale, no cold start) but bills at least one always-on instance and
// on Linux wants an Azure Files content share, which needs a storage key. See infra/README.md.

import { tagsType, functionAppSettingsType, alwaysReadyType } from 'types.bicep'

@description('Location of the plan and app.')
param location string

@description('Tags applied to every resource.')
param tags tagsType

@description('Flex Consumption plan name.')
param planName string

@description('Function app name (also the default host name prefix).')
param functionAppName string

@description('azd service name; azd finds the app to deploy to by this tag.')
param azdServiceName string

@description('User-assigned identity the app runs as.')
param functionsIdentityName string

@description('Storage account that holds the deployment container.')
param storageAccountName string

@description('Blob container that holds the deployment package.')
param deploymentContainerName string

@description('Upper bound on instances the app scales out to.')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int

@description('Memory of each instance, in MB.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int

@description('Always-ready (pre-warmed) instances per function group ("http") or function ("function:<name>"). Empty: scale to zero.')
param alwaysReady alwaysReadyType[]

@description('The .NET version of the dotnet-isolated runtime: the one the worker targets (net10.0).')
param dotnetVersion string = '10.0'

@description('App settings. Null values are left out.')
param appSettings functionAppSettingsType

resource storage 'Microsoft.Storage/storageAccounts@2026-06-01' existing = {
  name: storageAccountName
}

resource functionsIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2024-11-30' existing = {
  name: functionsIdentityName
}

// Flex Consumption rejects FUNCTIONS_WORKER_RUNTIME as an app setting; it comes from
// functionAppConfig.runtime instead. Unset (null or empty) settings are left out.
var siteAppSettings = map(
  filter(items(appSettings), setting => setting.key != 'FUNCTIONS_WORKER_RUNTIME' && !empty(setting.?value ?? '')),
  setting => {
    name: setting.key
    value: setting.?value
  }
)

resource plan 'Microsoft.Web/serverfarms@2025-03-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    tier: 'FlexConsumption'
    name: 'FC1'
  }
  properties: {
    reserved: true // Linux
  }
}

resource functionApp 'Microsoft.Web/sites@2025-03-01' = {
  name: functionAppName
  location: location
  tags: union(tags, { 'azd-service-name': azdServiceName })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${functionsIdentity.id}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    siteConfig: {
      appSettings: siteAppSettings // Flex rejects most other siteConfig properties; TLS 1.2 is the default
    }
    functionAppConfig: {
      runtime: {
        name: appSettings.FUNCTIONS_WORKER_RUNTIME
        version: dotnetVersion
      }
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: functionsIdentity.id
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
        alwaysReady: alwaysReady
      }
    }
  }
}

// No publishing passwords: azd and `func azure functionapp publish` deploy with Entra ID tokens.
resource scmBasicAuth 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2025-03-01' = {
  parent: functionApp
  name: 'scm'
  properties: {
    allow: false
  }
}

resource ftpBasicAuth 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2025-03-01' = {
  parent: functionApp
  name: 'ftp'
  properties: {
    allow: false
  }
}

output functionAppId string = functionApp.id
output functionAppName string = functionApp.name
output defaultHostName string = functionApp.properties.defaultHostName
