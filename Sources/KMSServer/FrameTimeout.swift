import KMSProtocol
import NIOCore

/// Closes a connection that started a frame and did not finish it within `timeout`, however
/// slowly it trickles bytes: a client may be idle between frames (the idle timeout covers
/// that), never halfway through one.
///
/// Sits before the frame decoder and follows frame boundaries itself (4-byte big-endian length,
/// then the body), so it never buffers anything. Time kmsd itself spends not reading (its
/// in-flight limit, or a client that does not read its answers) is not held against the
/// client: when the deadline passes while no read is outstanding, it starts over.
final class FrameTimeoutHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer

    let timeout: TimeAmount
    let onTimeout: (ChannelHandlerContext) -> Void
    /// Bytes of the current frame's length prefix seen so far, and the length they make.
    private var headerBytes = 0
    private var length: UInt32 = 0
    /// Body bytes still to come for the current frame.
    private var remaining = 0
    private var deadline: Scheduled<Void>?
    /// True while a read kmsd asked for has not been satisfied yet.
    private var reading = false

    init(timeout: TimeAmount, onTimeout: @escaping (ChannelHandlerContext) -> Void) {
        self.timeout = timeout
        self.onTimeout = onTimeout
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        var view = buffer.readableBytesView[...]
        var completed = false
        while !view.isEmpty {
            if remaining > 0 {
                let take = min(remaining, view.count)
                remaining -= take
                view = view.dropFirst(take)
                completed = completed || remaining == 0
                continue
            }
            length = length << 8 | UInt32(view.first!)
            view = view.dropFirst()
            headerBytes += 1
            if headerBytes == KMSProtocolConstants.lengthPrefixBytes {
                remaining = Int(length)
                headerBytes = 0
                length = 0
            }
        }
        let midFrame = remaining > 0 || headerBytes > 0
        if completed || !midFrame, let d = deadline {
            // Each frame gets the whole timeout from its first byte.
            d.cancel()
            deadline = nil
        }
        if midFrame, deadline == nil { arm(context: context) }
        context.fireChannelRead(data)
    }

    private func arm(context: ChannelHandlerContext) {
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        deadline = context.eventLoop.scheduleTask(in: timeout) {
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
        context.fireChannelInactive()
    }
}
