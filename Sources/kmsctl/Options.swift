import ArgumentParser
import Foundation
import KMSClient

/// Options every subcommand accepts.
struct GlobalOptions: ParsableArguments {
    @Option(
        name: .long,
        help: ArgumentHelp(
            "Path of kmsd's Unix socket ($KMSD_SOCKET, when set, replaces /run/kmsd/kmsd.sock as the default).",
            valueName: "path"))
    var socket: String = KMSClient.defaultSocketPath()

    @Flag(name: .long, help: "Print the result as JSON, with AWS KMS field names.")
    var json = false

    /// Runs `body` with a client connected to `socket`, and closes the connection afterwards.
    func withClient<T>(_ body: (KMSClient) async throws -> T) async throws -> T {
        let client = KMSClient(socketPath: socket)
        do {
            let result = try await body(client)
            await client.close()
            return result
        } catch {
            await client.close()
            throw error
        }
    }
}

/// Parses repeatable `KEY=VALUE` options (`--context`, `--tag`, ...), splitting at the first
/// '='. Throws ValidationError (a usage error) for a value without '=', an empty key, or a key
/// given twice.
func parseKeyValuePairs(_ pairs: [String], option: String) throws -> [String: String] {
    var result: [String: String] = [:]
    for pair in pairs {
        guard let eq = pair.firstIndex(of: "=") else {
            throw ValidationError("\(option) '\(pair)' is not KEY=VALUE; write it as \(option) key=value")
        }
        let key = String(pair[..<eq])
        let value = String(pair[pair.index(after: eq)...])
        guard !key.isEmpty else {
            throw ValidationError("\(option) '\(pair)' has an empty key; write it as \(option) key=value")
        }
        guard result[key] == nil else {
            throw ValidationError("\(option) gives the key '\(key)' more than once; give each key once")
        }
        result[key] = value
    }
    return result
}
