import Foundation
import Glibc
import KMSProtocol
import Synchronization

/// What the driver talks to: how to build request frames and how to read the answers.
/// The driver itself is the same for every target.
protocol BenchTarget: Sendable {
    var name: String { get }
    var socketPath: String { get }
    /// Replaces the contents of `frame` with the complete request frame (length prefix and
    /// body) for request `id`.
    func makeFrame(id: UInt64, into frame: inout [UInt8])
    /// Checks one response body and returns the id of the request it answers. `position` is
    /// the id the answer has if answers come back in the order the requests were sent.
    func answeredID(body: ArraySlice<UInt8>, position: UInt64) throws -> UInt64
}

/// The operations measured against kmsd: each with 64 bytes of plaintext (Encrypt), the blob
/// of such an Encrypt (Decrypt), or a 32-byte data key (GenerateDataKey), and one
/// encryption-context pair.
enum BenchOperation: String, CaseIterable, Codable, Sendable {
    case encrypt = "Encrypt", decrypt = "Decrypt", generateDataKey = "GenerateDataKey"

    static let context = ["purpose": "kmsbench"]

    /// The request (id `id`) this operation sends; `blob` is Decrypt's ciphertext.
    func request(id: UInt64, keyID: String, plaintext: [UInt8], blob: [UInt8]) -> Kmsd_V1_Request {
        var request = Kmsd_V1_Request()
        request.id = id
        switch self {
        case .encrypt:
            request.operation = .encrypt(.with { $0.keyID = keyID; $0.plaintext = Data(plaintext); $0.encryptionContext = Self.context })
        case .decrypt:
            request.operation = .decrypt(.with { $0.ciphertextBlob = Data(blob); $0.encryptionContext = Self.context })
        case .generateDataKey:
            request.operation = .generateDataKey(.with { $0.keyID = keyID; $0.keySpec = "AES_256"; $0.encryptionContext = Self.context })
        }
        return request
    }

    /// True when `result` is this operation's answer.
    func answers(_ result: Kmsd_V1_Response.OneOf_Result) -> Bool {
        switch (self, result) {
        case (.encrypt, .encrypt), (.decrypt, .decrypt), (.generateDataKey, .generateDataKey): true
        default: false
        }
    }
}

/// Request frames, built without re-running the protobuf encoder for every request.
enum RequestFrames {
    /// First request id on every connection. Ids from 2^21 to 2^28 all take a 4-byte varint,
    /// so every request frame of a run has the same size.
    static let firstID: UInt64 = 1 << 21

    /// The request without its id (id 0 is not written), serialized.
    static func operationBytes(_ request: (UInt64) -> Kmsd_V1_Request) throws -> [UInt8] {
        try request(0).serializedBytes()
    }

    /// frame = length ‖ field 1 (id, varint) ‖ operation bytes. A protobuf message is the
    /// concatenation of its fields and `id` is field 1, so this is byte for byte what the
    /// encoder writes for Request{id, operation}; `check` confirms it once per run.
    static func build(id: UInt64, operationBytes: [UInt8], into frame: inout [UInt8]) {
        frame.removeAll(keepingCapacity: true)
        appendLengthPrefix(1 + varintLength(id) + operationBytes.count, to: &frame)
        frame.append(0x08)  // field 1, wire type 0 (varint)
        var v = id
        while v >= 0x80 {
            frame.append(UInt8(truncatingIfNeeded: v) | 0x80)
            v >>= 7
        }
        frame.append(UInt8(v))
        frame.append(contentsOf: operationBytes)
    }

    static func varintLength(_ value: UInt64) -> Int {
        var length = 1
        var v = value >> 7
        while v != 0 {
            length += 1
            v >>= 7
        }
        return length
    }

    /// Confirms that `build` produces exactly what the protobuf encoder produces.
    static func check(_ request: (UInt64) -> Kmsd_V1_Request, operationBytes: [UInt8]) throws {
        for id in [firstID, firstID + 12_345, UInt64(1), UInt64(300)] {
            var frame: [UInt8] = []
            build(id: id, operationBytes: operationBytes, into: &frame)
            let expected: [UInt8] = try request(id).serializedBytes()
            guard frame == lengthPrefixed(expected) else {
                throw BenchError("internal error: the prebuilt request frame for id \(id) differs from the protobuf encoding")
            }
        }
    }
}

/// The in-process echo server: answers come back in order, and are the request bytes.
struct EchoTarget: BenchTarget {
    let name = "echo"
    let socketPath: String
    /// The complete frame sent every time: a real Encrypt request frame, so that echo and
    /// kmsd carry the same bytes.
    let payloadFrame: [UInt8]

    func makeFrame(id: UInt64, into frame: inout [UInt8]) {
        frame = payloadFrame
    }

    func answeredID(body: ArraySlice<UInt8>, position: UInt64) throws -> UInt64 {
        guard body.count + 4 == payloadFrame.count else {
            throw BenchError("echo returned a \(body.count)-byte frame for a \(payloadFrame.count - 4)-byte one")
        }
        return position
    }
}

