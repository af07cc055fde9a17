// Pipeline: everything the platform needs in one resource group, deployed with `azd up`.
//
//   storage account   containers, queues (+ -poison twins) and tables from names.json; no shared keys
//   Event Grid        BlobCreated events for incoming/ -> blob-created queue (identity delivery)
//   Service Bus       namespace (Standard) + "commands" queue with dead-lettering; no SAS keys
//   function app      .NET isolated worker on Linux, Flex Consumption (FC1); identity-based connections
//   monitoring        Log Analytics + Application Insights (Entra ID ingestion only)
//   GPU compute       gpuBackend: Container Apps GPU job | Azure Machine Learning GPU cluster | none
//   identities        function app identity + trainer identity, least-privilege data roles
//
// See infra/README.md for the deployment guide and what was never exercised against Azure.

targetScope = 'subscription'

import { tagsType, functionAppSettingsType, alwaysReadyType } from 'modules/types.bicep'

@minLength(1)
@maxLength(64)
@description('azd environment name; seeds every resource name.')
param environmentName string

@minLength(1)
@description('Region for all resources. It must offer Flex Consumption and, for gpuBackend containerapps, serverless GPUs.')
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@description('Resource group name. Empty: rg-<environmentName>.')
param resourceGroupName string = ''

@description('Object id of the deploying user (azd sets AZURE_PRINCIPAL_ID); gets data access for the CLI. Empty for none.')
param principalId string = ''

@description('Type of principalId.')
@allowed([
  'User'
  'Group'
  'ServicePrincipal'
])
param principalType string = 'User'

@description('Where fine-tuning runs: a Container Apps GPU job, an Azure Machine Learning GPU cluster, or none (the function app uses the local trainer backend).')
@allowed([
  'containerapps'
  'azureml'
  'none'
])
param gpuBackend string = 'containerapps'

@description('ONNX Runtime execution provider for batch inference. cuda needs the GPU build on a GPU host; Flex Consumption has no GPU, where the handler falls back to cpu.')
@allowed([
  'cpu'
  'cuda'
])
param inferenceExecutionProvider string = 'cpu'

@description('Memory of each function app instance, in MB.')
@allowed([
  512
  2048
  4096
])
param functionInstanceMemoryMB int = 2048

@description('Most instances the function app scales out to.')
@minValue(40)
@maxValue(1000)
param functionMaximumInstanceCount int = 100

@description('Always-ready instances, e.g. [{"name": "http", "instanceCount": 1}]. Empty: scale to zero.')
param functionAlwaysReady alwaysReadyType[] = []

@description('Pipeline storage account SKU.')
@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_RAGRS'
  'Standard_GZRS'
  'Standard_RAGZRS'
])
param storageSku string = 'Standard_LRS'

@description('Days Log Analytics keeps data.')
@minValue(30)
@maxValue(730)
param logRetentionDays int = 30

@description('Trainer container image (for example <registry>.azurecr.io/pipeline-trainer:1). Empty: a public placeholder.')
param trainerImage string = ''

@description('Serverless GPU workload profile for the Container Apps trainer job.')
@allowed([
  'Consumption-GPU-NC8as-T4'
  'Consumption-GPU-NC24-A100'
])
param gpuWorkloadProfileType string = 'Consumption-GPU-NC8as-T4'

@description('vCPUs of the trainer container (8 on T4, 24 on A100).')
param trainerCpu string = '8'

@description('Memory of the trainer container (56Gi on T4, 220Gi on A100).')
param trainerMemory string = '56Gi'

@description('Longest one training execution may run, in seconds.')
@minValue(60)
param trainerTimeoutSeconds int = 14400

@description('GPU VM size of the Azure Machine Learning cluster.')
param azureMlVmSize string = 'Standard_NC4as_T4_v3'

@description('Most nodes of the Azure Machine Learning cluster (it idles at zero).')
@minValue(1)
param azureMlMaxNodes int = 1

@description('Azure Machine Learning node priority.')
@allowed([
  'Dedicated'
  'LowPriority'
])
param azureMlVmPriority string = 'Dedicated'

// One list of names: containers, queues, tables and Service Bus queues come from names.json, which
// the tests compare with shared/Storage/StorageNames.cs and the functions the worker reports.
var names = loadJsonContent('names.json')

// Containers, queues and roles that have a fixed part in the flow (infra/lint.sh checks that each is
// in names.json).
var incomingContainer = 'incoming'
var modelsContainer = 'models'
var blobCreatedQueue = 'blob-created'
var trainerReadContainers = [
  'datasets'
]
var trainerWriteContainers = [
  'jobs'
  'models'
]

var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags tagsType = {
  'azd-env-name': environmentName
}
var rgName = empty(resourceGroupName) ? 'rg-${environmentName}' : resourceGroupName

