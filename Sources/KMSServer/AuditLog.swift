import CKMSSystemd
import Glibc
import KMSCore
import KMSProtocol
import Synchronization

/// One audit record: what was asked, by whom, and how it ended. Never holds secret bytes.
struct AuditRecord: Sendable {
    enum Result: String { case allowed = "Allowed", denied = "Denied", failed = "Failed" }

    var action: String
    var requestID: UInt64
    var principal: Principal
    var result: Result
    var error: KMSErrorCode?
    var details = AuditDetails()
    var durationMicros: UInt64 = 0

    var fields: [String] {
        let verb = result == .allowed ? "allowed" : (result == .denied ? "denied" : "failed")
        var message = "\(action) by uid \(principal.uid) (\(principal.userName)) \(verb)"
        if !details.keyID.isEmpty { message += " on key \(details.keyID)" }
        if let error { message += ": \(error.rawValue)" }
        var fields = [
            "MESSAGE=\(message)",
            "MESSAGE_ID=\(AuditLog.messageID)",
            "PRIORITY=\(result == .allowed ? 6 : 4)",
            "SYSLOG_IDENTIFIER=kmsd",
            "KMS_ACTION=\(action)",
            "KMS_RESULT=\(result.rawValue)",
            "KMS_ERROR=\(error?.rawValue ?? "")",
            "KMS_KEY_ID=\(details.keyID)",
            "KMS_KEY_VERSION=\(details.keyVersion.map(String.init) ?? "")",
            "KMS_REQUEST_ID=\(requestID)",
            "KMS_PEER_UID=\(principal.uid)",
            "KMS_PEER_GID=\(principal.gid)",
            "KMS_PEER_PID=\(principal.pid)",
            "KMS_PEER_USER=\(principal.userName)",
            "KMS_PEER_EXE=\(principal.executable ?? "")",
            "KMS_PEER_UNIT=\(principal.systemdUnit ?? "")",
            "KMS_ENCRYPTION_CONTEXT=\(details.contextKeys)",
            "KMS_DURATION_US=\(durationMicros)",
        ]
        if let source = details.sourceKeyID {
            fields.append("KMS_SOURCE_KEY_ID=\(source)")
            fields.append("KMS_SOURCE_KEY_VERSION=\(details.sourceKeyVersion.map(String.init) ?? "")")
            fields.append("KMS_SOURCE_ENCRYPTION_CONTEXT=\(details.sourceContextKeys ?? "")")
        }
        return fields
    }
}

/// Hands one record per request to journald (sd_journal_sendv) before the response is sent.
///
/// Fail closed (the production default): when journald does not take the record, the request
/// fails with KMSInternalException and its result is withheld.
final class AuditLog: Sendable {
    static let messageID = "3f1c2a4e9b7d4c2e8a6f0d1b5e9c7a31"
    static let journalSocket = "/run/systemd/journal/socket"

    let failClosed: Bool
    private let warned = Atomic<Bool>(false)

    init(failClosed: Bool) {
        self.failClosed = failClosed
    }

    /// Writes the record; returns false when journald refused it.
    func write(_ record: AuditRecord) -> Bool {
        // sd_journal_sendv reports success when the journal socket does not exist (it drops the
        // entry silently), so check for it first; other failures it does report.
        let rc = access(Self.journalSocket, W_OK) == 0 ? Self.send(record.fields) : -ENOENT
        if rc < 0 {
            if !warned.exchange(true, ordering: .relaxed) {
                let why = String(cString: strerror(-rc))
                StandardError.write("kmsd: WARNING: journald did not accept an audit record (\(why)); \(failClosed ? "requests are refused while audit fails (auditFailClosed)" : "continuing without audit (development mode)")\n")
            }
            return false
        }
        return true
    }

    /// Sends FIELD=value strings as one journal entry; returns sd_journal_sendv's result.
    static func send(_ fields: [String]) -> Int32 {
        let buffers = fields.map { field -> (UnsafeMutableRawBufferPointer, Int) in
            // NUL ends a field early in the journal's native protocol; never let a value do that.
            let bytes = field.utf8.map { $0 == 0 ? UInt8(ascii: "?") : $0 }
            let p = UnsafeMutableRawBufferPointer.allocate(byteCount: max(bytes.count, 1), alignment: 1)
            p.copyBytes(from: bytes)
            return (p, bytes.count)
        }
        defer { for (p, _) in buffers { p.deallocate() } }
        var iov = buffers.map { iovec(iov_base: $0.0.baseAddress, iov_len: $0.1) }
        return sd_journal_sendv(&iov, Int32(iov.count))
    }
}

/// kmsd's own messages to stderr (journald's stdout/stderr capture under systemd).
enum StandardError {
    static func write(_ s: String) {
        var bytes = Array(s.utf8)
        _ = Glibc.write(2, &bytes, bytes.count)
    }
}
