import ArgumentParser
import Foundation
import KMSClient

struct GenerateDataKeyWithoutPlaintext: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "generate-data-key-without-plaintext",
        abstract: "Generate a data key and print only its encrypted copy as JSON (base64).",
        discussion: "The output is always JSON: {\"CiphertextBlob\", \"KeyId\"}. Decrypt the blob when the key is needed.")

    @OptionGroup var global: GlobalOptions
    @OptionGroup var options: DataKeyOptions

    func run() async throws {
        let o = options
        let r = try await global.withClient {
            try await $0.generateDataKeyWithoutPlaintext(
                keyID: o.keyID, keySpec: o.keySpec ?? "", numberOfBytes: o.numberOfBytes ?? 0, context: o.contextMap)
        }
        try printJSON([
            "CiphertextBlob": r.ciphertextBlob.base64EncodedString(),
            "KeyId": r.keyID,
        ])
    }
}
