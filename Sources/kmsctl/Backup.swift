import ArgumentParser
import Foundation
import KMSClient
import KMSProtocol

#if canImport(Glibc)
import Glibc
#endif

/// kmsctl backup: a consistent snapshot of the whole keystore, wrapped as at rest, into a file.
struct Backup: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "backup",
        abstract: "Write a backup of kmsd's whole keystore to a file (administrators).",
        discussion: """
        kmsd snapshots its keystore in one read transaction while it goes on serving, and this \
        command copies the backup file (PROTOCOL.md §14) to --out: every key's material wrapped \
        as at rest, never unwrapped, and authenticated under the root key. Restore it with \
        `kmsd restore --from FILE` and the same root key. The file is written as FILE.partial \
        (mode 0600) and renamed into place once complete; --out - writes to standard output.
        """)

    @OptionGroup var global: GlobalOptions

    @Option(name: .customLong("out"), help: ArgumentHelp("The backup file to write; - for standard output.", valueName: "file"))
    var out: String

    func run() async throws {
        let (made, written) = try await global.withClient { client -> (Kmsd_V1_CreateBackupResponse, UInt64) in
            let made = try await client.createBackup()
            let toStdout = out == "-"
            let partial = out + ".partial"
            if !toStdout { unlink(partial) }  // a fresh file of mode 0600, never one a link points to
            let fd = toStdout ? STDOUT_FILENO : open(partial, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw KMSError(.validation, "--out: cannot create \(partial): \(String(cString: strerror(errno)))") }
            var offset: UInt64 = 0
            do {
                while offset < made.size {
                    let chunk = try await client.getBackupChunk(backupID: made.backupID, offset: offset)
                    guard !chunk.data.isEmpty, chunk.size == made.size else {
                        throw KMSError(.internalError, "backup \(made.backupID) ended after \(offset) of \(made.size) bytes")
                    }
                    try chunk.data.withUnsafeBytes { bytes in
                        var done = 0
                        while done < bytes.count {
                            let n = write(fd, bytes.baseAddress! + done, bytes.count - done)
                            guard n > 0 else { throw KMSError(.internalError, "cannot write \(toStdout ? "standard output" : partial): \(String(cString: strerror(errno)))") }
                            done += n
                        }
                    }
                    offset += UInt64(chunk.data.count)
                }
                if !toStdout {
                    guard fsync(fd) == 0 else { throw KMSError(.internalError, "cannot write \(partial) durably: \(String(cString: strerror(errno)))") }
                    close(fd)
                    guard rename(partial, out) == 0 else { throw KMSError(.internalError, "cannot rename \(partial) to \(out): \(String(cString: strerror(errno)))") }
                }
            } catch {
                if !toStdout { close(fd); unlink(partial) }
                throw error
            }
            return (made, offset)
        }
        let fields: [(String, String)] = [
            ("BackupId", made.backupID), ("File", out == "-" ? "standard output" : out), ("Size", String(written)),
            ("KeyCount", String(made.keyCount)), ("RootKeyFingerprint", made.rootKeyFingerprint),
            ("CreatedAt", formatUnixTime(made.createdAt)),
        ]
        // The file may be on standard output: the summary then goes to standard error.
        if global.json {
            let object: [String: Any] = ["BackupId": made.backupID, "File": out, "Size": Int(written), "KeyCount": Int(made.keyCount),
                                         "RootKeyFingerprint": made.rootKeyFingerprint, "CreatedAt": Int(made.createdAt)]
            if out == "-" {
                let data = try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])
                writeStderr(String(decoding: data, as: UTF8.self) + "\n")
            } else {
                try printJSON(object)
            }
        } else if out == "-" {
            writeStderr(fields.map { "\($0.0)\t\($0.1)" }.joined(separator: "\n") + "\n")
        } else {
            printFields(fields)
        }
    }
}
