import ArgumentParser
import Foundation
import KMSClient

struct DescribeKey: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "describe-key",
        abstract: "Print the metadata of a KMS key.")

    @OptionGroup var global: GlobalOptions

    @Option(name: .customLong("key-id"), help: ArgumentHelp("The key: key id or key ARN (kmsd:key/ID).", valueName: "id"))
    var keyID: String

    func run() async throws {
        let metadata = try await global.withClient { try await $0.describeKey(keyID: keyID) }
        try printKeyMetadata(metadata, json: global.json)
    }
}
