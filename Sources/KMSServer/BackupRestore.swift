import Foundation
import Glibc
import KMSCore

/// `kmsd restore`: installs a backup file (PROTOCOL.md §14) as the keystore of a state directory
/// that has none, offline. The file is authenticated under the root key before anything takes
/// its place: a backup made under another root key, or truncated, altered or extended, is
/// refused and nothing is left behind.
public enum BackupRestore {
    /// The files SQLite keeps beside a database (write-ahead log, its index, a rollback journal):
    /// they belong with the keystore they were made for, never with another.
    static let sqliteSidecars = ["-wal", "-shm", "-journal"]

    /// The root key comes from where kmsd itself would load it ($CREDENTIALS_DIRECTORY/root-key,
    /// else rootKeyFile, else in development mode STATE_DIR/root-key). `from` is a path, or "-"
    /// for standard input. Returns what happened, for the administrator.
    public static func run(configuration c: ServerConfiguration, from source: String) throws -> String {
        try c.validate()
        let keystore = c.keystorePath
        if FileManager.default.fileExists(atPath: keystore) {
            throw ConfigurationError("\(c.stateDirectory) already has a keystore (\(keystore)); restore only into a state directory without one (move it away first: a restore never replaces a keystore)")
        }
        // A write-ahead log left by a keystore that was moved away would be replayed into the
        // restored one (and belongs with the keystore it came from).
        for suffix in sqliteSidecars where FileManager.default.fileExists(atPath: keystore + suffix) {
            throw ConfigurationError("\(keystore + suffix) is left from an earlier keystore; move it away with that keystore (it may hold its last changes) before restoring")
        }
        // A state directory this command creates is removed again when the restore fails, so a
        // refused backup leaves nothing behind.
        let created = !FileManager.default.fileExists(atPath: c.stateDirectory)
        try StateDirectory.make(c.stateDirectory)
        var restored = false
        defer {
            if created && !restored {
                unlink(c.stateDirectory + "/kmsd.lock")
                rmdir(c.stateDirectory)
            }
        }
        try StateDirectory.checkContents(c.stateDirectory)
        let lock = try StateDirectory.lock(c.stateDirectory)
        defer { close(lock) }
        let credentials = ProcessInfo.processInfo.environment["CREDENTIALS_DIRECTORY"]
        let devPath = c.development && FileManager.default.fileExists(atPath: c.devRootKeyPath) ? c.devRootKeyPath : nil
        guard credentials != nil || c.rootKeyFile != nil || devPath != nil else {
            throw ConfigurationError("no root key: give --root-key-file FILE (the root key the backed-up kmsd used), or the systemd credential root-key")
        }
        let (root, rootSource) = try RootKey.load(credentialsDirectory: credentials, file: c.rootKeyFile, devPath: devPath)

        let input = source == "-" ? STDIN_FILENO : open(source, O_RDONLY | O_CLOEXEC)
        guard input >= 0 else { throw ConfigurationError("cannot open \(source): \(String(cString: strerror(errno)))") }
        defer { if input != STDIN_FILENO { close(input) } }
        let staging = keystore + ".restoring"
        let discard = { for suffix in [""] + sqliteSidecars { unlink(staging + suffix) } }
        discard()
        let out = open(staging, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard out >= 0 else { throw ConfigurationError("cannot create \(staging): \(String(cString: strerror(errno)))") }
        var outOpen = true
        defer { if outOpen { close(out) } }
        let header: BackupFile.Header
        let keys: Int
        do {
            header = try BackupFile.open(root: root, read: { buffer in
                let n = read(input, buffer.baseAddress, buffer.count)
                guard n >= 0 else { throw ConfigurationError("cannot read \(source): \(String(cString: strerror(errno)))") }
                return n
            }, write: { bytes in
                var done = 0
                while done < bytes.count {
                    let n = Glibc.write(out, bytes.baseAddress! + done, bytes.count - done)
                    guard n > 0 else { throw ConfigurationError("cannot write \(staging): \(String(cString: strerror(errno)))") }
                    done += n
                }
            })
            guard fsync(out) == 0 else { throw ConfigurationError("cannot write \(staging) durably: \(String(cString: strerror(errno)))") }
            close(out)
            outOpen = false
        } catch {
            discard()
            throw ConfigurationError("\(source) was not restored: \(error)")
        }
        guard rename(staging, keystore) == 0 else {
            let e = String(cString: strerror(errno))
            discard()
            throw ConfigurationError("cannot move the restored keystore into place (\(keystore)): \(e)")
        }
        let dir = open(c.stateDirectory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dir >= 0 { fsync(dir); close(dir) }
        // The authentic snapshot opens under this root key and its rows check out (else it is
        // taken away again: a kmsd would refuse it too).
        do {
            let storage = try SQLiteKeyStorage(path: keystore, readConnections: 1)
            let repository = try KeyRepository(storage: storage, root: root)
            if let problem = repository.integrityReport.problem {
                throw ConfigurationError("the backup is authentic but its keystore reports: \(problem)")
            }
            keys = repository.keyCountsByState().values.reduce(0, +)
        } catch {
            for suffix in [""] + sqliteSidecars { unlink(keystore + suffix) }
            throw ConfigurationError("\(source) was not restored: \(error)")
        }
        restored = true
        let made = Date(timeIntervalSince1970: TimeInterval(header.createdAt))
        return "restored \(keys) keys into \(keystore) from a backup made \(ISO8601DateFormatter().string(from: made)) under root key \(header.rootKeyFingerprint) (\(rootSource)). Start kmsd with that root key"
    }
}
