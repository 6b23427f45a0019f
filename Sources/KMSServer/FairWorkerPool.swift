import Foundation
import NIOCore

/// Worker threads for anything that may block (storage, passwd lookups), shared fairly between
/// uids: each uid has its own queue, and the workers take one job from each waiting uid in turn.
/// So one uid's slow storage reads (a flood of cache misses, a large listing) delay its own
/// later requests, not everyone else's.
final class FairWorkerPool: @unchecked Sendable {
    struct Stopped: Error {}

    private struct Job {
        let run: () -> Void
        let cancel: () -> Void
    }

    private let condition = NSCondition()
    private var queues: [UInt32: CircularBuffer<Job>] = [:]
    /// Uids with queued jobs, in the order they are served.
    private var turn = CircularBuffer<UInt32>()
    private var stopped = false
    private var threads: [Thread] = []

    init(threads count: Int) {
        for i in 0..<max(1, count) {
            // Workers keep the pool alive until shutdown() lets them finish.
            let t = Thread { self.work() }
            t.name = "kmsd-worker-\(i)"
            threads.append(t)
            t.start()
        }
    }

    /// Runs `body` on a worker, in `uid`'s queue; the future completes on `eventLoop`. Fails
    /// with `Stopped` once the pool is shutting down.
    func run<T: Sendable>(uid: UInt32, eventLoop: EventLoop, _ body: @escaping @Sendable () -> T) -> EventLoopFuture<T> {
        let promise = eventLoop.makePromise(of: T.self)
        let job = Job(run: { promise.succeed(body()) }, cancel: { promise.fail(Stopped()) })
        condition.lock()
        if stopped {
            condition.unlock()
            job.cancel()
            return promise.futureResult
        }
        if queues[uid, default: []].isEmpty { turn.append(uid) }
        queues[uid, default: []].append(job)
        condition.signal()
        condition.unlock()
        return promise.futureResult
    }

    private func work() {
        while true {
            condition.lock()
            while turn.isEmpty, !stopped { condition.wait() }
            if turn.isEmpty {  // stopped and drained
                condition.unlock()
                return
            }
            let uid = turn.removeFirst()
            var queue = queues.removeValue(forKey: uid) ?? CircularBuffer()
            let job = queue.removeFirst()
            if !queue.isEmpty {
                queues[uid] = queue
                turn.append(uid)  // its next job waits for every other uid's turn
            }
            condition.unlock()
            job.run()
        }
    }

    /// Finishes the jobs already queued, refuses new ones, and waits for the workers.
    func shutdown() {
        condition.lock()
        stopped = true
        condition.broadcast()
        condition.unlock()
        while threads.contains(where: { !$0.isFinished }) { usleep(1000) }
    }
}
