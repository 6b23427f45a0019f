import Foundation
import KMSProtocol

/// One method per operation. Each throws `KMSError` (the server's stable code) or
/// `KMSTransportError`.
extension KMSClient {
    public func hello(clientName: String = "KMSClient") async throws -> Kmsd_V1_HelloResponse {
        guard case .hello(let r) = try await send(.hello(.with { $0.protocolVersion = KMSProtocolConstants.protocolVersion; $0.clientName = clientName })) else { throw Self.mismatch }
        // PROTOCOL.md §5: a client that does not speak the version the server chose closes.
        guard r.protocolVersion == KMSProtocolConstants.protocolVersion else {
            await close()
            throw KMSTransportError("kmsd answered protocol version \(r.protocolVersion); this client speaks \(KMSProtocolConstants.protocolVersion). Use a client and server that share a version")
        }
        return r
    }

    public func whoAmI() async throws -> Kmsd_V1_WhoAmIResponse {
        guard case .whoAmI(let r) = try await send(.whoAmI(.init())) else { throw Self.mismatch }
        return r
    }

    public func createKey(description: String = "", keySpec: String = "", keyUsage: String = "",
                          tags: [String: String] = [:], origin: String = "", policy: String = "",
                          bypassPolicyLockoutSafetyCheck: Bool = false, multiRegion: Bool = false) async throws -> Kmsd_V1_KeyMetadata {
        let req = Kmsd_V1_CreateKeyRequest.with {
            $0.multiRegion = multiRegion
            $0.origin = origin
            $0.policy = policy
            $0.bypassPolicyLockoutSafetyCheck = bypassPolicyLockoutSafetyCheck
            $0.description_p = description
            $0.keySpec = keySpec
            $0.keyUsage = keyUsage
            $0.tags = Self.tagMessages(tags)
        }
        guard case .createKey(let r) = try await send(.createKey(req)) else { throw Self.mismatch }
        return r.keyMetadata
    }

    public func enableKey(keyID: String) async throws {
        guard case .enableKey = try await send(.enableKey(.with { $0.keyID = keyID })) else { throw Self.mismatch }
    }

    public func disableKey(keyID: String) async throws {
        guard case .disableKey = try await send(.disableKey(.with { $0.keyID = keyID })) else { throw Self.mismatch }
    }

    /// Schedules the key's deletion after `pendingWindowInDays` (7...30; 0 = 30).
    public func scheduleKeyDeletion(keyID: String, pendingWindowInDays: UInt32 = 0) async throws -> Kmsd_V1_ScheduleKeyDeletionResponse {
        guard case .scheduleKeyDeletion(let r) = try await send(.scheduleKeyDeletion(.with {
            $0.keyID = keyID
            $0.pendingWindowInDays = pendingWindowInDays
        })) else { throw Self.mismatch }
        return r
    }

    public func cancelKeyDeletion(keyID: String) async throws -> Kmsd_V1_CancelKeyDeletionResponse {
        guard case .cancelKeyDeletion(let r) = try await send(.cancelKeyDeletion(.with { $0.keyID = keyID })) else { throw Self.mismatch }
        return r
    }

    public func updateKeyDescription(keyID: String, description: String) async throws {
        guard case .updateKeyDescription = try await send(.updateKeyDescription(.with {
            $0.keyID = keyID
            $0.description_p = description
        })) else { throw Self.mismatch }
    }

    public func createAlias(aliasName: String, targetKeyID: String) async throws {
        guard case .createAlias = try await send(.createAlias(.with { $0.aliasName = aliasName; $0.targetKeyID = targetKeyID })) else { throw Self.mismatch }
    }

    public func updateAlias(aliasName: String, targetKeyID: String) async throws {
        guard case .updateAlias = try await send(.updateAlias(.with { $0.aliasName = aliasName; $0.targetKeyID = targetKeyID })) else { throw Self.mismatch }
    }

    public func deleteAlias(aliasName: String) async throws {
        guard case .deleteAlias = try await send(.deleteAlias(.with { $0.aliasName = aliasName })) else { throw Self.mismatch }
    }

    public func listAliases(keyID: String = "", limit: UInt32 = 0, marker: String = "") async throws -> Kmsd_V1_ListAliasesResponse {
        guard case .listAliases(let r) = try await send(.listAliases(.with { $0.keyID = keyID; $0.limit = limit; $0.marker = marker })) else { throw Self.mismatch }
        return r
    }

