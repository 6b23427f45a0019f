import Foundation
import KMSProtocol

/// A key's identifier: a random UUID, written lowercase (`1234abcd-12ab-34cd-56ef-1234567890ab`),
/// or for a multi-region key `mrk-` and 32 lowercase hex digits (PROTOCOL.md §15.3). Both are
/// 16 bytes; a multi-region key's have 8 in the high nibble of byte 6 (where a UUID has its
/// version, 4 for kmsd's random ids), so the two forms never name the same bytes.
///
/// Parsed and printed by hand (every request names a key, and Foundation's UUID goes through
/// sscanf/printf); stored as its text.
public struct KeyID: Hashable, Sendable, Comparable, CustomStringConvertible, Codable {
    /// The 16 bytes (RFC 4122 order) as two big-endian words: comparing, hashing and copying a
    /// key id costs no allocation (every request names one, some several times).
    let high: UInt64
    let low: UInt64

    /// The 16 bytes in RFC 4122 order, as in the ciphertext header.
    public var bytes: [UInt8] {
        var out = [UInt8](repeating: 0, count: 16)
        for i in 0..<8 {
            out[i] = UInt8(truncatingIfNeeded: high >> (56 - 8 * UInt64(i)))
            out[8 + i] = UInt8(truncatingIfNeeded: low >> (56 - 8 * UInt64(i)))
        }
        return out
    }

    /// Writes the 16 bytes (RFC 4122 order) into `out`, which holds at least 16.
    public func write(into out: UnsafeMutableRawBufferPointer) {
        precondition(out.count >= 16)
        out.storeBytes(of: high.bigEndian, toByteOffset: 0, as: UInt64.self)
        out.storeBytes(of: low.bigEndian, toByteOffset: 8, as: UInt64.self)
    }

    /// True for a multi-region key's id (`mrk-…`).
    public var isMultiRegion: Bool { (high >> 12) & 0xf == 8 }

    /// The lowercase textual form.
    public var description: String {
        if isMultiRegion { return multiRegionDescription }
        return String(unsafeUninitializedCapacity: 36) { out in
            let hex: StaticString = "0123456789abcdef"
            let digits = hex.utf8Start
            var n = 0
            for i in 0..<16 {
                if i == 4 || i == 6 || i == 8 || i == 10 { out[n] = UInt8(ascii: "-"); n += 1 }
                let word = i < 8 ? high : low
                let b = UInt8(truncatingIfNeeded: word >> (56 - 8 * UInt64(i & 7)))
                out[n] = digits[Int(b >> 4)]
                out[n + 1] = digits[Int(b & 0x0f)]
                n += 2
            }
            return n
        }
    }

    /// `mrk-` and the 16 bytes as 32 lowercase hex digits.
    private var multiRegionDescription: String {
        String(unsafeUninitializedCapacity: 36) { out in
            let hex: StaticString = "0123456789abcdef"
            let digits = hex.utf8Start
            for (i, c) in "mrk-".utf8.enumerated() { out[i] = c }
            for i in 0..<16 {
                let word = i < 8 ? high : low
                let b = UInt8(truncatingIfNeeded: word >> (56 - 8 * UInt64(i & 7)))
                out[4 + 2 * i] = digits[Int(b >> 4)]
                out[5 + 2 * i] = digits[Int(b & 0x0f)]
            }
            return 36
        }
    }

    /// A fresh random key id (version 4 UUID).
    public static func random() -> KeyID {
        KeyID(bytes: withUnsafeBytes(of: UUID().uuid) { Array($0) })
    }

    /// A fresh random multi-region key id (`mrk-…`).
    public static func randomMultiRegion() -> KeyID {
        var bytes = withUnsafeBytes(of: UUID().uuid) { Array($0) }
        bytes[6] = bytes[6] & 0x0f | 0x80
        return KeyID(bytes: bytes)
    }

