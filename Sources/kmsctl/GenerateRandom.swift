import ArgumentParser
import Foundation
import KMSClient

struct GenerateRandom: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "generate-random",
        abstract: "Write random bytes from kmsd to standard output.")

    @OptionGroup var global: GlobalOptions

    @Option(name: .customLong("number-of-bytes"), help: ArgumentHelp("How many random bytes.", valueName: "n"))
    var numberOfBytes: UInt32

    @Flag(name: .long, help: "Write the bytes as base64 text and a newline.")
    var base64 = false

    func run() async throws {
        let bytes = try await global.withClient { try await $0.generateRandom(numberOfBytes: numberOfBytes) }
        let data = Data(bytes)
        if global.json {
            try printJSON(["Plaintext": data.base64EncodedString()])
        } else {
            writeBinary(data, base64: base64)
        }
    }
}
