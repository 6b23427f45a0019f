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
final class FrameReader: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    let maxFrameBytes: Int
    /// The start of a frame not complete yet; ours alone.
    private var partial: ByteBuffer?
    private var failed = false

    init(maxFrameBytes: Int) {
        self.maxFrameBytes = maxFrameBytes
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
            context.fireChannelRead(wrapInboundOut(frame))
            if failed { return }
        }
        if bytes.readableBytes > 0 {
            var held = context.channel.allocator.buffer(capacity: bytes.readableBytes)
            held.writeImmutableBuffer(bytes)
            partial = held
        }
        Self.wipe(bytes)  // everything in it has been copied out
    }

    func channelInactive(context: ChannelHandlerContext) {
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

    /// Zeroes a buffer's storage where it is: through a read-only view on purpose, since a
    /// mutating one would copy a shared storage and zero only the copy.
    static func wipe(_ buffer: ByteBuffer) {
        var whole = buffer
        whole.moveReaderIndex(to: 0)
        whole.withUnsafeReadableBytes { zeroize(UnsafeMutableRawBufferPointer(mutating: $0)) }
    }
}
