import Foundation
import KMSProtocol

/// A key's identifier: a random UUID, written lowercase (`1234abcd-12ab-34cd-56ef-1234567890ab`).
///
/// Parsed and printed by hand (every request names a key, and Foundation's UUID goes through
/// sscanf/printf); stored as its text.
public struct KeyID: Hashable, Sendable, Comparable, CustomStringConvertible, Codable {
    /// The 16 bytes in RFC 4122 order, as in the ciphertext header.
    public let bytes: [UInt8]
    /// The lowercase textual form.
    public let description: String

    /// A fresh random key id (version 4 UUID).
    public static func random() -> KeyID {
        KeyID(bytes: withUnsafeBytes(of: UUID().uuid) { Array($0) })
    }

    /// Parses a key id or a key ARN (`kmsd:key/<uuid>`).
    ///
    /// Throws ValidationException for an empty string, NotFoundException for anything else
    /// that names no possible key (as AWS answers for a malformed key id).
    public init(parsing text: String) throws(KMSError) {
        guard !text.isEmpty else { throw KMSError(.validation, "KeyId is required") }
        var body = Substring(text)
        if body.hasPrefix(Self.arnPrefix) { body = body.dropFirst(Self.arnPrefix.count) }
        if body.hasPrefix("alias/") {
            throw KMSError(.notFound, "an alias names no key here; this operation takes a key id or key ARN")
        }
        guard let bytes = Self.parseUUID(body.utf8) else {
            throw KMSError(.notFound, "that is not a key id; key ids look like 1234abcd-12ab-34cd-56ef-1234567890ab")
        }
        self.init(bytes: bytes)
    }

    /// The key id whose 16 bytes (RFC 4122 order) are `bytes`.
    public init(bytes: some Collection<UInt8>) {
        precondition(bytes.count == 16)
        self.bytes = Array(bytes)
        let hex = Array("0123456789abcdef".utf8)
        var text: [UInt8] = []
        text.reserveCapacity(36)
        for (i, b) in self.bytes.enumerated() {
            if i == 4 || i == 6 || i == 8 || i == 10 { text.append(UInt8(ascii: "-")) }
            text.append(hex[Int(b >> 4)])
            text.append(hex[Int(b & 0x0f)])
        }
        description = String(decoding: text, as: UTF8.self)
    }

    /// 8-4-4-4-12 hex digits, either case.
    static func parseUUID(_ utf8: Substring.UTF8View) -> [UInt8]? {
        guard utf8.count == 36 else { return nil }
        var out: [UInt8] = []
        out.reserveCapacity(16)
        var high: UInt8? = nil
        for (i, c) in utf8.enumerated() {
            if i == 8 || i == 13 || i == 18 || i == 23 {
                guard c == UInt8(ascii: "-") else { return nil }
                continue
            }
            let v: UInt8
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): v = c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): v = c - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): v = c - UInt8(ascii: "A") + 10
            default: return nil
            }
            if let h = high { out.append(h << 4 | v); high = nil } else { high = v }
        }
        return out.count == 16 ? out : nil
    }

    public static let arnPrefix = "kmsd:key/"

    public var arn: String { Self.arnPrefix + description }

    public static func < (a: KeyID, b: KeyID) -> Bool { a.bytes.lexicographicallyPrecedes(b.bytes) }
    public static func == (a: KeyID, b: KeyID) -> Bool { a.bytes == b.bytes }
    public func hash(into hasher: inout Hasher) { hasher.combine(bytes) }

    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        guard let bytes = Self.parseUUID(Substring(text).utf8) else {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "not a key id"))
        }
        self.init(bytes: bytes)
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(description)
    }
}
