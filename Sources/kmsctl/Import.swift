import ArgumentParser
import Foundation
import KMSClient

struct GetParametersForImport: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "get-parameters-for-import",
        abstract: "Get a public key to wrap key material for an EXTERNAL key, and the import token to send with it (24 hours, single use).",
        discussion: """
        PublicKey (DER SubjectPublicKeyInfo) and ImportToken are printed as base64. For example:
          kmsctl get-parameters-for-import --key-id ID --wrapping-algorithm RSAES_OAEP_SHA_256 \\
            --wrapping-key-spec RSA_2048 --json > params.json
        then decode PublicKey into pub.der and ImportToken into token.bin, wrap with
          openssl pkeyutl -encrypt -pubin -keyform DER -inkey pub.der -in material.bin \\
            -out wrapped.bin -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256
        and import with import-key-material.
        """)

    @OptionGroup var global: GlobalOptions
    @OptionGroup var key: KeyOption

    @Option(name: .customLong("wrapping-algorithm"), help: ArgumentHelp("RSAES_OAEP_SHA_256, RSAES_OAEP_SHA_1, RSA_AES_KEY_WRAP_SHA_256 or RSA_AES_KEY_WRAP_SHA_1.", valueName: "algorithm"))
    var wrappingAlgorithm: String

    @Option(name: .customLong("wrapping-key-spec"), help: ArgumentHelp("RSA_2048, RSA_3072 or RSA_4096.", valueName: "spec"))
    var wrappingKeySpec: String

    func run() async throws {
        let r = try await global.withClient {
            try await $0.getParametersForImport(keyID: key.keyID, wrappingAlgorithm: wrappingAlgorithm, wrappingKeySpec: wrappingKeySpec)
        }
        if global.json {
            try printJSON(["KeyId": r.keyID, "ImportToken": r.importToken.base64EncodedString(),
                           "PublicKey": r.publicKey.base64EncodedString(), "ParametersValidTo": Int(r.parametersValidTo)])
        } else {
            printFields([("KeyId", r.keyID), ("ParametersValidTo", formatUnixTime(r.parametersValidTo)),
                         ("PublicKey", r.publicKey.base64EncodedString()), ("ImportToken", r.importToken.base64EncodedString())])
        }
    }
}

struct ImportKeyMaterial: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "import-key-material",
        abstract: "Import wrapped key material into an EXTERNAL key (it becomes Enabled).")

    @OptionGroup var global: GlobalOptions
    @OptionGroup var key: KeyOption

    @Option(name: .customLong("import-token"), help: ArgumentHelp("The ImportToken: fileb://PATH or base64.", valueName: "fileb://path"))
    var importToken: String

    @Option(name: .customLong("encrypted-key-material"), help: ArgumentHelp("The wrapped material: fileb://PATH or base64.", valueName: "fileb://path"))
    var encryptedKeyMaterial: String

    @Option(name: .customLong("expiration-model"), help: ArgumentHelp("KEY_MATERIAL_EXPIRES (the default; needs --valid-to) or KEY_MATERIAL_DOES_NOT_EXPIRE.", valueName: "model"))
    var expirationModel: String = ""

    @Option(name: .customLong("valid-to"), help: ArgumentHelp("When the material expires: Unix seconds or ISO 8601, at most 365 days ahead.", valueName: "time"))
    var validTo: String?

    func run() async throws {
        let token = try readBlobArgument(importToken, option: "--import-token")
        let material = try readBlobArgument(encryptedKeyMaterial, option: "--encrypted-key-material")
        let until = try validTo.map { try parseTimeArgument($0, option: "--valid-to") } ?? 0
        try await global.withClient {
            try await $0.importKeyMaterial(keyID: key.keyID, importToken: token, encryptedKeyMaterial: material,
                                           expirationModel: expirationModel, validTo: until)
        }
        if global.json { try printJSON([:]) }
    }
}

struct DeleteImportedKeyMaterial: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "delete-imported-key-material",
        abstract: "Delete an EXTERNAL key's imported material now; the key is PendingImport until the same material is imported again.")

    @OptionGroup var global: GlobalOptions
    @OptionGroup var key: KeyOption

    func run() async throws {
        try await global.withClient { try await $0.deleteImportedKeyMaterial(keyID: key.keyID) }
        if global.json { try printJSON([:]) }
    }
}