    /// Adds tags (a key already present gets the new value).
    public func tagResource(keyID: String, tags: [(key: String, value: String)]) async throws {
        guard case .tagResource = try await send(.tagResource(.with {
            $0.keyID = keyID
            $0.tags = tags.map { t in .with { $0.tagKey = t.key; $0.tagValue = t.value } }
        })) else { throw Self.mismatch }
    }

    public func untagResource(keyID: String, tagKeys: [String]) async throws {
        guard case .untagResource = try await send(.untagResource(.with { $0.keyID = keyID; $0.tagKeys = tagKeys })) else { throw Self.mismatch }
    }

    public func listResourceTags(keyID: String, limit: UInt32 = 0, marker: String = "") async throws -> Kmsd_V1_ListResourceTagsResponse {
        guard case .listResourceTags(let r) = try await send(.listResourceTags(.with { $0.keyID = keyID; $0.limit = limit; $0.marker = marker })) else { throw Self.mismatch }
        return r
    }

    /// Turns on automatic rotation every `rotationPeriodInDays` (90...2560; 0 = 365).
    public func enableKeyRotation(keyID: String, rotationPeriodInDays: UInt32 = 0) async throws {
        guard case .enableKeyRotation = try await send(.enableKeyRotation(.with { $0.keyID = keyID; $0.rotationPeriodInDays = rotationPeriodInDays })) else { throw Self.mismatch }
    }

    public func disableKeyRotation(keyID: String) async throws {
        guard case .disableKeyRotation = try await send(.disableKeyRotation(.with { $0.keyID = keyID })) else { throw Self.mismatch }
    }

    public func getKeyRotationStatus(keyID: String) async throws -> Kmsd_V1_GetKeyRotationStatusResponse {
        guard case .getKeyRotationStatus(let r) = try await send(.getKeyRotationStatus(.with { $0.keyID = keyID })) else { throw Self.mismatch }
        return r
    }

    public func rotateKeyOnDemand(keyID: String) async throws -> Kmsd_V1_RotateKeyOnDemandResponse {
        guard case .rotateKeyOnDemand(let r) = try await send(.rotateKeyOnDemand(.with { $0.keyID = keyID })) else { throw Self.mismatch }
        return r
    }

    public func listKeyRotations(keyID: String, limit: UInt32 = 0, marker: String = "") async throws -> Kmsd_V1_ListKeyRotationsResponse {
        guard case .listKeyRotations(let r) = try await send(.listKeyRotations(.with { $0.keyID = keyID; $0.limit = limit; $0.marker = marker })) else { throw Self.mismatch }
        return r
    }

    /// Beyond AWS: blobs of versions below `version` refuse to decrypt.
    public func setMinimumDecryptionVersion(keyID: String, version: UInt32) async throws {
        guard case .setMinimumDecryptionVersion = try await send(.setMinimumDecryptionVersion(.with {
            $0.keyID = keyID
            $0.minimumDecryptionVersion = version
        })) else { throw Self.mismatch }
    }

    public func describeKey(keyID: String) async throws -> Kmsd_V1_KeyMetadata {
        guard case .describeKey(let r) = try await send(.describeKey(.with { $0.keyID = keyID })) else { throw Self.mismatch }
        return r.keyMetadata
    }

    public func listKeys(limit: UInt32 = 0, marker: String = "") async throws -> Kmsd_V1_ListKeysResponse {
        guard case .listKeys(let r) = try await send(.listKeys(.with { $0.limit = limit; $0.marker = marker })) else { throw Self.mismatch }
        return r
    }

    public func encrypt(keyID: String, plaintext: [UInt8], context: [String: String] = [:]) async throws -> Kmsd_V1_EncryptResponse {
        let req = Kmsd_V1_EncryptRequest.with { $0.keyID = keyID; $0.plaintext = Data(plaintext); $0.encryptionContext = context }
        guard case .encrypt(let r) = try await send(.encrypt(req)) else { throw Self.mismatch }
        return r
    }

    public func decrypt(ciphertextBlob: [UInt8], context: [String: String] = [:], keyID: String = "") async throws -> Kmsd_V1_DecryptResponse {
        let req = Kmsd_V1_DecryptRequest.with { $0.ciphertextBlob = Data(ciphertextBlob); $0.encryptionContext = context; $0.keyID = keyID }
        guard case .decrypt(let r) = try await send(.decrypt(req)) else { throw Self.mismatch }
        return r
    }

