import KMSCrypto
import KMSProtocol

/// The file envelope format v1 (PROTOCOL.md §16): a stream of any length encrypted in chunks
/// of AES-256-GCM under a per-file data key, which travels in the header encrypted by kmsd.
///
/// This module knows the format only (header, keys, chunks), with no transport: KMSClient's
/// `encryptFile`/`decryptFile` add kmsd (GenerateDataKey, Decrypt), and the fuzz target
/// (KMSServer's FuzzTargets) drives the reader. Everything here is synchronous.
public enum FileEnvelope {
    public static let magic: [UInt8] = Array("KMSDENVL".utf8)
    public static let version: UInt16 = 1
    public static let suite: UInt16 = 1
    public static let defaultChunkSize = 65_536
    public static let maxChunkSize = 16 * 1024 * 1024
    public static let maxContextBytes = 8192
    public static let maxContextPairs = 64
    public static let maxEncryptedDataKeyBytes = 6144
    public static let dataKeyBytes = 32
    static let tagBytes = 16
    /// magic, version, suite, chunk size, message id, context length.
    static let fixedHeaderBytes = 52
    static let keyLabel = Array("kmsd/v1/envelope-key".utf8)
    static let commitLabel = Array("kmsd/v1/envelope-commit".utf8)
    static let fullChunk: UInt8 = 0x00
    static let finalChunk: UInt8 = 0x01

    /// What an encrypted or decrypted file was.
    public struct Summary: Sendable {
        /// The kmsd key that encrypted the data key (as kmsd named it).
        public var keyID: String
        public var messageID: [UInt8]
        public var encryptionContext: [String: String]
        public var chunkSize: Int
        public var chunks: UInt64
        public var plaintextBytes: UInt64

        public init(keyID: String, messageID: [UInt8], encryptionContext: [String: String], chunkSize: Int, chunks: UInt64, plaintextBytes: UInt64) {
            self.keyID = keyID
            self.messageID = messageID
            self.encryptionContext = encryptionContext
            self.chunkSize = chunkSize
            self.chunks = chunks
            self.plaintextBytes = plaintextBytes
        }
    }

    /// The header fields of §16.1 (the tag is checked separately, once the key is known).
    public struct Header: Sendable {
        public var chunkSize: Int
        public var messageID: [UInt8]
        /// C(ctx), §9.3.
        public var canonicalContext: [UInt8]
        public var encryptionContext: [String: String]
        public var encryptedDataKey: [UInt8]
        public var commitment: [UInt8]
        public var tag: [UInt8]

        /// Header bytes 0 ... 86 + c + e − 1: what the header tag authenticates.
        var authenticatedBytes: [UInt8] {
            var out: [UInt8] = magic
            out.reserveCapacity(86 + canonicalContext.count + encryptedDataKey.count)
            out.appendBE(version); out.appendBE(suite); out.appendBE(UInt32(chunkSize))
            out += messageID
            out.appendBE(UInt32(canonicalContext.count)); out += canonicalContext
            out.appendBE(UInt16(encryptedDataKey.count)); out += encryptedDataKey
            out += commitment
            return out
        }
    }

    // MARK: - Keys

    /// The envelope key K and the commitment of §16.2.
    static func keys(dataKey: SecureBytes, messageID: [UInt8]) throws -> (key: SecureBytes, commitment: [UInt8]) {
        var suiteBytes: [UInt8] = []
        suiteBytes.appendBE(suite)
        let key = try HKDF.deriveKey(from: dataKey, salt: messageID, info: keyLabel + suiteBytes)
        let commitment = try HKDF.deriveKey(from: dataKey, salt: messageID, info: commitLabel + suiteBytes)
        return (key, commitment.unsafeCopyToArray())
    }

    // MARK: - Encryption context, C(ctx) of §9.3