var resourceNames = {
  functionsIdentity: 'id-func-${resourceToken}'
  trainerIdentity: 'id-trainer-${resourceToken}'
  logAnalytics: 'log-${resourceToken}'
  applicationInsights: 'appi-${resourceToken}'
  storage: 'st${resourceToken}'
  systemTopic: 'evgt-${resourceToken}'
  serviceBus: 'sb-${resourceToken}'
  plan: 'plan-${resourceToken}'
  functionApp: 'func-${resourceToken}'
  registry: 'cr${resourceToken}'
  containerAppsEnvironment: 'cae-${resourceToken}'
  containerAppsJob: 'caj-trainer-${resourceToken}'
  azureMlWorkspace: 'mlw-${resourceToken}'
  azureMlKeyVault: 'kv-${resourceToken}'
  azureMlStorage: 'stml${resourceToken}'
  azureMlCompute: 'gpu-cluster'
}

var useContainerApps = gpuBackend == 'containerapps'
var useAzureMl = gpuBackend == 'azureml'

resource rg 'Microsoft.Resources/resourceGroups@2025-04-01' = {
  name: rgName
  location: location
  tags: tags
}

module identities 'modules/identity.bicep' = {
  name: 'identities'
  scope: rg
  params: {
    location: location
    tags: tags
    functionsIdentityName: resourceNames.functionsIdentity
    trainerIdentityName: resourceNames.trainerIdentity
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  dependsOn: [
    identities
  ]
  params: {
    location: location
    tags: tags
    logAnalyticsName: resourceNames.logAnalytics
    applicationInsightsName: resourceNames.applicationInsights
    retentionInDays: logRetentionDays
    functionsIdentityName: resourceNames.functionsIdentity
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  scope: rg
  dependsOn: [
    identities
  ]
  params: {
    location: location
    tags: tags
    storageAccountName: resourceNames.storage
    skuName: storageSku
    containerNames: names.containers
    queueNames: names.queues
    tableNames: names.tables
    deploymentContainerName: names.deploymentContainer
    functionsIdentityName: resourceNames.functionsIdentity
    trainerIdentityName: resourceNames.trainerIdentity
    trainerReadContainers: trainerReadContainers
    trainerWriteContainers: trainerWriteContainers
    principalId: principalId
    principalType: principalType
    softDeleteDays: 7
  }
}

module eventGrid 'modules/eventgrid.bicep' = {
  name: 'eventgrid'
  scope: rg
  dependsOn: [
    storage
  ]
  params: {
    location: location
    tags: tags
    systemTopicName: resourceNames.systemTopic
    storageAccountName: resourceNames.storage
    incomingContainerName: incomingContainer
    modelsContainerName: modelsContainer
    blobCreatedQueueName: blobCreatedQueue
    eventTimeToLiveHours: 24
  }
}

module serviceBus 'modules/servicebus.bicep' = {
  name: 'servicebus'
  scope: rg
  dependsOn: [
    identities
  ]
  params: {
    location: location
    tags: tags
    namespaceName: resourceNames.serviceBus
    queueNames: names.serviceBusQueues
    functionsIdentityName: resourceNames.functionsIdentity
    principalId: principalId
    principalType: principalType
  }
}

module registry 'modules/registry.bicep' = if (useContainerApps || useAzureMl) {
  name: 'registry'
  scope: rg
  dependsOn: [
    identities
  ]
  params: {
    location: location
    tags: tags
    registryName: resourceNames.registry
    pullIdentityName: resourceNames.trainerIdentity
    principalId: principalId
    principalType: principalType
  }
}

module containerApps 'modules/gpu-containerapps.bicep' = if (useContainerApps) {
  name: 'gpu-containerapps'
  scope: rg
  dependsOn: [
    monitoring
    registry
    storage
  ]
  params: {
    location: location
    tags: tags
    environmentName: resourceNames.containerAppsEnvironment
    jobName: resourceNames.containerAppsJob
    logAnalyticsName: resourceNames.logAnalytics
    gpuWorkloadProfileType: gpuWorkloadProfileType
    trainerCpu: trainerCpu
    trainerMemory: trainerMemory
    trainerImage: trainerImage
    replicaTimeoutSeconds: trainerTimeoutSeconds
    registryName: resourceNames.registry
    trainerIdentityName: resourceNames.trainerIdentity
    functionsIdentityName: resourceNames.functionsIdentity
    storageAccountName: resourceNames.storage
  }
}

module azureMl 'modules/gpu-azureml.bicep' = if (useAzureMl) {
  name: 'gpu-azureml'
  scope: rg
  dependsOn: [
    monitoring
    registry
  ]
  params: {
    location: location
    tags: tags
    workspaceName: resourceNames.azureMlWorkspace
    keyVaultName: resourceNames.azureMlKeyVault
    workspaceStorageName: resourceNames.azureMlStorage
    applicationInsightsName: resourceNames.applicationInsights
    registryName: resourceNames.registry
    computeName: resourceNames.azureMlCompute
    vmSize: azureMlVmSize
    maxNodes: azureMlMaxNodes
    vmPriority: azureMlVmPriority
    trainerIdentityName: resourceNames.trainerIdentity
    functionsIdentityName: resourceNames.functionsIdentity
  }
}

var functionAppSettings functionAppSettingsType = {
  AzureWebJobsStorage__accountName: resourceNames.storage
  AzureWebJobsStorage__blobServiceUri: storage.outputs.blobEndpoint
  AzureWebJobsStorage__queueServiceUri: storage.outputs.queueEndpoint
  AzureWebJobsStorage__tableServiceUri: storage.outputs.tableEndpoint
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identities.outputs.functionsClientId
  ServiceBusConnection__fullyQualifiedNamespace: serviceBus.outputs.fullyQualifiedNamespace
  ServiceBusConnection__credential: 'managedidentity'
  ServiceBusConnection__clientId: identities.outputs.functionsClientId
  FUNCTIONS_WORKER_RUNTIME: 'dotnet-isolated'
  APPLICATIONINSIGHTS_CONNECTION_STRING: monitoring.outputs.applicationInsightsConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identities.outputs.functionsClientId};Authorization=AAD'
  AZURE_CLIENT_ID: identities.outputs.functionsClientId
  Pipeline__FineTune__Backend: useContainerApps ? 'containerapps' : (useAzureMl ? 'azureml' : 'local')
  Pipeline__FineTune__TrainerImage: useContainerApps ? containerApps!.outputs.trainerImage : (empty(trainerImage) ? null : trainerImage)
  Pipeline__FineTune__TrainerClientId: useContainerApps || useAzureMl ? identities.outputs.trainerClientId : null
  Pipeline__FineTune__ContainerApps__JobResourceId: useContainerApps ? containerApps!.outputs.jobResourceId : null
  Pipeline__FineTune__AzureML__WorkspaceResourceId: useAzureMl ? azureMl!.outputs.workspaceId : null
  Pipeline__FineTune__AzureML__ComputeName: useAzureMl ? azureMl!.outputs.computeName : null
  Pipeline__Inference__ExecutionProvider: inferenceExecutionProvider
}

module functionApp 'modules/functionapp.bicep' = {
  name: 'functionapp'
  scope: rg
  dependsOn: [
    eventGrid // queues and the blob-created subscription exist before the first instance starts
  ]
  params: {
    location: location
    tags: tags
    planName: resourceNames.plan
    functionAppName: resourceNames.functionApp
    azdServiceName: 'functions'
    functionsIdentityName: resourceNames.functionsIdentity
    storageAccountName: resourceNames.storage
    deploymentContainerName: names.deploymentContainer
    maximumInstanceCount: functionMaximumInstanceCount
    instanceMemoryMB: functionInstanceMemoryMB
    alwaysReady: functionAlwaysReady
    appSettings: functionAppSettings
  }
}

// Outputs land in the azd environment (.azure/<env>/.env) for the CLI and scripts.
output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_STORAGE_ACCOUNT_NAME string = resourceNames.storage
output AZURE_STORAGE_BLOB_ENDPOINT string = storage.outputs.blobEndpoint
output AZURE_STORAGE_QUEUE_ENDPOINT string = storage.outputs.queueEndpoint
output AZURE_STORAGE_TABLE_ENDPOINT string = storage.outputs.tableEndpoint
output AZURE_FUNCTION_APP_NAME string = functionApp.outputs.functionAppName
output AZURE_FUNCTION_APP_HOSTNAME string = functionApp.outputs.defaultHostName
output AZURE_FUNCTION_APP_URL string = 'https://${functionApp.outputs.defaultHostName}'
output SERVICEBUS_NAMESPACE_FQDN string = serviceBus.outputs.fullyQualifiedNamespace
output SERVICEBUS_COMMANDS_QUEUE string = names.serviceBusQueues[0]
output PIPELINE_IDENTITY_CLIENT_ID string = identities.outputs.functionsClientId
output PIPELINE_TRAINER_CLIENT_ID string = identities.outputs.trainerClientId
output PIPELINE_GPU_BACKEND string = gpuBackend
output APPLICATIONINSIGHTS_CONNECTION_STRING string = monitoring.outputs.applicationInsightsConnectionString
output AZURE_CONTAINER_REGISTRY_NAME string = useContainerApps || useAzureMl ? resourceNames.registry : ''
output AZURE_CONTAINER_APPS_JOB_NAME string = useContainerApps ? resourceNames.containerAppsJob : ''
output AZURE_CONTAINER_REGISTRY_ENDPOINT string = useContainerApps || useAzureMl ? registry!.outputs.loginServer : ''
output CONTAINERAPPS_JOB_NAME string = useContainerApps ? containerApps!.outputs.jobName : ''
output AZUREML_WORKSPACE_NAME string = useAzureMl ? azureMl!.outputs.workspaceName : ''
output AZUREML_COMPUTE_NAME string = useAzureMl ? azureMl!.outputs.computeName : ''
