import Foundation
import NIOCore

/// The answer side of `HotRequestDecoder`: writes the responses to Encrypt, Decrypt and
/// GenerateDataKey(WithoutPlaintext) straight into the outgoing buffer, byte for byte what
/// SwiftProtobuf serializes (fields in number order, defaults left out), without its
/// intermediate array. Any other response, or one carrying unknown fields, returns nil and is
/// serialized by SwiftProtobuf (`HotResponseEncoderTests` compares the two).
public enum HotResponseEncoder {
    /// A field of one of the four response messages.
    enum Value {
        case bytes(Data)
        case string(String)
        case varint(UInt64)

        /// Its encoded size with a one-byte tag (fields 1...15); 0 for a default value.
        var size: Int {
            switch self {
            case .bytes(let d): d.isEmpty ? 0 : 1 + varintSize(UInt64(d.count)) + d.count
            case .string(let s): s.isEmpty ? 0 : 1 + varintSize(UInt64(s.utf8.count)) + s.utf8.count
            case .varint(let v): v == 0 ? 0 : 1 + varintSize(v)
            }
        }
    }

    /// The operation field and the fields (numbers 1, 2, …) of a response it can write.
    static func fields(_ response: KMSResponse) -> (Int, [Value])? {
        guard response.unknownFields.data.isEmpty else { return nil }
        switch response.result {
        case .encrypt(let r)?:
            guard r.unknownFields.data.isEmpty else { return nil }
            return (30, [.bytes(r.ciphertextBlob), .string(r.keyID), .string(r.encryptionAlgorithm)])
        case .decrypt(let r)?:
            guard r.unknownFields.data.isEmpty else { return nil }
            return (31, [.string(r.keyID), .bytes(r.plaintext), .string(r.encryptionAlgorithm), .varint(UInt64(r.keyVersion))])
        case .generateDataKey(let r)?:
            guard r.unknownFields.data.isEmpty else { return nil }
            return (33, [.bytes(r.ciphertextBlob), .bytes(r.plaintext), .string(r.keyID)])
        case .generateDataKeyWithoutPlaintext(let r)?:
            guard r.unknownFields.data.isEmpty else { return nil }
            return (34, [.bytes(r.ciphertextBlob), .string(r.keyID)])
        default:
            return nil
        }
    }

    /// A response ready to write: `size` bytes of frame body.
    public struct Plan {
        let id: UInt64
        let operation: Int
        let values: [Value]
        let inner: Int
        public let size: Int
    }

    /// The plan for `response`, or nil when SwiftProtobuf must serialize it.
    public static func plan(_ response: KMSResponse) -> Plan? {
        guard let (operation, values) = fields(response) else { return nil }
        let inner = values.reduce(0) { $0 + $1.size }
        let idSize = response.id == 0 ? 0 : 1 + varintSize(response.id)
        let size = idSize + varintSize(UInt64(operation << 3 | 2)) + varintSize(UInt64(inner)) + inner
        return Plan(id: response.id, operation: operation, values: values, inner: inner, size: size)
    }

    /// Writes the frame body `plan` describes.
    public static func write(_ plan: Plan, into buffer: inout ByteBuffer) {
        if plan.id != 0 {
            buffer.writeInteger(UInt8(1 << 3 | 0))
            writeVarint(plan.id, into: &buffer)
        }
        writeVarint(UInt64(plan.operation << 3 | 2), into: &buffer)
        writeVarint(UInt64(plan.inner), into: &buffer)
        for (i, value) in plan.values.enumerated() where value.size > 0 {
            let field = UInt8(i + 1)
            switch value {
            case .bytes(let d):
                buffer.writeInteger(field << 3 | 2)
                writeVarint(UInt64(d.count), into: &buffer)
                d.withUnsafeBytes { _ = buffer.writeBytes($0) }
            case .string(let s):
                buffer.writeInteger(field << 3 | 2)
                writeVarint(UInt64(s.utf8.count), into: &buffer)
                buffer.writeString(s)
            case .varint(let v):
                buffer.writeInteger(field << 3 | 0)
                writeVarint(v, into: &buffer)
            }
        }
    }

    static func varintSize(_ v: UInt64) -> Int {
        var v = v, n = 1
        while v >= 0x80 { v >>= 7; n += 1 }
        return n
    }

    static func writeVarint(_ v: UInt64, into buffer: inout ByteBuffer) {
        var v = v
        while v >= 0x80 { buffer.writeInteger(UInt8(truncatingIfNeeded: v) | 0x80); v >>= 7 }
        buffer.writeInteger(UInt8(v))
    }
}
