import ArgumentParser
import Foundation
import KMSClient

struct ReEncrypt: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "re-encrypt",
        abstract: "Decrypt a ciphertext blob from standard input and encrypt it again under another key (or context), without exposing the plaintext.")

    @OptionGroup var global: GlobalOptions

    @Option(name: .customLong("source-key-id"), help: ArgumentHelp("Fail unless the blob was encrypted under this key (optional).", valueName: "id"))
    var sourceKeyID: String?

    @Option(name: .customLong("destination-key-id"), help: ArgumentHelp("The key to encrypt the new blob under.", valueName: "id"))
    var destinationKeyID: String

    @Option(name: .customLong("source-context"), help: ArgumentHelp("Encryption context pair KEY=VALUE of the blob on standard input. Repeatable.", valueName: "key=value"))
    var sourceContext: [String] = []

    @Option(name: .customLong("destination-context"), help: ArgumentHelp("Encryption context pair KEY=VALUE for the new blob. Repeatable.", valueName: "key=value"))
    var destinationContext: [String] = []

    @Flag(name: .long, help: "Standard input is base64 text, and the new blob is written as base64 text and a newline.")
    var base64 = false

    func validate() throws {
        _ = try parseKeyValuePairs(sourceContext, option: "--source-context")
        _ = try parseKeyValuePairs(destinationContext, option: "--destination-context")
    }

    func run() async throws {
        let sourceMap = try parseKeyValuePairs(sourceContext, option: "--source-context")
        let destinationMap = try parseKeyValuePairs(destinationContext, option: "--destination-context")
        let blob = try readStandardInput(base64: base64, what: "ciphertext blob")
        let r = try await global.withClient {
            try await $0.reEncrypt(
                ciphertextBlob: Array(blob), sourceContext: sourceMap, sourceKeyID: sourceKeyID ?? "",
                destinationKeyID: destinationKeyID, destinationContext: destinationMap)
        }
        if global.json {
            try printJSON([
                "CiphertextBlob": r.ciphertextBlob.base64EncodedString(),
                "SourceKeyId": r.sourceKeyID,
                "KeyId": r.keyID,
            ])
        } else {
            writeBinary(r.ciphertextBlob, base64: base64)
        }
    }
}
