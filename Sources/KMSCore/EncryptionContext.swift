import Foundation
import KMSProtocol

/// An encryption context: non-secret key/value pairs bound to a ciphertext as AAD.
///
/// Keys are compared by their UTF-8 bytes, as the canonical form orders them: text that is
/// canonically equivalent but spelled differently (NFC and NFD) makes two distinct keys, and a
/// key given twice with the same bytes is refused rather than silently collapsed.
public struct EncryptionContext: Sendable, Equatable {
    /// The pairs in canonical order (ascending key bytes); keys are distinct.
    public let pairs: [WirePair]
    /// u32be(count) ‖ for each pair by ascending key bytes: u32be(len k) ‖ k ‖ u32be(len v) ‖ v.
    /// Computed once: it is the AAD suffix of every seal and open.
    public let canonicalBytes: [UInt8]

    /// From a Swift dictionary (whose keys are already distinct as Strings).
    public init(_ pairs: [String: String]) throws(KMSError) {
        try self.init(pairs: pairs.map { WirePair(key: Array($0.key.utf8), value: Array($0.value.utf8)) })
    }

    /// Validates the pairs against the documented limits.
    ///
    /// Throws ValidationException when there are too many pairs, an empty key, a key given
    /// twice (same bytes), or the canonical form exceeds `KMSLimits.maxCanonicalContextBytes`.
    public init(pairs: [WirePair]) throws(KMSError) {
        guard pairs.count <= KMSLimits.maxContextPairs else {
            throw KMSError(.validation, "encryption context has \(pairs.count) pairs; at most \(KMSLimits.maxContextPairs) are allowed")
        }
        let sorted = pairs.sorted { $0.key.lexicographicallyPrecedes($1.key) }
        for (a, b) in zip(sorted, sorted.dropFirst()) where a.key == b.key {
            throw KMSError(.validation, "encryption context key '\(Self.escape(String(decoding: a.key, as: UTF8.self)).prefix(64))' is given twice; each key may appear once")
        }
        guard !sorted.contains(where: { $0.key.isEmpty }) else {
            throw KMSError(.validation, "encryption context keys must not be empty")
        }
        let canonical = WirePair.canonicalBytes(sorted: sorted)
        guard canonical.count <= KMSLimits.maxCanonicalContextBytes else {
            throw KMSError(.validation, "encryption context is \(canonical.count) bytes in canonical form; at most \(KMSLimits.maxCanonicalContextBytes) are allowed")
        }
        self.pairs = sorted
        self.canonicalBytes = canonical
    }

    public static let empty = try! EncryptionContext([:])

    /// The keys of pairs as they arrived (duplicates included), for the audit record of a
    /// request whose context may not even be valid; same format as `auditKeys(_:)`.
    public static func auditKeys(pairs: [WirePair]) -> String {
        // Every Encrypt and Decrypt builds this: the usual single pair costs one String.
        if pairs.count == 1 { return escape(String(decoding: pairs[0].key, as: UTF8.self)) }
        return pairs.map(\.key).sorted { $0.lexicographicallyPrecedes($1) }
            .map { escape(String(decoding: $0, as: UTF8.self)) }.joined(separator: ",")
    }

    /// The keys only (values may be sensitive: never audited), in canonical (bytewise) order,
    /// joined with `,`. Escaped so the text maps back to exactly one list of keys: `\` is
    /// written `\\`, `,` is `\,`, and a control character (U+0000...U+001F, U+007F) is `\xHH`.
    public static func auditKeys(_ pairs: [String: String]) -> String {
        pairs.keys.map { Array($0.utf8) }.sorted { $0.lexicographicallyPrecedes($1) }
            .map { escape(String(decoding: $0, as: UTF8.self)) }
            .joined(separator: ",")
    }

    /// What KMS_ENCRYPTION_CONTEXT records: keys only, unless the key's policy opted in to
    /// values too (the one place that decides whether values reach the audit log).
    public static func auditText(_ pairs: [WirePair], values: Bool) -> String {
        values ? auditPairs(pairs: pairs) : auditKeys(pairs: pairs)
    }

    /// Keys and values (`key=value`, comma-separated, canonical order), for keys whose policy
    /// opts in (AuditEncryptionContext KeysAndValues); escaped as `auditKeys`, with `=` as `\=`.
    public static func auditPairs(pairs: [WirePair]) -> String {
        pairs.sorted { $0.key.lexicographicallyPrecedes($1.key) }
            .map { escape(String(decoding: $0.key, as: UTF8.self)).replacingOccurrences(of: "=", with: "\\=") + "="
                + escape(String(decoding: $0.value, as: UTF8.self)).replacingOccurrences(of: "=", with: "\\=") }
            .joined(separator: ",")
    }

    static func escape(_ key: String) -> String {
        // Most keys need no escaping: then the text is the key itself.
        if key.utf8.allSatisfy({ $0 >= 0x20 && $0 != 0x7f && $0 != 0x5c && $0 != 0x2c }) { return key }
        var out = ""
        let hex = Array("0123456789abcdef")
        for scalar in key.unicodeScalars {
            switch scalar.value {
            case 0x5c: out += "\\\\"
            case 0x2c: out += "\\,"
            case 0..<0x20, 0x7f: out += "\\x" + String(hex[Int(scalar.value >> 4)]) + String(hex[Int(scalar.value & 15)])
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out
    }
}

extension Array where Element == UInt8 {
    mutating func appendBigEndian(_ v: UInt32) {
        append(UInt8(v >> 24)); append(UInt8((v >> 16) & 0xff)); append(UInt8((v >> 8) & 0xff)); append(UInt8(v & 0xff))
    }

    /// u32be(count) ‖ bytes.
    mutating func appendLengthPrefixed(_ bytes: [UInt8]) {
        appendBigEndian(UInt32(bytes.count)); self += bytes
    }
}

extension Collection where Element == UInt8 {
    func readBigEndianUInt32(at offset: Index) -> UInt32 {
        var v: UInt32 = 0
        var i = offset
        for _ in 0..<4 { v = v << 8 | UInt32(self[i]); i = index(after: i) }
        return v
    }
}
