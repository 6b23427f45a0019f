import CKMSLinux
import Foundation
import Synchronization
import Glibc
import KMSCore
import KMSProtocol

/// The credential provider: systemd's `LoadCredential=ID:/run/kmsd/credentials.sock` connects
/// here from PID 1, bound to the abstract address `\0RANDOM/unit/UNIT/ID`, and reads the
/// credential until EOF. kmsd serves only a uid-0 peer; the unit and the credential id come
/// from that address; the secret is the blob `kmsctl put-credential` stored in
/// CREDENTIAL_DIR/UNIT/ID, decrypted as a Decrypt request of the unit (principal: the unit, no
/// user) with the encryption context {"systemd-unit": UNIT, "credential": ID}, so the key's
/// policy decides which units get which secrets. Anything else (another uid, an address not of
/// that form, no such credential, a denial) closes the connection with nothing written. Every
/// connection is audited: the Decrypt record (with KMS_CREDENTIAL), or a `LoadCredential`
/// record of the refusal.
///
/// Nothing is read from the peer, so a slow one holds only its own connection; each is served
/// on its own (at most `concurrentServes` at once), with a send timeout.
final class CredentialProvider: @unchecked Sendable {
    /// No real uid: the unit is the principal, never a user (root would be an administrator).
    static let unitPrincipalUID = UInt32.max

    let fd: Int32
    let dispatcher: Dispatcher
    let directory: @Sendable () -> String

    init(fd: Int32, dispatcher: Dispatcher, directory: @escaping @Sendable () -> String) {
        self.fd = fd
        self.dispatcher = dispatcher
        self.directory = directory
    }

    /// At most this many connections are served at once; more wait in the socket's backlog.
    static let concurrentServes = 16
    private let slots = DispatchSemaphore(value: CredentialProvider.concurrentServes)
    private let serving = DispatchGroup()
    private let stopping = Atomic<Bool>(false)
    private let stopped = DispatchSemaphore(value: 0)

    func start() {
        let t = Thread { [self] in
            acceptLoop()
            stopped.signal()
        }
        t.name = "kmsd-credentials"
        t.start()
    }

    /// Stops accepting and waits for the connections being served, so none writes an audit
    /// record after kmsd's last. The socket itself stays as it is: when systemd passed it, it
    /// goes on listening for the next kmsd (a shutdown() would break kmsd-credentials.socket).
    func stop() {
        stopping.store(true, ordering: .relaxed)
        stopped.wait()
        serving.wait()
    }

