import NIOCore
import SwiftProtobuf

extension SwiftProtobuf.Message {
    /// Decodes a frame body; throws ValidationException when it is not this message.
    public init(frameBody: ByteBuffer) throws(KMSError) {
        do {
            self = try Self(serializedBytes: Array(frameBody.readableBytesView))
        } catch {
            throw KMSError(.validation, "the frame body is not a valid kmsd.v1 message (\(frameBody.readableBytes) bytes); check the client encodes kmsd.proto")
        }
    }

    /// Serializes into a fresh buffer (the frame body, without its length prefix).
    public func frameBody(allocator: ByteBufferAllocator = ByteBufferAllocator()) throws -> ByteBuffer {
        let bytes: [UInt8] = try serializedBytes()
        var buffer = allocator.buffer(capacity: bytes.count)
        buffer.writeBytes(bytes)
        return buffer
    }
}
