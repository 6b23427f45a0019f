import ArgumentParser
import KMSClient

struct CancelKeyDeletion: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cancel-key-deletion",
        abstract: "Cancel a KMS key's scheduled deletion; the key is then Disabled (enable-key to use it).")

    @OptionGroup var global: GlobalOptions

    @Option(name: .customLong("key-id"), help: ArgumentHelp("The key: key id or key ARN (kmsd:key/ID).", valueName: "id"))
    var keyID: String

    func run() async throws {
        let r = try await global.withClient { try await $0.cancelKeyDeletion(keyID: keyID) }
        if global.json { try printJSON(["KeyId": r.keyID]) } else { printFields([("KeyId", r.keyID)]) }
    }
}
