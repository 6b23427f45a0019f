import Glibc
import KMSCore
import KMSCrypto
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
    /// A ThrottledRequests summary: how many requests it stands for.
    var throttledCount: Int? = nil
    /// Set for events kmsd caused itself: their MESSAGE (and MESSAGE_ID is the event one).
    var eventMessage: String? = nil
    /// Set for alarms: the rule (KMS_ALARM); MESSAGE_ID is the alarm one and PRIORITY alert.
    var alarm: String? = nil
    /// More fields (NAME=value), for events that carry their own.
    var extraFields: [String] = []

    /// syslog priority: requests info (6) allowed, warning (4) denied, err (3) failed; kmsd's
    /// own events and changes to keys notice (5), err (3) when they failed.
    var priority: Int {
        if alarm != nil { return 1 }
        if eventMessage != nil { return result == .allowed ? 5 : 3 }
        switch result {
        case .allowed: return 6
        case .denied: return 4
        case .failed: return 3
        }
    }

    var fields: [String] {
        let verb = result == .allowed ? "allowed" : (result == .denied ? "denied" : "failed")
        var message = "\(action) by uid \(principal.uid) (\(principal.userName)) \(verb)"
        if !details.keyID.isEmpty { message += " on key \(details.keyID)" }
        if let error { message += ": \(error.rawValue)" }
        var fields = [
            "MESSAGE=\(message)",
            "MESSAGE_ID=\(AuditLog.messageID)",
            "PRIORITY=\(priority)",
            "SYSLOG_IDENTIFIER=kmsd",
            "KMS_ACTION=\(action)",
            "KMS_RESULT=\(result.rawValue)",
            "KMS_ERROR=\(error?.rawValue ?? "")",
            "KMS_KEY_ID=\(details.keyID)",
            "KMS_KEY_VERSION=\(details.keyVersion.map(String.init) ?? "")",
            "KMS_ALIAS=\(details.alias)",
            "KMS_REQUEST_ID=\(requestID)",
            "KMS_PEER_UID=\(principal.uid)",
            "KMS_PEER_GID=\(principal.gid)",
            "KMS_PEER_PID=\(principal.pid)",
            "KMS_PEER_USER=\(principal.userName)",
            "KMS_PEER_EXE=\(principal.executable ?? "")",
            "KMS_PEER_UNIT=\(principal.systemdUnit ?? "")",
            "KMS_PEER_UNRESOLVED=\(principal.unresolved ?? "")",
            "KMS_ENCRYPTION_CONTEXT=\(details.contextKeys)",
            "KMS_DECIDED_BY=\(details.decidedBy)",
            "KMS_DURATION_US=\(durationMicros)",
        ]
        if let eventMessage {
            fields[0] = "MESSAGE=\(eventMessage)"
            fields[1] = "MESSAGE_ID=\(alarm == nil ? AuditLog.eventMessageID : Alarms.messageID)"
        }
        if let alarm { fields.append("KMS_ALARM=\(alarm)") }
        if let throttledCount {
            fields[0] = "MESSAGE=\(throttledCount) further requests by uid \(principal.uid) (\(principal.userName)) were throttled within one second (counted here, not recorded one by one)"
            fields.append("KMS_THROTTLED_COUNT=\(throttledCount)")
        }
        if !details.integrityFailures.isEmpty {
            fields.append("KMS_INTEGRITY_FAILURES=\(details.integrityFailures.joined(separator: ","))")
        }
        if !details.grantID.isEmpty { fields.append("KMS_GRANT_ID=\(details.grantID)") }
        fields += extraFields
        if let source = details.sourceKeyID {
            fields.append("KMS_SOURCE_KEY_ID=\(source)")
            fields.append("KMS_SOURCE_KEY_VERSION=\(details.sourceKeyVersion.map(String.init) ?? "")")
            fields.append("KMS_SOURCE_ENCRYPTION_CONTEXT=\(details.sourceContextKeys ?? "")")
            fields.append("KMS_SOURCE_ALIAS=\(details.sourceAlias)")
        }
        return fields
    }
}

/// Hands one record per request to journald before the response is sent.
///
/// Records go over journald's native protocol on a non-blocking datagram socket, so a journald
/// that stops reading (SIGSTOP, overload) costs a request at most `timeout`, never a hung event
/// loop; once a hand-over has timed out, later records get one non-blocking attempt each until
/// journald takes one again. Every record carries `KMS_RUN_ID` (random per daemon start) and
/// `KMS_SEQ` (1, 2, 3, ... per run, consumed only by records journald took), so a record that
/// journald dropped after accepting it (its rate limit) leaves a visible gap.
///
/// Fail closed (the production default): when journald does not take the record, the request
/// fails with AuditUnavailableException and its result is withheld.
final class AuditLog: Sendable {
    static let messageID = "3f1c2a4e9b7d4c2e8a6f0d1b5e9c7a31"
    /// Records of what kmsd did on its own, not for a request (a scheduled key deletion).
    static let eventMessageID = "c1b7e0f4a2d94e8b9f3a6d5c2e1b0a97"
    static let journalSocket = "/run/systemd/journal/socket"

