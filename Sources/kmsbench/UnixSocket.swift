import Foundation
import Glibc
import KMSProtocol

/// A failure with a message for people.
struct BenchError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Monotonic clock in nanoseconds.
@inline(__always)
func monotonicNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}

func errnoDescription(_ code: Int32) -> String {
    String(cString: strerror(code))
}

/// Blocking Unix stream sockets, the only kind kmsbench uses (all under its work directory).
enum UnixSocket {
    /// MSG_NOSIGNAL (Linux): a write to a closed peer fails with EPIPE instead of raising SIGPIPE.
    static let noSignal: Int32 = 0x4000

    /// Longest path that fits in `sockaddr_un.sun_path` with its terminating NUL.
    static let maxPathBytes = MemoryLayout.size(ofValue: sockaddr_un().sun_path) - 1

    static func address(_ path: String) throws -> sockaddr_un {
        let bytes = Array(path.utf8)
        guard !bytes.isEmpty, bytes.count <= maxPathBytes else {
            throw BenchError("socket path \(path) is longer than \(maxPathBytes) bytes; choose a shorter --work-dir")
        }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { $0.copyBytes(from: bytes) }
        return addr
    }

    private static func newSocket() throws -> Int32 {
        let type = Int32(bitPattern: SOCK_STREAM.rawValue) | Int32(bitPattern: SOCK_CLOEXEC.rawValue)
        let fd = socket(AF_UNIX, type, 0)
        guard fd >= 0 else { throw BenchError("socket(AF_UNIX) failed: \(errnoDescription(errno))") }
        return fd
    }

    /// Connects to the socket at `path`; returns the descriptor.
    static func connect(to path: String) throws -> Int32 {
        var addr = try address(path)
        let fd = try newSocket()
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        if rc != 0 {
            let e = errno
            Glibc.close(fd)
            throw BenchError("cannot connect to \(path): \(errnoDescription(e))")
        }
        return fd
    }

    /// Binds and listens at `path`, replacing a stale socket file; returns the descriptor.
    static func listen(at path: String, backlog: Int32 = 128) throws -> Int32 {
        var addr = try address(path)
        unlink(path)
        let fd = try newSocket()
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        if rc != 0 {
            let e = errno
            Glibc.close(fd)
            throw BenchError("cannot bind \(path): \(errnoDescription(e))")
        }
        if Glibc.listen(fd, backlog) != 0 {
            let e = errno
            Glibc.close(fd)
            throw BenchError("cannot listen on \(path): \(errnoDescription(e))")
        }
        return fd
    }

    /// Bounds every blocking read and write on `fd`, so no loop can hang on a stalled peer.
    static func setTimeouts(_ fd: Int32, seconds: Int) {
        var tv = timeval(tv_sec: seconds, tv_usec: 0)
        let size = socklen_t(MemoryLayout<timeval>.size)
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, size)
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, size)
    }

    static func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) throws {
        guard let base = bytes.baseAddress else { return }
        var offset = 0
        while offset < bytes.count {
            let n = send(fd, base + offset, bytes.count - offset, noSignal)
            if n > 0 {
                offset += n
                continue
            }
            let e = errno
            if n < 0 && e == EINTR { continue }
            if n < 0 && (e == EAGAIN || e == EWOULDBLOCK) {
                throw BenchError("write timed out (the peer stopped reading)")
            }
            throw BenchError("write failed: \(errnoDescription(e))")
        }
    }

    static func writeAll(_ fd: Int32, _ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try writeAll(fd, $0) }
    }
}

/// Appends the 4-byte big-endian length prefix of the framing (PROTOCOL.md §3).
func appendLengthPrefix(_ length: Int, to frame: inout [UInt8]) {
    let n = UInt32(length)
    frame.append(UInt8(truncatingIfNeeded: n >> 24))
    frame.append(UInt8(truncatingIfNeeded: n >> 16))
    frame.append(UInt8(truncatingIfNeeded: n >> 8))
    frame.append(UInt8(truncatingIfNeeded: n))
}

/// A complete frame: length prefix, then `body`.
func lengthPrefixed(_ body: [UInt8]) -> [UInt8] {
    var frame: [UInt8] = []
    frame.reserveCapacity(4 + body.count)
    appendLengthPrefix(body.count, to: &frame)
    frame.append(contentsOf: body)
    return frame
}

