import ArgumentParser
import Foundation
import KMSClient

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

// MARK: - Exit statuses

enum ExitStatus {
    static let success: Int32 = 0
    /// The service answered with an error (KMSError), or kmsctl itself failed.
    static let serviceError: Int32 = 1
    /// The command line is wrong (reported by ArgumentParser).
    static let usageError: Int32 = 2
    /// kmsd could not be reached or the connection broke (KMSTransportError).
    static let connectionError: Int32 = 3
}

/// Ends the process. A free function so that `exit` is never confused with
/// `ParsableCommand.exit(withError:)` inside command types.
func terminate(_ status: Int32) -> Never {
    exit(status)
}

// MARK: - Raw output

/// Writes all of `bytes` to `fd`; nil, or the errno that stopped it.
private func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) -> Int32? {
    var done = 0
    while done < bytes.count {
        let n = Glibc.write(fd, bytes.baseAddress! + done, bytes.count - done)
        if n < 0 {
            if errno == EINTR { continue }
            return errno
        }
        done += n
    }
    return nil
}

/// Standard output as Unix tools write it: a reader that went away (`kmsctl ... | head`) ends
/// kmsctl by SIGPIPE, as it would `cat` (SwiftNIO ignores the signal in-process, so the write
/// fails with EPIPE instead); any other failure (a full disk) is an error, exit status 1.
func writeStdout(_ data: Data) {
    guard !data.isEmpty, let error = data.withUnsafeBytes({ writeAll(1, $0) }) else { return }
    if error == EPIPE {
        signal(SIGPIPE, SIG_DFL)
        raise(SIGPIPE)
    }
    writeStderr("kmsctl: cannot write standard output: \(String(cString: strerror(error)))\n")
    exit(1)
}

func writeStdout(_ text: String) {
    writeStdout(Data(text.utf8))
}

func writeStderr(_ text: String) {
    var text = text
    _ = text.withUTF8 { writeAll(2, UnsafeRawBufferPointer($0)) }
}

/// Prints `kmsctl: <code>: <message>` to standard error. Messages never contain plaintext or keys.
func reportError(code: String, message: String) {
    writeStderr("kmsctl: \(code): \(message)\n")
}

// MARK: - Binary input and output

/// Reads all of standard input. With `base64`, the input is base64 text (whitespace, including
/// line breaks, is ignored) and the decoded bytes are returned.
func readStandardInput(base64: Bool, what: String) throws -> Data {
    let raw = FileHandle.standardInput.readDataToEndOfFile()
    guard base64 else { return raw }
    return try decodeBase64(raw, what: what)
}

/// Decodes base64 text. Throws ValidationException without echoing the input (it may be secret).
func decodeBase64(_ raw: Data, what: String) throws -> Data {
    guard let text = String(data: raw, encoding: .utf8) else {
        throw KMSError(.validation, "the \(what) on standard input is not base64 text; drop --base64 to pass raw bytes")
    }
    let compact = text.filter { !$0.isWhitespace }
    guard let decoded = Data(base64Encoded: compact) else {
        throw KMSError(.validation, "the \(what) on standard input is not valid base64; drop --base64 to pass raw bytes")
    }
    return decoded
}

/// Writes raw bytes (no trailing newline), or base64 text and a newline.
func writeBinary(_ data: Data, base64: Bool) {
    if base64 {
        writeStdout(data.base64EncodedString() + "\n")
    } else {
        writeStdout(data)
    }
}

// MARK: - JSON

/// Prints `object` as pretty-printed JSON with sorted keys and a trailing newline.
func printJSON(_ object: [String: Any]) throws {
    let data = try JSONSerialization.data(
        withJSONObject: object, options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes])
    writeStdout(data)
    writeStdout("\n")
}

// MARK: - Tables

/// Prints one object as aligned `Field  Value` lines.
func printFields(_ rows: [(String, String)]) {
    let width = rows.map { $0.0.count }.max() ?? 0
    var out = ""
    for (field, value) in rows {
        out += field.padding(toLength: width, withPad: " ", startingAt: 0)
        out += "  "
        out += value.isEmpty ? "-" : value
        out += "\n"
    }
    writeStdout(out)
}