    let failClosed: Bool
    let runID: String
    let timeoutMilliseconds: Int32
    private let state: Mutex<JournalSocket>
    /// Keys KMS_CHAIN (derived from the root key; never leaves kmsd). nil: no chain (tests of
    /// the transport alone).
    let chainKey: SecureBytes?
    /// kmsd itself, the principal of its own events (resolved once: a passwd lookup may be slow).
    let daemon = Principal(uid: geteuid(), gid: getegid(), pid: getpid(), userName: Principal.userName(of: geteuid()))

    /// Development only (benchmarks): records are dropped unwritten and count as taken.
    let disabled: Bool

    init(failClosed: Bool, timeoutMilliseconds: Int = 250, socketPath: String = AuditLog.journalSocket, chainKey: SecureBytes? = nil,
         disabled: Bool = false) {
        self.disabled = disabled
        self.failClosed = failClosed
        self.timeoutMilliseconds = Int32(clamping: timeoutMilliseconds)
        self.chainKey = chainKey
        let id = (try? SecureRandom.bytes(16)) ?? []
        runID = Hex.encode(id)
        state = Mutex(JournalSocket(path: socketPath))
    }

    /// The last sequence number journald took (0 before the first record).
    var lastSequence: UInt64 { state.withLock { $0.sequence } }

    /// Where the chain stands: the last record journald took (seq, KMS_CHAIN).
    var chainPosition: (sequence: UInt64, chain: [UInt8]) { state.withLock { ($0.sequence, $0.chain) } }

    /// Starts this run's chain from the previous run's last known link (its checkpoint).
    func startChain(after previous: [UInt8]) { state.withLock { $0.chain = previous } }

    /// The fields KMS_CHAIN covers, in a form independent of their order in the journal: every
    /// KMS_ field but KMS_CHAIN, and MESSAGE, MESSAGE_ID, PRIORITY, SYSLOG_IDENTIFIER, sorted
    /// by name, each as lp(name) ‖ lp(value). `fields` are `NAME=value` in UTF-8.
    static func chainInput(previous: [UInt8], fields: [[UInt8]]) -> [UInt8] {
        let equals = UInt8(ascii: "=")
        var chained: [(bytes: [UInt8], eq: Int)] = []
        chained.reserveCapacity(fields.count)
        for f in fields {
            guard let eq = f.firstIndex(of: equals), isChained(f[..<eq]) else { continue }
            chained.append((f, eq))
        }
        chained.sort { namePrecedes($0.bytes, $0.eq, $1.bytes, $1.eq) }
        var out = [UInt8]()
        out.reserveCapacity(fields.reduce(64) { $0 + $1.count + 8 })
        out += chainLabel
        func lp<C: Collection>(_ bytes: C) where C.Element == UInt8 {
            let n = UInt32(bytes.count)
            out.append(UInt8(n >> 24)); out.append(UInt8((n >> 16) & 0xff)); out.append(UInt8((n >> 8) & 0xff)); out.append(UInt8(n & 0xff))
            out.append(contentsOf: bytes)
        }
        lp(previous)
        for c in chained {
            lp(c.bytes[..<c.eq])
            lp(c.bytes[(c.eq + 1)...])
        }
        return out
    }

    /// Bytewise order of two field names (`a[..<ae]`, `b[..<be]`), as lexicographicallyPrecedes.
    static func namePrecedes(_ a: [UInt8], _ ae: Int, _ b: [UInt8], _ be: Int) -> Bool {
        a.withUnsafeBufferPointer { pa in
            b.withUnsafeBufferPointer { pb in
                let c = memcmp(pa.baseAddress!, pb.baseAddress!, min(ae, be))
                return c != 0 ? c < 0 : ae < be
            }
        }
    }

    static let chainLabel = Array("kmsd/v1/audit-chain".utf8)
    static let plainChained: [[UInt8]] = ["MESSAGE", "MESSAGE_ID", "PRIORITY", "SYSLOG_IDENTIFIER"].map { Array($0.utf8) }
    static let kmsPrefix = Array("KMS_".utf8)
    static let chainName = Array("KMS_CHAIN".utf8)

