import ArgumentParser
import Foundation
import KMSClient

struct DescribeKey: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "describe-key",
        abstract: "Print the metadata of a KMS key.")

    @OptionGroup var global: GlobalOptions

    @OptionGroup var key: KeyOption

    func run() async throws {
        let metadata = try await global.withClient { try await $0.describeKey(keyID: key.keyID) }
        try printKeyMetadata(metadata, json: global.json)
    }
}
