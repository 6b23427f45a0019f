import Foundation
import Glibc
import KMSCore
import KMSCrypto
import KMSProtocol
import Synchronization

/// Backup files kmsd has made and not yet discarded (PROTOCOL.md §7.46, §7.47, §14).
///
/// CreateBackup snapshots the keystore (`VACUUM INTO`, one read transaction, so a consistent
/// copy while requests go on) into `STATE_DIR/backups/ID.snapshot`, authenticates it under the
/// root key's backup key, and keeps it until it has not been read for `lifetime`; the client
/// reads the backup file (header, snapshot, tag) in chunks. The snapshot holds what the keystore
/// holds: key material wrapped, nothing unwrapped. At most `kept` backups exist at once (the
/// oldest is discarded for a new one) and none survive a restart.
final class BackupStore: Sendable {
    struct Entry: Sendable {
        let id: String
        let path: String
        let header: [UInt8]
        let tag: [UInt8]
        let payloadBytes: UInt64
        let createdAt: Date
        let keyCount: Int
        var expiresAt: Date
        var size: UInt64 { UInt64(BackupFile.headerBytes) + payloadBytes + UInt64(BackupFile.tagBytes) }
    }

    static let lifetime: TimeInterval = 900
    static let kept = 2
    let directory: String
    /// The root key a restore of these backups needs.
    var rootKeyFingerprint: String { root.fingerprint }
    private let storage: SQLiteKeyStorage
    private let root: RootKey
    private let entries = Mutex<[Entry]>([])
    /// One snapshot at a time: each is a full copy of the keystore.
    private let creating = Mutex<Void>(())

