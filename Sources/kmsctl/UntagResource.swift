import ArgumentParser
import KMSClient

struct UntagResource: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "untag-resource",
        abstract: "Remove tags from a KMS key (keys it does not have are ignored). Prints nothing.")

    @OptionGroup var global: GlobalOptions
    @OptionGroup var key: KeyOption

    @Option(name: .customLong("tag-keys"), parsing: .upToNextOption, help: ArgumentHelp("The tag keys to remove.", valueName: "key"))
    var tagKeys: [String] = []

    func validate() throws {
        guard !tagKeys.isEmpty else { throw ValidationError("give at least one tag key: --tag-keys KEY ...") }
    }

    func run() async throws {
        try await global.withClient { try await $0.untagResource(keyID: key.keyID, tagKeys: tagKeys) }
    }
}
