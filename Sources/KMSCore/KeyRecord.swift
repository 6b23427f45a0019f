import Foundation

/// Key states, as in AWS KMS.
public enum KeyState: String, Codable, Sendable {
    case enabled = "Enabled"
    case disabled = "Disabled"
    case pendingDeletion = "PendingDeletion"
    case pendingImport = "PendingImport"
}

/// Key specs kmsd knows by name. Only SYMMETRIC_DEFAULT can be created in this version.
public enum KeySpec: String, Codable, Sendable, CaseIterable {
    case symmetricDefault = "SYMMETRIC_DEFAULT"
    case hmac224 = "HMAC_224", hmac256 = "HMAC_256", hmac384 = "HMAC_384", hmac512 = "HMAC_512"
    case rsa2048 = "RSA_2048", rsa3072 = "RSA_3072", rsa4096 = "RSA_4096"
    case eccNistP256 = "ECC_NIST_P256", eccNistP384 = "ECC_NIST_P384", eccNistP521 = "ECC_NIST_P521"
    case eccSecgP256K1 = "ECC_SECG_P256K1", eccNistEdwards25519 = "ECC_NIST_EDWARDS25519"

    /// Bytes of key material for specs kmsd can generate.
    var materialBytes: Int? { self == .symmetricDefault ? 32 : nil }
}

/// Key usages, as in AWS KMS.
public enum KeyUsage: String, Codable, Sendable, CaseIterable {
    case encryptDecrypt = "ENCRYPT_DECRYPT"
    case signVerify = "SIGN_VERIFY"
    case generateVerifyMAC = "GENERATE_VERIFY_MAC"
    case keyAgreement = "KEY_AGREEMENT"
}

public struct Tag: Codable, Sendable, Equatable {
    public var key: String
    public var value: String
    public init(key: String, value: String) { self.key = key; self.value = value }
}

/// Everything about a key except its material. Stored authenticated (see KeyRepository).
public struct KeyRecord: Codable, Sendable, Equatable {
    public var keyID: KeyID
    public var createdAt: Date
    public var description: String
    public var keyUsage: KeyUsage
    public var keySpec: KeySpec
    public var state: KeyState
    /// The uid that created the key; until the policy layer lands, it and administrators may use it.
    public var ownerUID: UInt32
    public var currentVersion: UInt32
    public var tags: [Tag]
    public var origin: String
    /// PendingDeletion only: when kmsd deletes the key, and the window that was asked for.
    public var deletionDate: Date? = nil
    public var pendingWindowInDays: UInt32? = nil
    /// Automatic rotation: the period (nil = off) and when the next rotation is due.
    public var rotationPeriodDays: UInt32? = nil
    public var nextRotationDate: Date? = nil
    /// Beyond AWS: versions below this refuse to decrypt (nil or 1: none refused).
    public var minimumDecryptionVersion: UInt32? = nil
    /// On-demand rotations so far (AWS allows 10 per key).
    public var onDemandRotations: UInt32? = nil
    /// EXTERNAL keys holding imported material: KEY_MATERIAL_EXPIRES or
    /// KEY_MATERIAL_DOES_NOT_EXPIRE (nil: no material now), and when it expires.
    public var expirationModel: String? = nil
    public var validTo: Date? = nil
    /// EXTERNAL keys: a keyed one-way check value of the first material imported, so a later
    /// import must bring the same material (never the material itself).
    public var importedMaterialCheck: Data? = nil
    /// The key policy (JSON) set by PutKeyPolicy or CreateKey; nil: the default policy.
    public var policy: String? = nil
    /// Multi-region keys (`mrk-` ids, PROTOCOL.md §15.3): PRIMARY or REPLICA (nil: a
    /// single-region key), the primary's region, and on the primary the regions it was
    /// replicated to.
    public var multiRegionKeyType: String? = nil
    public var primaryRegion: String? = nil
    public var replicaRegions: [String]? = nil
    /// A replica: the sequence of the newest replication bundle it took (older ones are refused).
    public var replicationSequence: UInt64? = nil
    /// A primary: per replica region, the sequence of the newest bundle made for it; a replica
    /// deletion notice older than that is stale (the replica was made or synced again since).
    public var replicatedSequences: [String: UInt64]? = nil

    /// An EXTERNAL key whose material is not there (never imported, expired or deleted).
    public var awaitsMaterial: Bool { origin == KeyRecord.externalOrigin && expirationModel == nil }

    public init(keyID: KeyID, createdAt: Date, description: String, keyUsage: KeyUsage, keySpec: KeySpec, state: KeyState,
                ownerUID: UInt32, currentVersion: UInt32, tags: [Tag], origin: String) {
        self.keyID = keyID
        self.createdAt = createdAt
        self.description = description
        self.keyUsage = keyUsage
        self.keySpec = keySpec
        self.state = state
        self.ownerUID = ownerUID
        self.currentVersion = currentVersion
        self.tags = tags
        self.origin = origin
    }

    public static let externalOrigin = "EXTERNAL"
    public static let kmsOrigin = "AWS_KMS"
}

/// What remains of a deleted key: its id and when it was deleted, so a request naming it is
/// told the key was deleted (NotFoundException) rather than that its blob is invalid.
public struct KeyTombstone: Codable, Sendable, Equatable {
    public var keyID: KeyID
    public var deletedAt: Date
}

/// One version of a key's material, wrapped under the root-derived wrapping key.
public struct KeyVersionRecord: Codable, Sendable, Equatable {
    public var keyID: KeyID
    public var version: UInt32
    public var keySpec: KeySpec
    public var createdAt: Date
    /// nonce(12) ‖ AES-256-GCM ciphertext ‖ tag(16); AAD binds key id, version and spec.
    public var wrappedMaterial: [UInt8]
    /// Versions after the first: AUTOMATIC or ON_DEMAND, the rotation that made it.
    public var rotationType: String? = nil
}

/// An alias: a friendly name for a key (`alias/NAME`). Stored authenticated, like keys.
public struct AliasRecord: Codable, Sendable, Equatable {
    public var aliasName: String
    public var keyID: KeyID
    public var createdAt: Date
    public var updatedAt: Date

    public init(aliasName: String, keyID: KeyID, createdAt: Date, updatedAt: Date) {
        self.aliasName = aliasName
        self.keyID = keyID
        self.createdAt = createdAt
        self.updatedAt = updatedAt
    }
}
