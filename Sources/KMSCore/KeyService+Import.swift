import Foundation
import KMSCrypto
import KMSProtocol
import Synchronization

/// Bring your own key: GetParametersForImport, ImportKeyMaterial, DeleteImportedKeyMaterial,
/// and the expiry of imported material.
///
/// A key created with Origin EXTERNAL starts PendingImport. GetParametersForImport hands out
/// a fresh RSA public key and an import token (24 hours, single use, for that key only; the
/// private key stays in OpenSSL's locked heap and is never stored). ImportKeyMaterial unwraps
/// the material with it and stores it wrapped under the root key like any other material. The
/// first import fixes the material: later imports into the key must bring the same bytes.
extension KeyService {
    public enum WrappingAlgorithm: String, Sendable, CaseIterable {
        case oaepSHA256 = "RSAES_OAEP_SHA_256"
        case oaepSHA1 = "RSAES_OAEP_SHA_1"
        case aesKeyWrapSHA256 = "RSA_AES_KEY_WRAP_SHA_256"
        case aesKeyWrapSHA1 = "RSA_AES_KEY_WRAP_SHA_1"

        var digest: OAEPDigest { self == .oaepSHA1 || self == .aesKeyWrapSHA1 ? .sha1 : .sha256 }
        var wrapsWithAES: Bool { self == .aesKeyWrapSHA256 || self == .aesKeyWrapSHA1 }
    }

    public struct ImportParameters: Sendable {
        public let keyID: KeyID
        public let importToken: [UInt8]
        public let publicKey: [UInt8]
        public let validTo: Date
    }

    static let expiresModel = "KEY_MATERIAL_EXPIRES"
    static let doesNotExpireModel = "KEY_MATERIAL_DOES_NOT_EXPIRE"
    static let importTokenSeconds: TimeInterval = 24 * 3600
    static let maxValidToSeconds: TimeInterval = 365 * 86_400

