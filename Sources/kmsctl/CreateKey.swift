import ArgumentParser
import Foundation
import KMSClient

struct CreateKey: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create-key",
        abstract: "Create a new KMS key and print its metadata (administrators only).")

    @OptionGroup var global: GlobalOptions

    @Option(name: .customLong("description"), help: ArgumentHelp("A description of the key (not secret); file://PATH reads it from a file.", valueName: "text"))
    var keyDescription: String = ""

    @Option(name: .customLong("key-spec"), help: ArgumentHelp("Key spec; default SYMMETRIC_DEFAULT.", valueName: "spec"))
    var keySpec: String = ""

    @Option(name: .customLong("key-usage"), help: ArgumentHelp("Key usage; default ENCRYPT_DECRYPT.", valueName: "usage"))
    var keyUsage: String = ""

    @Option(name: .customLong("origin"), help: ArgumentHelp("AWS_KMS (default: kmsd makes the material) or EXTERNAL (import it later; the key is PendingImport until then).", valueName: "origin"))
    var origin: String = ""

    @Option(name: .customLong("policy"), help: ArgumentHelp("A key policy instead of the default: file://PATH, - for standard input, or the JSON itself.", valueName: "file://path"))
    var policy: String?

    @Flag(name: .customLong("bypass-policy-lockout-safety-check"), help: "Accept a policy that does not let you change it later.")
    var bypass = false

    @Flag(name: .customLong("multi-region"), help: "A multi-region key (mrk- id), primary in this kmsd's region; see replicate-key.")
    var multiRegion = false

    @Option(name: .customLong("tag"), help: ArgumentHelp("A tag KEY=VALUE (split at the first '='). Repeatable.", valueName: "key=value"))
    var tags: [String] = []

    @Option(name: .customLong("tags"), parsing: .upToNextOption,
            help: ArgumentHelp("Tags in the aws CLI's shorthand: TagKey=KEY,TagValue=VALUE ...", valueName: "TagKey=k,TagValue=v"))
    var tagsShorthand: [String] = []

    func validate() throws {
        _ = try allTags()
    }

    /// --tag k=v and --tags TagKey=k,TagValue=v together; a key given twice is a usage error.
    func allTags() throws -> [String: String] {
        var tagMap = try parseKeyValuePairs(tags, option: "--tag")
        for (k, v) in try parseTagShorthand(tagsShorthand) {
            guard tagMap.updateValue(v, forKey: k) == nil else { throw ValidationError("tag key '\(k)' is given twice") }
        }
        return tagMap
    }

    func run() async throws {
        let tagMap = try allTags()
        let policyText = try policy.map { try readTextArgument($0, option: "--policy") } ?? ""
        let descriptionText = try readTextParameter(keyDescription, option: "--description")
        let metadata = try await global.withClient {
            try await $0.createKey(description: descriptionText, keySpec: keySpec, keyUsage: keyUsage, tags: tagMap, origin: origin,
                                   policy: policyText, bypassPolicyLockoutSafetyCheck: bypass, multiRegion: multiRegion)
        }
        try printKeyMetadata(metadata, json: global.json)
    }
}
