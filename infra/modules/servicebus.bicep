// Service Bus namespace (Standard) with the "commands" queue consumed by the serviceBusTrigger
// function. Local (SAS key) authentication is disabled: the function app receives with its managed
// identity (Azure Service Bus Data Receiver on the queue only); other systems send with Entra ID
// (Azure Service Bus Data Sender).
//
// maxDeliveryCount 5: a command that fails five times goes to the dead-letter sub-queue
// (commands/$deadletterqueue), as do expired ones. Duplicate detection drops a resend with the same
// MessageId within the window, so a sender's retry does not start a run twice.

import { tagsType } from 'types.bicep'

@description('Location of the namespace.')
param location string

@description('Tags applied to every resource.')
param tags tagsType

@description('Service Bus namespace name.')
param namespaceName string

@description('Service Bus queues (names.json "serviceBusQueues").')
param queueNames string[]

@description('Name of the function app identity (receiver).')
param functionsIdentityName string

@description('Object id of a user or group allowed to send commands (testing, CLI). Empty for none.')
param principalId string

@description('Type of principalId.')
@allowed([
  'User'
  'Group'
  'ServicePrincipal'
])
param principalType string

var receiverRoleId = '4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0' // Azure Service Bus Data Receiver
var senderRoleId = '69a216fc-b8fb-44d8-bc22-1f3c2cd27a39' // Azure Service Bus Data Sender

resource namespace 'Microsoft.ServiceBus/namespaces@2026-01-01' = {
  name: namespaceName
  location: location
  tags: tags
  sku: {
    name: 'Standard'
    tier: 'Standard'
  }
  properties: {
    disableLocalAuth: true
    minimumTlsVersion: '1.2'
    publicNetworkAccess: 'Enabled'
  }
}

resource queues 'Microsoft.ServiceBus/namespaces/queues@2026-01-01' = [
  for name in queueNames: {
    parent: namespace
    name: name
    properties: {
      maxDeliveryCount: 5
      deadLetteringOnMessageExpiration: true
      lockDuration: 'PT5M'
      defaultMessageTimeToLive: 'P14D'
      requiresDuplicateDetection: true
      duplicateDetectionHistoryTimeWindow: 'PT1H'
      enableBatchedOperations: true
    }
  }
]

resource functionsIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2024-11-30' existing = {
  name: functionsIdentityName
}

resource receiverRoles 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for (name, i) in queueNames: {
    name: guid(queues[i].id, functionsIdentity.id, receiverRoleId)
    scope: queues[i]
    properties: {
      roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', receiverRoleId)
      principalId: functionsIdentity.properties.principalId
      principalType: 'ServicePrincipal'
    }
  }
]

resource senderRoles 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for (name, i) in queueNames: if (!empty(principalId)) {
    name: guid(queues[i].id, principalId, senderRoleId)
    scope: queues[i]
    properties: {
      roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', senderRoleId)
      principalId: principalId
      principalType: principalType
    }
  }
]

output namespaceId string = namespace.id
output fullyQualifiedNamespace string = split(replace(namespace.properties.serviceBusEndpoint, 'https://', ''), ':')[0]
