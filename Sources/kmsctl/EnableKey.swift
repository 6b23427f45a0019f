import ArgumentParser
import KMSClient

struct EnableKey: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "enable-key",
        abstract: "Enable a disabled KMS key (its owner or an administrator). Prints nothing.")

    @OptionGroup var global: GlobalOptions

    @OptionGroup var key: KeyOption

    func run() async throws {
        try await global.withClient { try await $0.enableKey(keyID: key.keyID) }
    }
}
