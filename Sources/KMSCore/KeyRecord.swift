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
    /// The stored fields, shared by copies of a record until one of them changes (a record is
    /// copied several times on every request's way: cache, access decision, handler; a copy is
    /// now one reference, not some 300 bytes and a dozen references). Encoded exactly as the
    /// record always was: the same keys, so stored records read and verify as before.
    struct Fields: Codable, Sendable, Equatable {
        var keyID: KeyID
        var createdAt: Date
        var description: String
        var keyUsage: KeyUsage
        var keySpec: KeySpec
        var state: KeyState
        var ownerUID: UInt32
        var currentVersion: UInt32
        var tags: [Tag]
        var origin: String
        var deletionDate: Date? = nil
        var pendingWindowInDays: UInt32? = nil
        var rotationPeriodDays: UInt32? = nil
        var nextRotationDate: Date? = nil
        var minimumDecryptionVersion: UInt32? = nil
        var onDemandRotations: UInt32? = nil
        var expirationModel: String? = nil
        var validTo: Date? = nil
        var importedMaterialCheck: Data? = nil
        var policy: String? = nil
        var multiRegionKeyType: String? = nil
        var primaryRegion: String? = nil
        var replicaRegions: [String]? = nil
        var replicationSequence: UInt64? = nil
        var replicatedSequences: [String: UInt64]? = nil
    }

    /// Never changed while shared: `mutate` copies it first unless this record holds the only
    /// reference.
    private final class Box: @unchecked Sendable {
        var fields: Fields
        init(_ fields: Fields) { self.fields = fields }
    }

    private var box: Box

    private mutating func mutate(_ change: (inout Fields) -> Void) {
        if !isKnownUniquelyReferenced(&box) { box = Box(box.fields) }
        change(&box.fields)
    }

    public var keyID: KeyID { get { box.fields.keyID } set { mutate { $0.keyID = newValue } } }
    public var createdAt: Date { get { box.fields.createdAt } set { mutate { $0.createdAt = newValue } } }
    public var description: String { get { box.fields.description } set { mutate { $0.description = newValue } } }
    public var keyUsage: KeyUsage { get { box.fields.keyUsage } set { mutate { $0.keyUsage = newValue } } }
    public var keySpec: KeySpec { get { box.fields.keySpec } set { mutate { $0.keySpec = newValue } } }
    public var state: KeyState { get { box.fields.state } set { mutate { $0.state = newValue } } }
    /// The uid that created the key; until the policy layer lands, it and administrators may use it.
    public var ownerUID: UInt32 { get { box.fields.ownerUID } set { mutate { $0.ownerUID = newValue } } }
    public var currentVersion: UInt32 { get { box.fields.currentVersion } set { mutate { $0.currentVersion = newValue } } }
    public var tags: [Tag] { get { box.fields.tags } set { mutate { $0.tags = newValue } } }
    public var origin: String { get { box.fields.origin } set { mutate { $0.origin = newValue } } }
    /// PendingDeletion only: when kmsd deletes the key, and the window that was asked for.
    public var deletionDate: Date? { get { box.fields.deletionDate } set { mutate { $0.deletionDate = newValue } } }
    public var pendingWindowInDays: UInt32? { get { box.fields.pendingWindowInDays } set { mutate { $0.pendingWindowInDays = newValue } } }
    /// Automatic rotation: the period (nil = off) and when the next rotation is due.
    public var rotationPeriodDays: UInt32? { get { box.fields.rotationPeriodDays } set { mutate { $0.rotationPeriodDays = newValue } } }
    public var nextRotationDate: Date? { get { box.fields.nextRotationDate } set { mutate { $0.nextRotationDate = newValue } } }
    /// Beyond AWS: versions below this refuse to decrypt (nil or 1: none refused).
    public var minimumDecryptionVersion: UInt32? { get { box.fields.minimumDecryptionVersion } set { mutate { $0.minimumDecryptionVersion = newValue } } }
    /// On-demand rotations so far (AWS allows 10 per key).
    public var onDemandRotations: UInt32? { get { box.fields.onDemandRotations } set { mutate { $0.onDemandRotations = newValue } } }
    /// EXTERNAL keys holding imported material: KEY_MATERIAL_EXPIRES or
    /// KEY_MATERIAL_DOES_NOT_EXPIRE (nil: no material now), and when it expires.
    public var expirationModel: String? { get { box.fields.expirationModel } set { mutate { $0.expirationModel = newValue } } }
    public var validTo: Date? { get { box.fields.validTo } set { mutate { $0.validTo = newValue } } }
    /// EXTERNAL keys: a keyed one-way check value of the first material imported, so a later
    /// import must bring the same material (never the material itself).
    public var importedMaterialCheck: Data? { get { box.fields.importedMaterialCheck } set { mutate { $0.importedMaterialCheck = newValue } } }
    /// The key policy (JSON) set by PutKeyPolicy or CreateKey; nil: the default policy.
    public var policy: String? { get { box.fields.policy } set { mutate { $0.policy = newValue } } }
    /// Multi-region keys (`mrk-` ids, PROTOCOL.md §15.3): PRIMARY or REPLICA (nil: a
    /// single-region key), the primary's region, and on the primary the regions it was
    /// replicated to.
    public var multiRegionKeyType: String? { get { box.fields.multiRegionKeyType } set { mutate { $0.multiRegionKeyType = newValue } } }
    public var primaryRegion: String? { get { box.fields.primaryRegion } set { mutate { $0.primaryRegion = newValue } } }
    public var replicaRegions: [String]? { get { box.fields.replicaRegions } set { mutate { $0.replicaRegions = newValue } } }
    /// A replica: the sequence of the newest replication bundle it took (older ones are refused).
    public var replicationSequence: UInt64? { get { box.fields.replicationSequence } set { mutate { $0.replicationSequence = newValue } } }
    /// A primary: per replica region, the sequence of the newest bundle made for it; a replica
    /// deletion notice older than that is stale (the replica was made or synced again since).
    public var replicatedSequences: [String: UInt64]? { get { box.fields.replicatedSequences } set { mutate { $0.replicatedSequences = newValue } } }

    public init(from decoder: Decoder) throws { box = Box(try Fields(from: decoder)) }
    public func encode(to encoder: Encoder) throws { try box.fields.encode(to: encoder) }
    public static func == (a: KeyRecord, b: KeyRecord) -> Bool { a.box === b.box || a.box.fields == b.box.fields }

    /// An EXTERNAL key whose material is not there (never imported, expired or deleted).
    public var awaitsMaterial: Bool { origin == KeyRecord.externalOrigin && expirationModel == nil }

    public init(keyID: KeyID, createdAt: Date, description: String, keyUsage: KeyUsage, keySpec: KeySpec, state: KeyState,
                ownerUID: UInt32, currentVersion: UInt32, tags: [Tag], origin: String) {
        box = Box(Fields(keyID: keyID, createdAt: createdAt, description: description, keyUsage: keyUsage, keySpec: keySpec,
                         state: state, ownerUID: ownerUID, currentVersion: currentVersion, tags: tags, origin: origin))
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
