import CKMSLinux
import Glibc
import KMSProtocol
import NIOCore

/// What kmsd does when it runs out of file descriptors (RLIMIT_NOFILE, or the system's table).
///
/// accept(2) then fails with EMFILE or ENFILE and the connection stays in the listen backlog:
/// its client has connected, and would wait unanswered until it gives up. So one descriptor is
/// kept in reserve (an open /dev/null). When an accept fails for want of descriptors, the
/// reserve is given up to accept each waiting connection, answer it with a connection-level
/// `LimitExceededException` (request id 0, PROTOCOL.md §6), and close it; then the reserve is
/// taken back. The refusals are audited like every other refused connection. Nothing else
/// changes: connections already open keep being served, and new ones are served again as soon
/// as descriptors are free.
///
/// It sits on the listening channel ahead of SwiftNIO's `AcceptBackoffHandler` (Server adds
/// one), and passes the error on (so accepting pauses for a second) only when it could not take
/// the reserve back.
final class DescriptorExhaustionHandler: ChannelDuplexHandler {
    typealias InboundIn = Channel
    typealias InboundOut = Channel
    typealias OutboundIn = Channel
    typealias OutboundOut = Channel

    /// The listening socket (kmsd's own, or the one systemd passed).
    private let listenFD: Int32
    private var reserve: Int32
    /// The response every refused connection gets, encoded once.
    private let frame: [UInt8]
    /// Runs for each refused peer (off the event loop: it audits).
    private let onRefused: @Sendable (kms_ucred) -> Void
    private var lastLogged: UInt64 = 0
    private var refusedSinceLog = 0

    static let message = "kmsd has run out of file descriptors (RLIMIT_NOFILE); retry later"

    init(listenFD: Int32, onRefused: @escaping @Sendable (kms_ucred) -> Void) {
        self.listenFD = listenFD
        self.onRefused = onRefused
        reserve = Self.openReserve()
        let response = KMSResponse.failure(id: KMSProtocolConstants.connectionErrorRequestID,
                                           KMSError(.limitExceeded, Self.message))
        var framed: [UInt8] = []
        let body: [UInt8] = (try? response.serializedBytes()) ?? []
        let n = UInt32(body.count)
        framed.append(contentsOf: [UInt8(n >> 24), UInt8(n >> 16 & 0xff), UInt8(n >> 8 & 0xff), UInt8(n & 0xff)])
        framed.append(contentsOf: body)
        frame = framed
    }

    deinit { if reserve >= 0 { Glibc.close(reserve) } }

    private static func openReserve() -> Int32 { open("/dev/null", O_RDONLY | O_CLOEXEC) }

    /// Before every accept: a reserve lost to another thread (it took the descriptor the
    /// reserve freed) is taken back first, so a descriptor that comes free goes to the reserve,
    /// not to the next waiting connection; that one is then refused from the reserve.
    func read(context: ChannelHandlerContext) {
        if reserve < 0 { reserve = Self.openReserve() }
        context.read()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        guard let io = error as? IOError, io.errnoCode == EMFILE || io.errnoCode == ENFILE else {
            context.fireErrorCaught(error)
            return
        }
        if reserve < 0 { reserve = Self.openReserve() }
        guard reserve >= 0 else {
            // Not even the reserve: let NIO wait a second before it tries to accept again.
            note(refused: 0, reserveLost: true)
            context.fireErrorCaught(error)
            return
        }
        Glibc.close(reserve)
        reserve = -1
        var refused = 0
        // Each accepted connection is closed before the next accept, so the one descriptor
        // the reserve freed serves them all, unless another thread takes it meanwhile (accept
        // then fails with EMFILE and the loop ends). At most a backlog's worth per call.
        while refused < 1024 {
            let fd = accept(listenFD, nil, nil)
            guard fd >= 0 else { break }
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            var cred = kms_ucred()
            var length = socklen_t(MemoryLayout<kms_ucred>.size)
            let known = getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &length) == 0
            _ = frame.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT)) }
            // Read what the client already sent, so closing does not reset the connection
            // before it reads the answer.
            var scratch = (UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0))
            for _ in 0..<16 {
                guard withUnsafeMutableBytes(of: &scratch, { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }) > 0 else { break }
            }
            Glibc.close(fd)
            refused += 1
            if !known { cred = kms_ucred(pid: 0, uid: UInt32.max, gid: UInt32.max) }
            onRefused(cred)
        }
        reserve = Self.openReserve()
        note(refused: refused, reserveLost: reserve < 0)
        if reserve < 0 { context.fireErrorCaught(error) }
    }

    /// One line on stderr at most every 10 s, with the count since the last one.
    private func note(refused: Int, reserveLost: Bool) {
        refusedSinceLog += refused
        let now = RequestRateLimiter.nowNanoseconds()
        guard now &- lastLogged >= 10_000_000_000 else { return }
        lastLogged = now
        StandardError.write("kmsd: WARNING: out of file descriptors: \(refusedSinceLog) connections refused with LimitExceededException\(reserveLost ? "; the reserve descriptor could not be reopened, accepting pauses for a second" : ""). Raise LimitNOFILE= or lower maxConnections\n")
        refusedSinceLog = 0
    }
}
