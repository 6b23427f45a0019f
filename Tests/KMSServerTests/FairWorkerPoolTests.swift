import Foundation
@testable import KMSServer
import NIOCore
import NIOPosix
import Testing

/// One uid's backlog of slow work does not queue another uid's request behind it.
struct FairWorkerPoolTests {
    final class Log: @unchecked Sendable {
        private let lock = NSLock()
        private var entries: [String] = []
        func append(_ s: String) { lock.withLock { entries.append(s) } }
        var all: [String] { lock.withLock { entries } }
    }

    @Test func aBusyUIDDoesNotDelayAnother() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let pool = FairWorkerPool(threads: 2)
        defer { pool.shutdown(); group.shutdownGracefully { _ in } }
        let log = Log()
        var futures: [EventLoopFuture<Void>] = []
        for i in 0..<40 {
            futures.append(pool.run(uid: 1000, eventLoop: group.next()) { usleep(5_000); log.append("a\(i)") })
        }
        futures.append(pool.run(uid: 2000, eventLoop: group.next()) { log.append("b") })
        for f in futures { try await f.get() }
        let position = try #require(log.all.firstIndex(of: "b"))
        #expect(position <= 3, "uid 2000's job ran after \(position) of uid 1000's 40 queued jobs")
        #expect(log.all.count == 41)
    }

    @Test func afterShutdownJobsFail() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { group.shutdownGracefully { _ in } }
        let pool = FairWorkerPool(threads: 1)
        pool.shutdown()
        await #expect(throws: FairWorkerPool.Stopped.self) { try await pool.run(uid: 1, eventLoop: group.next()) { 1 }.get() }
    }
}
