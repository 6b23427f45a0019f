import ArgumentParser
import KMSClient

struct CreateAlias: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create-alias",
        abstract: "Give a KMS key a friendly name, usable wherever a key id is taken for encryption. Prints nothing.")

    @OptionGroup var global: GlobalOptions
    @OptionGroup var alias: AliasOption

    @Option(name: .customLong("target-key-id"), help: ArgumentHelp("The key: key id or key ARN.", valueName: "id"))
    var targetKeyID: String

    func run() async throws {
        try await global.withClient { try await $0.createAlias(aliasName: alias.aliasName, targetKeyID: targetKeyID) }
    }
}
