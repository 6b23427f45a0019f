import Foundation
import KMSCrypto
import KMSEnvelope

/// File envelope encryption (PROTOCOL.md §16) with a kmsd key: one GenerateDataKey per file to
/// encrypt, one Decrypt per file to decrypt; the bulk work is AES-256-GCM in this process.
///
/// The streams are read and written synchronously on the calling task's thread.
extension KMSClient {
    /// Encrypts everything `input` yields into `output` as a file envelope under a fresh data
    /// key from `keyID` with `context`. Returns what was written.
    public func encryptFile(keyID: String, context: [String: String] = [:], chunkSize: Int = FileEnvelope.defaultChunkSize,
                            from input: inout some EnvelopeInput, to output: inout some EnvelopeOutput) async throws -> FileEnvelope.Summary {
        // Refuse a context the header cannot hold before kmsd makes a data key for it.
        _ = try FileEnvelope.canonicalContext(context)
        guard (1...FileEnvelope.maxChunkSize).contains(chunkSize) else {
            throw KMSError(.validation, "the chunk size must be 1...\(FileEnvelope.maxChunkSize) bytes, not \(chunkSize)")
        }
        var response = try await generateDataKey(keyID: keyID, keySpec: "AES_256", context: context)
        let dataKey = try Self.takeSecret(&response.plaintext)
        let written = try FileEnvelope.encrypt(dataKey: dataKey, encryptedDataKey: Array(response.ciphertextBlob), context: context,
                                               chunkSize: chunkSize, from: &input, to: &output)
        return FileEnvelope.Summary(keyID: response.keyID, messageID: written.messageID, encryptionContext: context,
                                    chunkSize: chunkSize, chunks: written.chunks, plaintextBytes: written.plaintextBytes)
    }

    /// Decrypts a file envelope from `input` into `output`. Each pair of `expectedContext` must
    /// be in the file's encryption context (§16.4 step 2); `keyID`, when given, must be the key
    /// that encrypted the data key. A thrown error after some output was written means that
    /// output is incomplete and must be discarded.
    public func decryptFile(expectedContext: [String: String] = [:], keyID: String = "",
                            from input: inout some EnvelopeInput, to output: inout some EnvelopeOutput) async throws -> FileEnvelope.Summary {
        let header = try FileEnvelope.readHeader(from: &input)
        try FileEnvelope.checkExpectedContext(expectedContext, in: header)
        var response = try await decrypt(ciphertextBlob: header.encryptedDataKey, context: header.encryptionContext, keyID: keyID)
        let dataKey = try Self.takeSecret(&response.plaintext)
        let read = try FileEnvelope.decrypt(header: header, dataKey: dataKey, from: &input, to: &output)
        return FileEnvelope.Summary(keyID: response.keyID, messageID: header.messageID, encryptionContext: header.encryptionContext,
                                    chunkSize: header.chunkSize, chunks: read.chunks, plaintextBytes: read.plaintextBytes)
    }

    // MARK: - Messages in memory, with an optional data-key cache

    /// Encrypts one message in memory as a file envelope (PROTOCOL.md §16). With `cache`, the
    /// data key may come from an earlier message for the same `keyID` and `context` (within the
    /// cache's limits) instead of a GenerateDataKey round trip.
    public func encryptMessage(keyID: String, plaintext: [UInt8], context: [String: String] = [:],
                               cache: DataKeyCache? = nil) async throws -> [UInt8] {
        let canonical = try FileEnvelope.canonicalContext(context)
        let slot = DataKeyCache.encryptionSlot(keyID: keyID, canonicalContext: canonical)
        let size = UInt64(plaintext.count)
        let entry: DataKeyCache.Entry
        if let cache, let cached = cache.takeForEncryption(slot: slot, bytes: size) {
            entry = cached
        } else {
            var response = try await generateDataKey(keyID: keyID, keySpec: "AES_256", context: context)
            entry = DataKeyCache.Entry(dataKey: try Self.takeSecret(&response.plaintext), encryptedDataKey: Array(response.ciphertextBlob))
            cache?.storeForEncryption(slot: slot, entry: entry, bytes: size)
        }
        var input = BytesInput(plaintext)
        var output = BytesOutput()
        output.bytes.reserveCapacity(plaintext.count + 160 + canonical.count + entry.encryptedDataKey.count)
        _ = try FileEnvelope.encrypt(dataKey: entry.dataKey, encryptedDataKey: entry.encryptedDataKey, context: context,
                                     chunkSize: FileEnvelope.defaultChunkSize, from: &input, to: &output)
        return output.bytes
    }

    /// Decrypts a message made by `encryptMessage` (or any file envelope held in memory).
    /// With `cache`, a data key opened for an earlier message with the same encrypted data
    /// key, context and `keyID` is reused (within the cache's age limit) instead of a Decrypt
    /// round trip.
    public func decryptMessage(_ message: [UInt8], expectedContext: [String: String] = [:], keyID: String = "",
                               cache: DataKeyCache? = nil) async throws -> [UInt8] {
        var input = BytesInput(message)
        let header = try FileEnvelope.readHeader(from: &input)
        try FileEnvelope.checkExpectedContext(expectedContext, in: header)
        let slot = DataKeyCache.decryptionSlot(encryptedDataKey: header.encryptedDataKey, canonicalContext: header.canonicalContext, keyID: keyID)
        let dataKey: SecureBytes
        if let cache, let cached = cache.takeForDecryption(slot: slot) {
            dataKey = cached.dataKey
        } else {
            var response = try await decrypt(ciphertextBlob: header.encryptedDataKey, context: header.encryptionContext, keyID: keyID)
            dataKey = try Self.takeSecret(&response.plaintext)
            cache?.storeForDecryption(slot: slot, entry: .init(dataKey: dataKey, encryptedDataKey: header.encryptedDataKey))
        }
        var output = BytesOutput()
        output.bytes.reserveCapacity(message.count)
        _ = try FileEnvelope.decrypt(header: header, dataKey: dataKey, from: &input, to: &output)
        return output.bytes
    }

    /// Moves secret bytes out of a decoded response into locked memory and zeroes the
    /// response's copy (in place: the response is the only owner here).
    static func takeSecret(_ data: inout Data) throws -> SecureBytes {
        let secret = try data.withUnsafeMutableBytes { raw in
            defer { kmsExplicitBzero(raw) }
            return try SecureBytes(copying: UnsafeRawBufferPointer(raw))
        }
        data = Data()
        return secret
    }
}