    static func isChained(_ name: ArraySlice<UInt8>) -> Bool {
        if name.starts(with: kmsPrefix) { return !name.elementsEqual(chainName) }
        return plainChained.contains { name.elementsEqual($0) }
    }

    /// KMS_CHAIN of a record: HMAC-SHA256 under the chain key over the previous record's chain
    /// and this record's fields (`NAME=value` in UTF-8).
    func chainValue(previous: [UInt8], encoded: [[UInt8]]) -> [UInt8]? {
        guard let chainKey else { return nil }
        return try? HMAC.authenticate(key: chainKey, data: Self.chainInput(previous: previous, fields: encoded))
    }

    func chainValue(previous: [UInt8], fields: [(name: String, value: String)]) -> [UInt8]? {
        chainValue(previous: previous, encoded: fields.map { Array($0.name.utf8) + [UInt8(ascii: "=")] + Array($0.value.utf8) })
    }

    /// Where the chain stands, for the keystore (so the next start links to it):
    /// run id (16) ‖ u64be seq ‖ chain (32) ‖ clean (1) ‖ HMAC (32).
    func checkpoint(clean: Bool) -> [UInt8] {
        let (seq, chain) = chainPosition
        var body = Hex.decode(runID) ?? []
        for shift in stride(from: 56, through: 0, by: -8) { body.append(UInt8((seq >> UInt64(shift)) & 0xff)) }
        body += chain
        body.append(clean ? 1 : 0)
        guard let chainKey, let mac = try? HMAC.authenticate(key: chainKey, data: Array("kmsd/v1/audit-checkpoint".utf8) + body) else { return body }
        return body + mac
    }

    struct Checkpoint { let runID: String; let sequence: UInt64; let chain: [UInt8]; let clean: Bool }

    func parseCheckpoint(_ bytes: [UInt8]) -> Checkpoint? {
        guard bytes.count == 16 + 8 + 32 + 1 + 32, let chainKey else { return nil }
        let body = Array(bytes[0..<57])
        guard (try? HMAC.isValid(Array(bytes[57...]), key: chainKey, data: Array("kmsd/v1/audit-checkpoint".utf8) + body)) == true else { return nil }
        return Checkpoint(runID: Hex.encode(Array(body[0..<16])), sequence: body[16..<24].reduce(0) { $0 << 8 | UInt64($1) },
                          chain: Array(body[24..<56]), clean: body[56] == 1)
    }


    /// Writes the record; returns false when journald did not take it in time.
    func write(_ record: AuditRecord) -> Bool {
        if disabled { return true }
        var encoded = record.fields.map { Array($0.utf8) }
        encoded.append(Array("KMS_RUN_ID=\(runID)".utf8))
        var head = [UInt8]()
        head.reserveCapacity(1024)
        for field in encoded { Self.append(encoded: field, to: &head) }
        let timeout = timeoutMilliseconds, failClosed = self.failClosed
        return state.withLock { journal in
            var datagram = head
            let seq = Array("KMS_SEQ=\(journal.sequence + 1)".utf8)
            Self.append(encoded: seq, to: &datagram)
            var chain: [UInt8]? = nil
            if chainKey != nil {
                encoded.append(seq)
                chain = chainValue(previous: journal.chain, encoded: encoded)
                if let chain { Self.append(encoded: Array("KMS_CHAIN=\(Hex.encode(chain))".utf8), to: &datagram) }
            }
            if let error = journal.send(datagram, timeoutMilliseconds: timeout) {
                if !journal.warned {
                    journal.warned = true
                    StandardError.write("kmsd: WARNING: journald did not take an audit record (\(error)); \(failClosed ? "requests are refused while audit fails (auditFailClosed)" : "continuing without audit (development mode)")\n")
                }
                return false
            }
            if journal.warned {
                journal.warned = false
                StandardError.write("kmsd: journald takes audit records again\n")
            }
            journal.sequence += 1
            if let chain { journal.chain = chain }
            return true
        }
    }

    /// Why a record could not be written now (nil: it could, or audit is not fail-closed).
    /// Asked before a change that cannot be undone once made (RotateKeyOnDemand,
    /// DeleteImportedKeyMaterial), so that, while journald is unreachable or not reading, such
    /// a change is refused before it is made instead of made and then answered
    /// AuditUnavailableException. journald can still fail between this check and the record.
    func unableToRecord() -> String? {
        if disabled || !failClosed { return nil }
        return state.withLock { journal in
            if journal.stalled { return "journald is not reading its socket" }
            if journal.fd < 0, let error = journal.connectSocket() { return error }
            var pfd = pollfd(fd: journal.fd, events: Int16(POLLOUT), revents: 0)
            guard poll(&pfd, 1, 0) == 1, pfd.revents & Int16(POLLOUT) != 0 else { return "journald's socket is full" }
            return nil
        }
    }

