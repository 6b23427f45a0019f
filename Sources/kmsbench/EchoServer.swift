import Foundation
import Glibc
import KMSProtocol
import Synchronization

/// The transport baseline ("how fast can a Unix socket carry these frames"): a server that
/// answers every 4-byte-length frame with the same frame. Blocking POSIX sockets, one thread
/// per connection; no protobuf, no crypto. Runs inside the kmsbench process.
///
/// Sendable: every stored property is immutable or thread-safe.
final class EchoServer: @unchecked Sendable {
    /// A connection that sends nothing for this long is closed.
    static let idleSeconds = 30

    let path: String
    private let listenFD: Int32
    private let stopping = Atomic<Bool>(false)
    private let acceptLoop = ThreadLatch()
    private let connections = ThreadLatch()

    init(path: String) throws {
        self.path = path
        self.listenFD = try UnixSocket.listen(at: path)
    }

    func start() {
        acceptLoop.enter()
        let thread = Thread { [self] in
            self.acceptConnections()
            self.acceptLoop.leave()
        }
        thread.name = "kmsbench-echo-accept"
        thread.start()
    }

    /// Stops accepting, removes the socket file and waits (bounded) for open connections to end.
    func stop() {
        stopping.store(true, ordering: .relaxed)
        // Wake the blocked accept(): it sees `stopping` and returns.
        if let fd = try? UnixSocket.connect(to: path) { close(fd) }
        if !acceptLoop.wait(seconds: 5) {
            _ = shutdown(listenFD, Int32(SHUT_RDWR))
            _ = acceptLoop.wait(seconds: 2)
        }
        close(listenFD)
        unlink(path)
        _ = connections.wait(seconds: Double(EchoServer.idleSeconds + 5))
    }

    private func acceptConnections() {
        while !stopping.load(ordering: .relaxed) {
            let fd = accept(listenFD, nil, nil)
            if fd < 0 {
                let e = errno
                if e == EINTR || e == ECONNABORTED { continue }
                return  // shut down, or out of resources
            }
            if stopping.load(ordering: .relaxed) {
                close(fd)
                return
            }
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            UnixSocket.setTimeouts(fd, seconds: EchoServer.idleSeconds)
            let latch = connections
            latch.enter()
            let thread = Thread {
                EchoServer.echoFrames(fd: fd)
                close(fd)
                latch.leave()
            }
            thread.name = "kmsbench-echo-conn"
            thread.start()
        }
    }

    /// Reads frames and writes each complete frame back unchanged, until the client closes,
    /// goes quiet for `idleSeconds`, or sends a bad length. Frames that arrived together are
    /// written back with one write(2), as an event-loop server flushes them together.
    static func echoFrames(fd: Int32) {
        var reader = FrameReader(fd: fd)
        while let frames = try? reader.completeFrames() {
            let written = reader.buffer.withUnsafeBytes { p in
                (try? UnixSocket.writeAll(fd, UnsafeRawBufferPointer(rebasing: p[frames]))) != nil
            }
            guard written else { return }
        }
    }
}