    /// C(ctx): the pairs by ascending key bytes, each length-prefixed.
    public static func canonicalContext(_ context: [String: String]) throws(EnvelopeError) -> [UInt8] {
        guard context.count <= maxContextPairs else {
            throw EnvelopeError(.header, "the encryption context has \(context.count) pairs; a file envelope holds at most \(maxContextPairs)")
        }
        let pairs = context.map { WirePair(key: Array($0.key.utf8), value: Array($0.value.utf8)) }.sorted { $0.key.lexicographicallyPrecedes($1.key) }
        guard !pairs.contains(where: { $0.key.isEmpty }) else { throw EnvelopeError(.header, "encryption context keys must not be empty") }
        let out = WirePair.canonicalBytes(sorted: pairs)
        guard out.count <= maxContextBytes else {
            throw EnvelopeError(.header, "the encryption context is \(out.count) bytes in canonical form; at most \(maxContextBytes) fit a file envelope")
        }
        return out
    }

    /// The pairs of C(ctx) as bytes, in canonical order.
    static func contextPairs(_ c: [UInt8]) -> [(key: [UInt8], value: [UInt8])] {
        var reader = ByteCursor(c)
        guard let count = reader.u32() else { return [] }
        return (0..<count).compactMap { _ in
            guard let kn = reader.u32(), let k = reader.take(Int(kn)), let vn = reader.u32(), let v = reader.take(Int(vn)) else { return nil }
            return (k, v)
        }
    }

    /// Reads C(ctx) strictly (§16.1): count, lengths inside the field, non-empty keys in
    /// strictly ascending byte order, UTF-8, every byte used. Two keys whose bytes differ but
    /// that are the same text to Swift (NFC and NFD spellings) are refused: kmsd's Decrypt
    /// request carries the context as a map keyed by text (§16.1 allows this refusal).
    static func parseContext(_ c: [UInt8]) throws(EnvelopeError) -> [String: String] {
        var reader = ByteCursor(c)
        guard let count = reader.u32(), count <= UInt32(maxContextPairs) else {
            throw EnvelopeError(.header, "the encryption context field is malformed (pair count)")
        }
        var result: [String: String] = [:]
        var previous: [UInt8]?
        for _ in 0..<count {
            guard let kn = reader.u32(), let k = reader.take(Int(kn)), let vn = reader.u32(), let v = reader.take(Int(vn)) else {
                throw EnvelopeError(.header, "the encryption context field is malformed (a length runs past it)")
            }
            guard !k.isEmpty else { throw EnvelopeError(.header, "the encryption context has an empty key") }
            if let p = previous, !p.lexicographicallyPrecedes(k) {
                throw EnvelopeError(.header, "the encryption context keys are not in strictly ascending byte order")
            }
            previous = k
            guard let ks = String(validating: k, as: UTF8.self), let vs = String(validating: v, as: UTF8.self) else {
                throw EnvelopeError(.header, "the encryption context is not UTF-8")
            }
            guard result.updateValue(vs, forKey: ks) == nil else {
                throw EnvelopeError(.header, "the encryption context has two keys that are the same text")
            }
        }
        guard reader.isAtEnd else { throw EnvelopeError(.header, "the encryption context field has bytes after its pairs") }
        return result
    }

    // MARK: - Reading the header

    /// Reads and checks the header (§16.4 step 1).
    public static func readHeader(from input: inout some EnvelopeInput) throws -> Header {
        var fixed = [UInt8](repeating: 0, count: fixedHeaderBytes)
        try input.readExactly(&fixed, step: .header, what: "the header")
        guard Array(fixed[0..<8]) == magic else {
            throw EnvelopeError(.header, "this is not a kmsd file envelope (it does not begin with KMSDENVL)")
        }
        var cursor = ByteCursor(fixed)
        _ = cursor.take(8)
        let v = cursor.u16()!, s = cursor.u16()!, chunk = cursor.u32()!
        guard v == version else { throw EnvelopeError(.header, "file envelope version \(v) is not supported (this reader knows version \(version))") }
        guard s == suite else { throw EnvelopeError(.header, "file envelope suite \(s) is not supported (this reader knows suite \(suite))") }
        guard chunk >= 1, chunk <= UInt32(maxChunkSize) else {
            throw EnvelopeError(.header, "the chunk size \(chunk) is outside 1...\(maxChunkSize)")
        }
        let messageID = cursor.take(32)!
        let c = cursor.u32()!
        guard c >= 4, c <= UInt32(maxContextBytes) else {
            throw EnvelopeError(.header, "the encryption context field length \(c) is outside 4...\(maxContextBytes)")
        }
        var canonical = [UInt8](repeating: 0, count: Int(c))
        try input.readExactly(&canonical, step: .header, what: "the header")
        let context = try parseContext(canonical)
        var eBytes = [UInt8](repeating: 0, count: 2)
        try input.readExactly(&eBytes, step: .header, what: "the header")
        let e = Int(eBytes[0]) << 8 | Int(eBytes[1])
        guard e >= 1, e <= maxEncryptedDataKeyBytes else {
            throw EnvelopeError(.header, "the encrypted data key length \(e) is outside 1...\(maxEncryptedDataKeyBytes)")
        }
        var rest = [UInt8](repeating: 0, count: e + 32 + tagBytes)
        try input.readExactly(&rest, step: .header, what: "the header")
        return Header(chunkSize: Int(chunk), messageID: messageID, canonicalContext: canonical, encryptionContext: context,
                      encryptedDataKey: Array(rest[0..<e]), commitment: Array(rest[e..<e + 32]), tag: Array(rest[(e + 32)...]))
    }

