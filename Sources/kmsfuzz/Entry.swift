import Foundation
import KMSServer

#if KMSFUZZ_LIBFUZZER
// Built by `make fuzz` with -sanitize=fuzzer: libFuzzer's driver runs every input through the
// target KMSFUZZ_TARGET names.
let fuzzTarget: String = {
    guard let name = ProcessInfo.processInfo.environment["KMSFUZZ_TARGET"], FuzzTargets.names.contains(name) else {
        fatalError("kmsfuzz: set KMSFUZZ_TARGET to one of \(FuzzTargets.names.joined(separator: ", "))")
    }
    return name
}()

@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(_ argc: UnsafeMutablePointer<CInt>,
                         _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
                         _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt) -> CInt

/// The entry libFuzzer's own main() looks for (it is linked in with -sanitize=fuzzer); kmsfuzz's
/// main below runs the same driver.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ bytes: UnsafePointer<UInt8>?, _ count: Int) -> CInt {
    FuzzTargets.run(fuzzTarget, UnsafeRawBufferPointer(start: bytes, count: count))
    return 0
}

@main
struct Fuzz {
    static func main() {
        _ = fuzzTarget
        var argc = CommandLine.argc
        var argv = CommandLine.unsafeArgv
        exit(LLVMFuzzerRunDriver(&argc, &argv) { bytes, count in fuzzOneInput(bytes, count) })
    }
}
#else
/// The ordinary build: `kmsfuzz TARGET PATH...` runs every file (or every file in every
/// directory) through a target once, as regression tests do; `kmsfuzz seeds DIR VECTORS_DIR`
/// writes seed corpora from Protocol/vectors for `make fuzz`.
@main
struct Replay {
    static func main() throws {
        let args = Array(CommandLine.arguments.dropFirst())
        if args.first == "seeds", args.count == 3 {
            try Seeds.write(to: args[1], vectors: args[2])
            return
        }
        guard args.count >= 2, FuzzTargets.names.contains(args[0]) else {
            FileHandle.standardError.write(Data("usage: kmsfuzz TARGET PATH... (targets: \(FuzzTargets.names.joined(separator: ", "))) | kmsfuzz seeds DIR VECTORS_DIR\n".utf8))
            exit(2)
        }
        var files: [String] = []
        for path in args.dropFirst() {
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else { continue }
            if isDirectory.boolValue {
                for name in try FileManager.default.contentsOfDirectory(atPath: path).sorted() { files.append(path + "/" + name) }
            } else {
                files.append(path)
            }
        }
        for file in files {
            let data = try Data(contentsOf: URL(fileURLWithPath: file))
            data.withUnsafeBytes { FuzzTargets.run(args[0], $0) }
        }
        print("kmsfuzz: \(args[0]): \(files.count) inputs, no crash")
    }
}
#endif
