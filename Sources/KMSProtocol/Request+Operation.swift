import SwiftProtobuf

public typealias KMSRequest = Kmsd_V1_Request
public typealias KMSResponse = Kmsd_V1_Response

extension Kmsd_V1_Request.OneOf_Operation {
    /// The AWS KMS operation name, as used in audit records, capabilities and `kms:` actions.
    public var name: String {
        switch self {
        case .hello: "Hello"
        case .whoAmI: "WhoAmI"
        case .createKey: "CreateKey"
        case .describeKey: "DescribeKey"
        case .listKeys: "ListKeys"
        case .enableKey: "EnableKey"
        case .disableKey: "DisableKey"
        case .scheduleKeyDeletion: "ScheduleKeyDeletion"
        case .cancelKeyDeletion: "CancelKeyDeletion"
        case .updateKeyDescription: "UpdateKeyDescription"
        case .encrypt: "Encrypt"
        case .decrypt: "Decrypt"
        case .reEncrypt: "ReEncrypt"
        case .generateDataKey: "GenerateDataKey"
        case .generateDataKeyWithoutPlaintext: "GenerateDataKeyWithoutPlaintext"
        case .generateRandom: "GenerateRandom"
        case .createAlias: "CreateAlias"
        case .updateAlias: "UpdateAlias"
        case .deleteAlias: "DeleteAlias"
        case .listAliases: "ListAliases"
        case .tagResource: "TagResource"
        case .untagResource: "UntagResource"
        case .listResourceTags: "ListResourceTags"
        case .enableKeyRotation: "EnableKeyRotation"
        case .disableKeyRotation: "DisableKeyRotation"
        case .getKeyRotationStatus: "GetKeyRotationStatus"
        case .rotateKeyOnDemand: "RotateKeyOnDemand"
        case .listKeyRotations: "ListKeyRotations"
        case .setMinimumDecryptionVersion: "SetMinimumDecryptionVersion"
        case .getParametersForImport: "GetParametersForImport"
        case .importKeyMaterial: "ImportKeyMaterial"
        case .deleteImportedKeyMaterial: "DeleteImportedKeyMaterial"
        case .getKeyPolicy: "GetKeyPolicy"
        case .putKeyPolicy: "PutKeyPolicy"
        case .listKeyPolicies: "ListKeyPolicies"
        case .simulatePolicy: "SimulatePolicy"
        case .createGrant: "CreateGrant"
        case .listGrants: "ListGrants"
        case .listRetirableGrants: "ListRetirableGrants"
        case .retireGrant: "RetireGrant"
        case .revokeGrant: "RevokeGrant"
        case .reviewAccess: "ReviewAccess"
        case .verifyAuditRecords: "VerifyAuditRecords"
        case .status: "Status"
        case .createBackup: "CreateBackup"
        case .getBackupChunk: "GetBackupChunk"
        case .getReplicationIdentity: "GetReplicationIdentity"
        case .pinReplicationIdentity: "PinReplicationIdentity"
        case .replicateKey: "ReplicateKey"
        case .importReplica: "ImportReplica"
        case .updatePrimaryRegion: "UpdatePrimaryRegion"
        }
    }
}

extension Kmsd_V1_Response {
    /// A response carrying only an error.
    public static func failure(id: UInt64, _ error: KMSError) -> Kmsd_V1_Response {
        var response = Kmsd_V1_Response()
        response.id = id
        response.error = .with {
            $0.code = error.code.rawValue
            $0.message = error.message
        }
        return response
    }

    /// The error this response carries, if any. A code this client does not know (from a
    /// newer server) becomes KMSInternalException with the original code kept in the message.
    public var kmsError: KMSError? {
        guard case .error(let e)? = result else { return nil }
        if let code = KMSErrorCode(rawValue: e.code) { return KMSError(code, e.message) }
        return KMSError(.internalError, "\(e.code): \(e.message)")
    }
}