/// kmsd: one operation's requests; answers come back in any order and are matched by id.
struct KMSDTarget: BenchTarget {
    let name = "kmsd"
    let socketPath: String
    let operation: BenchOperation
    /// The serialized request without id (see `RequestFrames`).
    let operationBytes: [UInt8]

    func makeFrame(id: UInt64, into frame: inout [UInt8]) {
        RequestFrames.build(id: id, operationBytes: operationBytes, into: &frame)
    }

    func answeredID(body: ArraySlice<UInt8>, position: UInt64) throws -> UInt64 {
        try Self.answeredID(body: body, operation: operation)
    }

    /// The id of the answer `body`, which must be `operation`'s result.
    static func answeredID(body: ArraySlice<UInt8>, operation: BenchOperation) throws -> UInt64 {
        let response: Kmsd_V1_Response
        do {
            response = try Kmsd_V1_Response(serializedBytes: Array(body))
        } catch {
            throw BenchError("kmsd sent \(body.count) bytes that do not decode as kmsd.v1.Response")
        }
        switch response.result {
        case .error(let e)?:
            throw BenchError("kmsd answered request \(response.id) with \(e.code): \(e.message)")
        case let result? where operation.answers(result):
            return response.id
        default:
            throw BenchError("kmsd answered request \(response.id) with something other than a \(operation.rawValue) result")
        }
    }
}

/// One load shape: how many connections, and how many requests each keeps in flight.
struct Scenario: Sendable {
    let name: String
    let connections: Int
    let window: Int

    static let all: [Scenario] = [
        Scenario(name: "1 connection, 1 in flight", connections: 1, window: 1),
        Scenario(name: "8 connections, 1 in flight each", connections: 8, window: 1),
        Scenario(name: "1 connection, 32 in flight", connections: 1, window: 32),
    ]
}

/// What one run measured, over the measured window only.
struct LoadResult: Sendable {
    let completed: Int
    let opsPerSecond: Double
    let p50Nanos: UInt64
    let p99Nanos: UInt64
    /// CPU time the target process used over the measured window, when it can be read.
    var cpuNanos: UInt64? = nil
    /// CPU time this process (the client) used over the measured window.
    var clientCPUNanos: UInt64? = nil
}

/// The CPU time measured by the sampling thread; read after it has finished.
final class CPUSample: @unchecked Sendable {
    private let lock = NSLock()
    private var nanos: UInt64?
    private var client: UInt64?
    func set(_ v: UInt64) { lock.withLock { nanos = v } }
    func setClient(_ v: UInt64) { lock.withLock { client = v } }
    var value: UInt64? { lock.withLock { nanos } }
    var clientValue: UInt64? { lock.withLock { client } }
}

/// Written by one client thread; read by the driver only after that thread has finished.
final class ConnectionOutcome: @unchecked Sendable {
    var latencies: [UInt64] = []
    var failure: String?
}

/// Tells every client thread of a run to stop sending (set when one of them fails).
final class StopSignal: Sendable {
    private let flag = Atomic<Bool>(false)
    func set() { flag.store(true, ordering: .relaxed) }
    var isSet: Bool { flag.load(ordering: .relaxed) }
}

/// Counts running threads; `wait` returns true when all have finished before the deadline.
final class ThreadLatch: @unchecked Sendable {
    private let group = DispatchGroup()
    func enter() { group.enter() }
    func leave() { group.leave() }
    func wait(seconds: Double) -> Bool { group.wait(timeout: .now() + seconds) == .success }
}

/// The client side of one connection: keeps `window` requests in flight until `measureUntil`,
/// then collects the outstanding answers.
struct ConnectionWorker<Target: BenchTarget>: Sendable {
    let fd: Int32
    let target: Target
    let window: Int
    let measureFrom: UInt64
    let measureUntil: UInt64
    let stop: StopSignal

    func run(into outcome: ConnectionOutcome) {
        do {
            outcome.latencies = try drive()
        } catch {
            outcome.failure = "\(target.name): \(error)"
            stop.set()
        }
    }

    /// Latencies (ns) of the answers that arrived inside the measured window.
    private func drive() throws -> [UInt64] {
        var reader = FrameReader(fd: fd)
        var frame: [UInt8] = []
        frame.reserveCapacity(512)
        var sentAt: [UInt64: UInt64] = [:]
        sentAt.reserveCapacity(window * 2)
        var latencies: [UInt64] = []
        latencies.reserveCapacity(1 << 16)
        var nextID = RequestFrames.firstID
        var nextPosition = RequestFrames.firstID
        var outstanding = 0
        var sending = true

        while true {
            // Top up the window: W frames at the start, then one per answer.
            while sending && outstanding < window {
                target.makeFrame(id: nextID, into: &frame)
                sentAt[nextID] = monotonicNanos()
                try UnixSocket.writeAll(fd, frame)
                nextID += 1
                outstanding += 1
            }
            if outstanding == 0 { break }

            let body = try reader.nextFrame()
            let now = monotonicNanos()
            let id = try target.answeredID(body: reader.buffer[body], position: nextPosition)
            nextPosition += 1
            guard let sent = sentAt.removeValue(forKey: id) else {
                throw BenchError("answer for id \(id), which is not outstanding on this connection")
            }
            outstanding -= 1
            if now >= measureFrom && now < measureUntil {
                latencies.append(now &- sent)
            }
            if now >= measureUntil || stop.isSet {
                sending = false
            }
        }
        return latencies
    }
}

