import Foundation
import KMSClient
import KMSCrypto
import KMSProtocol
import Testing

/// Bring your own key: material wrapped by `openssl` (a tool kmsd did not write), imported
/// through kmsctl, used by kmsd, checked against the documented ciphertext format, and never
/// found in the state directory; expiry, deletion and re-import of the same material only.
@Suite(.serialized)
final class ImportTests {
    let daemon: Daemon
    let client: KMSClient
    let work: String
    let clockFile: String

    init() throws {
        work = try Paths.tempDir("import-work")
        clockFile = work + "/clock"
        try "0".write(toFile: clockFile, atomically: true, encoding: .utf8)
        daemon = try Daemon(arguments: ["--dev-clock-file", clockFile])
        client = daemon.client()
    }

    deinit {
        daemon.stop()
        try? FileManager.default.removeItem(atPath: work)
    }

    func kmsctl(_ args: [String]) throws -> ProcessResult {
        try run(Paths.kmsctl, args, env: ["KMSD_SOCKET": daemon.socket])
    }

    func openssl(_ args: [String]) throws {
        let r = try run("/usr/bin/openssl", args)
        // Only the subcommand: the arguments may hold a wrapping key (-K).
        #expect(r.status == 0, "openssl \(args.first ?? ""): \(r.stderr)")
    }

    func write(_ bytes: [UInt8], _ name: String) throws -> String {
        let path = work + "/" + name
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        return path
    }

    /// get-parameters-for-import through kmsctl --json: the public key (DER) and token files.
    func parameters(_ key: String, algorithm: String, spec: String) throws -> (publicKey: String, token: String) {
        let r = try kmsctl(["get-parameters-for-import", "--key-id", key, "--wrapping-algorithm", algorithm,
                            "--wrapping-key-spec", spec, "--json"])
        #expect(r.status == 0, "\(r.stderr)")
        let json = try #require(try JSONSerialization.jsonObject(with: r.stdout) as? [String: Any])
        #expect(json["KeyId"] as? String == key)
        let validTo = try #require(json["ParametersValidTo"] as? Int)
        #expect(abs(validTo - Int(Date().timeIntervalSince1970) - 86_400) < 120, "valid for 24 hours")
        let publicKey = try #require(Data(base64Encoded: json["PublicKey"] as? String ?? ""))
        let token = try #require(Data(base64Encoded: json["ImportToken"] as? String ?? ""))
        let tag = UUID().uuidString.prefix(8)
        return (try write(Array(publicKey), "pub-\(tag).der"), try write(Array(token), "token-\(tag).bin"))
    }

    /// RSAES-OAEP-SHA256 with openssl pkeyutl.
    func wrapOAEP(_ materialPath: String, publicKey: String) throws -> String {
        let out = materialPath + ".oaep-\(UUID().uuidString.prefix(8))"
        try openssl(["pkeyutl", "-encrypt", "-pubin", "-keyform", "DER", "-inkey", publicKey, "-in", materialPath, "-out", out,
                     "-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256"])
        return out
    }

    /// RSA_AES_KEY_WRAP_SHA_256 with openssl, as AWS documents it: a fresh AES-256 key under
    /// RSA-OAEP-SHA256, then the material under AES key wrap with padding (RFC 5649).
    func wrapAESKeyWrap(_ materialPath: String, publicKey: String) throws -> String {
        let aes = try write(try SecureRandom.bytes(32), "aes-\(UUID().uuidString.prefix(8)).bin")
        let hex = try Data(contentsOf: URL(fileURLWithPath: aes)).map { String(format: "%02x", $0) }.joined()
        let wrappedKey = try wrapOAEP(aes, publicKey: publicKey)
        let wrappedMaterial = materialPath + ".kwp"
        try openssl(["enc", "-id-aes256-wrap-pad", "-K", hex, "-iv", "A65959A6", "-in", materialPath, "-out", wrappedMaterial])
        let combined = try Data(contentsOf: URL(fileURLWithPath: wrappedKey)) + Data(contentsOf: URL(fileURLWithPath: wrappedMaterial))
        return try write(Array(combined), "combined-\(UUID().uuidString.prefix(8)).bin")
    }

    func importMaterial(_ key: String, wrapped: String, token: String, extra: [String] = ["--expiration-model", "KEY_MATERIAL_DOES_NOT_EXPIRE"]) throws -> ProcessResult {
        try kmsctl(["import-key-material", "--key-id", key, "--encrypted-key-material", "fileb://" + wrapped,
                    "--import-token", "fileb://" + token] + extra)
    }

