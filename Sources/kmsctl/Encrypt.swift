import ArgumentParser
import Foundation
import KMSClient

struct Encrypt: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "encrypt",
        abstract: "Encrypt standard input under a KMS key and write the ciphertext blob to standard output.")

    @OptionGroup var global: GlobalOptions

    @Option(name: .customLong("key-id"), help: ArgumentHelp("The key to encrypt under: key id or key ARN (kmsd:key/ID).", valueName: "id"))
    var keyID: String

    @Option(name: .customLong("context"), help: ArgumentHelp("Encryption context pair KEY=VALUE (split at the first '='); decrypt needs the same pairs. Repeatable.", valueName: "key=value"))
    var context: [String] = []

    @Flag(name: .long, help: "Standard input is base64 text, and the blob is written as base64 text and a newline.")
    var base64 = false

    func validate() throws {
        _ = try parseKeyValuePairs(context, option: "--context")
    }

    func run() async throws {
        let contextMap = try parseKeyValuePairs(context, option: "--context")
        let plaintext = try readStandardInput(base64: base64, what: "plaintext")
        let r = try await global.withClient {
            try await $0.encrypt(keyID: keyID, plaintext: Array(plaintext), context: contextMap)
        }
        if global.json {
            try printJSON([
                "CiphertextBlob": r.ciphertextBlob.base64EncodedString(),
                "KeyId": r.keyID,
                "EncryptionAlgorithm": algorithmName(r.encryptionAlgorithm),
            ])
        } else {
            writeBinary(r.ciphertextBlob, base64: base64)
        }
    }
}
