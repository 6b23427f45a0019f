import ArgumentParser
import Foundation
import KMSClient

struct Decrypt: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "decrypt",
        abstract: "Decrypt a ciphertext blob from standard input and write the plaintext to standard output.")

    @OptionGroup var global: GlobalOptions

    @Option(name: .customLong("key-id"), help: ArgumentHelp("Fail unless the blob was encrypted under this key (optional: the blob names its key).", valueName: "id"))
    var keyID: String?

    @Option(name: .customLong("context"), help: ArgumentHelp("Encryption context pair KEY=VALUE given at encryption (split at the first '='). Repeatable.", valueName: "key=value"))
    var context: [String] = []

    @Flag(name: .long, help: "Standard input is base64 text, and the plaintext is written as base64 text and a newline.")
    var base64 = false

    func validate() throws {
        _ = try parseKeyValuePairs(context, option: "--context")
    }

    func run() async throws {
        let contextMap = try parseKeyValuePairs(context, option: "--context")
        let blob = try readStandardInput(base64: base64, what: "ciphertext blob")
        let r = try await global.withClient {
            try await $0.decrypt(ciphertextBlob: Array(blob), context: contextMap, keyID: keyID ?? "")
        }
        if global.json {
            try printJSON([
                "KeyId": r.keyID,
                "Plaintext": r.plaintext.base64EncodedString(),
                "EncryptionAlgorithm": algorithmName(r.encryptionAlgorithm),
            ])
        } else {
            writeBinary(r.plaintext, base64: base64)
        }
    }
}
