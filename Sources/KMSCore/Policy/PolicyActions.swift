/// The `kms:` actions a policy may name: every AWS KMS action (so a policy written for AWS
/// parses; actions kmsd does not implement simply never occur) and kmsd's own.
public enum PolicyActions {
    public static let all: [String] = [
        "CancelKeyDeletion", "ConnectCustomKeyStore", "CreateAlias", "CreateCustomKeyStore", "CreateGrant", "CreateKey",
        "Decrypt", "DeleteAlias", "DeleteCustomKeyStore", "DeleteImportedKeyMaterial", "DeriveSharedSecret",
        "DescribeCustomKeyStores", "DescribeKey", "DisableKey", "DisableKeyRotation", "DisconnectCustomKeyStore",
        "EnableKey", "EnableKeyRotation", "Encrypt", "GenerateDataKey", "GenerateDataKeyPair",
        "GenerateDataKeyPairWithoutPlaintext", "GenerateDataKeyWithoutPlaintext", "GenerateMac", "GenerateRandom",
        "GetKeyPolicy", "GetKeyRotationStatus", "GetParametersForImport", "GetPublicKey", "ImportKeyMaterial",
        "ListAliases", "ListGrants", "ListKeyPolicies", "ListKeyRotations", "ListKeys", "ListResourceTags",
        "ListRetirableGrants", "PutKeyPolicy", "ReEncryptFrom", "ReEncryptTo", "ReplicateKey", "RetireGrant",
        "RevokeGrant", "RotateKeyOnDemand", "ScheduleKeyDeletion", "Sign", "SynchronizeMultiRegionKey",
        "TagResource", "UntagResource", "UpdateAlias", "UpdateCustomKeyStore", "UpdateKeyDescription",
        "UpdatePrimaryRegion", "Verify", "VerifyMac",
        // Beyond AWS.
        "SetMinimumDecryptionVersion", "SimulatePolicy",
    ]

    /// Lower-cased name → index (bit in an `ActionSet`).
    static let index: [String: Int] = Dictionary(uniqueKeysWithValues: all.enumerated().map { ($1.lowercased(), $0) })

    /// Exact name (as kmsd's operations spell it) → index: the per-request lookup, with no
    /// lower-casing or concatenation.
    static let exactIndex: [String: Int] = Dictionary(uniqueKeysWithValues: all.enumerated().map { ($1, $0) })

    /// The index of the action kmsd's operation `name` needs (`Encrypt`, `ReEncryptFrom`, …):
    /// one of `all`, spelled as there.
    public static func index(ofOperation name: String) -> Int {
        guard let i = exactIndex[name] else { preconditionFailure("\(name) is not in PolicyActions.all") }
        return i
    }

    /// The index of `kms:Name` (case-insensitive, as AWS matches actions), or nil.
    public static func index(of action: String) -> Int? {
        let lower = action.lowercased()
        guard lower.hasPrefix("kms:") else { return nil }
        return index[String(lower.dropFirst(4))]
    }
}

/// A set of actions as a bitset, so matching a request costs one AND.
public struct ActionSet: Sendable, Equatable {
    var bits: (UInt64, UInt64) = (0, 0)

    public init() {}

    mutating func insert(_ i: Int) {
        if i < 64 { bits.0 |= 1 << UInt64(i) } else { bits.1 |= 1 << UInt64(i - 64) }
    }

    func contains(_ i: Int) -> Bool {
        i < 64 ? bits.0 & (1 << UInt64(i)) != 0 : bits.1 & (1 << UInt64(i - 64)) != 0
    }

    var isEmpty: Bool { bits.0 == 0 && bits.1 == 0 }

    public static func == (a: ActionSet, b: ActionSet) -> Bool { a.bits == b.bits }

    /// The actions a pattern such as `kms:GenerateDataKey*` or `kms:*` names; empty when it
    /// names none.
    static func matching(_ pattern: String) -> ActionSet {
        var set = ActionSet()
        let lower = pattern == "*" ? "kms:*" : pattern.lowercased()  // "*": every action, as AWS reads it
        guard lower.hasPrefix("kms:") else { return set }
        let glob = Glob(String(lower.dropFirst(4)))
        for (i, name) in PolicyActions.all.enumerated() where glob.matches(name.lowercased()) { set.insert(i) }
        return set
    }
}

/// `*` (any run, also empty) and `?` (any one character) over characters, as AWS's StringLike.
struct Glob: Sendable, Equatable {
    let pattern: [Character]
    let literal: String?

    init(_ p: String) {
        pattern = Array(p)
        literal = p.contains("*") || p.contains("?") ? nil : p
    }

    func matches(_ s: String) -> Bool {
        if let literal { return literal == s }
        let text = Array(s)
        var p = 0, t = 0, star = -1, mark = 0
        while t < text.count {
            if p < pattern.count, pattern[p] == "*" {
                star = p; mark = t; p += 1
            } else if p < pattern.count, pattern[p] == "?" || pattern[p] == text[t] {
                p += 1; t += 1
            } else if star >= 0 {
                p = star + 1; mark += 1; t = mark
            } else {
                return false
            }
        }
        while p < pattern.count, pattern[p] == "*" { p += 1 }
        return p == pattern.count
    }
}