    /// §16.4 step 2: every expected pair must be in the file's context with the same value,
    /// compared as UTF-8 bytes (as C(ctx) holds them; no Unicode normalisation).
    public static func checkExpectedContext(_ expected: [String: String], in header: Header) throws(EnvelopeError) {
        let pairs = contextPairs(header.canonicalContext)
        for (k, v) in expected.sorted(by: { Array($0.key.utf8).lexicographicallyPrecedes(Array($1.key.utf8)) }) {
            let key = Array(k.utf8)
            guard let pair = pairs.first(where: { $0.key == key }) else {
                let names = pairs.map { String(decoding: $0.key, as: UTF8.self) }.joined(separator: ", ")
                throw EnvelopeError(.context, "the file's encryption context has no key '\(k)' (its keys: \(names))")
            }
            guard pair.value == Array(v.utf8) else {
                throw EnvelopeError(.context, "the file's encryption context has another value for '\(k)' than the one expected")
            }
        }
    }

    // MARK: - Encryption

    /// Encrypts everything `input` yields into `output` (§16.1–16.3) under `dataKey`, whose
    /// kmsd-encrypted form is `encryptedDataKey`. `messageID` is random unless given (tests).
    public static func encrypt(dataKey: SecureBytes, encryptedDataKey: [UInt8], context: [String: String],
                               chunkSize: Int = defaultChunkSize, messageID: [UInt8]? = nil,
                               from input: inout some EnvelopeInput, to output: inout some EnvelopeOutput) throws -> (chunks: UInt64, plaintextBytes: UInt64, messageID: [UInt8]) {
        guard (1...maxChunkSize).contains(chunkSize) else {
            throw KMSError(.validation, "the chunk size must be 1...\(maxChunkSize) bytes, not \(chunkSize)")
        }
        guard dataKey.count == dataKeyBytes else { throw KMSError(.validation, "the data key must be \(dataKeyBytes) bytes") }
        guard (1...maxEncryptedDataKeyBytes).contains(encryptedDataKey.count) else {
            throw KMSError(.validation, "the encrypted data key must be 1...\(maxEncryptedDataKeyBytes) bytes")
        }
        let id = try messageID ?? SecureRandom.bytes(32)
        precondition(id.count == 32)
        let (key, commitment) = try keys(dataKey: dataKey, messageID: id)
        let canonical = try canonicalContext(context)
        let gcm = try AESGCMKey(key: key, encrypting: true)
        var header = Header(chunkSize: chunkSize, messageID: id, canonicalContext: canonical, encryptionContext: context,
                            encryptedDataKey: encryptedDataKey, commitment: commitment, tag: [])
        var headerBytes = header.authenticatedBytes
        var tag = [UInt8](repeating: 0, count: tagBytes)
        try headerBytes.withUnsafeBytes { aad in
            try tag.withUnsafeMutableBytes { t in
                try zeroNonce.withUnsafeBytes { n in try gcm.seal(nonce: n, aad: aad, inPlace: UnsafeMutableRawBufferPointer(start: nil, count: 0), tag: t) }
            }
        }
        header.tag = tag
        headerBytes += tag
        try headerBytes.withUnsafeBytes { try output.write($0) }

        // One buffer: 5 bytes for the type and length, the chunk, the tag.
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 5 + chunkSize + tagBytes, alignment: 16)
        defer {
            kmsExplicitBzero(buffer)
            buffer.deallocate()
        }
        var chunkNumber: UInt64 = 1
        var total: UInt64 = 0
        var meta = ChunkMeta(messageID: id)
        while true {
            let data = UnsafeMutableRawBufferPointer(rebasing: buffer[5..<(5 + chunkSize)])
            let got = try input.readFully(data)
            total += UInt64(got)
            let isFinal = got < chunkSize
            let type = isFinal ? finalChunk : fullChunk
            meta.set(chunk: chunkNumber, type: type, length: UInt32(got))
            let body = UnsafeMutableRawBufferPointer(rebasing: buffer[5..<(5 + got)])
            let tagSlot = UnsafeMutableRawBufferPointer(rebasing: buffer[(5 + got)..<(5 + got + tagBytes)])
            try meta.withNonceAndAAD { n, aad in try gcm.seal(nonce: n, aad: aad, inPlace: body, tag: tagSlot) }
            let start: Int
            if isFinal {
                buffer[0] = finalChunk
                buffer.storeBytes(of: UInt32(got).bigEndian, toByteOffset: 1, as: UInt32.self)
                start = 0
            } else {
                buffer[4] = fullChunk
                start = 4
            }
            try output.write(UnsafeRawBufferPointer(rebasing: buffer[start..<(5 + got + tagBytes)]))
            if isFinal { return (chunkNumber, total, id) }
            chunkNumber += 1
        }
    }

    // MARK: - Decryption

    /// §16.4 steps 4–7 for a header already read (and its context checked) and the data key
    /// kmsd gave back: writes each chunk's plaintext to `output` once its tag verified.
    public static func decrypt(header: Header, dataKey: SecureBytes,
                               from input: inout some EnvelopeInput, to output: inout some EnvelopeOutput) throws -> (chunks: UInt64, plaintextBytes: UInt64) {
        guard dataKey.count == dataKeyBytes else {
            throw EnvelopeError(.dataKey, "the data key kmsd returned is \(dataKey.count) bytes, not \(dataKeyBytes): this file was not made by encrypt-file")
        }
        let (key, commitment) = try keys(dataKey: dataKey, messageID: header.messageID)
        guard ConstantTime.equals(commitment, header.commitment) else {
            throw EnvelopeError(.commitment, "the key commitment does not match the data key: the header was altered or belongs to another file")
        }
        let gcm = try AESGCMKey(key: key, encrypting: false)
        do {
            try header.authenticatedBytes.withUnsafeBytes { aad in
                try header.tag.withUnsafeBytes { t in
                    try zeroNonce.withUnsafeBytes { n in try gcm.open(nonce: n, aad: aad, inPlace: UnsafeMutableRawBufferPointer(start: nil, count: 0), tag: t) }
                }
            }
        } catch CryptoError.authenticationFailure {
            throw EnvelopeError(.headerTag, "the header does not verify: it was altered")
        }
        let chunkSize = header.chunkSize
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkSize + tagBytes, alignment: 16)
        defer {
            kmsExplicitBzero(buffer)
            buffer.deallocate()
        }
        var meta = ChunkMeta(messageID: header.messageID)
        var chunkNumber: UInt64 = 1
        var total: UInt64 = 0
        var small = [UInt8](repeating: 0, count: 4)
        while true {
            guard let type = try input.readByte() else {
                throw EnvelopeError(.truncated, "the file ends before chunk \(chunkNumber): it was cut short (\(total) bytes of plaintext were verified)")
            }
            let length: Int
            switch type {
            case fullChunk:
                length = chunkSize
            case finalChunk:
                try input.readExactly(&small, step: .truncated, what: "chunk \(chunkNumber)")
                let n = Int(UInt32(small[0]) << 24 | UInt32(small[1]) << 16 | UInt32(small[2]) << 8 | UInt32(small[3]))
                guard n < chunkSize else {
                    throw EnvelopeError(.malformedChunk, "the final chunk (\(chunkNumber)) claims \(n) bytes; a final chunk holds fewer than the chunk size \(chunkSize)")
                }
                length = n
            default:
                throw EnvelopeError(.malformedChunk, "chunk \(chunkNumber) has type byte \(type); only 0 (full) and 1 (final) exist")
            }
            let record = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<(length + tagBytes)])
            try input.readExactly(record, step: .truncated, what: "chunk \(chunkNumber)")
            meta.set(chunk: chunkNumber, type: type, length: UInt32(length))
            let body = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<length])
            do {
                try meta.withNonceAndAAD { n, aad in
                    try gcm.open(nonce: n, aad: aad, inPlace: body, tag: UnsafeRawBufferPointer(rebasing: buffer[length..<(length + tagBytes)]))
                }
            } catch CryptoError.authenticationFailure {
                throw EnvelopeError(.chunkTag, "chunk \(chunkNumber) does not verify: it was altered, moved, duplicated or comes from another file")
            }
            try output.write(UnsafeRawBufferPointer(body))
            total += UInt64(length)
            if type == finalChunk { break }
            chunkNumber += 1
        }
        if try input.readByte() != nil {
            throw EnvelopeError(.trailing, "there are bytes after the final chunk: data was appended to the file")
        }
        return (chunkNumber, total)
    }

    static let zeroNonce = [UInt8](repeating: 0, count: 12)

    /// The iv and AAD of chunk i (§16.3), rewritten in place for each chunk.
    struct ChunkMeta {
        var nonce = [UInt8](repeating: 0, count: 12)
        var aad: [UInt8]

        init(messageID: [UInt8]) { aad = messageID + [UInt8](repeating: 0, count: 13) }

        mutating func set(chunk: UInt64, type: UInt8, length: UInt32) {
            for i in 0..<8 {
                let b = UInt8(truncatingIfNeeded: chunk >> (56 - 8 * UInt64(i)))
                nonce[4 + i] = b
                aad[32 + i] = b
            }
            aad[40] = type
            for i in 0..<4 { aad[41 + i] = UInt8(truncatingIfNeeded: length >> (24 - 8 * UInt32(i))) }
        }

        func withNonceAndAAD<R>(_ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) throws -> R) rethrows -> R {
            try nonce.withUnsafeBytes { n in try aad.withUnsafeBytes { a in try body(n, a) } }
        }
    }
}