    /// Opens a blob with the known material, following PROTOCOL.md §9 only.
    static func openDocumented(_ blob: [UInt8], material: [UInt8], context: [String: String]) throws -> [UInt8] {
        try #require(blob.count > 82 && blob[0] == 1 && blob[1] == 1)
        let header = Array(blob[0..<66]), salt = Array(blob[22..<54]), nonce = Array(blob[54..<66])
        var messageKey = [UInt8](repeating: 0, count: 32)
        let info = Array("kmsd/v1/symmetric-message-key".utf8) + header
        try material.withUnsafeBytes { m in try salt.withUnsafeBytes { s in try info.withUnsafeBytes { i in
            try messageKey.withUnsafeMutableBytes { try HKDF.derive(ikm: m, salt: s, info: i, into: $0) }
        } } }
        var aad: [UInt8] = header  // AAD = H ‖ C(ctx) (§9.4)
        func u32(_ n: Int) { aad += [UInt8(n >> 24 & 0xff), UInt8(n >> 16 & 0xff), UInt8(n >> 8 & 0xff), UInt8(n & 0xff)] }
        u32(context.count)
        for (k, v) in context.sorted(by: { Array($0.key.utf8).lexicographicallyPrecedes(Array($1.key.utf8)) }) {
            u32(k.utf8.count); aad += Array(k.utf8); u32(v.utf8.count); aad += Array(v.utf8)
        }
        let sealed = Array(blob[66...])
        var out = [UInt8](repeating: 0, count: sealed.count - 16)
        try messageKey.withUnsafeBytes { k in try nonce.withUnsafeBytes { n in try sealed.withUnsafeBytes { c in
            try aad.withUnsafeBytes { a in try out.withUnsafeMutableBytes { o in
                try AESGCM.open(key: k, nonce: n, ciphertext: UnsafeRawBufferPointer(rebasing: c[0..<(sealed.count - 16)]),
                                tag: UnsafeRawBufferPointer(rebasing: c[(sealed.count - 16)...]), aad: a, into: o)
            } }
        } } }
        return out
    }

    /// Every file under `dir` (the keystore, its WAL, everything) searched for `needle` raw,
    /// as hex and as base64.
    static func occurrences(of needle: [UInt8], under dir: String) -> [String] {
        let forms: [(String, [UInt8])] = [
            ("raw", needle),
            ("hex", Array(needle.map { String(format: "%02x", $0) }.joined().utf8)),
            ("HEX", Array(needle.map { String(format: "%02X", $0) }.joined().utf8)),
            ("base64", Array(Data(needle).base64EncodedString().utf8)),
        ]
        var found: [String] = []
        let files = FileManager.default.enumerator(atPath: dir)?.compactMap { $0 as? String } ?? []
        for file in files {
            guard let data = FileManager.default.contents(atPath: dir + "/" + file) else { continue }
            let bytes = [UInt8](data)
            for (name, form) in forms where bytes.count >= form.count {
                if (0...(bytes.count - form.count)).contains(where: { i in bytes[i] == form[0] && Array(bytes[i..<(i + form.count)]) == form }) {
                    found.append("\(file) (\(name))")
                }
            }
        }
        return found
    }

