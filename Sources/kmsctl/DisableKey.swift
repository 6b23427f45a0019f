import ArgumentParser
import KMSClient

struct DisableKey: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "disable-key",
        abstract: "Disable a KMS key: it refuses every cryptographic operation until enabled. Prints nothing.")

    @OptionGroup var global: GlobalOptions

    @OptionGroup var key: KeyOption

    func run() async throws {
        try await global.withClient { try await $0.disableKey(keyID: key.keyID) }
    }
}
