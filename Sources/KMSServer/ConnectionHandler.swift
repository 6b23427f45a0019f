import KMSCore
import KMSProtocol
import NIOCore
import NIOPosix
import Synchronization

/// Requests the whole server has accepted but not yet answered, and whether it is draining.
final class RequestTracker: Sendable {
    /// Requests read from a socket whose response has not been written out yet.
    let pending = Atomic<Int>(0)
    /// Set on SIGTERM: connections stop reading new requests.
    let draining = Atomic<Bool>(false)
}

/// One client connection: decodes requests, handles them with at most `maxInFlight` at once
/// (on the event loop when every key they name is cached, else on the worker pool, which also
/// takes anything that writes storage), writes responses (in completion order, matched by id),
/// and closes on framing errors or idleness.
///
/// A request counts as in flight from the moment it is read until its response has been
/// written to the socket. No further reads are issued while `maxInFlight` requests are in
/// flight, while the socket is not writable (the client is not reading its answers), or while
/// the server drains; so a client that pipelines faster than it reads is slowed down, never
/// errored, and cannot grow the daemon's memory.
final class ConnectionHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let principal: Principal
    private let dispatcher: Dispatcher
    private let pool: FairWorkerPool
    private let maxInFlight: Int
    private let tracker: RequestTracker
    private let onClose: @Sendable () -> Void
    private let turns: TurnScheduler

    private var inFlight = 0
    /// Access decisions of this connection's requests handled on the event loop (never those
    /// handed to the worker pool), used again while nothing they read has changed.
    private let memo = DecisionMemo()
    /// A request read but not started: its frame, or (when it was put back at the end of a
    /// turn) what decoding it gave.
    enum Waiting {
        case frame(ByteBuffer)
        case decoded(Result<IncomingRequest, KMSError>)

        /// Decodes a frame, then zeroes it (it may hold an Encrypt plaintext).
        var request: Result<IncomingRequest, KMSError> {
            switch self {
            case .decoded(let r): return r
            case .frame(let frame):
                defer { frame.zeroInPlace() }
                return Result { () throws(KMSError) in try IncomingRequest(frameBody: frame) }
            }
        }
    }

    /// Requests read, not started yet. Decoding waits for the request's turn: it is work too.
    private var waiting: CircularBuffer<Waiting> = []
    private var readPending = false
    private var closing = false
    private var inputClosed = false
    private var starting = false
    /// Responses written on the event loop and not flushed yet (`startWaiting` flushes).
    private var needsFlush = false

    init(principal: Principal, dispatcher: Dispatcher, pool: FairWorkerPool, maxInFlight: Int,
         tracker: RequestTracker, turns: TurnScheduler, onClose: @escaping @Sendable () -> Void) {
        self.turns = turns
        self.principal = principal
        self.dispatcher = dispatcher
        self.pool = pool
        self.maxInFlight = maxInFlight
        self.tracker = tracker
        self.onClose = onClose
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        waiting.append(.frame(unwrapInboundIn(data)))
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        // A read is a new turn for this connection (unless it is waiting for the next round).
        if !waitingForRound { beginTurn() }
        startWaiting(context: context)
        context.fireChannelReadComplete()
    }

    /// Most requests handed to a worker as one task: frames that arrived together are handled
    /// together (fewer thread hops), in batches small enough that one slow request delays few.
    static let batchLimit = 8

    /// How long one connection may keep its event loop per turn. Past it, the rest waits for
    /// the loop's next round (see `TurnScheduler`), which runs only after the loop has polled
    /// for I/O again, so one pipelining client cannot hold a loop that other clients share.
    static let turnBudgetNanoseconds: UInt64 = 300_000

    private var turnStartedAt: UInt64 = 0
    private var startedThisTurn = 0
    private var waitingForRound = false

    private func beginTurn() {
        startedThisTurn = 0
        turnStartedAt = RequestRateLimiter.nowNanoseconds()
    }

    private func startWaiting(context: ChannelHandlerContext) {
        // Not re-entrant: a write completing inside start() calls back here; the loop below
        // picks up whatever that callback would have started.
        guard !starting else { return }
        starting = true
        defer {
            starting = false
            // One flush (one write(2)) for every response this pass produced.
            if needsFlush {
                needsFlush = false
                context.flush()
            }
        }
        while inFlight < maxInFlight, !closing, !waiting.isEmpty {
            // Every turn starts at least one batch; after that, only within the time budget.
            guard startedThisTurn == 0 || RequestRateLimiter.nowNanoseconds() &- turnStartedAt < Self.turnBudgetNanoseconds else {
                waitForNextRound(context: context)
                return
            }
            var batch: [Result<IncomingRequest, KMSError>] = []
            while batch.count < Self.batchLimit, inFlight + batch.count < maxInFlight, let next = waiting.popFirst() {
                batch.append(next.request)
                // Stop early when decoding alone used up the turn; what is left waits.
                if RequestRateLimiter.nowNanoseconds() &- turnStartedAt >= Self.turnBudgetNanoseconds { break }
            }
            startedThisTurn += batch.count
            start(batch, context: context)
        }
    }

    private func waitForNextRound(context: ChannelHandlerContext) {
        guard !waitingForRound else { return }
        waitingForRound = true
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        turns.next {
            let (handler, context) = loopBound.value
            handler.waitingForRound = false
            handler.beginTurn()
            handler.startWaiting(context: context)
            handler.closeIfDone(context: context)
            handler.readIfAllowed(context: context)
        }
    }

    private func start(_ decoded: [Result<IncomingRequest, KMSError>], context: ChannelHandlerContext) {
        inFlight += decoded.count
        tracker.pending.add(decoded.count, ordering: .relaxed)
        let dispatcher = self.dispatcher
        let principal = self.principal
        // Requests whose keys are all cached are handled right here: a thread hop there and back
        // costs more than the work. Anything that may touch storage goes to the worker pool.
        if decoded.allSatisfy({ (try? $0.get()).map { dispatcher.runsWithoutStorage($0.message, memo: memo) } ?? true }) {
            // One at a time within the turn's time budget; what is left goes back to the front
            // of the queue for the next round.
            var responses: [Outgoing] = []
            responses.reserveCapacity(decoded.count)
            for (i, request) in decoded.enumerated() {
                if i > 0, RequestRateLimiter.nowNanoseconds() &- turnStartedAt >= Self.turnBudgetNanoseconds {
                    let left = decoded.count - i
                    for r in decoded[i...].reversed() { waiting.prepend(.decoded(r)) }
                    inFlight -= left
                    startedThisTurn -= left
                    tracker.pending.subtract(left, ordering: .relaxed)
                    break
                }
                responses.append(dispatcher.handle(request, principal: principal, memo: memo))
            }
            write(responses, context: context, flush: false)
            return
        }
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        pool.run(uid: principal.uid, eventLoop: context.eventLoop) { () -> [Outgoing] in
            decoded.map { dispatcher.handle($0, principal: principal) }
        }.whenComplete { result in
            let (handler, context) = loopBound.value
            switch result {
            case .success(let responses):
                handler.write(responses, context: context)
            case .failure:
                // The worker pool has stopped: kmsd is shutting down. Each request is answered
                // with its own id (0 only for a frame that did not decode) and audited.
                let stopping = KMSError(.throttling, "kmsd is shutting down; retry against the restarted daemon")
                handler.write(decoded.map { request in
                    let id = (try? request.get())?.message.id ?? KMSProtocolConstants.connectionErrorRequestID
                    let action = (try? request.get())?.message.operation?.name ?? "Unknown"
                    dispatcher.auditRejected(action: action, principal: principal, error: stopping, requestID: id)
                    return Outgoing(response: .failure(id: id, stopping))
                }, context: context)
            }
        }
    }

    /// Writes (and, unless `flush` is false, flushes) the responses of one batch; they stop being in flight once their
    /// bytes reach the socket. One promise for the batch (writes complete in order, so the last
    /// one's completion covers all), not one per response. Frames that carried a secret are
    /// zeroed once written.
    private func write(_ responses: [Outgoing], context: ChannelHandlerContext, flush: Bool = true) {
        guard !responses.isEmpty else { return }
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        let count = responses.count
        var secretFrames: [ByteBuffer] = []
        let done: @Sendable (Result<Void, Error>) -> Void = { _ in
            let (handler, context) = loopBound.value
            handler.inFlight -= count
            handler.tracker.pending.subtract(count, ordering: .relaxed)
            handler.startWaiting(context: context)
            handler.closeIfDone(context: context)
            handler.readIfAllowed(context: context)
        }
        guard context.channel.isActive else {
            done(.success(()))
            return
        }
        var last: ByteBuffer? = nil
        for outgoing in responses {
            guard let frame = try? Self.frame(outgoing, allocator: context.channel.allocator) else { continue }
            if outgoing.secret != nil { secretFrames.append(frame) }
            if let previous = last { context.write(wrapOutboundOut(previous), promise: nil) }
            last = frame
        }
        guard let last else {
            done(.success(()))
            return
        }
        let promise = context.eventLoop.makePromise(of: Void.self)
        if flush {
            context.writeAndFlush(wrapOutboundOut(last), promise: promise)
        } else {
            context.write(wrapOutboundOut(last), promise: promise)
            needsFlush = true
        }
        if secretFrames.isEmpty {
            promise.futureResult.whenComplete(done)
        } else {
            let box = NIOLoopBound(secretFrames, eventLoop: context.eventLoop)
            promise.futureResult.whenComplete { result in
                // Written (or failed): zero them where they are.
                for frame in box.value { frame.zeroInPlace() }
                done(result)
            }
        }
    }

    /// The whole frame: length prefix, the serialized response, and (when there is one) the
    /// secret as one more occurrence of the operation field, copied from locked memory.
    static func frame(_ outgoing: Outgoing, allocator: ByteBufferAllocator) throws -> ByteBuffer {
        // Encrypt, Decrypt and GenerateDataKey answers go straight into the buffer.
        if let plan = HotResponseEncoder.plan(outgoing.response) {
            let outer = outgoing.secret.map { secretSize($0) } ?? 0
            var frame = allocator.buffer(capacity: 4 + plan.size + outer)
            frame.writeInteger(UInt32(plan.size + outer), endianness: .big)
            HotResponseEncoder.write(plan, into: &frame)
            if let secret = outgoing.secret { append(secret, to: &frame) }
            return frame
        }
        let body: [UInt8] = try outgoing.response.serializedBytes()
        guard let secret = outgoing.secret else {
            var frame = allocator.buffer(capacity: 4 + body.count)
            frame.writeInteger(UInt32(body.count), endianness: .big)
            frame.writeBytes(body)
            return frame
        }
        let outer = secretSize(secret)
        var frame = allocator.buffer(capacity: 4 + body.count + outer)
        frame.writeInteger(UInt32(body.count + outer), endianness: .big)
        frame.writeBytes(body)
        append(secret, to: &frame)
        return frame
    }

    /// The size of the secret's extra occurrence of the operation field.
    static func secretSize(_ secret: ResponseSecret) -> Int {
        let n = secret.bytes.count
        let inner = 1 + varintSize(n) + n
        return varintSize(secret.operationField << 3 | 2) + varintSize(inner) + inner
    }

    /// Appends the secret as one more occurrence of the operation field holding only its bytes
    /// field, copied from locked memory.
    static func append(_ secret: ResponseSecret, to frame: inout ByteBuffer) {
        let n = secret.bytes.count
        writeVarint(secret.operationField << 3 | 2, to: &frame)
        writeVarint(1 + varintSize(n) + n, to: &frame)
        frame.writeInteger(UInt8(secret.field << 3 | 2))
        writeVarint(n, to: &frame)
        secret.bytes.withUnsafeBytes { _ = frame.writeBytes($0) }
    }

    static func varintSize(_ v: Int) -> Int {
        var v = UInt64(v), n = 1
        while v >= 0x80 { v >>= 7; n += 1 }
        return n
    }

    static func writeVarint(_ v: Int, to buffer: inout ByteBuffer) {
        var v = UInt64(v)
        while v >= 0x80 { buffer.writeInteger(UInt8(v & 0x7f | 0x80)); v >>= 7 }
        buffer.writeInteger(UInt8(v))
    }

    private var mayRead: Bool {
        inFlight < maxInFlight && waiting.isEmpty && !closing && !tracker.draining.load(ordering: .relaxed)
    }

    private func readIfAllowed(context: ChannelHandlerContext) {
        if readPending, mayRead, context.channel.isWritable {
            readPending = false
            context.read()
        }
    }

    func read(context: ChannelHandlerContext) {
        if mayRead, context.channel.isWritable {
            context.read()
        } else {
            readPending = true
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        readIfAllowed(context: context)
        context.fireChannelWritabilityChanged()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        guard let e = error as? FrameLengthError else {
            context.close(promise: nil)
            return
        }
        closing = true
        let reason = e.announced == 0 ? "an empty frame" : "a frame of \(e.announced) bytes"
        let failure = KMSError(.validation, "\(reason) is not allowed; frames are 1...\(e.maximum) bytes. The connection is closed")
        let response = KMSResponse.failure(id: KMSProtocolConstants.connectionErrorRequestID, failure)
        let dispatcher = self.dispatcher, principal = self.principal
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        pool.run(uid: principal.uid, eventLoop: context.eventLoop) {
            dispatcher.auditRejected(action: "Unknown", principal: principal, error: failure)
        }.whenComplete { _ in
            let (handler, context) = loopBound.value
            if let frame = try? Self.frame(Outgoing(response: response), allocator: context.channel.allocator) {
                let channel = context.channel
                context.writeAndFlush(handler.wrapOutboundOut(frame)).whenComplete { _ in channel.close(promise: nil) }
            } else {
                context.close(promise: nil)
            }
        }
    }

    /// After the client half-closed, close once every request has been answered.
    private func closeIfDone(context: ChannelHandlerContext) {
        if inputClosed, inFlight == 0, waiting.isEmpty, !closing {
            closing = true
            context.close(promise: nil)
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? ChannelEvent, e == .inputClosed {
            inputClosed = true
            startWaiting(context: context)  // frames decoded at EOF come without a read-complete
            closeIfDone(context: context)
            return
        }
        // Idle: nothing in flight and nothing read for the idle timeout. A client that stopped
        // reading its answers also lands here, since no reads are issued while it is unwritable.
        if let idle = event as? IdleStateHandler.IdleStateEvent, idle == .read, inFlight == 0 || !context.channel.isWritable {
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        closing = true
        for case .frame(let frame) in waiting { frame.zeroInPlace() }
        waiting.removeAll()
        onClose()
        context.fireChannelInactive()
    }
}

/// Answers a connection over the limits with one error frame, then closes it.
final class RefusingHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    let response: KMSResponse

    init(response: KMSResponse) { self.response = response }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { refuse(context: context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        refuse(context: context)
    }

    private func refuse(context: ChannelHandlerContext) {
        var frame = context.channel.allocator.buffer(capacity: 256)
        frame.writeFrame((try? response.serializedBytes()) ?? [])
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(frame)).whenComplete { _ in channel.close(promise: nil) }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}
}

/// Rounds of deferred work for the connections of one event loop, so that a connection over
/// its turn budget continues only after the loop has served everyone else's I/O.
///
/// SwiftNIO runs every task that is due before it polls again, including tasks that fell due
/// while earlier ones ran; so each connection scheduling its own continuation could keep the
/// loop in its task phase indefinitely. Here one task per loop runs one round (each waiting
/// connection gets one more turn) and schedules the next round from the moment the round
/// ended: it is never due yet when the loop checks, so the loop polls for I/O in between.
final class TurnScheduler: @unchecked Sendable {
    let loop: EventLoop
    private var pending: [() -> Void] = []
    private var scheduled = false

    init(loop: EventLoop) { self.loop = loop }

    /// Runs `body` in the next round. Only on `loop`.
    func next(_ body: @escaping () -> Void) {
        loop.preconditionInEventLoop()
        pending.append(body)
        scheduleIfNeeded()
    }

    private func scheduleIfNeeded() {
        guard !scheduled, !pending.isEmpty else { return }
        scheduled = true
        loop.scheduleTask(in: .microseconds(20)) { self.round() }
    }

    /// Most time one round may take; connections it did not reach go first next round. So
    /// however many connections flood a loop, it polls for I/O at least this often.
    static let roundBudgetNanoseconds: UInt64 = 1_000_000

    private func round() {
        // `scheduled` stays set while the round runs: what the round defers goes to the next
        // round, scheduled only once this one has ended.
        let due = pending
        pending = []
        let start = RequestRateLimiter.nowNanoseconds()
        var ran = 0
        for body in due {
            body()
            ran += 1
            if RequestRateLimiter.nowNanoseconds() &- start >= Self.roundBudgetNanoseconds { break }
        }
        if ran < due.count { pending = Array(due[ran...]) + pending }
        scheduled = false
        scheduleIfNeeded()
    }
}
