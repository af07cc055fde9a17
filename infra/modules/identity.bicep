// User-assigned managed identities: one for the function app, one for the GPU trainer.
// Separate identities keep the trainer (which runs user code and images) away from the
// function app's rights: it can only read datasets and write jobs/models blobs.

import { tagsType } from 'types.bicep'

@description('Location of the identities.')
param location string

@description('Tags applied to every resource.')
param tags tagsType

@description('Name of the function app identity.')
param functionsIdentityName string

@description('Name of the trainer identity (GPU jobs).')
param trainerIdentityName string

resource functionsIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2024-11-30' = {
  name: functionsIdentityName
  location: location
  tags: tags
}

resource trainerIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2024-11-30' = {
  name: trainerIdentityName
  location: location
  tags: tags
}

output functionsIdentityId string = functionsIdentity.id
output functionsClientId string = functionsIdentity.properties.clientId
output functionsPrincipalId string = functionsIdentity.properties.principalId
output trainerIdentityId string = trainerIdentity.id
output trainerClientId string = trainerIdentity.properties.clientId
output trainerPrincipalId string = trainerIdentity.properties.principalId