enum LoadDriver {
    /// Longest a single read or write may block.
    static let ioTimeoutSeconds = 10

    /// Runs `scenario` against `target`: warm-up, then the measured window.
    static func run<Target: BenchTarget>(target: Target, scenario: Scenario,
                                         warmup: Double, duration: Double,
                                         cpuNanos: (@Sendable () -> UInt64?)? = nil) throws -> LoadResult {
        var fds: [Int32] = []
        defer { for fd in fds { close(fd) } }
        for _ in 0..<scenario.connections {
            let fd = try UnixSocket.connect(to: target.socketPath)
            fds.append(fd)
            UnixSocket.setTimeouts(fd, seconds: ioTimeoutSeconds)
        }

        let start = monotonicNanos()
        let measureFrom = start + UInt64(warmup * 1e9)
        let measureUntil = measureFrom + UInt64(duration * 1e9)
        let stop = StopSignal()
        let latch = ThreadLatch()
        var outcomes: [ConnectionOutcome] = []
        for (index, fd) in fds.enumerated() {
            let outcome = ConnectionOutcome()
            outcomes.append(outcome)
            let worker = ConnectionWorker(fd: fd, target: target, window: scenario.window,
                                          measureFrom: measureFrom, measureUntil: measureUntil, stop: stop)
            latch.enter()
            let thread = Thread {
                worker.run(into: outcome)
                latch.leave()
            }
            thread.name = "kmsbench-\(target.name)-\(index)"
            thread.start()
        }

        // The target's CPU time is sampled at the edges of the measured window.
        // So is this process's own (the client's: the echo server runs in a process of its own).
        let cpu = CPUSample()
        latch.enter()
        Thread {
            sleepUntil(measureFrom)
            let before = cpuNanos?(), clientBefore = ownCPUNanos()
            sleepUntil(measureUntil)
            if let before, let after = cpuNanos?() { cpu.set(after &- before) }
            cpu.setClient(ownCPUNanos() &- clientBefore)
            latch.leave()
        }.start()

        // Each thread ends by itself: it stops sending at measureUntil and every read is bounded.
        let limit = warmup + duration + Double(4 * ioTimeoutSeconds)
        guard latch.wait(seconds: limit) else {
            stop.set()
            fds = []  // still in use by a stuck thread; the process is about to exit anyway
            throw BenchError("\(target.name): client threads did not finish within \(Int(limit)) s")
        }

        let failures = outcomes.compactMap { $0.failure }
        if let first = failures.first {
            throw BenchError("\(first) (\(failures.count) of \(outcomes.count) connections failed; run aborted)")
        }
        var all: [UInt64] = []
        all.reserveCapacity(outcomes.reduce(0) { $0 + $1.latencies.count })
        for outcome in outcomes { all.append(contentsOf: outcome.latencies) }
        guard !all.isEmpty else {
            throw BenchError("\(target.name): no request completed in the measured window; try a longer --duration")
        }
        all.sort()
        return LoadResult(completed: all.count,
                          opsPerSecond: Double(all.count) / duration,
                          p50Nanos: percentile(all, 0.50),
                          p99Nanos: percentile(all, 0.99),
                          cpuNanos: cpu.value, clientCPUNanos: cpu.clientValue)
    }

    static func sleepUntil(_ deadline: UInt64) {
        let now = monotonicNanos()
        if deadline > now { usleep(useconds_t((deadline - now) / 1000)) }
    }

    /// utime + stime of a process from /proc/PID/stat, in nanoseconds.
    static func processCPUNanos(pid: Int32) -> UInt64? {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = text.lastIndex(of: ")") else { return nil }
        let fields = text[text.index(after: close)...].split(separator: " ")
        // Fields after the name start at field 3; utime and stime are fields 14 and 15.
        guard fields.count > 13, let user = UInt64(fields[11]), let system = UInt64(fields[12]) else { return nil }
        let hz = UInt64(max(1, sysconf(Int32(_SC_CLK_TCK))))
        return (user + system) * 1_000_000_000 / hz
    }

    /// CPU time of this whole process (every thread), in nanoseconds.
    static func ownCPUNanos() -> UInt64 {
        var t = timespec()
        clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t)
        return UInt64(t.tv_sec) * 1_000_000_000 + UInt64(t.tv_nsec)
    }

    /// Nearest-rank percentile of ascending `sorted` (not empty).
    static func percentile(_ sorted: [UInt64], _ p: Double) -> UInt64 {
        let rank = Int((p * Double(sorted.count)).rounded(.up))
        return sorted[min(max(rank, 1), sorted.count) - 1]
    }
}
