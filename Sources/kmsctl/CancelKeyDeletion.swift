import ArgumentParser
import KMSClient

struct CancelKeyDeletion: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cancel-key-deletion",
        abstract: "Cancel a KMS key's scheduled deletion; the key is then Disabled (enable-key to use it).")

    @OptionGroup var global: GlobalOptions

    @OptionGroup var key: KeyOption

    func run() async throws {
        let r = try await global.withClient { try await $0.cancelKeyDeletion(keyID: key.keyID) }
        if global.json { try printJSON(["KeyId": r.keyID]) } else { printFields([("KeyId", r.keyID)]) }
    }
}
