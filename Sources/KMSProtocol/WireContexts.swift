/// One encryption-context pair exactly as it travelled: the UTF-8 bytes of key and value.
public struct WirePair: Sendable, Equatable {
    public let key: [UInt8]
    public let value: [UInt8]
    public init(key: [UInt8], value: [UInt8]) { self.key = key; self.value = value }
}

extension WirePair {
    /// C(ctx) of PROTOCOL.md §9.3, the form a ciphertext and a file envelope bind:
    /// u32be(count) ‖ for each pair: u32be(len k) ‖ k ‖ u32be(len v) ‖ v, with `sorted` already
    /// in ascending key-byte order (callers check their own limits first).
    public static func canonicalBytes(sorted: [WirePair]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(4 + sorted.reduce(0) { $0 + 8 + $1.key.count + $1.value.count })
        func u32(_ v: Int) { withUnsafeBytes(of: UInt32(v).bigEndian) { out += $0 } }
        u32(sorted.count)
        for p in sorted {
            u32(p.key.count); out += p.key
            u32(p.value.count); out += p.value
        }
        return out
    }
}

/// The encryption contexts of a request as they are on the wire, before protobuf's map
/// decoding can collapse them: a key sent twice, or two keys that Swift's String considers
/// equal (NFC and NFD forms of the same text) but whose bytes differ, all stay visible here.
///
/// Follows protobuf's rules for everything else: of the `operation` oneof fields the last one
/// on the wire is the request's operation, and several occurrences of that same field are
/// merged (their context entries add up); inside one map entry a repeated key or value field
/// keeps the last.
public struct WireContexts: Sendable {
    /// (operation field, context field) → pairs in wire order.
    private var pairs: [Int: [WirePair]] = [:]
    /// False when the scan met bytes it could not walk; the pairs are then not to be trusted.
    public private(set) var complete = true

    /// Context fields per operation field of `Request` (see kmsd.proto).
    static let contextFields: [Int: [Int]] = [30: [3], 31: [2], 32: [2, 5], 33: [4], 34: [4], 73: [4]]
    /// Every field number of `Request.operation`, context-bearing or not.
    static let operationFields: Set<Int> = [10, 11, 20, 21, 22, 23, 24, 25, 26, 27, 30, 31, 32, 33, 34, 35, 40, 41, 42, 43, 44, 45, 46, 50, 51, 52, 53, 54, 55, 60, 61, 62, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 83, 84, 85, 86, 87, 88]

    /// True when the request and these pairs came from one reading of the same bytes
    /// (`HotRequestDecoder`): they agree by construction, with nothing to cross-check.
    public private(set) var fromOneReading = false

    public init() {}

    /// The pairs `HotRequestDecoder` read for the request it decoded alongside.
    init(operation: Int, field: Int, pairs: [WirePair]) {
        if !pairs.isEmpty { self.pairs[operation * 100 + field] = pairs }
        fromOneReading = true
    }

    /// Scans a frame body that already decoded as a Request (so its structure is valid).
    public init(scanning body: UnsafeRawBufferPointer) {
        var reader = WireReader(body)
        var operation = 0
        var occurrences: [UnsafeRawBufferPointer] = []
        while reader.offset < reader.bytes.count {
            guard let (field, wireType) = reader.tag() else { complete = false; return }
            guard wireType == 2, Self.operationFields.contains(field), let message = reader.lengthDelimited() else {
                if !reader.skip(wireType, field: field) { complete = false; return }
                continue
            }
            if field != operation { occurrences = [] }
            operation = field
            occurrences.append(message)
        }
        guard let fields = Self.contextFields[operation] else { return }
        for message in occurrences {
            var inner = WireReader(message)
            while inner.offset < inner.bytes.count {
                guard let (field, wireType) = inner.tag() else { complete = false; return }
                guard wireType == 2, fields.contains(field), let entry = inner.lengthDelimited() else {
                    if !inner.skip(wireType, field: field) { complete = false; return }
                    continue
                }
                guard let pair = Self.entry(entry) else { complete = false; return }
                pairs[operation * 100 + field, default: []].append(pair)
            }
        }
    }

    /// The pairs of one context field of one operation, in wire order (duplicates included).
    public func context(operation: Int, field: Int) -> [WirePair] {
        pairs[operation * 100 + field] ?? []
    }

    /// A map entry `{1: key, 2: value}`; nil when it is not one a protobuf parser reads the same.
    static func entry(_ bytes: UnsafeRawBufferPointer) -> WirePair? {
        var reader = WireReader(bytes)
        var key: [UInt8] = [], value: [UInt8] = []
        while reader.offset < reader.bytes.count {
            guard let (field, wireType) = reader.tag() else { return nil }
            if field == 1 || field == 2 {
                guard wireType == 2, let b = reader.lengthDelimited() else { return nil }
                if field == 1 { key = Array(b) } else { value = Array(b) }
            } else if !reader.skip(wireType, field: field) {
                return nil
            }
        }
        return WirePair(key: key, value: value)
    }
}

/// Just enough of the protobuf wire format to walk fields.
struct WireReader {
    let bytes: UnsafeRawBufferPointer
    var offset = 0

    init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    mutating func varint() -> UInt64? {
        var result: UInt64 = 0
        var shift: UInt64 = 0
        while offset < bytes.count, shift < 64 {
            let b = bytes[offset]
            offset += 1
            result |= UInt64(b & 0x7f) << shift
            if b & 0x80 == 0 { return result }
            shift += 7
        }
        return nil
    }

    /// The next field's number and wire type; nil at the end (or on a malformed tag).
    mutating func tag() -> (Int, Int)? {
        guard offset < bytes.count, let t = varint(), t >> 3 > 0, t >> 3 < 1 << 29 else { return nil }
        return (Int(t >> 3), Int(t & 7))
    }

    mutating func lengthDelimited() -> UnsafeRawBufferPointer? {
        guard let n = varint(), n <= UInt64(bytes.count - offset) else { return nil }
        let slice = UnsafeRawBufferPointer(rebasing: bytes[offset..<offset + Int(n)])
        offset += Int(n)
        return slice
    }

    /// Skips a field's value, groups included (as protobuf parsers skip unknown fields);
    /// false when the bytes are malformed.
    mutating func skip(_ wireType: Int, field: Int = 0, depth: Int = 0) -> Bool {
        switch wireType {
        case 0: return varint() != nil
        case 1: guard bytes.count - offset >= 8 else { return false }; offset += 8; return true
        case 2: return lengthDelimited() != nil
        case 3:
            // A group: fields up to the end-group tag of the same number.
            guard depth < 64 else { return false }
            while let (inner, innerType) = tag() {
                if innerType == 4 { return inner == field }
                if !skip(innerType, field: inner, depth: depth + 1) { return false }
            }
            return false
        case 5: guard bytes.count - offset >= 4 else { return false }; offset += 4; return true
        default: return false
        }
    }
}