/// Why a file envelope was refused: `step` is the step of PROTOCOL.md §16.4 that refused it
/// (the `fails_at` of vectors/envelope.json). Its code is always InvalidCiphertextException.
public struct EnvelopeError: Error, Sendable, CustomStringConvertible {
    public enum Step: String, Sendable {
        case header, context, dataKey = "datakey", commitment, headerTag = "header-tag"
        case truncated, malformedChunk = "malformed-chunk", chunkTag = "chunk-tag", trailing
    }

    public let step: Step
    public let message: String
    public var code: KMSErrorCode { .invalidCiphertext }

    public init(_ step: Step, _ message: String) {
        self.step = step
        self.message = message
    }

    public var description: String { "\(code.rawValue): \(message)" }
    public var kmsError: KMSError { KMSError(code, message) }
}

/// Reads big-endian fields from bytes.
struct ByteCursor {
    let bytes: [UInt8]
    var offset = 0

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    var isAtEnd: Bool { offset == bytes.count }

    mutating func take(_ n: Int) -> [UInt8]? {
        guard n >= 0, n <= bytes.count - offset else { return nil }
        defer { offset += n }
        return Array(bytes[offset..<(offset + n)])
    }

    mutating func u16() -> UInt16? { take(2).map { UInt16($0[0]) << 8 | UInt16($0[1]) } }
    mutating func u32() -> UInt32? { take(4).map { $0.reduce(0) { $0 << 8 | UInt32($1) } } }
}

extension Array where Element == UInt8 {
    package mutating func appendBE<T: FixedWidthInteger>(_ v: T) {
        Swift.withUnsafeBytes(of: v.bigEndian) { append(contentsOf: $0) }
    }
}
