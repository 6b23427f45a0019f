import ArgumentParser
import KMSClient

struct ListResourceTags: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "list-resource-tags",
        abstract: "List a KMS key's tags.")

    @OptionGroup var global: GlobalOptions
    @OptionGroup var key: KeyOption

    @OptionGroup var page: PageOptions

    func run() async throws {
        let r = try await global.withClient { try await $0.listResourceTags(keyID: key.keyID, limit: page.limit, marker: page.marker) }
        if global.json {
            var out: [String: Any] = ["Tags": r.tags.map { ["TagKey": $0.tagKey, "TagValue": $0.tagValue] }, "Truncated": r.truncated]
            if r.truncated { out["NextMarker"] = r.nextMarker }
            try printJSON(out)
        } else {
            printColumns(headers: ["TagKey", "TagValue"], rows: r.tags.map { [$0.tagKey, $0.tagValue] })
            if r.truncated { writeStdout("NextMarker: \(r.nextMarker)\n") }
        }
    }
}