    /// Creates `directory` (mode 0700) and removes whatever an earlier run left in it.
    init(directory: String, storage: SQLiteKeyStorage, root: RootKey) throws {
        self.directory = directory
        self.storage = storage
        self.root = root
        try StateDirectory.make(directory)
        for name in (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [] {
            unlink(directory + "/" + name)
        }
    }

    func create() throws(KMSError) -> Entry {
        try creating.withLock { _ throws(KMSError) in
            discardExpired()
            let id: String
            do { id = Hex.encode(try SecureRandom.bytes(16)) } catch { throw KMSError(.internalError, "could not generate random bytes inside kmsd") }
            let path = directory + "/" + id + ".snapshot"
            do {
                try storage.snapshot(to: path)
                guard chmod(path, 0o600) == 0 else { throw StorageError("cannot chmod \(path)") }
                var st = stat()
                guard stat(path, &st) == 0 else { throw StorageError("the snapshot \(path) vanished") }
                let header = BackupFile.Header(rootKeyFingerprint: root.fingerprint, createdAt: UInt64(Date().timeIntervalSince1970),
                                               payloadBytes: UInt64(st.st_size))
                let fd = open(path, O_RDONLY | O_CLOEXEC)
                guard fd >= 0 else { throw StorageError("cannot open the snapshot \(path)") }
                defer { close(fd) }
                let tag = try BackupFile.tag(header: header, root: root) { buffer in
                    let n = read(fd, buffer.baseAddress, buffer.count)
                    guard n >= 0 else { throw StorageError("cannot read the snapshot: \(String(cString: strerror(errno)))") }
                    return n
                }
                let entry = Entry(id: id, path: path, header: header.encoded, tag: tag, payloadBytes: header.payloadBytes,
                                  createdAt: Date(timeIntervalSince1970: TimeInterval(header.createdAt)),
                                  keyCount: try SQLiteKeyStorage.keyCount(snapshot: path), expiresAt: Date().addingTimeInterval(Self.lifetime))
                let dropped: [Entry] = entries.withLock { list in
                    list.append(entry)
                    let over = max(0, list.count - Self.kept)
                    defer { list.removeFirst(over) }
                    return Array(list.prefix(over))
                }
                for old in dropped { unlink(old.path) }
                return entry
            } catch {
                unlink(path)
                let reason = "\(error)"
                let full = reason.contains("full") || reason.contains("space")
                throw KMSError(.internalError, "the keystore could not be backed up: \(reason)\(full ? " (free space in kmsd's state directory: a backup needs as much room as the keystore)" : "")")
            }
        }
    }

    /// Up to `limit` bytes of backup `id` from `offset` on, and the file's size. Reading
    /// keeps the backup for another `lifetime`.
    func chunk(id: String, offset: UInt64, limit: Int) throws(KMSError) -> (data: [UInt8], size: UInt64) {
        discardExpired()
        let now = Date()
        guard let entry = entries.withLock({ list -> Entry? in
            guard let i = list.firstIndex(where: { $0.id == id }) else { return nil }
            list[i].expiresAt = now.addingTimeInterval(Self.lifetime)
            return list[i]
        }) else {
            throw KMSError(.notFound, "backup \(id.prefix(32)) does not exist: it expired (backups are kept \(Int(Self.lifetime) / 60) minutes after their last read), was replaced by newer ones (at most \(Self.kept) are kept) or kmsd restarted; create a new one")
        }
        guard offset <= entry.size else {
            throw KMSError(.validation, "Offset \(offset) is beyond the end of backup \(id) (\(entry.size) bytes)")
        }
        var out: [UInt8] = []
        var at = offset
        let end = min(entry.size, offset + UInt64(limit))
        let payloadEnd = UInt64(BackupFile.headerBytes) + entry.payloadBytes
        if at < UInt64(BackupFile.headerBytes), at < end {
            let upTo = min(end, UInt64(BackupFile.headerBytes))
            out += entry.header[Int(at)..<Int(upTo)]
            at = upTo
        }
        if at < payloadEnd, at < end {
            let upTo = min(end, payloadEnd)
            let fd = open(entry.path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { throw KMSError(.internalError, "backup \(id) could not be read: \(String(cString: strerror(errno)))") }
            defer { close(fd) }
            var piece = [UInt8](repeating: 0, count: Int(upTo - at))
            var got = 0
            while got < piece.count {
                let n = piece.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + got, $0.count - got, off_t(at) - off_t(BackupFile.headerBytes) + off_t(got)) }
                guard n > 0 else { throw KMSError(.internalError, "backup \(id) could not be read (its snapshot file is shorter than recorded)") }
                got += n
            }
            out += piece
            at = upTo
        }
        if at < end {
            out += entry.tag[Int(at - payloadEnd)..<Int(end - payloadEnd)]
        }
        return (out, entry.size)
    }

    /// Removes backups not read for `lifetime` (housekeeping calls this every second).
    func discardExpired() {
        let now = Date()
        let expired: [Entry] = entries.withLock { list in
            let gone = list.filter { $0.expiresAt <= now }
            list.removeAll { $0.expiresAt <= now }
            return gone
        }
        for entry in expired { unlink(entry.path) }
    }
}

/// CreateBackup and GetBackupChunk (administrators only, decided in Authorizer).
enum BackupHandlers {
    static func createBackup(_ ctx: HandlerContext) throws(KMSError) -> Kmsd_V1_CreateBackupResponse {
        guard let backups = ctx.backups else { throw KMSError(.unsupportedOperation, "this server keeps no backups") }
        let entry = try backups.create()
        return .with {
            $0.backupID = entry.id
            $0.size = entry.size
            $0.rootKeyFingerprint = backups.rootKeyFingerprint
            $0.createdAt = Int64(entry.createdAt.timeIntervalSince1970)
            $0.keyCount = UInt64(entry.keyCount)
            $0.expiresAt = Int64(entry.expiresAt.timeIntervalSince1970)
        }
    }

    static func getBackupChunk(_ r: Kmsd_V1_GetBackupChunkRequest, _ ctx: HandlerContext) throws(KMSError) -> Kmsd_V1_GetBackupChunkResponse {
        guard let backups = ctx.backups else { throw KMSError(.unsupportedOperation, "this server keeps no backups") }
        guard r.backupID.count == 32, Hex.decode(r.backupID) != nil else {
            throw KMSError(.validation, "BackupId must be the 32 hex digits CreateBackup returned")
        }
        // Room for the response's own fields within max_frame_bytes (PROTOCOL.md §6).
        let (data, size) = try backups.chunk(id: r.backupID.lowercased(), offset: r.offset, limit: ctx.settings.maxFrameBytes - 256)
        return .with {
            $0.data = Data(data)
            $0.size = size
        }
    }
}