    public func reEncrypt(ciphertextBlob: [UInt8], sourceContext: [String: String] = [:], sourceKeyID: String = "",
                          destinationKeyID: String, destinationContext: [String: String] = [:]) async throws -> Kmsd_V1_ReEncryptResponse {
        let req = Kmsd_V1_ReEncryptRequest.with {
            $0.ciphertextBlob = Data(ciphertextBlob)
            $0.sourceEncryptionContext = sourceContext
            $0.sourceKeyID = sourceKeyID
            $0.destinationKeyID = destinationKeyID
            $0.destinationEncryptionContext = destinationContext
        }
        guard case .reEncrypt(let r) = try await send(.reEncrypt(req)) else { throw Self.mismatch }
        return r
    }

    /// `keySpec` AES_128/AES_256, or `numberOfBytes` (exactly one).
    public func generateDataKey(keyID: String, keySpec: String = "", numberOfBytes: UInt32 = 0,
                                context: [String: String] = [:]) async throws -> Kmsd_V1_GenerateDataKeyResponse {
        let req = Kmsd_V1_GenerateDataKeyRequest.with {
            $0.keyID = keyID; $0.keySpec = keySpec; $0.numberOfBytes = numberOfBytes; $0.encryptionContext = context
        }
        guard case .generateDataKey(let r) = try await send(.generateDataKey(req)) else { throw Self.mismatch }
        return r
    }

    public func generateDataKeyWithoutPlaintext(keyID: String, keySpec: String = "", numberOfBytes: UInt32 = 0,
                                                context: [String: String] = [:]) async throws -> Kmsd_V1_GenerateDataKeyWithoutPlaintextResponse {
        let req = Kmsd_V1_GenerateDataKeyWithoutPlaintextRequest.with {
            $0.keyID = keyID; $0.keySpec = keySpec; $0.numberOfBytes = numberOfBytes; $0.encryptionContext = context
        }
        guard case .generateDataKeyWithoutPlaintext(let r) = try await send(.generateDataKeyWithoutPlaintext(req)) else { throw Self.mismatch }
        return r
    }

    public func generateRandom(numberOfBytes: UInt32) async throws -> [UInt8] {
        guard case .generateRandom(let r) = try await send(.generateRandom(.with { $0.numberOfBytes = numberOfBytes })) else { throw Self.mismatch }
        return Array(r.plaintext)
    }

    static var mismatch: KMSTransportError { KMSTransportError("the server answered with a different operation's result") }

    // MARK: - Bring your own key

    /// A public key to wrap material for `keyID` (an EXTERNAL key) and the import token to
    /// send with it.
    public func getParametersForImport(keyID: String, wrappingAlgorithm: String,
                                       wrappingKeySpec: String) async throws -> Kmsd_V1_GetParametersForImportResponse {
        guard case .getParametersForImport(let r) = try await send(.getParametersForImport(.with {
            $0.keyID = keyID
            $0.wrappingAlgorithm = wrappingAlgorithm
            $0.wrappingKeySpec = wrappingKeySpec
        })) else { throw Self.mismatch }
        return r
    }

    /// Imports wrapped material; `validTo` (Unix seconds) with KEY_MATERIAL_EXPIRES (the
    /// default), 0 with KEY_MATERIAL_DOES_NOT_EXPIRE.
    public func importKeyMaterial(keyID: String, importToken: [UInt8], encryptedKeyMaterial: [UInt8],
                                  expirationModel: String = "", validTo: Int64 = 0) async throws {
        guard case .importKeyMaterial = try await send(.importKeyMaterial(.with {
            $0.keyID = keyID
            $0.importToken = Data(importToken)
            $0.encryptedKeyMaterial = Data(encryptedKeyMaterial)
            $0.expirationModel = expirationModel
            $0.validTo = validTo
        })) else { throw Self.mismatch }
    }

    public func deleteImportedKeyMaterial(keyID: String) async throws {
        guard case .deleteImportedKeyMaterial = try await send(.deleteImportedKeyMaterial(.with { $0.keyID = keyID })) else {
            throw Self.mismatch
        }
    }

    // MARK: - Key policies

    public func getKeyPolicy(keyID: String, policyName: String = "default") async throws -> String {
        guard case .getKeyPolicy(let r) = try await send(.getKeyPolicy(.with { $0.keyID = keyID; $0.policyName = policyName })) else {
            throw Self.mismatch
        }
        return r.policy
    }

