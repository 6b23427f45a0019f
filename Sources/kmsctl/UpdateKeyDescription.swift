import ArgumentParser
import KMSClient

struct UpdateKeyDescription: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "update-key-description",
        abstract: "Replace a KMS key's description. Prints nothing.")

    @OptionGroup var global: GlobalOptions

    @OptionGroup var key: KeyOption

    @Option(name: .customLong("description"), help: ArgumentHelp("The new description (not secret); file://PATH reads it from a file.", valueName: "text"))
    var keyDescription: String

    func run() async throws {
        let text = try readTextParameter(keyDescription, option: "--description")
        try await global.withClient { try await $0.updateKeyDescription(keyID: key.keyID, description: text) }
    }
}
