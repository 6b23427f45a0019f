import ArgumentParser
import Foundation
import KMSClient

struct GenerateDataKey: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "generate-data-key",
        abstract: "Generate a data key; print JSON with the plaintext key and the key encrypted under a KMS key (both base64).",
        discussion: "The output is always JSON: {\"CiphertextBlob\", \"Plaintext\", \"KeyId\"}. Keep the Plaintext secret; store the CiphertextBlob.")

    @OptionGroup var global: GlobalOptions
    @OptionGroup var options: DataKeyOptions

    func run() async throws {
        let o = options
        let r = try await global.withClient {
            try await $0.generateDataKey(
                keyID: o.keyID, keySpec: o.keySpec ?? "", numberOfBytes: o.numberOfBytes ?? 0, context: o.contextMap)
        }
        try printJSON([
            "CiphertextBlob": r.ciphertextBlob.base64EncodedString(),
            "Plaintext": r.plaintext.base64EncodedString(),
            "KeyId": r.keyID,
        ])
    }
}
