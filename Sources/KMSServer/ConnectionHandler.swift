import KMSCore
import KMSProtocol
import NIOCore
import NIOPosix

/// One client connection: decodes requests, runs them on the worker pool with at most
/// `maxInFlight` at once, writes responses (in completion order, matched by id), and closes on
/// framing errors or idleness.
///
/// Beyond `maxInFlight`, decoded frames wait here and no further reads are issued, so a client
/// that pipelines faster than it is answered is slowed down, never errored or allowed to grow
/// the daemon's memory.
final class ConnectionHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let principal: Principal
    private let dispatcher: Dispatcher
    private let pool: NIOThreadPool
    private let maxInFlight: Int
    private let onClose: @Sendable () -> Void

    private var inFlight = 0
    private var waiting: CircularBuffer<ByteBuffer> = []
    private var readPending = false
    private var closing = false
    private var inputClosed = false

    init(principal: Principal, dispatcher: Dispatcher, pool: NIOThreadPool, maxInFlight: Int, onClose: @escaping @Sendable () -> Void) {
        self.principal = principal
        self.dispatcher = dispatcher
        self.pool = pool
        self.maxInFlight = maxInFlight
        self.onClose = onClose
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        waiting.append(unwrapInboundIn(data))
        startWaiting(context: context)
    }

    private func startWaiting(context: ChannelHandlerContext) {
        while inFlight < maxInFlight, !closing, let frame = waiting.popFirst() {
            start(frame, context: context)
        }
    }

    private func start(_ frame: ByteBuffer, context: ChannelHandlerContext) {
        let request: KMSRequest
        do {
            request = try KMSRequest(frameBody: frame)
        } catch {
            // The framing is intact, so answer and keep the connection.
            dispatcher.auditRejected(action: "Unknown", principal: principal, error: error)
            write(.failure(id: KMSProtocolConstants.connectionErrorRequestID, error), context: context)
            return
        }
        inFlight += 1
        let dispatcher = self.dispatcher
        let principal = self.principal
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        pool.runIfActive(eventLoop: context.eventLoop) {
            dispatcher.handle(request, principal: principal)
        }.whenComplete { result in
            let (handler, context) = loopBound.value
            handler.inFlight -= 1
            switch result {
            case .success(let response): handler.write(response, context: context)
            case .failure:
                handler.write(.failure(id: request.id, KMSError(.throttling, "kmsd is shutting down; retry against the restarted daemon")), context: context)
            }
            handler.startWaiting(context: context)
            handler.closeIfDone(context: context)
            if handler.readPending, handler.inFlight < handler.maxInFlight, handler.waiting.isEmpty {
                handler.readPending = false
                context.read()
            }
        }
    }

    private func write(_ response: KMSResponse, context: ChannelHandlerContext) {
        guard context.channel.isActive, let body = try? response.frameBody(allocator: context.channel.allocator) else { return }
        context.writeAndFlush(wrapOutboundOut(body), promise: nil)
    }

    func read(context: ChannelHandlerContext) {
        if inFlight >= maxInFlight || !waiting.isEmpty {
            readPending = true
        } else {
            context.read()
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if let e = error as? FrameLengthError {
            closing = true
            let reason = e.announced == 0 ? "an empty frame" : "a frame of \(e.announced) bytes"
            let failure = KMSError(.validation, "\(reason) is not allowed; frames are 1...\(e.maximum) bytes. The connection is closed")
            dispatcher.auditRejected(action: "Unknown", principal: principal, error: failure)
            let response = KMSResponse.failure(id: KMSProtocolConstants.connectionErrorRequestID, failure)
            if let body = try? response.frameBody(allocator: context.channel.allocator) {
                context.writeAndFlush(wrapOutboundOut(body)).whenComplete { _ in context.close(promise: nil) }
            } else {
                context.close(promise: nil)
            }
            return
        }
        context.close(promise: nil)
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
            closeIfDone(context: context)
            return
        }
        if let idle = event as? IdleStateHandler.IdleStateEvent, idle == .read, inFlight == 0 {
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        closing = true
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
        context.writeAndFlush(wrapOutboundOut(frame)).whenComplete { _ in context.close(promise: nil) }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}
}
