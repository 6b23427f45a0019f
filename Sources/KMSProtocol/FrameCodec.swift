import NIOCore

/// An event fired when a peer announces a frame that breaks the framing rules.
///
/// The length is checked as soon as the 4 length bytes arrive, before any of the body is
/// buffered, so a hostile length costs nothing.
public struct FrameLengthError: Error, Sendable, Equatable {
    public let announced: UInt32
    public let maximum: Int

    public init(announced: UInt32, maximum: Int) {
        self.announced = announced
        self.maximum = maximum
    }
}

/// Splits a byte stream into frames: a 4-byte big-endian length, then that many bytes.
public struct FrameDecoder: ByteToMessageDecoder {
    public typealias InboundOut = ByteBuffer

    public let maxFrameBytes: Int

    public init(maxFrameBytes: Int) {
        self.maxFrameBytes = maxFrameBytes
    }

    public mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let length = buffer.getInteger(at: buffer.readerIndex, endianness: .big, as: UInt32.self) else {
            return .needMoreData
        }
        guard length >= 1, Int(length) <= maxFrameBytes else {
            throw FrameLengthError(announced: length, maximum: maxFrameBytes)
        }
        guard buffer.readableBytes >= KMSProtocolConstants.lengthPrefixBytes + Int(length) else {
            return .needMoreData
        }
        buffer.moveReaderIndex(forwardBy: KMSProtocolConstants.lengthPrefixBytes)
        // The frame goes on in a buffer of its own, and its bytes in the receive buffer are
        // zeroed at once: a frame may carry a plaintext, and the receive buffer's storage may
        // be copied (as more bytes are appended) or freed without anyone zeroing it later.
        let body = buffer.readSlice(length: Int(length))!
        var frame = context.channel.allocator.buffer(capacity: body.readableBytes)
        frame.writeImmutableBuffer(body)
        body.zeroInPlace()
        context.fireChannelRead(Self.wrapInboundOut(frame))
        return .continue
    }

    public mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        // A truncated trailing frame is dropped: the peer went away mid-frame.
        while try decode(context: context, buffer: &buffer) == .continue {}
        buffer.clear()
        return .needMoreData
    }
}

/// Prefixes each outgoing frame with its 4-byte big-endian length.
public struct FrameEncoder: MessageToByteEncoder {
    public typealias OutboundIn = ByteBuffer

    public init() {}

    public func encode(data: ByteBuffer, out: inout ByteBuffer) throws {
        out.writeInteger(UInt32(data.readableBytes), endianness: .big)
        out.writeImmutableBuffer(data)
    }
}

extension ByteBuffer {
    /// Appends one complete frame (length prefix and body).
    public mutating func writeFrame(_ body: [UInt8]) {
        writeInteger(UInt32(body.count), endianness: .big)
        writeBytes(body)
    }
}
