import Foundation
@_exported import KMSEnvelope
@_exported import KMSProtocol
import NIOCore
import NIOPosix
import Synchronization

/// The connection could not be made or was lost; the request may or may not have run.
public struct KMSTransportError: Error, Sendable, CustomStringConvertible {
    public let description: String
    public init(_ d: String) { description = d }
}

/// An async client for kmsd: one method per operation, typed errors, one reused connection
/// that carries many requests at once (responses are matched by id).
///
/// Service errors are thrown as `KMSError` (stable `code`); transport failures as
/// `KMSTransportError`.
public final class KMSClient: Sendable {
    /// The socket this client talks to.
    public let socketPath: String
    private let group: EventLoopGroup
    private let state = Mutex<ConnectionState>(.idle)
    private let nextID = Atomic<UInt64>(1)

    enum ConnectionState {
        case idle
        case connecting(EventLoopFuture<Channel>)
        case connected(Channel)
    }

    /// `socketPath` defaults to `$KMSD_SOCKET`, else /run/kmsd/kmsd.sock.
    public init(socketPath: String? = nil, group: EventLoopGroup = MultiThreadedEventLoopGroup.singleton) {
        self.socketPath = socketPath ?? Self.defaultSocketPath()
        self.group = group
    }

    public static func defaultSocketPath() -> String {
        let env = ProcessInfo.processInfo.environment[KMSProtocolConstants.socketEnvironmentVariable]
        return (env?.isEmpty == false ? env : nil) ?? KMSProtocolConstants.defaultSocketPath
    }

    /// Closes the connection; the next request reconnects.
    public func close() async {
        let channel: Channel? = state.withLock { st in
            let current = st
            st = .idle
            if case .connected(let ch) = current { return ch }
            return nil
        }
        try? await channel?.close()
    }

    // MARK: - Raw requests

    /// Sends one request (its id is assigned here) and waits for its response.
    ///
    /// Throws KMSError when the server answers with an error, KMSTransportError when the
    /// connection fails.
    public func send(_ operation: KMSRequest.OneOf_Operation) async throws -> KMSResponse.OneOf_Result {
        var request = KMSRequest()
        request.operation = operation
        let response = try await pipeline([request]).first!
        if let error = response.kmsError { throw error }
        guard let result = response.result else { throw KMSTransportError("the server sent an empty response") }
        return result
    }

    /// Writes all `requests` (ids assigned here) in one flush before reading any answer, then
    /// returns the responses in the order of the requests, matched by id. Errors are returned
    /// inside the responses, not thrown.
    public func pipeline(_ requests: [KMSRequest]) async throws -> [KMSResponse] {
        let channel = try await connection()
        var numbered = requests
        for i in numbered.indices { numbered[i].id = nextID.wrappingAdd(1, ordering: .relaxed).oldValue }
        var frames: [ByteBuffer] = []
        frames.reserveCapacity(numbered.count)
        for r in numbered {
            var buf = channel.allocator.buffer(capacity: 64)
            buf.writeBytes(try r.serializedBytes() as [UInt8])
            frames.append(buf)
        }
        let promises = numbered.map { _ in channel.eventLoop.makePromise(of: KMSResponse.self) }
        let ids = numbered.map(\.id)
        let frameList = frames
        do {
            try await channel.eventLoop.submit {
                let handler: ResponseRouter
                do {
                    handler = try channel.pipeline.syncOperations.handler(type: ResponseRouter.self)
                    try handler.register(ids: ids, promises: promises)
                } catch {
                    // The connection went away first: nobody will answer these.
                    for p in promises { p.fail(error) }
                    throw error
                }
                for (id, f) in zip(ids, frameList) {
                    // A failed write fails that request, so no caller waits for an answer never asked.
                    let written = channel.eventLoop.makePromise(of: Void.self)
                    written.futureResult.whenFailure { handler.fail(id: id, $0) }
                    channel.write(f, promise: written)
                }
                channel.flush()
            }.get()
        } catch let error as EventLoopError {
            // The event loop would not run the submission at all.
            for p in promises { p.fail(error) }
            throw KMSTransportError("the connection to kmsd is closed: \(error)")
        } catch {
            state.withLock { if case .connected(let ch) = $0, ch === channel { $0 = .idle } }
            throw KMSTransportError("the connection to kmsd is closed: \(error)")
        }
        var out: [KMSResponse] = []
        out.reserveCapacity(promises.count)
        for p in promises { out.append(try await p.futureResult.get()) }
        return out
    }

    private func connection() async throws -> Channel {
        let future: EventLoopFuture<Channel> = state.withLock { st in
            switch st {
            case .connected(let ch) where ch.isActive: return ch.eventLoop.makeSucceededFuture(ch)
            case .connecting(let f): return f
            default:
                let f = ClientBootstrap(group: group)
                    .channelInitializer { channel in
                        channel.eventLoop.makeCompletedFuture {
                            try channel.pipeline.syncOperations.addHandlers([
                                ByteToMessageHandler(FrameDecoder(maxFrameBytes: KMSProtocolConstants.maxConfigurableFrameBytes)),
                                MessageToByteHandler(FrameEncoder()),
                                ResponseRouter(),
                            ])
                        }
                    }
                    .connect(unixDomainSocketPath: socketPath)
                st = .connecting(f)
                return f
            }
        }
        do {
            let ch = try await future.get()
            state.withLock { if case .connecting = $0 { $0 = .connected(ch) } }
            return ch
        } catch {
            state.withLock { if case .connecting = $0 { $0 = .idle } }
            throw KMSTransportError("cannot connect to kmsd at \(socketPath): \(error). Is kmsd running? Set KMSD_SOCKET or --socket")
        }
    }
}

/// Completes each request's promise with the response of the same id.
final class ResponseRouter: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    private var waiting: [UInt64: EventLoopPromise<KMSResponse>] = [:]
    private var closed = false

    /// Registers requests about to be written; throws when the connection is already gone.
    func register(ids: [UInt64], promises: [EventLoopPromise<KMSResponse>]) throws {
        guard !closed else {
            let error = KMSTransportError("the connection to kmsd was closed; retry the request")
            for p in promises { p.fail(error) }
            throw error
        }
        for (id, p) in zip(ids, promises) { waiting[id] = p }
    }

    func fail(id: UInt64, _ error: Error) {
        waiting.removeValue(forKey: id)?.fail(KMSTransportError("the request could not be sent: \(error)"))
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard let response = try? KMSResponse(frameBody: unwrapInboundIn(data)) else {
            failAll(KMSTransportError("the server sent a response this client cannot decode"))
            context.close(promise: nil)
            return
        }
        if response.id == KMSProtocolConstants.connectionErrorRequestID {
            // A connection-level error (limit, oversized frame): every waiting request fails with it.
            failAll(response.kmsError ?? KMSTransportError("the server closed the connection"))
            return
        }
        waiting.removeValue(forKey: response.id)?.succeed(response)
    }

    func channelInactive(context: ChannelHandlerContext) {
        closed = true
        failAll(KMSTransportError("the connection to kmsd was closed before every answer arrived"))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        failAll(KMSTransportError("connection error: \(error)"))
        context.close(promise: nil)
    }

    private func failAll(_ error: Error) {
        let all = waiting
        waiting.removeAll()
        for p in all.values { p.fail(error) }
    }
}
