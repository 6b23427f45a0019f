import Foundation
import SwiftProtobuf

/// The request path's shortcut for the requests that make up nearly all traffic: Encrypt,
/// Decrypt, GenerateDataKey and GenerateDataKeyWithoutPlaintext, encoded as every protobuf
/// encoder writes them. One pass over the frame body gives both the `Request` and its
/// `WireContexts`, where the general path runs SwiftProtobuf's decoder (a map decode that
/// builds a dictionary) and then walks the bytes again for the context pairs.
///
/// It accepts only the plain shape: `id` (a varint) at most once; exactly one occurrence of
/// one of those four operation fields and nothing else at the top level; inside it, each
/// known field at most once with its declared wire type, context entries `{1: key, 2: value}`
/// (each at most once per entry), every string valid UTF-8, `number_of_bytes` within 32 bits,
/// no unknown field. Anything else returns nil and takes SwiftProtobuf's path, which
/// decides what it means (merging repeated messages, keeping unknown fields, refusing bad
/// UTF-8). So whenever this returns a request, it is the request SwiftProtobuf would have
/// decoded (`HotPathCodecTests` and the `request` fuzz target compare the two).
public enum HotRequestDecoder {
    public static func decode(_ body: UnsafeRawBufferPointer) -> (KMSRequest, WireContexts)? {
        var reader = WireReader(body)
        var id: UInt64? = nil
        var operation: (field: Int, bytes: UnsafeRawBufferPointer)? = nil
        while reader.offset < body.count {
            guard let (field, wireType) = reader.tag() else { return nil }
            switch (field, wireType) {
            case (1, 0):
                guard id == nil, let v = reader.varint() else { return nil }
                id = v
            case (30, 2), (31, 2), (33, 2), (34, 2):
                guard operation == nil, let bytes = reader.lengthDelimited() else { return nil }
                operation = (field, bytes)
            default:
                return nil
            }
        }
        guard let operation else { return nil }
        var request = KMSRequest()
        request.id = id ?? 0
        var pairs: [WirePair] = []
        let contextField: Int
        switch operation.field {
        case 30:
            guard let r = encrypt(operation.bytes, &pairs) else { return nil }
            request.operation = .encrypt(r)
            contextField = 3
        case 31:
            guard let r = decrypt(operation.bytes, &pairs) else { return nil }
            request.operation = .decrypt(r)
            contextField = 2
        case 33:
            guard let r: Kmsd_V1_GenerateDataKeyRequest = dataKey(operation.bytes, &pairs, { $0.keyID = $1 }, { $0.keySpec = $1 },
                                                                 { $0.numberOfBytes = $1 }, { $0.encryptionContext = $1 }) else { return nil }
            request.operation = .generateDataKey(r)
            contextField = 4
        default:
            guard let r: Kmsd_V1_GenerateDataKeyWithoutPlaintextRequest = dataKey(operation.bytes, &pairs, { $0.keyID = $1 }, { $0.keySpec = $1 },
                                                                                 { $0.numberOfBytes = $1 }, { $0.encryptionContext = $1 }) else { return nil }
            request.operation = .generateDataKeyWithoutPlaintext(r)
            contextField = 4
        }
        return (request, WireContexts(operation: operation.field, field: contextField, pairs: pairs))
    }

    /// Encrypt: key_id 1, plaintext 2, encryption_context 3, encryption_algorithm 4.
    private static func encrypt(_ bytes: UnsafeRawBufferPointer, _ pairs: inout [WirePair]) -> Kmsd_V1_EncryptRequest? {
        var r = Kmsd_V1_EncryptRequest()
        let ok = walk(bytes, contextField: 3, &pairs) { field, value, _ in
            switch field {
            case 1: guard let s = string(value) else { return false }; r.keyID = s
            case 2: r.plaintext = Data(value)
            default: guard let s = string(value) else { return false }; r.encryptionAlgorithm = s
            }
            return true
        }
        guard ok else {
            // The plaintext copied before the shape turned out unusual: zeroed where it is.
            r.plaintext.withUnsafeBytes { zeroizeInPlace($0) }
            return nil
        }
        r.encryptionContext = dictionary(pairs)
        return r
    }

    /// Decrypt: ciphertext_blob 1, encryption_context 2, key_id 3, encryption_algorithm 4.
    private static func decrypt(_ bytes: UnsafeRawBufferPointer, _ pairs: inout [WirePair]) -> Kmsd_V1_DecryptRequest? {
        var r = Kmsd_V1_DecryptRequest()
        let ok = walk(bytes, contextField: 2, &pairs) { field, value, _ in
            switch field {
            case 1: r.ciphertextBlob = Data(value)
            case 3: guard let s = string(value) else { return false }; r.keyID = s
            default: guard let s = string(value) else { return false }; r.encryptionAlgorithm = s
            }
            return true
        }
        guard ok else { return nil }
        r.encryptionContext = dictionary(pairs)
        return r
    }