/// Prints a list as aligned columns under a header line.
func printColumns(headers: [String], rows: [[String]]) {
    let all = [headers] + rows
    var widths = [Int](repeating: 0, count: headers.count)
    for row in all {
        for (i, cell) in row.enumerated() where i < widths.count {
            widths[i] = max(widths[i], cell.count)
        }
    }
    var out = ""
    for row in all {
        var line = ""
        for (i, cell) in row.enumerated() where i < widths.count {
            if i == widths.count - 1 {
                line += cell
            } else {
                line += cell.padding(toLength: widths[i], withPad: " ", startingAt: 0) + "  "
            }
        }
        out += line + "\n"
    }
    writeStdout(out)
}

// MARK: - Key metadata

/// The `KeyMetadata` object of AWS KMS (AWS field names).
func keyMetadataDictionary(_ m: Kmsd_V1_KeyMetadata) -> [String: Any] {
    var d = keyMetadataFields(m)
    d["CurrentKeyVersion"] = Int(m.currentKeyVersion)
    d["MinimumDecryptionVersion"] = Int(max(1, m.minimumDecryptionVersion))
    if m.deletionDate != 0 {
        d["DeletionDate"] = Int(m.deletionDate)
        d["PendingDeletionWindowInDays"] = Int(m.pendingDeletionWindowInDays)
    }
    if !m.expirationModel.isEmpty { d["ExpirationModel"] = m.expirationModel }
    if m.validTo != 0 { d["ValidTo"] = Int(m.validTo) }
    d["MultiRegion"] = m.multiRegion
    if m.hasMultiRegionConfiguration {
        let c = m.multiRegionConfiguration
        d["MultiRegionConfiguration"] = [
            "MultiRegionKeyType": c.multiRegionKeyType,
            "PrimaryKey": ["Arn": c.primaryKey.arn, "Region": c.primaryKey.region],
            "ReplicaKeys": c.replicaKeys.map { ["Arn": $0.arn, "Region": $0.region] },
        ] as [String: Any]
    }
    return d
}

private func keyMetadataFields(_ m: Kmsd_V1_KeyMetadata) -> [String: Any] {
    [
        "KeyId": m.keyID,
        "Arn": m.arn,
        "CreationDate": Int(m.creationDate),
        "Enabled": m.enabled,
        "Description": m.description_p,
        "KeyUsage": m.keyUsage,
        "KeyState": m.keyState,
        "KeySpec": m.keySpec,
        "Origin": m.origin,
        "KeyManager": m.keyManager,
        "EncryptionAlgorithms": m.encryptionAlgorithms,
    ]
}

/// "PRIMARY, primary in east, replicas in west" for a multi-region key; nothing for others.
private func multiRegionFields(_ m: Kmsd_V1_KeyMetadata) -> [(String, String)] {
    guard m.hasMultiRegionConfiguration else { return [] }
    let c = m.multiRegionConfiguration
    var text = "\(c.multiRegionKeyType), primary in \(c.primaryKey.region)"
    if !c.replicaKeys.isEmpty { text += ", replicas in " + c.replicaKeys.map(\.region).joined(separator: ", ") }
    return [("MultiRegion", text)]
}