    /// A record of something kmsd did by itself (no caller): `action` on `keyID`.
    @discardableResult
    func writeEvent(action: String, keyID: String, version: UInt32? = nil, failure: KMSErrorCode? = nil, message: String,
                    extraFields: [String] = [], alarm: String? = nil) -> Bool {
        var record = AuditRecord(action: action, requestID: 0, principal: daemon, result: failure == nil ? .allowed : .failed)
        record.error = failure
        record.extraFields = extraFields
        record.alarm = alarm
        record.details.keyID = keyID
        record.details.keyVersion = version
        record.eventMessage = message
        return write(record)
    }

    /// One field in journald's native protocol: `NAME=value\n`, or, when the value holds a
    /// newline or NUL, `NAME\n` + 64-bit little-endian length + value + `\n`.
    static func append(encoded field: [UInt8], to out: inout [UInt8]) {
        guard let eq = field.firstIndex(of: UInt8(ascii: "=")) else { return }
        let plain = field.withUnsafeBytes { memchr($0.baseAddress!, 10, $0.count) == nil && memchr($0.baseAddress!, 0, $0.count) == nil }
        if plain {
            out += field
            out.append(10)
        } else {
            let value = field[(eq + 1)...]
            out += field[..<eq]
            out.append(10)
            var n = UInt64(value.count).littleEndian
            withUnsafeBytes(of: &n) { out += $0 }
            out += value
            out.append(10)
        }
    }
}

/// A datagram socket connected to journald's native socket, reconnected when journald
/// restarts. Non-blocking: a full journald queue is waited for at most the given time, and
/// not at all while journald is known to be stalled.
struct JournalSocket: ~Copyable {
    let path: String
    var fd: Int32 = -1
    var sequence: UInt64 = 0
    /// KMS_CHAIN of the last record journald took (or the link this run started from).
    var chain = [UInt8](repeating: 0, count: 32)
    var warned = false
    /// True after a hand-over timed out, until journald takes a record again.
    var stalled = false
    /// After journald could not be reached, when (monotonic ns) to try connecting again: a
    /// daemon without journald then costs nothing per record but the refusal.
    var retryConnectAt: UInt64 = 0

    init(path: String) { self.path = path }

    deinit { if fd >= 0 { close(fd) } }

    /// Sends one datagram; nil on success, else why it failed.
    mutating func send(_ datagram: [UInt8], timeoutMilliseconds: Int32) -> String? {
        for attempt in 0..<2 {
            if fd < 0, let error = connectSocket() { return error }
            let sent = datagram.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
            if sent == datagram.count {
                stalled = false
                return nil
            }
            let err = errno
            switch err {
            case EAGAIN, EWOULDBLOCK:
                if stalled { return "journald is not reading its socket" }
                var pfd = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                if poll(&pfd, 1, timeoutMilliseconds) == 1, pfd.revents & Int16(POLLOUT) != 0 {
                    let again = datagram.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
                    if again == datagram.count { return nil }
                }
                stalled = true
                return "journald did not take the record within \(timeoutMilliseconds) ms"
            case ECONNREFUSED, ENOTCONN, ENOENT, EPIPE, ECONNRESET:
                // journald restarted (new socket) or is gone: reconnect once.
                close(fd)
                fd = -1
                if attempt == 1 { return String(cString: strerror(err)) }
            default:
                return String(cString: strerror(err))
            }
        }
        return "journald is unreachable"
    }

    mutating func connectSocket() -> String? {
        let now = RequestRateLimiter.nowNanoseconds()
        guard now >= retryConnectAt else { return "journald was unreachable moments ago (\(path))" }
        retryConnectAt = now + 100_000_000
        let s = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        guard s >= 0 else { return String(cString: strerror(errno)) }
        guard let rc = withUnixAddress(path, { Glibc.connect(s, $0, $1) }) else { close(s); return "journal socket path too long" }
        guard rc == 0 else {
            let why = String(cString: strerror(errno))
            close(s)
            return "cannot reach journald at \(path): \(why)"
        }
        // Room for large records; the kernel caps it at wmem_max.
        var size: Int32 = 8 * 1024 * 1024
        setsockopt(s, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        fd = s
        retryConnectAt = 0
        return nil
    }
}

/// kmsd's own messages to stderr (journald's stdout/stderr capture under systemd).
enum StandardError {
    static func write(_ s: String) {
        var bytes = Array(s.utf8)
        _ = Glibc.write(2, &bytes, bytes.count)
    }
}
