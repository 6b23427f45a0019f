import ArgumentParser
import KMSClient

struct TagResource: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tag-resource",
        abstract: "Add or replace tags on a KMS key. Prints nothing.")

    @OptionGroup var global: GlobalOptions
    @OptionGroup var key: KeyOption

    @Option(name: .customLong("tags"), parsing: .upToNextOption,
            help: ArgumentHelp("One or more tags, each TagKey=KEY,TagValue=VALUE.", valueName: "TagKey=k,TagValue=v"))
    var tags: [String] = []

    func validate() throws {
        guard !tags.isEmpty else { throw ValidationError("give at least one tag: --tags TagKey=KEY,TagValue=VALUE") }
        _ = try parseTagShorthand(tags)
    }

    func run() async throws {
        let parsed = try parseTagShorthand(tags)
        try await global.withClient { try await $0.tagResource(keyID: key.keyID, tags: parsed) }
    }
}