    /// GenerateDataKey(WithoutPlaintext): key_id 1, key_spec 2, number_of_bytes 3 (a varint
    /// within 32 bits), encryption_context 4.
    private static func dataKey<R: SwiftProtobuf.Message>(
        _ bytes: UnsafeRawBufferPointer, _ pairs: inout [WirePair],
        _ keyID: (inout R, String) -> Void, _ keySpec: (inout R, String) -> Void,
        _ numberOfBytes: (inout R, UInt32) -> Void, _ context: (inout R, [String: String]) -> Void
    ) -> R? {
        var r = R()
        let ok = walk(bytes, contextField: 4, varintField: 3, &pairs) { field, value, number in
            switch field {
            case 3: guard number <= UInt64(UInt32.max) else { return false }; numberOfBytes(&r, UInt32(number))
            default:
                guard let s = string(value) else { return false }
                if field == 1 { keyID(&r, s) } else { keySpec(&r, s) }
            }
            return true
        }
        guard ok else { return nil }
        context(&r, dictionary(pairs))
        return r
    }

    /// Walks one operation message with fields 1...4: entries of `contextField` go to `pairs`;
    /// every other field must come once, length-delimited (or a varint for `varintField`), and
    /// is handed to `take` with its bytes or number. False when the message is not that shape
    /// or `take` refuses a value.
    private static func walk(_ bytes: UnsafeRawBufferPointer, contextField: Int, varintField: Int = 0, _ pairs: inout [WirePair],
                             _ take: (Int, UnsafeRawBufferPointer, UInt64) -> Bool) -> Bool {
        var seen: UInt8 = 0
        var reader = WireReader(bytes)
        while reader.offset < bytes.count {
            guard let (field, wireType) = reader.tag(), (1...4).contains(field) else { return false }
            if field == varintField {
                guard wireType == 0, once(field, &seen), let v = reader.varint(), take(field, UnsafeRawBufferPointer(start: nil, count: 0), v) else { return false }
                continue
            }
            guard wireType == 2, let value = reader.lengthDelimited() else { return false }
            if field == contextField {
                guard entry(value, &pairs) else { return false }
            } else {
                guard once(field, &seen), take(field, value, 0) else { return false }
            }
        }
        return true
    }

    /// One map entry `{1: key, 2: value}`, each at most once and valid UTF-8.
    private static func entry(_ bytes: UnsafeRawBufferPointer, _ pairs: inout [WirePair]) -> Bool {
        var reader = WireReader(bytes)
        var key: [UInt8] = [], value: [UInt8] = []
        var seen: UInt8 = 0
        while reader.offset < bytes.count {
            guard let (field, wireType) = reader.tag(), field == 1 || field == 2, wireType == 2, once(field, &seen),
                  let b = reader.lengthDelimited(), isUTF8(b) else { return false }
            if field == 1 { key = Array(b) } else { value = Array(b) }
        }
        pairs.append(WirePair(key: key, value: value))
        return true
    }

    /// Protobuf's map semantics: a key sent again replaces the earlier value.
    private static func dictionary(_ pairs: [WirePair]) -> [String: String] {
        guard !pairs.isEmpty else { return [:] }
        var d: [String: String] = Dictionary(minimumCapacity: pairs.count)
        for p in pairs { d[String(decoding: p.key, as: UTF8.self)] = String(decoding: p.value, as: UTF8.self) }
        return d
    }

    private static func once(_ field: Int, _ seen: inout UInt8) -> Bool {
        let bit = UInt8(1) << UInt8(field)
        guard seen & bit == 0 else { return false }
        seen |= bit
        return true
    }

    private static func string(_ bytes: UnsafeRawBufferPointer) -> String? {
        guard isUTF8(bytes) else { return nil }
        return String(decoding: bytes, as: UTF8.self)
    }

    private static func isUTF8(_ bytes: UnsafeRawBufferPointer) -> Bool {
        // ASCII, the common case, without the validator.
        if !bytes.contains(where: { $0 >= 0x80 }) { return true }
        return String(validating: bytes, as: UTF8.self) != nil
    }

    /// For the `request` fuzz target: false when the shortcut took `body` but read it
    /// differently from SwiftProtobuf (the request, or the pairs `WireContexts(scanning:)` finds).
    public static func agreesWithSwiftProtobuf(_ body: UnsafeRawBufferPointer) -> Bool {
        guard let (request, contexts) = decode(body) else { return true }
        guard let reference = try? KMSRequest(serializedBytes: Array(body)), reference == request else { return false }
        let scanned = WireContexts(scanning: body)
        return scanned.complete && [(30, 3), (31, 2), (33, 4), (34, 4)].allSatisfy {
            contexts.context(operation: $0.0, field: $0.1) == scanned.context(operation: $0.0, field: $0.1)
        }
    }
}