    public func putKeyPolicy(keyID: String, policy: String, policyName: String = "default",
                             bypassPolicyLockoutSafetyCheck: Bool = false) async throws {
        guard case .putKeyPolicy = try await send(.putKeyPolicy(.with {
            $0.keyID = keyID
            $0.policy = policy
            $0.policyName = policyName
            $0.bypassPolicyLockoutSafetyCheck = bypassPolicyLockoutSafetyCheck
        })) else { throw Self.mismatch }
    }

    public func listKeyPolicies(keyID: String) async throws -> [String] {
        guard case .listKeyPolicies(let r) = try await send(.listKeyPolicies(.with { $0.keyID = keyID })) else { throw Self.mismatch }
        return r.policyNames
    }

    /// Beyond AWS: would the principal be allowed `action` (`kms:Encrypt`) on the key, and why.
    public func simulatePolicy(keyID: String, action: String, principal: Kmsd_V1_SimulatedPrincipal,
                               context: [String: String] = [:], policy: String = "") async throws -> Kmsd_V1_SimulatePolicyResponse {
        guard case .simulatePolicy(let r) = try await send(.simulatePolicy(.with {
            $0.keyID = keyID
            $0.action = action
            $0.principal = principal
            $0.encryptionContext = context
            $0.policy = policy
        })) else { throw Self.mismatch }
        return r
    }

    // MARK: - Grants

    /// Creates a grant; returns (GrantToken, GrantId).
    public func createGrant(keyID: String, granteePrincipal: String, operations: [String], retiringPrincipal: String = "",
                            contextSubset: [String: String]? = nil, contextEquals: [String: String]? = nil,
                            name: String = "", grantTokens: [String] = []) async throws -> Kmsd_V1_CreateGrantResponse {
        guard case .createGrant(let r) = try await send(.createGrant(.with {
            $0.keyID = keyID
            $0.granteePrincipal = granteePrincipal
            $0.retiringPrincipal = retiringPrincipal
            $0.operations = operations
            if contextSubset != nil || contextEquals != nil {
                $0.constraints = .with {
                    $0.encryptionContextSubset = contextSubset ?? [:]
                    $0.encryptionContextEquals = contextEquals ?? [:]
                }
            }
            $0.name = name
            $0.grantTokens = grantTokens
        })) else { throw Self.mismatch }
        return r
    }

    public func listGrants(keyID: String, grantID: String = "", granteePrincipal: String = "", limit: UInt32 = 0,
                           marker: String = "") async throws -> Kmsd_V1_ListGrantsResponse {
        guard case .listGrants(let r) = try await send(.listGrants(.with {
            $0.keyID = keyID; $0.grantID = grantID; $0.granteePrincipal = granteePrincipal; $0.limit = limit; $0.marker = marker
        })) else { throw Self.mismatch }
        return r
    }

    public func listRetirableGrants(retiringPrincipal: String, limit: UInt32 = 0, marker: String = "") async throws -> Kmsd_V1_ListRetirableGrantsResponse {
        guard case .listRetirableGrants(let r) = try await send(.listRetirableGrants(.with {
            $0.retiringPrincipal = retiringPrincipal; $0.limit = limit; $0.marker = marker
        })) else { throw Self.mismatch }
        return r
    }

    /// Retires a grant named by its token, or by key id and grant id.
    public func retireGrant(grantToken: String = "", keyID: String = "", grantID: String = "") async throws {
        guard case .retireGrant = try await send(.retireGrant(.with {
            $0.grantToken = grantToken; $0.keyID = keyID; $0.grantID = grantID
        })) else { throw Self.mismatch }
    }

    public func revokeGrant(keyID: String, grantID: String) async throws {
        guard case .revokeGrant = try await send(.revokeGrant(.with { $0.keyID = keyID; $0.grantID = grantID })) else { throw Self.mismatch }
    }

    /// Beyond AWS: the permissions on one key, or (administrators) every key, one page.
    public func reviewAccess(keyID: String = "", limit: UInt32 = 0, marker: String = "") async throws -> Kmsd_V1_ReviewAccessResponse {
        guard case .reviewAccess(let r) = try await send(.reviewAccess(.with { $0.keyID = keyID; $0.limit = limit; $0.marker = marker })) else {
            throw Self.mismatch
        }
        return r
    }