/// Reads length-prefixed frames from a blocking socket. It buffers, so frames that arrive
/// together cost one read(2).
struct FrameReader {
    let fd: Int32
    let maxFrameBytes: Int
    private(set) var buffer: [UInt8]
    private var start = 0
    private var end = 0

    /// Whether to wait in poll(2) for input (clients) rather than blocked in read(2) (the echo
    /// server's threads, whose peer is the client).
    let waitsInPoll: Bool

    init(fd: Int32, maxFrameBytes: Int = KMSProtocolConstants.maxConfigurableFrameBytes, capacity: Int = 64 * 1024,
         waitsInPoll: Bool = true) {
        self.fd = fd
        self.waitsInPoll = waitsInPoll
        self.maxFrameBytes = maxFrameBytes
        self.buffer = [UInt8](repeating: 0, count: max(capacity, 16))
    }

    /// The body of the next frame, as a range of `buffer` that stays valid until the next call.
    /// Throws when the peer closes, on a read error or timeout, and on an impossible length.
    mutating func nextFrame() throws -> Range<Int> {
        while true {
            let available = end - start
            if available >= 4 {
                let length = Int(buffer[start]) << 24 | Int(buffer[start + 1]) << 16
                    | Int(buffer[start + 2]) << 8 | Int(buffer[start + 3])
                guard length >= 1, length <= maxFrameBytes else {
                    throw BenchError("the peer sent a frame length of \(length) (allowed 1...\(maxFrameBytes))")
                }
                if available >= 4 + length {
                    let body = (start + 4)..<(start + 4 + length)
                    start += 4 + length
                    return body
                }
            }
            try fill()
        }
    }

    /// Every complete frame buffered (length prefixes included), as a range of `buffer` valid
    /// until the next call; reads until there is at least one. Throws as `nextFrame` does.
    mutating func completeFrames() throws -> Range<Int> {
        while true {
            var scan = start
            while end - scan >= 4 {
                let length = Int(buffer[scan]) << 24 | Int(buffer[scan + 1]) << 16
                    | Int(buffer[scan + 2]) << 8 | Int(buffer[scan + 3])
                guard length >= 1, length <= maxFrameBytes else {
                    throw BenchError("the peer sent a frame length of \(length) (allowed 1...\(maxFrameBytes))")
                }
                guard end - scan - 4 >= length else { break }
                scan += 4 + length
            }
            if scan > start {
                let frames = start..<scan
                start = scan
                return frames
            }
            try fill()
        }
    }

    /// Makes room if needed, then reads at least one byte.
    private mutating func fill() throws {
        if start == end {
            start = 0
            end = 0
        }
        if end == buffer.count {
            if start > 0 {
                let from = start
                let count = end - start
                buffer.withUnsafeMutableBytes { p in
                    let base = p.baseAddress!
                    _ = memmove(base, base + from, count)
                }
                start = 0
                end = count
            } else {
                // A frame larger than the buffer (its length is already checked).
                buffer.append(contentsOf: repeatElement(0, count: buffer.count))
            }
        }
        let descriptor = fd
        let offset = end
        // What is there already, without blocking; else wait in poll(2) for input only, as an
        // event-loop client (epoll) does. A thread blocked in read(2) on a Unix socket sleeps on
        // the queue the peer wakes for write space too, so it would also be woken every time
        // the server reads a request off the socket, and the kernel charges that spurious
        // wake-up to the server (about a tenth of kmsd's CPU per request with one in flight).
        var waited = false
        while true {
            let flags = waitsInPoll ? Int32(MSG_DONTWAIT) : 0
            let n = buffer.withUnsafeMutableBytes { p in
                recv(descriptor, p.baseAddress! + offset, p.count - offset, flags)
            }
            if n > 0 {
                end += n
                return
            }
            if n == 0 { throw BenchError("the peer closed the connection") }
            let e = errno
            if e == EINTR { continue }
            if e == EAGAIN || e == EWOULDBLOCK {
                if waited || !waitsInPoll { throw BenchError("no answer within the receive timeout") }
                var pfd = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
                let ready = poll(&pfd, 1, Int32(LoadDriver.ioTimeoutSeconds * 1000))
                if ready < 0, errno == EINTR { continue }
                waited = ready == 0
                continue
            }
            throw BenchError("read failed: \(errnoDescription(e))")
        }
    }
}
