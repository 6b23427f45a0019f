import Foundation
import KMSProtocol

/// A key's identifier: a random UUID, written lowercase (`1234abcd-12ab-34cd-56ef-1234567890ab`).
public struct KeyID: Hashable, Sendable, Comparable, CustomStringConvertible, Codable {
    public let uuid: UUID

    public init(uuid: UUID) { self.uuid = uuid }

    /// A fresh random key id.
    public static func random() -> KeyID { KeyID(uuid: UUID()) }

    /// Parses a key id or a key ARN (`kmsd:key/<uuid>`).
    ///
    /// Throws ValidationException for an empty string, NotFoundException for anything else
    /// that names no possible key (as AWS answers for a malformed key id).
    public init(parsing text: String) throws(KMSError) {
        guard !text.isEmpty else { throw KMSError(.validation, "KeyId is required") }
        var body = Substring(text)
        if body.hasPrefix(Self.arnPrefix) { body = body.dropFirst(Self.arnPrefix.count) }
        if body.hasPrefix("alias/") {
            throw KMSError(.notFound, "aliases are not supported yet; pass the key id (a UUID)")
        }
        guard body.count == 36, let uuid = UUID(uuidString: String(body)) else {
            throw KMSError(.notFound, "'\(text.prefix(80))' is not a key id; key ids look like 1234abcd-12ab-34cd-56ef-1234567890ab")
        }
        self.uuid = uuid
    }

    /// The 16 bytes of the UUID in RFC 4122 order (as in the ciphertext header).
    public init(bytes: some Collection<UInt8>) {
        precondition(bytes.count == 16)
        let b = Array(bytes)
        uuid = UUID(uuid: (b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]))
    }

    public var bytes: [UInt8] {
        withUnsafeBytes(of: uuid.uuid) { Array($0) }
    }

    public static let arnPrefix = "kmsd:key/"

    public var description: String { uuid.uuidString.lowercased() }
    public var arn: String { Self.arnPrefix + description }

    public static func < (a: KeyID, b: KeyID) -> Bool { a.description < b.description }
}
