import ArgumentParser
import KMSClient

struct DisableKey: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "disable-key",
        abstract: "Disable a KMS key: it refuses every cryptographic operation until enabled. Prints nothing.")

    @OptionGroup var global: GlobalOptions

    @Option(name: .customLong("key-id"), help: ArgumentHelp("The key: key id or key ARN (kmsd:key/ID).", valueName: "id"))
    var keyID: String

    func run() async throws {
        try await global.withClient { try await $0.disableKey(keyID: keyID) }
    }
}
