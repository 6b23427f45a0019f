import ArgumentParser
import KMSClient

struct UpdateKeyDescription: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "update-key-description",
        abstract: "Replace a KMS key's description. Prints nothing.")

    @OptionGroup var global: GlobalOptions

    @Option(name: .customLong("key-id"), help: ArgumentHelp("The key: key id or key ARN (kmsd:key/ID).", valueName: "id"))
    var keyID: String

    @Option(name: .customLong("description"), help: ArgumentHelp("The new description (not secret).", valueName: "text"))
    var keyDescription: String

    func run() async throws {
        try await global.withClient { try await $0.updateKeyDescription(keyID: keyID, description: keyDescription) }
    }
}
