import ArgumentParser
import Foundation
import KMSClient

struct GenerateDataKeyWithoutPlaintext: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "generate-data-key-without-plaintext",
        abstract: "Generate a data key and print only its encrypted copy as JSON (base64).",
        discussion: "The output is always JSON: {\"CiphertextBlob\", \"KeyId\"}. Decrypt the blob when the key is needed.")

    @OptionGroup var global: GlobalOptions

    @Option(name: .customLong("key-id"), help: ArgumentHelp("The key that encrypts the data key: key id, key ARN, alias name or alias ARN.", valueName: "id"))
    var keyID: String

    @Option(name: .customLong("key-spec"), help: ArgumentHelp("AES_256 or AES_128 (give this or --number-of-bytes).", valueName: "spec"))
    var keySpec: String?

    @Option(name: .customLong("number-of-bytes"), help: ArgumentHelp("Length of the data key in bytes (give this or --key-spec).", valueName: "n"))
    var numberOfBytes: UInt32?

    @Option(name: .customLong("context"), help: ArgumentHelp("Encryption context pair KEY=VALUE (split at the first '='). Repeatable.", valueName: "key=value"))
    var context: [String] = []

    func validate() throws {
        _ = try parseKeyValuePairs(context, option: "--context")
        if (keySpec == nil) == (numberOfBytes == nil) {
            throw ValidationError("give exactly one of --key-spec AES_256|AES_128 and --number-of-bytes N")
        }
    }

    func run() async throws {
        let contextMap = try parseKeyValuePairs(context, option: "--context")
        let r = try await global.withClient {
            try await $0.generateDataKeyWithoutPlaintext(
                keyID: keyID, keySpec: keySpec ?? "", numberOfBytes: numberOfBytes ?? 0, context: contextMap)
        }
        try printJSON([
            "CiphertextBlob": r.ciphertextBlob.base64EncodedString(),
            "KeyId": r.keyID,
        ])
    }
}