    /// Beyond AWS: KMS_CHAIN checks of audit records (administrators). Records: (previous
    /// chain, fields). Returns one Bool per record and where the chain stands now.
    public func verifyAuditRecords(_ records: [(previousChain: [UInt8], fields: [(name: String, value: String)])]) async throws -> Kmsd_V1_VerifyAuditRecordsResponse {
        guard case .verifyAuditRecords(let r) = try await send(.verifyAuditRecords(.with {
            $0.records = records.map { rec in
                .with {
                    $0.previousChain = Data(rec.previousChain)
                    $0.fields = rec.fields.map { f in .with { $0.name = f.name; $0.value = f.value } }
                }
            }
        })) else { throw Self.mismatch }
        return r
    }

    /// Beyond AWS: health and use since kmsd started (administrators).
    public func status() async throws -> Kmsd_V1_StatusResponse {
        guard case .status(let r) = try await send(.status(.init())) else { throw Self.mismatch }
        return r
    }

    /// Beyond AWS: a consistent snapshot of the keystore, kept by kmsd as a backup file to be
    /// read with `getBackupChunk` (administrators).
    public func createBackup() async throws -> Kmsd_V1_CreateBackupResponse {
        guard case .createBackup(let r) = try await send(.createBackup(.init())) else { throw Self.mismatch }
        return r
    }

    /// Beyond AWS: this kmsd's replication identity and the identities pinned here (administrators).
    public func getReplicationIdentity() async throws -> Kmsd_V1_GetReplicationIdentityResponse {
        guard case .getReplicationIdentity(let r) = try await send(.getReplicationIdentity(.init())) else { throw Self.mismatch }
        return r
    }

    /// Beyond AWS: trusts `identity` as the kmsd of its region (administrators).
    public func pinReplicationIdentity(_ identity: Kmsd_V1_ReplicationIdentity) async throws -> Kmsd_V1_PinReplicationIdentityResponse {
        guard case .pinReplicationIdentity(let r) = try await send(.pinReplicationIdentity(.with { $0.identity = identity })) else {
            throw Self.mismatch
        }
        return r
    }

    /// A replication bundle of primary multi-region key `keyID` for `replicaRegion`.
    public func replicateKey(keyID: String, replicaRegion: String, policy: String = "", description: String = "",
                             tags: [String: String] = [:]) async throws -> Kmsd_V1_ReplicateKeyResponse {
        let req = Kmsd_V1_ReplicateKeyRequest.with {
            $0.keyID = keyID
            $0.replicaRegion = replicaRegion
            $0.policy = policy
            $0.description_p = description
            $0.tags = Self.tagMessages(tags)
        }
        guard case .replicateKey(let r) = try await send(.replicateKey(req)) else { throw Self.mismatch }
        return r
    }

    /// Moves the primary of multi-region key `keyID` to `primaryRegion`; returns the bundle that
    /// makes the replica there the primary.
    public func updatePrimaryRegion(keyID: String, primaryRegion: String) async throws -> Kmsd_V1_UpdatePrimaryRegionResponse {
        guard case .updatePrimaryRegion(let r) = try await send(.updatePrimaryRegion(.with { $0.keyID = keyID; $0.primaryRegion = primaryRegion })) else {
            throw Self.mismatch
        }
        return r
    }

    /// Takes a replication bundle made for this kmsd (administrators).
    public func importReplica(bundle: [UInt8]) async throws -> Kmsd_V1_ImportReplicaResponse {
        guard case .importReplica(let r) = try await send(.importReplica(.with { $0.replicationBundle = Data(bundle) })) else { throw Self.mismatch }
        return r
    }

    /// Bytes of backup file `backupID` from `offset` on (empty at its end).
    public func getBackupChunk(backupID: String, offset: UInt64) async throws -> Kmsd_V1_GetBackupChunkResponse {
        guard case .getBackupChunk(let r) = try await send(.getBackupChunk(.with { $0.backupID = backupID; $0.offset = offset })) else {
            throw Self.mismatch
        }
        return r
    }
}

extension KMSClient {
    /// Tags as the protocol carries them, ordered by key.
    static func tagMessages(_ tags: [String: String]) -> [Kmsd_V1_Tag] {
        tags.sorted { $0.key < $1.key }.map { t in .with { $0.tagKey = t.key; $0.tagValue = t.value } }
    }
}
