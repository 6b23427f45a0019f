import ArgumentParser
import KMSClient

struct UpdateAlias: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "update-alias",
        abstract: "Point an existing alias at another KMS key. Prints nothing.")

    @OptionGroup var global: GlobalOptions
    @OptionGroup var alias: AliasOption

    @Option(name: .customLong("target-key-id"), help: ArgumentHelp("The new key: key id or key ARN.", valueName: "id"))
    var targetKeyID: String

    func run() async throws {
        try await global.withClient { try await $0.updateAlias(aliasName: alias.aliasName, targetKeyID: targetKeyID) }
    }
}
