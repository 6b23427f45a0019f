import ArgumentParser
import KMSClient

struct DisableKeyRotation: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "disable-key-rotation",
        abstract: "Stop rotating a KMS key automatically. Prints nothing.")

    @OptionGroup var global: GlobalOptions
    @OptionGroup var key: KeyOption

    func run() async throws {
        try await global.withClient { try await $0.disableKeyRotation(keyID: key.keyID) }
    }
}
