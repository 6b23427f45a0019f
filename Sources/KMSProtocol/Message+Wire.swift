import Glibc
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

/// A decoded request and its encryption contexts exactly as they were on the wire.
///
/// A class: the request waits in queues and batches on its way to a handler, and a `Request`
/// value (its operation inline) is hundreds of bytes to move each time; a reference is 8.
public final class IncomingRequest: Sendable {
    public let message: KMSRequest
    public let contexts: WireContexts

    public convenience init(_ message: KMSRequest, contexts: WireContexts = WireContexts()) {
        self.init(message: message, contexts: contexts)
    }

    private init(message: KMSRequest, contexts: WireContexts) {
        self.message = message
        self.contexts = contexts
    }

    /// Decodes a frame body; throws ValidationException when it is not a Request. The
    /// temporary copy of the body (which may hold a plaintext) is zeroed before returning.
    public convenience init(frameBody: ByteBuffer) throws(KMSError) {
        // Encrypt, Decrypt and GenerateDataKey in their plain shape: one pass, no copy.
        if let (message, contexts) = frameBody.withUnsafeReadableBytes({ HotRequestDecoder.decode($0) }) {
            self.init(message: message, contexts: contexts)
            return
        }
        var bytes = Array(frameBody.readableBytesView)
        defer { bytes.withUnsafeMutableBytes { zeroize($0) } }
        let message: KMSRequest
        do {
            message = try KMSRequest(serializedBytes: bytes)
        } catch {
            throw KMSError(.validation, "the frame body is not a valid kmsd.v1 message (\(frameBody.readableBytes) bytes); check the client encodes kmsd.proto")
        }
        self.init(message: message, contexts: bytes.withUnsafeBytes { WireContexts(scanning: $0) })
    }
}

/// Overwrites memory with zeros in a way the optimizer cannot drop (explicit_bzero).
public func zeroize(_ buffer: UnsafeMutableRawBufferPointer) {
    guard let base = buffer.baseAddress, buffer.count > 0 else { return }
    explicit_bzero(base, buffer.count)
}

/// Zeroes shared storage where it is, through a read-only view on purpose: a mutating view
/// would first copy storage that is shared and zero only the copy. For bytes nobody reads
/// again (a consumed frame, a written response).
public func zeroizeInPlace(_ bytes: UnsafeRawBufferPointer) {
    zeroize(UnsafeMutableRawBufferPointer(mutating: bytes))
}

extension ByteBuffer {
    /// Zeroes the readable bytes in the buffer's storage itself (`zeroizeInPlace`).
    public func zeroInPlace() {
        withUnsafeReadableBytes { zeroizeInPlace($0) }
    }
}