    /// Parses a key id or a key ARN (`kmsd:key/<uuid>`).
    ///
    /// Throws ValidationException for an empty string, NotFoundException for anything else
    /// that names no possible key (as AWS answers for a malformed key id).
    public init(parsing text: String) throws(KMSError) {
        guard !text.isEmpty else { throw KMSError(.validation, "KeyId is required") }
        if let parsed = Self.parse(text) {
            self = parsed
            return
        }
        if text.hasPrefix(Self.arnPrefix + "alias/") || text.hasPrefix("alias/") {
            throw KMSError(.notFound, "an alias names no key here; this operation takes a key id or key ARN")
        }
        throw KMSError(.notFound, "that is not a key id; key ids look like 1234abcd-12ab-34cd-56ef-1234567890ab (multi-region keys: mrk- and 32 hex digits)")
    }

    /// A key id or key ARN, or nil.
    static func parse(_ text: String) -> KeyID? {
        var text = text
        return text.withUTF8 { utf8 -> KeyID? in
            var body = UnsafeRawBufferPointer(utf8)
            if body.count == 36 + arnPrefixUTF8.count, body.starts(with: arnPrefixUTF8) {
                body = UnsafeRawBufferPointer(rebasing: body[arnPrefixUTF8.count...])
            }
            return parseID(body)
        }
    }

    /// A UUID (not of version 8) or `mrk-` and 32 hex digits with 8 in byte 6's high nibble.
    static func parseID(_ utf8: UnsafeRawBufferPointer) -> KeyID? {
        if utf8.count == 36, utf8.starts(with: "mrk-".utf8) {
            var h: UInt64 = 0, l: UInt64 = 0
            for i in 0..<32 {
                guard let v = hexValue(utf8[4 + i]) else { return nil }
                if i < 16 { h = h << 4 | UInt64(v) } else { l = l << 4 | UInt64(v) }
            }
            let id = KeyID(high: h, low: l)
            return id.isMultiRegion ? id : nil
        }
        guard let id = parseUUID(utf8), !id.isMultiRegion else { return nil }
        return id
    }

    static func hexValue(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): c &- UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): c &- UInt8(ascii: "a") &+ 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): c &- UInt8(ascii: "A") &+ 10
        default: nil
        }
    }

    /// The key id whose 16 bytes (RFC 4122 order) are `bytes`.
    public init(bytes: some Collection<UInt8>) {
        precondition(bytes.count == 16)
        var h: UInt64 = 0, l: UInt64 = 0
        for (i, b) in bytes.enumerated() {
            if i < 8 { h = h << 8 | UInt64(b) } else { l = l << 8 | UInt64(b) }
        }
        high = h
        low = l
    }

    /// 8-4-4-4-12 hex digits, either case.
    static func parseUUID(_ utf8: UnsafeRawBufferPointer) -> KeyID? {
        guard utf8.count == 36 else { return nil }
        var h: UInt64 = 0, l: UInt64 = 0, digits = 0
        for i in 0..<36 {
            let c = utf8[i]
            if i == 8 || i == 13 || i == 18 || i == 23 {
                guard c == UInt8(ascii: "-") else { return nil }
                continue
            }
            guard let v = hexValue(c) else { return nil }
            if digits < 16 { h = h << 4 | UInt64(v) } else { l = l << 4 | UInt64(v) }
            digits += 1
        }
        return KeyID(high: h, low: l)
    }

    private init(high: UInt64, low: UInt64) {
        self.high = high
        self.low = low
    }

    static let arnPrefixUTF8 = Array(arnPrefix.utf8)

    public static let arnPrefix = "kmsd:key/"

    public var arn: String { Self.arnPrefix + description }

    public static func < (a: KeyID, b: KeyID) -> Bool { a.high != b.high ? a.high < b.high : a.low < b.low }

    /// The last byte of the id (locks are striped by it).
    public var lastByte: UInt8 { UInt8(truncatingIfNeeded: low) }

    public init(from decoder: any Decoder) throws {
        var text = try decoder.singleValueContainer().decode(String.self)
        guard let id = text.withUTF8({ Self.parseID(UnsafeRawBufferPointer($0)) }) else {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "not a key id"))
        }
        self = id
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(description)
    }
}
