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

/// `--key-id`, for subcommands that act on one key.
struct KeyOption: ParsableArguments {
    @Option(name: .customLong("key-id"), help: ArgumentHelp("The key: key id or key ARN (kmsd:key/ID).", valueName: "id"))
    var keyID: String
}

/// `--limit` and `--marker`, for the subcommands that list in pages.
struct PageOptions: ParsableArguments {
    @Option(name: .customLong("limit"), help: ArgumentHelp("At most this many per page (the server's default when omitted).", valueName: "n"))
    var limit: UInt32 = 0

    @Option(name: .customLong("marker"), help: ArgumentHelp("The NextMarker of the previous page.", valueName: "marker"))
    var marker: String = ""
}

/// `--alias-name`, for the alias subcommands.
struct AliasOption: ParsableArguments {
    @Option(name: .customLong("alias-name"), help: ArgumentHelp("The alias: alias/NAME.", valueName: "alias/name"))
    var aliasName: String
}

/// Parses the aws CLI's shorthand for tags: `TagKey=k,TagValue=v` per tag (a value may hold
/// commas after `TagValue=`; TagValue may be omitted for an empty value).
func parseTagShorthand(_ items: [String]) throws -> [(key: String, value: String)] {
    try items.map { item in
        guard item.hasPrefix("TagKey=") else { throw ValidationError("--tags takes TagKey=KEY,TagValue=VALUE, not '\(item)'") }
        let rest = item.dropFirst("TagKey=".count)
        guard let comma = rest.range(of: ",TagValue=") else { return (String(rest), "") }
        return (String(rest[..<comma.lowerBound]), String(rest[comma.upperBound...]))
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

/// The options of generate-data-key and generate-data-key-without-plaintext.
struct DataKeyOptions: ParsableArguments {
    @Option(name: .customLong("key-id"), help: ArgumentHelp("The key that encrypts the data key: key id or key ARN.", valueName: "id"))
    var keyID: String

    @Option(name: .customLong("key-spec"), help: ArgumentHelp("AES_256 or AES_128 (give this or --number-of-bytes).", valueName: "spec"))
    var keySpec: String?

    @Option(name: .customLong("number-of-bytes"), help: ArgumentHelp("Length of the data key in bytes, 1...1024 (give this or --key-spec).", valueName: "n"))
    var numberOfBytes: UInt32?

    @Option(name: .customLong("context"), help: ArgumentHelp("Encryption context pair KEY=VALUE (split at the first '='). Repeatable.", valueName: "key=value"))
    var context: [String] = []

    func validate() throws {
        _ = try parseKeyValuePairs(context, option: "--context")
        if (keySpec == nil) == (numberOfBytes == nil) {
            throw ValidationError("give exactly one of --key-spec AES_256|AES_128 and --number-of-bytes N")
        }
    }

    /// The --context pairs (already checked by validate()).
    var contextMap: [String: String] { (try? parseKeyValuePairs(context, option: "--context")) ?? [:] }
}
