import KMSProtocol
import NIOCore

/// Splits the byte stream into frames (4-byte big-endian length, then the body), like
/// `FrameDecoder`, but owns every byte it keeps, so it can leave none behind: each frame goes
/// on in a buffer of its own, a partial frame waits in a buffer of its own, and every receive
/// buffer is zeroed once its bytes have been copied out (a frame may carry a plaintext, and a
/// receive buffer is otherwise freed, or grown by reallocation, with its bytes still in it).
///
/// The length is checked as soon as its 4 bytes are in, before any of the body is kept; a
/// length of 0 or above `maxFrameBytes` fires `FrameLengthError` and nothing more is read.
///
/// With a `frameTimeout`, a frame that was started and not finished in time (however slowly
/// its bytes trickle in) calls `onTimeout`: a client may be idle between frames (the idle
/// timeout covers that), never halfway through one. Time kmsd spends not reading (its
/// in-flight limit, or a client that does not read its answers) is not held against the
/// client: when the deadline passes while no read is outstanding, it starts over.
final class FrameReader: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer

    let maxFrameBytes: Int
    let frameTimeout: TimeAmount?
    let onTimeout: (ChannelHandlerContext) -> Void
    /// The start of a frame not complete yet; ours alone.
    private var partial: ByteBuffer?
    private var failed = false
    private var deadline: Scheduled<Void>?
    /// True while a read kmsd asked for has not been satisfied yet.
    private var reading = false

    init(maxFrameBytes: Int, frameTimeout: TimeAmount? = nil, onTimeout: @escaping (ChannelHandlerContext) -> Void = { _ in }) {
        self.maxFrameBytes = maxFrameBytes
        self.frameTimeout = frameTimeout
        self.onTimeout = onTimeout
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let incoming = unwrapInboundIn(data)
        defer { Self.wipe(incoming) }
        guard !failed else { return }
        var bytes: ByteBuffer
        if let held = partial {
            bytes = context.channel.allocator.buffer(capacity: held.readableBytes + incoming.readableBytes)
            bytes.writeImmutableBuffer(held)
            bytes.writeImmutableBuffer(incoming)
            Self.wipe(held)
            partial = nil
        } else {
            bytes = incoming
        }
        var completed = false
        while let length = bytes.getInteger(at: bytes.readerIndex, endianness: .big, as: UInt32.self) {
            guard length >= 1, Int(length) <= maxFrameBytes else {
                failed = true
                Self.wipe(bytes)
                context.fireErrorCaught(FrameLengthError(announced: length, maximum: maxFrameBytes))
                return
            }
            guard bytes.readableBytes >= KMSProtocolConstants.lengthPrefixBytes + Int(length) else { break }
            bytes.moveReaderIndex(forwardBy: KMSProtocolConstants.lengthPrefixBytes)
            let body = bytes.readSlice(length: Int(length))!
            var frame = context.channel.allocator.buffer(capacity: body.readableBytes)
            frame.writeImmutableBuffer(body)
            completed = true
            context.fireChannelRead(wrapInboundOut(frame))
            if failed { return }
        }
        if bytes.readableBytes > 0 {
            var held = context.channel.allocator.buffer(capacity: bytes.readableBytes)
            held.writeImmutableBuffer(bytes)
            partial = held
        }
        Self.wipe(bytes)  // everything in it has been copied out
        // Each frame gets the whole timeout from its first byte.
        if completed || partial == nil, let d = deadline {
            d.cancel()
            deadline = nil
        }
        if partial != nil, deadline == nil { arm(context: context) }
    }

    private func arm(context: ChannelHandlerContext) {
        guard let frameTimeout else { return }
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        deadline = context.eventLoop.scheduleTask(in: frameTimeout) {
            let (handler, context) = loopBound.value
            handler.deadline = nil
            if handler.reading { handler.onTimeout(context) } else { handler.arm(context: context) }
        }
    }

    func read(context: ChannelHandlerContext) {
        reading = true
        context.read()
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        reading = false
        context.fireChannelReadComplete()
    }

    func channelInactive(context: ChannelHandlerContext) {
        deadline?.cancel()
        deadline = nil
        // A frame cut off by the peer going away is dropped, and its bytes with it.
        if let held = partial { Self.wipe(held) }
        partial = nil
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? ChannelEvent, e == .inputClosed, let held = partial {
            Self.wipe(held)
            partial = nil
        }
        context.fireUserInboundEventTriggered(event)
    }

    /// Zeroes a buffer's storage where it is, from its start (`zeroInPlace`).
    static func wipe(_ buffer: ByteBuffer) {
        var whole = buffer
        whole.moveReaderIndex(to: 0)
        whole.zeroInPlace()
    }
}
