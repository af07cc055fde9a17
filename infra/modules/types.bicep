// Shared user-defined types. Imported by main.bicep and the modules.

@export()
@description('Resource tags.')
type tagsType = {
  *: string
}

@export()
@description('''Every app setting the function app gets. The property names are the contract with the code:
infra/lint.sh checks that they equal names.json "appSettings", and a test checks that the code reads no other.
Null values are left out. FUNCTIONS_WORKER_RUNTIME is not an app setting on Flex Consumption (the platform
rejects it there); the function app module turns it into functionAppConfig.runtime.name, which the platform
exposes to the host as FUNCTIONS_WORKER_RUNTIME.''')
@sealed()
type functionAppSettingsType = {
  // Host storage and the storage bindings: identity-based, no keys.
  AzureWebJobsStorage__accountName: string
  AzureWebJobsStorage__blobServiceUri: string
  AzureWebJobsStorage__queueServiceUri: string
  AzureWebJobsStorage__tableServiceUri: string
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: string

  // serviceBusTrigger "connection": "ServiceBusConnection".
  ServiceBusConnection__fullyQualifiedNamespace: string
  ServiceBusConnection__credential: 'managedidentity'
  ServiceBusConnection__clientId: string

  FUNCTIONS_WORKER_RUNTIME: 'dotnet-isolated'

  // Telemetry with Entra ID authentication (local auth is disabled on the component).
  APPLICATIONINSIGHTS_CONNECTION_STRING: string
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: string

  // DefaultAzureCredential / ManagedIdentityCredential in the handler picks the user-assigned identity.
  AZURE_CLIENT_ID: string

  Pipeline__FineTune__Backend: 'local' | 'azureml' | 'containerapps'
  Pipeline__FineTune__TrainerImage: string?
  Pipeline__FineTune__TrainerClientId: string?
  Pipeline__FineTune__ContainerApps__JobResourceId: string?
  Pipeline__FineTune__AzureML__WorkspaceResourceId: string?
  Pipeline__FineTune__AzureML__ComputeName: string?
  Pipeline__Inference__ExecutionProvider: 'cpu' | 'cuda'
}

@export()
@description('Flex Consumption always-ready instances for a function group ("http", "blob", "durable") or one function ("function:<name>").')
type alwaysReadyType = {
  name: string
  @minValue(0)
  instanceCount: int
}