    /// A wrapping key pair and import token for an EXTERNAL key that is not pending deletion.
    public func getParametersForImport(_ keyID: String, algorithm: String, keySpec: String,
                                       caller: Principal) throws(KMSError) -> ImportParameters {
        guard let wrapping = WrappingAlgorithm(rawValue: algorithm) else {
            throw KMSError(.validation, "WrappingAlgorithm must be one of \(WrappingAlgorithm.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        let bits: Int
        switch keySpec {
        case "RSA_2048": bits = 2048
        case "RSA_3072": bits = 3072
        case "RSA_4096": bits = 4096
        default: throw KMSError(.validation, "WrappingKeySpec must be RSA_2048, RSA_3072 or RSA_4096")
        }
        let record = try importableRecord(try KeyID(parsing: keyID), caller: caller)
        let key: RSAPrivateKey
        let publicKey: [UInt8]
        let token: [UInt8]
        do {
            key = try RSAPrivateKey.generate(bits: bits)
            publicKey = try key.publicKeyDER()
            token = try SecureRandom.bytes(32)
        } catch {
            throw KMSError(.internalError, "could not make a wrapping key inside kmsd (\(error))")
        }
        let validTo = Date(timeIntervalSince1970: (clock().timeIntervalSince1970 + Self.importTokenSeconds).rounded(.down))
        importTokens.add(ImportTokens.Entry(token: token, keyID: record.keyID, algorithm: wrapping, key: key, validTo: validTo), now: clock())
        return ImportParameters(keyID: record.keyID, importToken: token, publicKey: publicKey, validTo: validTo)
    }

    /// What an ImportKeyMaterial changed: the record before and after.
    public struct Import: Sendable {
        public let before: KeyRecord
        public let after: KeyRecord
        /// True when the material was stored now (the key awaited it); false when the key
        /// already held it and only its expiry changed.
        public let storedMaterial: Bool
    }

    /// Imports material wrapped with the token's public key. PendingImport → Enabled; a key
    /// that already holds its material takes the same material again (new expiry).
    public func importKeyMaterial(_ keyID: String, importToken: [UInt8], encryptedKeyMaterial: [UInt8],
                                  expirationModel: String, validTo: Int64, caller: Principal) throws(KMSError) -> Import {
        let now = clock()
        let model = expirationModel.isEmpty ? Self.expiresModel : expirationModel
        var expiry: Date? = nil
        switch model {
        case Self.expiresModel:
            guard validTo > 0 else {
                throw KMSError(.validation, "ValidTo is required with ExpirationModel KEY_MATERIAL_EXPIRES (the default, as in AWS KMS); give a time up to 365 days ahead, or ExpirationModel KEY_MATERIAL_DOES_NOT_EXPIRE")
            }
            let date = Date(timeIntervalSince1970: TimeInterval(validTo))
            guard date > now, date.timeIntervalSince(now) <= Self.maxValidToSeconds else {
                throw KMSError(.validation, "ValidTo must be in the future and at most 365 days ahead")
            }
            expiry = date
        case Self.doesNotExpireModel:
            guard validTo == 0 else { throw KMSError(.validation, "ValidTo must be omitted with ExpirationModel KEY_MATERIAL_DOES_NOT_EXPIRE") }
        default:
            throw KMSError(.validation, "ExpirationModel must be KEY_MATERIAL_EXPIRES or KEY_MATERIAL_DOES_NOT_EXPIRE")
        }
        guard !importToken.isEmpty else { throw KMSError(.validation, "ImportToken is required: pass the token from GetParametersForImport") }
        guard !encryptedKeyMaterial.isEmpty else { throw KMSError(.validation, "EncryptedKeyMaterial is required: the material wrapped with the public key from GetParametersForImport") }
        let id = try KeyID(parsing: keyID)
        _ = try importableRecord(id, caller: caller)
        // Single use: the token is gone from here on, whatever becomes of this import.
        let entry = try importTokens.take(importToken, keyID: id, now: now)
        let material = try unwrap(encryptedKeyMaterial, with: entry)
        guard material.count == 32 else {
            throw KMSError(.incorrectKeyMaterial, "the imported material is \(material.count) bytes; a SYMMETRIC_DEFAULT key takes exactly 32 (a 256-bit key)")
        }
        let check: Data
        do { check = try repository.materialCheck(material, keyID: id) } catch {
            throw KMSError(.internalError, "the imported material could not be checked inside kmsd (\(error))")
        }
        return try locked(id) { () throws(KMSError) -> Import in
            let before = try importableRecord(id, caller: caller)
            if let known = before.importedMaterialCheck, !ConstantTime.equals(Array(known), Array(check)) {
                throw KMSError(.incorrectKeyMaterial, "key \(id) was given other material before; only that same material can be imported into it again")
            }
            var after = before
            after.importedMaterialCheck = check
            after.expirationModel = model
            after.validTo = expiry
            let storing = before.awaitsMaterial
            if storing, after.state == .pendingImport { after.state = .enabled }
            do {
                if storing {
                    try repository.importMaterial(after, material: material, at: now)
                } else {
                    try repository.update(after)
                }
            } catch {
                throw KMSError(.internalError, "the imported material could not be stored (\(error)); nothing was changed")
            }
            return Import(before: before, after: after, storedMaterial: storing)
        }
    }

    /// Undoes an import whose audit record was refused, unless the key changed since.
    public func undoImport(_ change: Import) throws {
        try locked(change.after.keyID) {
            guard try repository.record(change.after.keyID) == change.after else { return }
            if change.storedMaterial { try repository.removeMaterial(change.before) } else { try repository.update(change.before) }
        }
    }

    /// Deletes the imported material: the key goes to PendingImport until the same material is
    /// imported again; a key PendingDeletion stays so (as AWS KMS: its deletion still comes,
    /// and a cancelled deletion leaves it PendingImport). Nothing to do while PendingImport.
    public func deleteImportedKeyMaterial(_ keyID: String, caller: Principal) throws(KMSError) -> KeyService.Change {
        let id = try KeyID(parsing: keyID)
        return try locked(id) { () throws(KMSError) -> Change in
            let before = try usableRecord(id, caller: caller, needsEnabled: false)
            try Self.requireExternal(before)
            guard !before.awaitsMaterial else { return Change(before: before, after: before) }
            let after = Self.withoutMaterial(before)
            do { try repository.removeMaterial(after) } catch {
                throw KMSError(.internalError, "the imported material could not be deleted (\(error)); nothing was changed")
            }
            return Change(before: before, after: after)
        }
    }

    /// Deletes imported material whose ValidTo has passed; returns the keys it was deleted from.
    public func expireDueMaterial() throws -> Sweep<KeyID> {
        let now = clock()
        return try sweep(due: { try repository.dueForExpiry(at: now, limit: $0) }) { r in
            guard !r.awaitsMaterial, let due = r.validTo, due <= now else { return nil }
            try repository.removeMaterial(Self.withoutMaterial(r))
            return r.keyID
        }
    }

    /// The record once its material is gone: PendingImport (a key pending deletion stays so).
    static func withoutMaterial(_ r: KeyRecord) -> KeyRecord {
        var after = r
        after.expirationModel = nil
        after.validTo = nil
        if after.state != .pendingDeletion { after.state = .pendingImport }
        return after
    }

    static func requireExternal(_ r: KeyRecord) throws(KMSError) {
        guard r.origin == KeyRecord.externalOrigin else {
            throw KMSError(.unsupportedOperation, "key \(r.keyID) has Origin \(r.origin): kmsd made its material, so none can be imported or deleted; create a key with Origin EXTERNAL for that")
        }
    }

    /// An EXTERNAL key the caller may use that can take material now (not pending deletion).
    private func importableRecord(_ id: KeyID, caller: Principal) throws(KMSError) -> KeyRecord {
        let record = try usableRecord(id, caller: caller, needsEnabled: false)
        try Self.requireExternal(record)
        guard record.state != .pendingDeletion else { throw Self.invalidState(record, "given key material") }
        return record
    }

    /// The material inside EncryptedKeyMaterial: RSA-OAEP of the material itself, or RSA-OAEP
    /// of an AES key followed by the material under AES key wrap with padding (RFC 5649).
    private func unwrap(_ encrypted: [UInt8], with entry: ImportTokens.Entry) throws(KMSError) -> SecureBytes {
        let failed = KMSError(.invalidCiphertext, "EncryptedKeyMaterial could not be unwrapped with this import token's public key and wrapping algorithm \(entry.algorithm.rawValue); wrap the material again with the public key from the same GetParametersForImport answer")
        let rsaBytes = entry.key.bits / 8
        do {
            guard entry.algorithm.wrapsWithAES else { return try entry.key.decryptOAEP(encrypted, digest: entry.algorithm.digest) }
            guard encrypted.count > rsaBytes else { throw failed }
            let aesKey = try entry.key.decryptOAEP(Array(encrypted[..<rsaBytes]), digest: entry.algorithm.digest)
            guard [16, 24, 32].contains(aesKey.count) else { throw failed }
            return try AESKeyWrap.unwrap(key: aesKey, wrapped: Array(encrypted[rsaBytes...]))
        } catch {
            throw failed
        }
    }
}

/// Outstanding import tokens, in memory only: a restart invalidates them all.
final class ImportTokens: Sendable {
    struct Entry: Sendable {
        let token: [UInt8]
        let keyID: KeyID
        let algorithm: KeyService.WrappingAlgorithm
        let key: RSAPrivateKey
        let validTo: Date
    }

    /// At most this many outstanding per key and in all; the oldest go first.
    static let perKey = 8
    static let total = 64
    private let entries = Mutex<[Entry]>([])

    func add(_ entry: Entry, now: Date) {
        entries.withLock { list in
            list.removeAll { $0.validTo.addingTimeInterval(3600) < now }  // long expired
            if list.filter({ $0.keyID == entry.keyID }).count >= Self.perKey,
               let oldest = list.firstIndex(where: { $0.keyID == entry.keyID }) {
                list.remove(at: oldest)
            }
            if list.count >= Self.total { list.removeFirst() }
            list.append(entry)
        }
    }

    /// Removes and returns the token's entry: InvalidImportTokenException when it is unknown
    /// (never issued, already used, or issued before a restart) or for another key,
    /// ExpiredImportTokenException when its 24 hours have passed.
    func take(_ token: [UInt8], keyID: KeyID, now: Date) throws(KMSError) -> Entry {
        let found: Entry? = entries.withLock { list in
            guard let i = list.firstIndex(where: { ConstantTime.equals($0.token, token) && $0.keyID == keyID }) else { return nil }
            return list.remove(at: i)
        }
        guard let entry = found else {
            throw KMSError(.invalidImportToken, "ImportToken is not an unused token for key \(keyID): tokens are single use, belong to one key, and do not survive a restart of kmsd; call GetParametersForImport again")
        }
        guard entry.validTo > now else {
            throw KMSError(.expiredImportToken, "ImportToken expired on \(KeyService.date(entry.validTo)); call GetParametersForImport again")
        }
        return entry
    }
}