    @Test func importedMaterialWorksAndNeverReachesDiskUnwrapped() async throws {
        let created = try kmsctl(["create-key", "--origin", "EXTERNAL", "--description", "byok", "--json"])
        #expect(created.status == 0, "\(created.stderr)")
        let metadata = try #require((try JSONSerialization.jsonObject(with: created.stdout) as? [String: Any])?["KeyMetadata"] as? [String: Any])
        let key = try #require(metadata["KeyId"] as? String)
        #expect(metadata["KeyState"] as? String == "PendingImport" && metadata["Origin"] as? String == "EXTERNAL")
        await expectKMSError(.invalidState) { try await self.client.encrypt(keyID: key, plaintext: [1]) }

        let material = try SecureRandom.bytes(32)
        let materialPath = try write(material, "material.bin")
        let params = try parameters(key, algorithm: "RSAES_OAEP_SHA_256", spec: "RSA_2048")
        let wrapped = try wrapOAEP(materialPath, publicKey: params.publicKey)
        let imported = try importMaterial(key, wrapped: wrapped, token: params.token)
        #expect(imported.status == 0, "\(imported.stderr)")
        let described = try await client.describeKey(keyID: key)
        #expect(described.keyState == "Enabled" && described.expirationModel == "KEY_MATERIAL_DOES_NOT_EXPIRE")

        // kmsd encrypts with exactly the imported material: the test opens the blob itself.
        let plaintext = Array("imported material at work".utf8)
        let blob = Array(try await client.encrypt(keyID: key, plaintext: plaintext, context: ["app": "byok"]).ciphertextBlob)
        let opened = try Self.openDocumented(blob, material: material, context: ["app": "byok"]) == plaintext
        #expect(opened, "the blob opens with the imported material")

        // The token was single use.
        let again = try importMaterial(key, wrapped: wrapped, token: params.token)
        #expect(again.status != 0 && again.stderr.contains("InvalidImportTokenException"), "\(again.stderr)")

        // Nowhere in the state directory, running or stopped, in any encoding.
        #expect(Self.occurrences(of: material, under: daemon.stateDir).isEmpty)
        daemon.stop()
        #expect(Self.occurrences(of: material, under: daemon.stateDir).isEmpty, "\(Self.occurrences(of: material, under: daemon.stateDir))")
        try daemon.restart()
        let fresh = daemon.client()
        #expect(Array(try await fresh.decrypt(ciphertextBlob: blob, context: ["app": "byok"]).plaintext) == plaintext)

        // Deleted material: PendingImport, nothing decrypts; the same material, wrapped the
        // other way (RSA_AES_KEY_WRAP_SHA_256, RSA_3072), brings the old blob back.
        let deleted = try kmsctl(["delete-imported-key-material", "--key-id", key])
        #expect(deleted.status == 0, "\(deleted.stderr)")
        #expect(try await fresh.describeKey(keyID: key).keyState == "PendingImport")
        await expectKMSError(.invalidState) { try await fresh.decrypt(ciphertextBlob: blob, context: ["app": "byok"]) }
        let params2 = try parameters(key, algorithm: "RSA_AES_KEY_WRAP_SHA_256", spec: "RSA_3072")
        let validTo = Int(Date().timeIntervalSince1970) + 30 * 86_400
        let reimported = try importMaterial(key, wrapped: try wrapAESKeyWrap(materialPath, publicKey: params2.publicKey),
                                            token: params2.token, extra: ["--valid-to", String(validTo)])
        #expect(reimported.status == 0, "\(reimported.stderr)")
        let after = try await fresh.describeKey(keyID: key)
        #expect(after.keyState == "Enabled" && after.expirationModel == "KEY_MATERIAL_EXPIRES" && after.validTo == Int64(validTo))
        #expect(Array(try await fresh.decrypt(ciphertextBlob: blob, context: ["app": "byok"]).plaintext) == plaintext)

        // Other material is refused, even with a valid token; so is a blob that is not wrapped.
        let params3 = try parameters(key, algorithm: "RSAES_OAEP_SHA_256", spec: "RSA_4096")
        let other = try write(try SecureRandom.bytes(32), "other.bin")
        let refused = try importMaterial(key, wrapped: try wrapOAEP(other, publicKey: params3.publicKey), token: params3.token)
        #expect(refused.status != 0 && refused.stderr.contains("IncorrectKeyMaterialException"), "\(refused.stderr)")
        let params4 = try parameters(key, algorithm: "RSAES_OAEP_SHA_256", spec: "RSA_2048")
        let garbage = try importMaterial(key, wrapped: try write([UInt8](repeating: 7, count: 256), "garbage.bin"), token: params4.token)
        #expect(garbage.status != 0 && garbage.stderr.contains("InvalidCiphertextException"), "\(garbage.stderr)")
        #expect(Array(try await fresh.decrypt(ciphertextBlob: blob, context: ["app": "byok"]).plaintext) == plaintext)
        await fresh.close()
    }

    @Test func tokensBelongToOneKeyAndExpire() async throws {
        let a = try await client.createKey(origin: "EXTERNAL").keyID
        let b = try await client.createKey(origin: "EXTERNAL").keyID
        let p = try await client.getParametersForImport(keyID: a, wrappingAlgorithm: "RSAES_OAEP_SHA_256", wrappingKeySpec: "RSA_2048")
        let material = try SecureRandom.bytes(32)
        let wrapped = try material.withUnsafeBytes { try RSAPublicKey(der: Array(p.publicKey)).encryptOAEP($0, digest: .sha256) }
        await expectKMSError(.invalidImportToken) {
            try await self.client.importKeyMaterial(keyID: b, importToken: Array(p.importToken), encryptedKeyMaterial: wrapped,
                                                    expirationModel: "KEY_MATERIAL_DOES_NOT_EXPIRE")
        }
        // ValidTo is needed by default (KEY_MATERIAL_EXPIRES), and only then.
        await expectKMSError(.validation) {
            try await self.client.importKeyMaterial(keyID: a, importToken: Array(p.importToken), encryptedKeyMaterial: wrapped)
        }
        let p2 = try await client.getParametersForImport(keyID: a, wrappingAlgorithm: "RSAES_OAEP_SHA_256", wrappingKeySpec: "RSA_2048")
        try String(25 * 3600).write(toFile: clockFile, atomically: true, encoding: .utf8)
        defer { try? "0".write(toFile: clockFile, atomically: true, encoding: .utf8) }
        let wrapped2 = try material.withUnsafeBytes { try RSAPublicKey(der: Array(p2.publicKey)).encryptOAEP($0, digest: .sha256) }
        await expectKMSError(.expiredImportToken) {
            try await self.client.importKeyMaterial(keyID: a, importToken: Array(p2.importToken), encryptedKeyMaterial: wrapped2,
                                                    expirationModel: "KEY_MATERIAL_DOES_NOT_EXPIRE")
        }
        // Wrong shapes of request.
        await expectKMSError(.validation) {
            _ = try await self.client.getParametersForImport(keyID: a, wrappingAlgorithm: "RSAES_PKCS1_V1_5", wrappingKeySpec: "RSA_2048")
        }
        await expectKMSError(.validation) {
            _ = try await self.client.getParametersForImport(keyID: a, wrappingAlgorithm: "RSAES_OAEP_SHA_256", wrappingKeySpec: "RSA_1024")
        }
    }

