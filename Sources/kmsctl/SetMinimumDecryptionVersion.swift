import ArgumentParser
import KMSClient

struct SetMinimumDecryptionVersion: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "set-minimum-decryption-version",
        abstract: "Retire a KMS key's older versions: blobs made under versions below this refuse to decrypt (beyond AWS). Prints nothing.",
        discussion: "Re-encrypt old data first (kmsctl re-encrypt moves a blob to the newest version).")

    @OptionGroup var global: GlobalOptions
    @OptionGroup var key: KeyOption

    @Option(name: .customLong("minimum-decryption-version"), help: ArgumentHelp("The oldest version that still decrypts.", valueName: "n"))
    var version: UInt32

    func run() async throws {
        try await global.withClient { try await $0.setMinimumDecryptionVersion(keyID: key.keyID, version: version) }
    }
}