    /// Waits for a connection with poll (so stop() is seen within 200 ms), for a free slot,
    /// then accepts and serves it on its own.
    private func acceptLoop() {
        while !stopping.load(ordering: .relaxed) {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, 200) > 0 else { continue }
            guard slots.wait(timeout: .now() + .milliseconds(200)) == .success else { continue }
            let c = accept4Nonblocking()
            guard c >= 0 else {
                slots.signal()
                if errno == EMFILE || errno == ENFILE { usleep(100_000) }
                continue
            }
            serving.enter()
            DispatchQueue.global().async { [self] in
                defer { close(c); slots.signal(); serving.leave() }
                serve(c)
            }
        }
    }

    /// accept() without blocking: poll said a connection waits, but the peer may be gone.
    private func accept4Nonblocking() -> Int32 {
        let flags = fcntl(fd, F_GETFL)
        if flags & O_NONBLOCK == 0 { _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK) }
        let c = accept(fd, nil, nil)
        if c >= 0 {
            _ = fcntl(c, F_SETFD, FD_CLOEXEC)
            _ = fcntl(c, F_SETFL, fcntl(c, F_GETFL) & ~O_NONBLOCK)
        }
        return c
    }

    /// `\0RANDOM/unit/UNIT/ID` → (UNIT, ID); nil for any other address.
    static func parse(address bytes: [UInt8]) -> (unit: String, id: String)? {
        guard bytes.first == 0, let text = String(validating: bytes.dropFirst(), as: UTF8.self) else { return nil }
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 4, parts[1] == "unit", !parts[0].isEmpty else { return nil }
        let unit = String(parts[2]), id = String(parts[3])
        guard CredentialNames.isValidUnit(unit), CredentialNames.isValidID(id) else { return nil }
        return (unit, id)
    }

    private func serve(_ c: Int32) {
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        _ = setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var cred = kms_ucred()
        var credLength = socklen_t(MemoryLayout<kms_ucred>.size)
        guard getsockopt(c, SOL_SOCKET, SO_PEERCRED, &cred, &credLength) == 0 else { return }
        let peer = Principal(uid: cred.uid, gid: cred.gid, pid: cred.pid, userName: Principal.userName(of: cred.uid))
        var address = sockaddr_un()
        var length = socklen_t(MemoryLayout<sockaddr_un>.size)
        let named = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(c, $0, &length) }
        } == 0
        let pathLength = max(0, Int(length) - MemoryLayout<sa_family_t>.size)
        let bytes = withUnsafeBytes(of: &address.sun_path) { Array($0.prefix(pathLength)) }
        func refuse(_ code: KMSErrorCode, _ why: String, credential: String = "") {
            dispatcher.auditRejected(action: "LoadCredential", principal: peer, error: KMSError(code, why),
                                     extraFields: credential.isEmpty ? [] : ["KMS_CREDENTIAL=\(credential)"])
        }
        guard cred.uid == 0 else {
            // Counted against the uid's request rate like any request (audited the same way:
            // the first in each second, then one summary), so a flood costs kmsd little.
            guard dispatcher.rateLimiter.allow(uid: cred.uid) else {
                _ = dispatcher.throttled(id: KMSProtocolConstants.connectionErrorRequestID, action: "LoadCredential", principal: peer)
                return
            }
            return refuse(.accessDenied, "uid \(cred.uid) may not load credentials: only systemd (uid 0) may")
        }
        guard named, let (unit, id) = Self.parse(address: bytes) else {
            return refuse(.validation, "the peer's address is not systemd's \\0RANDOM/unit/UNIT/ID")
        }
        let dir = directory() + "/" + unit, path = dir + "/" + id
        let blob: [UInt8]
        do {
            try StateDirectory.checkTrusted(dir, what: "credential directory")
            blob = try Self.readBlob(path)
        } catch {
            return refuse(.notFound, "\(error)", credential: "\(unit)/\(id)")
        }
        var unitPrincipal = Principal(uid: Self.unitPrincipalUID, gid: Self.unitPrincipalUID, pid: cred.pid, userName: "unit \(unit)",
                                      systemdUnit: unit)
        unitPrincipal.executableKnown = false
        var decrypt = Kmsd_V1_DecryptRequest()
        decrypt.ciphertextBlob = Data(blob)
        decrypt.encryptionContext = CredentialNames.context(unit: unit, id: id)
        var request = KMSRequest()
        request.operation = .decrypt(decrypt)
        let out = dispatcher.handle(request, principal: unitPrincipal, extraAuditFields: ["KMS_CREDENTIAL=\(unit)/\(id)"])
        guard let secret = out.secret else { return }  // denied or failed: audited, nothing written
        secret.bytes.withUnsafeBytes { b in
            var sent = 0
            while sent < b.count {
                let n = send(c, b.baseAddress! + sent, b.count - sent, Int32(MSG_NOSIGNAL))
                if n < 0, errno == EINTR { continue }
                guard n > 0 else { return }
                sent += n
            }
        }
    }

    /// The stored blob: a regular file of at most 64 KiB that only root or kmsd can write.
    static func readBlob(_ path: String) throws -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else { throw ConfigurationError("no credential \(path) (kmsctl put-credential stores one)") }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, st.st_mode & S_IFMT == S_IFREG, st.st_mode & 0o022 == 0, st.st_uid == 0 || st.st_uid == geteuid(),
              st.st_size <= 65536 else {
            throw ConfigurationError("credential \(path) must be a regular file of at most 64 KiB that only root or kmsd's user can write")
        }
        var out = [UInt8](repeating: 0, count: Int(st.st_size))
        let n = out.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
        guard n == out.count else { throw ConfigurationError("short read from credential \(path)") }
        return out
    }
}
