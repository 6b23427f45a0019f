import ArgumentParser
import Foundation
import KMSClient

struct Hello: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hello",
        abstract: "Show the server's version, protocol version, limits and supported operations.")

    @OptionGroup var global: GlobalOptions

    func run() async throws {
        let socket = global.socket
        let r = try await global.withClient { try await $0.hello(clientName: "kmsctl/0.1") }
        if global.json {
            try printJSON([
                "Socket": socket,
                "ServerVersion": r.serverVersion,
                "ProtocolVersion": Int(r.protocolVersion),
                "Operations": r.operations,
                "MaxFrameBytes": Int(r.maxFrameBytes),
                "MaxInFlight": Int(r.maxInFlight),
            ])
        } else {
            printFields([
                ("Socket", socket),
                ("ServerVersion", r.serverVersion),
                ("ProtocolVersion", String(r.protocolVersion)),
                ("MaxFrameBytes", String(r.maxFrameBytes)),
                ("MaxInFlight", String(r.maxInFlight)),
                ("Operations", r.operations.joined(separator: ", ")),
            ])
        }
    }
}