/// Prints key metadata: `{"KeyMetadata": {...}}` with --json, else a table.
func printKeyMetadata(_ m: Kmsd_V1_KeyMetadata, json: Bool) throws {
    if json {
        try printJSON(["KeyMetadata": keyMetadataDictionary(m)])
        return
    }
    printFields([
        ("KeyId", m.keyID),
        ("Arn", m.arn),
        ("CreationDate", formatUnixTime(m.creationDate)),
        ("Enabled", m.enabled ? "true" : "false"),
        ("Description", m.description_p),
        ("KeyUsage", m.keyUsage),
        ("KeyState", m.keyState),
        ("KeySpec", m.keySpec),
        ("Origin", m.origin),
        ("KeyManager", m.keyManager),
        ("EncryptionAlgorithms", m.encryptionAlgorithms.joined(separator: ", ")),
        ("CurrentKeyVersion", String(m.currentKeyVersion)),
        ("MinimumDecryptionVersion", String(max(1, m.minimumDecryptionVersion))),
    ] + (m.deletionDate != 0 ? [("DeletionDate", formatUnixTime(m.deletionDate)),
                                ("PendingDeletionWindowInDays", String(m.pendingDeletionWindowInDays))] : [])
      + (m.expirationModel.isEmpty ? [] : [("ExpirationModel", m.expirationModel)])
      + (m.validTo != 0 ? [("ValidTo", formatUnixTime(m.validTo))] : [])
      + multiRegionFields(m))
}

/// `2025-01-31T12:00:00Z (1738324800)`.
func formatUnixTime(_ seconds: Int64) -> String {
    let formatter = ISO8601DateFormatter()
    formatter.timeZone = TimeZone(identifier: "UTC")
    let date = Date(timeIntervalSince1970: TimeInterval(seconds))
    return "\(formatter.string(from: date)) (\(seconds))"
}

/// The algorithm a response names, or AWS's default when the server left it empty.
func algorithmName(_ name: String) -> String {
    name.isEmpty ? "SYMMETRIC_DEFAULT" : name
}

/// A binary argument as the aws CLI reads one: `fileb://PATH` for the file's bytes, else the
/// value itself as base64.
func readBlobArgument(_ value: String, option: String) throws -> [UInt8] {
    if value.hasPrefix("fileb://") {
        let path = String(value.dropFirst("fileb://".count))
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ValidationError("\(option): cannot read \(path)")
        }
        return Array(data)
    }
    if value.hasPrefix("file://") {
        throw ValidationError("\(option) is binary: give fileb://PATH (file:// reads text) or base64 text")
    }
    guard let data = Data(base64Encoded: value) else {
        throw ValidationError("\(option) must be fileb://PATH or base64 text")
    }
    return Array(data)
}

/// A time argument: Unix seconds or ISO 8601 (`2026-12-31T00:00:00Z`), as the aws CLI takes.
func parseTimeArgument(_ value: String, option: String) throws -> Int64 {
    if let seconds = Int64(value) { return seconds }
    let formatter = ISO8601DateFormatter()
    if let date = formatter.date(from: value) { return Int64(date.timeIntervalSince1970) }
    formatter.formatOptions = [.withFullDate]
    if let date = formatter.date(from: value) { return Int64(date.timeIntervalSince1970) }
    throw ValidationError("\(option) must be Unix seconds or an ISO 8601 time such as 2026-12-31T00:00:00Z")
}

/// A plain text parameter (a description) as the aws CLI reads one: `file://PATH` for the
/// file's text, else the value itself (`-` too).
func readTextParameter(_ value: String, option: String) throws -> String {
    value.hasPrefix("file://") ? try readTextArgument(value, option: option) : value
}

/// A text argument as the aws CLI reads one: `file://PATH` for the file's text, `-` for
/// standard input, else the value itself.
func readTextArgument(_ value: String, option: String) throws -> String {
    if value == "-" {
        let data = FileHandle.standardInput.readDataToEndOfFile()
        guard let text = String(data: data, encoding: .utf8) else { throw ValidationError("\(option): standard input is not UTF-8 text") }
        return text
    }
    if value.hasPrefix("file://") {
        let path = String(value.dropFirst("file://".count))
        guard let data = FileManager.default.contents(atPath: path) else { throw ValidationError("\(option): cannot read \(path)") }
        guard let text = String(data: data, encoding: .utf8) else { throw ValidationError("\(option): \(path) is not UTF-8 text") }
        return text
    }
    if value.hasPrefix("fileb://") { throw ValidationError("\(option) is text: give file://PATH, - for standard input, or the text itself") }
    return value
}
