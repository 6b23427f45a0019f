import ArgumentParser
import KMSClient

struct DeleteAlias: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "delete-alias",
        abstract: "Delete an alias (the key stays). Prints nothing.")

    @OptionGroup var global: GlobalOptions
    @OptionGroup var alias: AliasOption

    func run() async throws {
        try await global.withClient { try await $0.deleteAlias(aliasName: alias.aliasName) }
    }
}
