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

    /// Writes the frame body `plan` describes, in one pass over the buffer's memory.
    public static func write(_ plan: Plan, into buffer: inout ByteBuffer) {
        buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: plan.size) { out in
            var c = Cursor(out: out)
            if plan.id != 0 {
                c.byte(1 << 3 | 0)
                c.varint(plan.id)
            }
            c.varint(UInt64(plan.operation << 3 | 2))
            c.varint(UInt64(plan.inner))
            for (i, value) in plan.values.enumerated() where value.size > 0 {
                let field = UInt8(i + 1)
                switch value {
                case .bytes(let d):
                    c.byte(field << 3 | 2)
                    c.varint(UInt64(d.count))
                    d.withUnsafeBytes { c.bytes($0) }
                case .string(var s):
                    c.byte(field << 3 | 2)
                    c.varint(UInt64(s.utf8.count))
                    s.withUTF8 { c.bytes(UnsafeRawBufferPointer($0)) }
                case .varint(let v):
                    c.byte(field << 3 | 0)
                    c.varint(v)
                }
            }
            precondition(c.at == plan.size, "a response plan's size and its bytes disagree")
            return c.at
        }
    }

    /// Writes into memory reserved for exactly the plan's bytes; never past its end.
    struct Cursor {
        let out: UnsafeMutableRawBufferPointer
        var at = 0

        mutating func byte(_ b: UInt8) {
            precondition(at < out.count)
            out.storeBytes(of: b, toByteOffset: at, as: UInt8.self)
            at += 1
        }

        mutating func varint(_ v: UInt64) {
            var v = v
            while v >= 0x80 { byte(UInt8(truncatingIfNeeded: v) | 0x80); v >>= 7 }
            byte(UInt8(v))
        }

        mutating func bytes(_ p: UnsafeRawBufferPointer) {
            guard let source = p.baseAddress, p.count > 0 else { return }
            precondition(p.count <= out.count - at)
            (out.baseAddress! + at).copyMemory(from: source, byteCount: p.count)
            at += p.count
        }
    }

    static func varintSize(_ v: UInt64) -> Int {
        var v = v, n = 1
        while v >= 0x80 { v >>= 7; n += 1 }
        return n
    }
}
