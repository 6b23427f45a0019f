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
/// The ordinary build: `kmsfuzz seeds DIR VECTORS_DIR` writes the seed corpora `make fuzz`
/// starts from (Protocol/vectors and a few policies). FuzzRegressionTests replays
/// Tests/FuzzRegressions; a libFuzzer build replays any input file given to it.
@main
struct Replay {
    static func main() throws {
        let args = Array(CommandLine.arguments.dropFirst())
        guard args.count == 3, args[0] == "seeds" else {
            FileHandle.standardError.write(Data("usage: kmsfuzz seeds DIR VECTORS_DIR (the fuzzer itself: make fuzz)\n".utf8))
            exit(2)
        }
        try Seeds.write(to: args[1], vectors: args[2])
    }
}
#endif
