import Foundation
import KMSCore
import KMSCrypto
import KMSProtocol

/// Encrypt, Decrypt, ReEncrypt, GenerateDataKey(WithoutPlaintext), GenerateRandom.
enum CryptoHandlers {
    static let algorithm = "SYMMETRIC_DEFAULT"

    static func checkAlgorithm(_ a: String) throws(KMSError) {
        if a.isEmpty || a == algorithm { return }  // every symmetric request
        if ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256", "SM2PKE"].contains(a) {
            throw KMSError(.invalidKeyUsage, "EncryptionAlgorithm \(a) needs an asymmetric key; symmetric keys use SYMMETRIC_DEFAULT")
        }
        guard a.isEmpty || a == algorithm else {
            throw KMSError(.validation, "EncryptionAlgorithm '\(a.prefix(40))' is not valid for a symmetric key; use SYMMETRIC_DEFAULT")
        }
    }

    static func encrypt(_ r: Kmsd_V1_EncryptRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_EncryptResponse {
        // The key and context the access decision was made on (Authorizer.sealing).
        let record = try ctx.decidedRecord()
        let pairs = try ctx.decidedContext(operation: 30, field: 3, decoded: r.encryptionContext)
        d.contextKeys = ctx.decidedAuditText(pairs, values: d.contextValues)
        try checkAlgorithm(r.encryptionAlgorithm)
        // The request's plaintext is used where SwiftProtobuf put it (Dispatcher zeroes it).
        let context = try ctx.decidedEncryptionContext(pairs)
        let sealed: KeyService.Sealed
        do {
            sealed = try r.plaintext.withUnsafeBytes { p in
                try ctx.service.encrypt(record: record, plaintext: p, context: context)
            }
        } catch let error as KMSError { throw error } catch { throw KMSError(.internalError, "encryption failed inside kmsd") }
        // The decision noted the sealing key's id already (the record sealed under is the one decided on).
        if d.keyID.isEmpty { d.keyID = sealed.keyID.description }
        let keyID = d.keyID
        d.keyVersion = sealed.keyVersion
        return .with {
            $0.ciphertextBlob = .init(sealed.blob)
            $0.keyID = keyID
            $0.encryptionAlgorithm = algorithm
        }
    }

    static func decrypt(_ r: Kmsd_V1_DecryptRequest, _ ctx: HandlerContext, _ d: inout AuditDetails,
                        _ secret: inout ResponseSecret?) throws(KMSError) -> Kmsd_V1_DecryptResponse {
        // A memo entry of Decrypt is one decided on the blob's key, whose id it noted.
        noteBlob(r.ciphertextBlob, into: &d, keyIDNoted: ctx.decided.remembered != nil)
        if case let a = AuditDetails.alias(requested: r.keyID), !a.isEmpty { d.alias = a }
        let pairs = try ctx.decidedContext(operation: 31, field: 2, decoded: r.encryptionContext)
        d.contextKeys = ctx.decidedAuditText(pairs, values: d.contextValues)
        try checkAlgorithm(r.encryptionAlgorithm)
        let opened = try ctx.service.decrypt(blob: Array(r.ciphertextBlob), context: ctx.decidedEncryptionContext(pairs), keyID: r.keyID,
                                             caller: ctx.principal, decided: ctx.decided.remembered?.record)
        // The plaintext travels from locked memory straight into the frame (ResponseSecret).
        secret = ResponseSecret(operationField: 31, field: 2, bytes: opened.plaintext)
        // noteBlob wrote the blob's key id, the key that opened it, as text already.
        let keyID = d.keyID.isEmpty ? opened.keyID.description : d.keyID
        return .with {
            $0.keyID = keyID
            $0.encryptionAlgorithm = algorithm
            $0.keyVersion = opened.keyVersion
        }
    }

    static func reEncrypt(_ r: Kmsd_V1_ReEncryptRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_ReEncryptResponse {
        noteBlob(r.ciphertextBlob, into: &d)
        d.sourceKeyID = d.keyID
        d.sourceKeyVersion = d.keyVersion
        if case let a = AuditDetails.alias(requested: r.sourceKeyID), !a.isEmpty { d.sourceAlias = a }
        d.noteKey(requested: r.destinationKeyID)
        d.keyVersion = nil
        let source = try ctx.context(operation: 32, field: 2, decoded: r.sourceEncryptionContext)
        let destination = try ctx.context(operation: 32, field: 5, decoded: r.destinationEncryptionContext)
        d.contextKeys = EncryptionContext.auditText(destination, values: d.contextValues)
        d.sourceContextKeys = EncryptionContext.auditText(source, values: d.sourceContextValues)
        let result = try ctx.service.reEncrypt(blob: Array(r.ciphertextBlob), sourceContext: EncryptionContext(pairs: source),
                                               sourceKeyID: r.sourceKeyID, destinationKeyID: r.destinationKeyID,
                                               destinationContext: EncryptionContext(pairs: destination), caller: ctx.principal)
        d.keyID = result.sealed.keyID.description
        d.keyVersion = result.sealed.keyVersion
        return .with {
            $0.ciphertextBlob = .init(result.sealed.blob)
            $0.sourceKeyID = result.source.keyID.description
            $0.keyID = result.sealed.keyID.description
            $0.sourceKeyVersion = result.source.keyVersion
        }
    }

    /// The shared half of GenerateDataKey and GenerateDataKeyWithoutPlaintext.
    static func dataKey(keySpec: String, numberOfBytes: UInt32, _ ctx: HandlerContext, _ d: inout AuditDetails,
                        operation: Int, context decoded: [String: String]) throws(KMSError) -> (plaintext: SecureBytes, sealed: KeyService.Sealed) {
        // The key and context the access decision was made on (Authorizer.sealing).
        let record = try ctx.decidedRecord()
        let pairs = try ctx.decidedContext(operation: operation, field: 4, decoded: decoded)
        d.contextKeys = ctx.decidedAuditText(pairs, values: d.contextValues)
        let result = try ctx.service.generateDataKey(record: record, keySpec: keySpec, numberOfBytes: numberOfBytes,
                                                     context: ctx.decidedEncryptionContext(pairs))
        // The decision noted the sealing key's id already (the record sealed under is the one decided on).
        if d.keyID.isEmpty { d.keyID = result.sealed.keyID.description }
        d.keyVersion = result.sealed.keyVersion
        return result
    }

    static func generateDataKey(_ r: Kmsd_V1_GenerateDataKeyRequest, _ ctx: HandlerContext, _ d: inout AuditDetails,
                                _ secret: inout ResponseSecret?) throws(KMSError) -> Kmsd_V1_GenerateDataKeyResponse {
        let result = try dataKey(keySpec: r.keySpec, numberOfBytes: r.numberOfBytes, ctx, &d, operation: 33, context: r.encryptionContext)
        secret = ResponseSecret(operationField: 33, field: 2, bytes: result.plaintext)
        let keyID = d.keyID  // the sealing key's id, as dataKey noted it
        return .with {
            $0.ciphertextBlob = .init(result.sealed.blob)
            $0.keyID = keyID
        }
    }

    static func generateDataKeyWithoutPlaintext(_ r: Kmsd_V1_GenerateDataKeyWithoutPlaintextRequest, _ ctx: HandlerContext,
                                                _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_GenerateDataKeyWithoutPlaintextResponse {
        let result = try dataKey(keySpec: r.keySpec, numberOfBytes: r.numberOfBytes, ctx, &d, operation: 34, context: r.encryptionContext)
        let keyID = d.keyID
        return .with {
            $0.ciphertextBlob = .init(result.sealed.blob)
            $0.keyID = keyID
        }
    }

    static func generateRandom(_ r: Kmsd_V1_GenerateRandomRequest, _ ctx: HandlerContext) throws(KMSError) -> Kmsd_V1_GenerateRandomResponse {
        let bytes = try ctx.service.generateRandom(count: r.numberOfBytes)
        return .with { $0.plaintext = .init(bytes) }
    }

    /// Records the key id and version a blob names, for the audit record, when it parses.
    /// `keyIDNoted`: the decision was made on the blob's key and noted its id already.
    static func noteBlob(_ blob: Data, into d: inout AuditDetails, keyIDNoted: Bool = false) {
        if let named = SymmetricCiphertext.keyReference(of: blob) {
            if !keyIDNoted {
                // Usually the decision has named this key already (the same text, not made again).
                let id = named.keyID.description
                if d.keyID != id { d.keyID = id }
            }
            d.keyVersion = named.keyVersion
        }
    }
}
