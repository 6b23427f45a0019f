import ArgumentParser
import Foundation
import Glibc
import KMSClient

/// Where encrypt-file and decrypt-file read and write: standard input and output, or paths.
struct StreamOptions: ParsableArguments {
    @Option(name: .customLong("in"), help: ArgumentHelp("Read this file instead of standard input.", valueName: "path"))
    var inPath: String?

    @Option(name: .customLong("out"), help: ArgumentHelp("Write this file instead of standard output: it appears at PATH only when complete (written as an anonymous file in PATH's directory, then renamed into place); on failure nothing is left.", valueName: "path"))
    var outPath: String?

    func openInput() throws -> FileDescriptorInput {
        guard let inPath else { return FileDescriptorInput(fd: STDIN_FILENO) }
        let fd = open(inPath, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw EnvelopeIOError("cannot open \(inPath): \(String(cString: strerror(errno)))") }
        return FileDescriptorInput(fd: fd)
    }

    /// Runs `body` with the output; for --out, the file appears at its path (with `mode`
    /// less the umask) only if `body` returned. It is written as an anonymous O_TMPFILE in
    /// the target's directory, so a kill leaves nothing behind, then linked under a temporary
    /// name and renamed over the target; where the file system has no O_TMPFILE, a mkstemp
    /// file beside the target, removed on failure.
    func withOutput<T>(mode: mode_t, _ body: (inout FileDescriptorOutput) async throws -> T) async throws -> T {
        guard let outPath else {
            var out = FileDescriptorOutput(fd: STDOUT_FILENO)
            return try await body(&out)
        }
        let url = URL(fileURLWithPath: outPath)
        let dir = url.deletingLastPathComponent().path
        let hidden = dir + "/.\(url.lastPathComponent).kmsctl-"
        var named: String?
        var fd = open(dir, oTmpFile | O_WRONLY | O_CLOEXEC, mode)
        if fd < 0 {
            guard [EOPNOTSUPP, EISDIR, EINVAL].contains(errno) else {
                throw EnvelopeIOError("cannot create a file in \(dir): \(String(cString: strerror(errno)))")
            }
            var template = Array((hidden + "XXXXXX").utf8CString)
            fd = mkstemp(&template)
            guard fd >= 0 else { throw EnvelopeIOError("cannot create a file beside \(outPath): \(String(cString: strerror(errno)))") }
            named = String(cString: template)
            guard fchmod(fd, mode & ~currentUmask()) == 0 else {
                let e = errno
                close(fd)
                unlink(named!)
                throw EnvelopeIOError("cannot set the mode of \(named!): \(String(cString: strerror(e)))")
            }
        }
        var open = true
        do {
            var out = FileDescriptorOutput(fd: fd)
            let result = try await body(&out)
            guard fsync(fd) == 0 else { throw EnvelopeIOError("cannot write \(outPath): \(String(cString: strerror(errno)))") }
            if named == nil {
                let link = hidden + String(UInt64.random(in: 0...UInt64.max), radix: 16)
                guard linkat(AT_FDCWD, "/proc/self/fd/\(fd)", AT_FDCWD, link, AT_SYMLINK_FOLLOW) == 0 else {
                    throw EnvelopeIOError("cannot name the output in \(dir): \(String(cString: strerror(errno)))")
                }
                named = link
            }
            close(fd)
            open = false
            guard rename(named!, outPath) == 0 else { throw EnvelopeIOError("cannot rename the output into \(outPath): \(String(cString: strerror(errno)))") }
            named = nil
            let dirFD = Glibc.open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            if dirFD >= 0 { fsync(dirFD); close(dirFD) }
            return result
        } catch {
            if open { close(fd) }
            if let named { unlink(named) }
            throw error
        }
    }
}

/// O_TMPFILE (Linux 3.11+; not exported to Swift): __O_TMPFILE | O_DIRECTORY.
private let oTmpFile: Int32 = 0o20000000 | O_DIRECTORY

/// The process's umask, read without changing it (Linux 4.7+: /proc/self/status); 022 if
/// it cannot be read.
func currentUmask() -> mode_t {
    guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
          let line = status.split(separator: "\n").first(where: { $0.hasPrefix("Umask:") }),
          let value = mode_t(line.dropFirst("Umask:".count).trimmingCharacters(in: .whitespaces), radix: 8) else { return 0o022 }
    return value
}

extension StreamOptions {
    /// --json prints the summary on standard output, so the data must go to --out.
    func validate(json: Bool, what: String) throws {
        if json && outPath == nil {
            throw ValidationError("--json prints a summary on standard output: give --out for the \(what)")
        }
    }