    @Test func materialExpiresOnTimeAndWhileKMSDIsDown() async throws {
        let key = try await client.createKey(origin: "EXTERNAL").keyID
        let material = try SecureRandom.bytes(32)
        func importNow(validFor seconds: Int) async throws {
            let p = try await client.getParametersForImport(keyID: key, wrappingAlgorithm: "RSAES_OAEP_SHA_1", wrappingKeySpec: "RSA_2048")
            let wrapped = try material.withUnsafeBytes { try RSAPublicKey(der: Array(p.publicKey)).encryptOAEP($0, digest: .sha1) }
            let offset = Int((try? String(contentsOfFile: clockFile, encoding: .utf8)) ?? "0") ?? 0
            try await client.importKeyMaterial(keyID: key, importToken: Array(p.importToken), encryptedKeyMaterial: wrapped,
                                               validTo: Int64(Date().timeIntervalSince1970) + Int64(offset + seconds))
        }
        defer { try? "0".write(toFile: clockFile, atomically: true, encoding: .utf8) }
        try await importNow(validFor: 3600)
        let blob = Array(try await client.encrypt(keyID: key, plaintext: [42]).ciphertextBlob)
        #expect(try await client.describeKey(keyID: key).keyState == "Enabled")
        // Two hours on: kmsd's sweep deletes the material within a few seconds.
        try String(7200).write(toFile: clockFile, atomically: true, encoding: .utf8)
        var state = ""
        for _ in 0..<50 {
            state = try await client.describeKey(keyID: key).keyState
            if state == "PendingImport" { break }
            try await Task.sleep(for: .milliseconds(100))
        }
        #expect(state == "PendingImport")
        await expectKMSError(.invalidState) { try await self.client.decrypt(ciphertextBlob: blob) }
        #expect(daemon.log.contains("imported material of key \(key) expired"))

        // Re-imported, then its expiry passes while kmsd is down: gone at the next start.
        try await importNow(validFor: 3600)
        #expect(Array(try await client.decrypt(ciphertextBlob: blob).plaintext) == [42])
        daemon.stop()
        try String(7200 + 7200).write(toFile: clockFile, atomically: true, encoding: .utf8)
        try daemon.restart()
        let fresh = daemon.client()
        var after = ""
        for _ in 0..<50 {
            after = try await fresh.describeKey(keyID: key).keyState
            if after == "PendingImport" { break }
            try await Task.sleep(for: .milliseconds(100))
        }
        #expect(after == "PendingImport")
        await fresh.close()
    }

    @Test func operationsThatDoNotApplyToTheOrigin() async throws {
        let kms = try await client.createKey().keyID
        await expectKMSError(.unsupportedOperation) {
            _ = try await self.client.getParametersForImport(keyID: kms, wrappingAlgorithm: "RSAES_OAEP_SHA_256", wrappingKeySpec: "RSA_2048")
        }
        await expectKMSError(.unsupportedOperation) { try await self.client.deleteImportedKeyMaterial(keyID: kms) }
        let external = try await client.createKey(origin: "EXTERNAL").keyID
        await expectKMSError(.unsupportedOperation) { try await self.client.enableKeyRotation(keyID: external) }
        await expectKMSError(.unsupportedOperation) { _ = try await self.client.rotateKeyOnDemand(keyID: external) }
        await expectKMSError(.validation) { _ = try await self.client.createKey(origin: "SOMEWHERE") }
        await expectKMSError(.unsupportedOperation) { _ = try await self.client.createKey(origin: "AWS_CLOUDHSM") }
        // A key without material that is scheduled for deletion and cancelled awaits material again.
        _ = try await client.scheduleKeyDeletion(keyID: external, pendingWindowInDays: 7)
        await expectKMSError(.invalidState) {
            _ = try await self.client.getParametersForImport(keyID: external, wrappingAlgorithm: "RSAES_OAEP_SHA_256", wrappingKeySpec: "RSA_2048")
        }
        _ = try await client.cancelKeyDeletion(keyID: external)
        #expect(try await client.describeKey(keyID: external).keyState == "PendingImport")
    }
}
