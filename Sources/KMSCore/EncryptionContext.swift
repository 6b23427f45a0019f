import Foundation
import KMSProtocol

/// An encryption context: non-secret key/value pairs bound to a ciphertext as AAD.
public struct EncryptionContext: Sendable, Equatable {
    public let pairs: [String: String]
    /// u32be(count) ‖ for each pair by ascending key bytes: u32be(len k) ‖ k ‖ u32be(len v) ‖ v.
    /// Computed once: it is the AAD suffix of every seal and open.
    public let canonicalBytes: [UInt8]

    /// Validates the pairs against the documented limits.
    ///
    /// Throws ValidationException when there are too many pairs, an empty key, or the
    /// canonical form exceeds `KMSLimits.maxCanonicalContextBytes`.
    public init(_ pairs: [String: String]) throws(KMSError) {
        guard pairs.count <= KMSLimits.maxContextPairs else {
            throw KMSError(.validation, "encryption context has \(pairs.count) pairs; at most \(KMSLimits.maxContextPairs) are allowed")
        }
        guard !pairs.keys.contains("") else {
            throw KMSError(.validation, "encryption context keys must not be empty")
        }
        let canonical = Self.canonicalize(pairs)
        guard canonical.count <= KMSLimits.maxCanonicalContextBytes else {
            throw KMSError(.validation, "encryption context is \(canonical.count) bytes in canonical form; at most \(KMSLimits.maxCanonicalContextBytes) are allowed")
        }
        self.pairs = pairs
        self.canonicalBytes = canonical
    }

    public static let empty = try! EncryptionContext([:])

    static func canonicalize(_ pairs: [String: String]) -> [UInt8] {
        let sorted = pairs.map { (Array($0.key.utf8), Array($0.value.utf8)) }
            .sorted { $0.0.lexicographicallyPrecedes($1.0) }
        var out: [UInt8] = []
        out.appendBigEndian(UInt32(sorted.count))
        for (k, v) in sorted {
            out.appendBigEndian(UInt32(k.count)); out += k
            out.appendBigEndian(UInt32(v.count)); out += v
        }
        return out
    }

    /// The keys only (values may be sensitive: never audited), in canonical (bytewise) order,
    /// joined with `,`. Escaped so the text maps back to exactly one list of keys: `\` is
    /// written `\\`, `,` is `\,`, and a control character (U+0000...U+001F, U+007F) is `\xHH`.
    public static func auditKeys(_ pairs: [String: String]) -> String {
        pairs.keys.map { Array($0.utf8) }.sorted { $0.lexicographicallyPrecedes($1) }
            .map { escape(String(decoding: $0, as: UTF8.self)) }
            .joined(separator: ",")
    }

    static func escape(_ key: String) -> String {
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