    /// The common run of encrypt-file and decrypt-file: input, output (`mode` for --out), a
    /// client, `body`, and the --json summary.
    func run(_ global: GlobalOptions, mode: mode_t,
             _ body: (KMSClient, inout FileDescriptorInput, inout FileDescriptorOutput) async throws -> FileEnvelope.Summary) async throws {
        var input = try openInput()
        defer { if inPath != nil { close(input.fd) } }
        let summary = try await withOutput(mode: mode) { output in
            try await global.withClient { client in try await body(client, &input, &output) }
        }
        if global.json { try printEnvelopeSummary(summary) }
    }
}

func printEnvelopeSummary(_ s: FileEnvelope.Summary) throws {
    try printJSON([
        "KeyId": s.keyID,
        "MessageId": s.messageID.map { String(format: "%02x", $0) }.joined(),
        "EncryptionContext": s.encryptionContext,
        "ChunkSize": s.chunkSize,
        "Chunks": s.chunks,
        "PlaintextBytes": s.plaintextBytes,
    ])
}

struct EncryptFile: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "encrypt-file",
        abstract: "Encrypt a stream of any size under a fresh data key from a KMS key (file envelope, PROTOCOL.md §16).",
        discussion: """
        Reads standard input (or --in) and writes the envelope to standard output (or --out) in \
        constant memory: a header holding the data key encrypted by kmsd with the encryption \
        context, then AES-256-GCM chunks. decrypt-file reverses it.

          kmsctl encrypt-file --key-id alias/backups --context host=db1 < dump.sql > dump.sql.kms
        """)

    @OptionGroup var global: GlobalOptions

    @Option(name: .customLong("key-id"), help: ArgumentHelp("The key that encrypts the data key: key id, key ARN or alias/NAME.", valueName: "id"))
    var keyID: String

    @Option(name: .customLong("context"), help: ArgumentHelp("Encryption context pair KEY=VALUE (split at the first '='), stored in the header and bound to the data key. Repeatable.", valueName: "key=value"))
    var context: [String] = []

    @Option(name: .customLong("chunk-size"), help: ArgumentHelp("Plaintext bytes per chunk, 1...16777216.", valueName: "bytes"))
    var chunkSize: Int = FileEnvelope.defaultChunkSize

    @OptionGroup var streams: StreamOptions

    func validate() throws {
        _ = try parseKeyValuePairs(context, option: "--context")
        guard (1...FileEnvelope.maxChunkSize).contains(chunkSize) else {
            throw ValidationError("--chunk-size must be 1...\(FileEnvelope.maxChunkSize)")
        }
        try streams.validate(json: global.json, what: "envelope")
    }

    func run() async throws {
        let contextMap = try parseKeyValuePairs(context, option: "--context")
        try await streams.run(global, mode: 0o666) { client, input, output in
            try await client.encryptFile(keyID: keyID, context: contextMap, chunkSize: chunkSize, from: &input, to: &output)
        }
    }
}

struct DecryptFile: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "decrypt-file",
        abstract: "Decrypt a file envelope made by encrypt-file.",
        discussion: """
        Reads the envelope from standard input (or --in) and writes the plaintext to standard \
        output (or --out), chunk by chunk, each only after its tag verified. Any damage \
        (truncation, reordered, duplicated or altered chunks, appended bytes) fails with \
        InvalidCiphertextException and exit status 1: on standard output the plaintext written \
        so far is then incomplete and must be discarded; with --out nothing is left behind.

          kmsctl decrypt-file --context host=db1 < dump.sql.kms > dump.sql
        """)

    @OptionGroup var global: GlobalOptions

    @Option(name: .customLong("key-id"), help: ArgumentHelp("Fail unless the data key was encrypted under this key.", valueName: "id"))
    var keyID: String?

    @Option(name: .customLong("context"), help: ArgumentHelp("Expected encryption context pair KEY=VALUE: the file's context must hold it. Repeatable.", valueName: "key=value"))
    var context: [String] = []

    @OptionGroup var streams: StreamOptions

    func validate() throws {
        _ = try parseKeyValuePairs(context, option: "--context")
        try streams.validate(json: global.json, what: "plaintext")
    }

    func run() async throws {
        let contextMap = try parseKeyValuePairs(context, option: "--context")
        try await streams.run(global, mode: 0o600) { client, input, output in
            try await client.decryptFile(expectedContext: contextMap, keyID: keyID ?? "", from: &input, to: &output)
        }
    }
}
