// Event Grid system topic on the storage account and a subscription that delivers
// Microsoft.Storage.BlobCreated events for the "incoming" and "models" containers into the "blob-created"
// storage queue (new data starts ingestion; a model folder dropped into "models" is registered), so ingestion is queue-triggered like every other stage and blob contents never pass through
// the host. Events use the Event Grid schema, one event per queue message; Event Grid base64-encodes
// queue messages, which matches the queue extension's default messageEncoding (base64).
//
// Delivery uses the topic's system-assigned identity (no SAS or keys), which gets
// "Storage Queue Data Message Sender" on the blob-created queue only.

import { tagsType } from 'types.bicep'

@description('Location of the storage account (a system topic lives with its source).')
param location string

@description('Tags applied to every resource.')
param tags tagsType

@description('System topic name.')
param systemTopicName string

@description('Storage account that raises the events and holds the destination queue.')
param storageAccountName string

@description('Container whose new blobs start ingestion.')
param incomingContainerName string

@description('Container whose new model folders are registered.')
param modelsContainerName string

@description('Queue that receives the BlobCreated events.')
param blobCreatedQueueName string

@description('Hours Event Grid keeps retrying an undelivered event.')
@minValue(1)
@maxValue(24)
param eventTimeToLiveHours int

// Storage Queue Data Message Sender.
var queueMessageSenderRoleId = 'c6a89b2d-59bc-44d0-9896-0f6e12d7b80a'

resource storage 'Microsoft.Storage/storageAccounts@2026-06-01' existing = {
  name: storageAccountName

  resource queueService 'queueServices' existing = {
    name: 'default'

    resource blobCreatedQueue 'queues' existing = {
      name: blobCreatedQueueName
    }
  }
}

resource systemTopic 'Microsoft.EventGrid/systemTopics@2025-02-15' = {
  name: systemTopicName
  location: location
  tags: tags
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    source: storage.id
    topicType: 'Microsoft.Storage.StorageAccounts'
  }
}

resource senderRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage::queueService::blobCreatedQueue.id, systemTopic.id, queueMessageSenderRoleId)
  scope: storage::queueService::blobCreatedQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', queueMessageSenderRoleId)
    principalId: systemTopic.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

resource subscriptions 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2025-02-15' = [for container in [incomingContainerName, modelsContainerName]: {
  parent: systemTopic
  name: '${container}-to-${blobCreatedQueueName}'
  dependsOn: [
    senderRole // the identity must be allowed to send before Event Grid validates the destination
  ]
  properties: {
    eventDeliverySchema: 'EventGridSchema'
    deliveryWithResourceIdentity: {
      identity: {
        type: 'SystemAssigned'
      }
      destination: {
        endpointType: 'StorageQueue'
        properties: {
          resourceId: storage.id
          queueName: blobCreatedQueueName
          queueMessageTimeToLiveInSeconds: -1 // never expire: an unprocessed file must not be forgotten
        }
      }
    }
    filter: {
      includedEventTypes: [
        'Microsoft.Storage.BlobCreated'
      ]
      subjectBeginsWith: '/blobServices/default/containers/${container}/'
      enableAdvancedFilteringOnArrays: true
    }
    retryPolicy: {
      maxDeliveryAttempts: 30
      eventTimeToLiveInMinutes: eventTimeToLiveHours * 60
    }
  }
}]

output systemTopicId string = systemTopic.id
output eventSubscriptionNames string[] = [for (container, i) in [incomingContainerName, modelsContainerName]: subscriptions[i].name]
