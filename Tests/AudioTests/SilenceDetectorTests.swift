import Testing
import Glibc
@testable import TalkMeshAudioService

/// pydub's detect_silence written the slow, literal way: a reference for the O(n) detector.
func referenceSilences(_ samples: [Int16], rate: Int, channels: Int, minSilenceMs: Int, thresholdDB: Double) -> [Silence] {
    let frames = samples.count / channels
    let length = Int((1000.0 * (Double(frames) / Double(rate))).rounded(.toNearestOrEven))
    guard length >= minSilenceMs else { return [] }
    let threshold = pow(10, thresholdDB / 20) * 32768
    func frame(_ ms: Int) -> Int { Int(Double(ms) * (Double(rate) / 1000.0)) }
    var starts: [Int] = []
    for i in 0...(length - minSilenceMs) {
        let s = frame(min(i, length)), e = frame(min(i + minSilenceMs, length))
        var sum = 0.0
        for f in s..<e {
            for c in 0..<channels {
                let value = f < frames ? Double(samples[f * channels + c]) : 0
                sum += value * value
            }
        }
        let count = (e - s) * channels
        let rms = count == 0 ? 0 : UInt32((sum / Double(count)).squareRoot())
        if Double(rms) <= threshold { starts.append(i) }
    }
    guard var previous = starts.first else { return [] }
    var rangeStart = previous
    var ranges: [Silence] = []
    for start in starts.dropFirst() {
        if start != previous + 1 && start > previous + minSilenceMs {
            ranges.append(Silence(startMs: rangeStart, endMs: previous + minSilenceMs))
            rangeStart = start
        }
        previous = start
    }
    ranges.append(Silence(startMs: rangeStart, endMs: previous + minSilenceMs))
    return ranges
}

/// Tone bursts and quiet gaps with a little noise, deterministic.
func synthesize(rate: Int, channels: Int, layout: [(seconds: Double, loud: Bool)], seed: UInt64 = 7) -> [Int16] {
    var state = seed
    func noise() -> Int16 {
        state = state &* 6364136223846793005 &+ 1442695040888963407
        return Int16(truncatingIfNeeded: Int(state >> 33) % 200 - 100)
    }
    var out: [Int16] = []
    var t = 0
    for (seconds, loud) in layout {
        for _ in 0..<Int(seconds * Double(rate)) {
            let tone = loud ? 9000 * sin(2 * Double.pi * 220 * Double(t) / Double(rate)) : 0
            for _ in 0..<channels { out.append(Int16(max(-32768, min(32767, tone + Double(noise()))))) }
            t += 1
        }
    }
    return out
}

func profile(_ samples: [Int16], rate: Int, channels: Int, chunked: Int = 997) -> EnergyProfile {
    var builder = EnergyProfileBuilder(rate: rate, channels: channels)
    var index = 0
    while index < samples.count {
        let end = min(samples.count, index + chunked)
        samples[index..<end].withUnsafeBufferPointer { builder.add($0) }
        index = end
    }
    return builder.finish()
}

@Suite("Silence detection")
struct SilenceDetectorTests {
    @Test("matches pydub's literal algorithm", arguments: [(44100, 2), (16000, 1), (22050, 1), (48000, 2), (8000, 1), (11025, 2)])
    func matchesReference(rate: Int, channels: Int) {
        let samples = synthesize(rate: rate, channels: channels, layout: [(0.3, true), (0.7, false), (0.45, true), (0.52, false), (0.2, true), (1.1, false)])
        let energy = profile(samples, rate: rate, channels: channels)
        for (minSilence, threshold) in [(500, -40.0), (300, -30.0), (100, -60.0), (250, -20.0)] {
            let fast = SilenceDetector.detect(energy, minSilenceMs: minSilence, thresholdDB: threshold)
            let slow = referenceSilences(samples, rate: rate, channels: channels, minSilenceMs: minSilence, thresholdDB: threshold)
            #expect(fast == slow, "rate \(rate) channels \(channels) min \(minSilence) thresh \(threshold)")
        }
    }

    @Test("silences are found where the layout has them")
    func knownLayout() {
        let samples = synthesize(rate: 16000, channels: 1, layout: [(1, true), (1, false), (1, true)])
        let found = SilenceDetector.detect(profile(samples, rate: 16000, channels: 1), minSilenceMs: 500, thresholdDB: -40)
        #expect(found.count == 1)
        #expect(abs(found[0].startMs - 1000) <= 2 && abs(found[0].endMs - 2000) <= 2)
    }

    @Test("audio shorter than the window has no silence; all-quiet audio is one range")
    func edges() {
        let short = synthesize(rate: 16000, channels: 1, layout: [(0.2, false)])
        #expect(SilenceDetector.detect(profile(short, rate: 16000, channels: 1), minSilenceMs: 500, thresholdDB: -40).isEmpty)
        let quiet = synthesize(rate: 16000, channels: 1, layout: [(2, false)])
        #expect(SilenceDetector.detect(profile(quiet, rate: 16000, channels: 1), minSilenceMs: 500, thresholdDB: -40) == [Silence(startMs: 0, endMs: 2000)])
    }

    @Test("the profile's length and frames follow pydub's rounding")
    func lengths() {
        let energy = profile([Int16](repeating: 1, count: 44100 + 22), rate: 44100, channels: 1)
        #expect(energy.frames == 44122)
        #expect(energy.lengthMs == 1000)  // round(1000.49…)
        #expect(energy.energy(fromMs: 0, toMs: 1000) == 44100)
    }
}

@Suite("Chunk planning")
struct ChunkPlannerTests {
    let planner = ChunkPlanner(parameters: .init(targetSec: 45, maxSec: 60, fps: 25))
    func middle(_ from: Int, _ to: Int) -> Int { (from + to) / 2 }

    func check(_ cuts: [Int], duration: Double) {
        var last = 0
        for cut in cuts {
            #expect(cut > last)
            #expect(Double(cut - last) / 25 <= 60 + 1e-9)
            last = cut
        }
        #expect(duration - Double(last) / 25 <= 60 + 1e-9)
        let chunks = planner.chunks(durationSec: duration, cuts: cuts)
        #expect(chunks.first?.startSec == 0)
        #expect(chunks.last?.endSec == duration)
        for (a, b) in zip(chunks, chunks.dropFirst()) { #expect(a.endSec == b.startSec) }
    }

    @Test("audio no longer than the target is one chunk")
    func short() {
        #expect(planner.cuts(durationSec: 45, silences: [], quietest: middle).isEmpty)
        #expect(planner.cuts(durationSec: 12.3, silences: [], quietest: middle).isEmpty)
    }

    @Test("no silence at all: quietest point, every chunk within max")
    func noSilence() {
        let cuts = planner.cuts(durationSec: 200, silences: [], quietest: { from, _ in from + 10 })
        #expect(!cuts.isEmpty)
        check(cuts, duration: 200)
    }

    @Test("a silence exactly at the target is where the cut goes")
    func silenceAtTarget() {
        let cuts = planner.cuts(durationSec: 80, silences: [Silence(startMs: 44_500, endMs: 45_500)], quietest: middle)
        #expect(cuts == [45 * 25])
    }

    @Test("the nearest silence within ±target/3 wins")
    func nearest() {
        let silences = [Silence(startMs: 31_000, endMs: 32_000), Silence(startMs: 50_000, endMs: 51_000), Silence(startMs: 70_000, endMs: 71_000)]
        let cuts = planner.cuts(durationSec: 90, silences: silences, quietest: middle)
        #expect(cuts.first == Int((50.5 * 25).rounded()))
        check(cuts, duration: 90)
    }

    @Test("a single three-minute sentence never exceeds the maximum")
    func longSentence() {
        let cuts = planner.cuts(durationSec: 180, silences: [], quietest: { _, to in to - 10 })
        check(cuts, duration: 180)
    }

    @Test("a tiny tail merges into its predecessor")
    func tinyTail() {
        let cuts = planner.cuts(durationSec: 50, silences: [Silence(startMs: 44_000, endMs: 46_000)], quietest: middle)
        #expect(cuts.isEmpty)  // 5 s left < 15 s, and 50 s ≤ 60 s
    }

    @Test("every cut lies on the 40 ms frame grid", arguments: [97.3, 140.01, 333.33, 1799.9])
    func grid(duration: Double) {
        let silences = stride(from: 7_000, to: Int(duration * 1000), by: 13_370).map { Silence(startMs: $0, endMs: $0 + 733) }
        let cuts = planner.cuts(durationSec: duration, silences: silences, quietest: { from, to in (from + to) / 2 + 3 })
        check(cuts, duration: duration)
        let chunks = planner.chunks(durationSec: duration, cuts: cuts)
        for chunk in chunks.dropLast() {
            let milliseconds = (chunk.endSec - chunk.startSec) * 1000
            #expect(abs(milliseconds / 40 - (milliseconds / 40).rounded()) < 1e-6)
        }
    }
}

@Suite("WAV files")
struct WAVFileTests {
    @Test("header fields and little-endian data")
    func header() {
        let bytes = WAVFile.encode([1, -2, 300][...], rate: 16000, channels: 1)
        #expect(bytes.count == 44 + 6)
        #expect(Array(bytes[0..<4]) == Array("RIFF".utf8) && Array(bytes[8..<16]) == Array("WAVEfmt ".utf8))
        #expect(bytes[24] == 0x80 && bytes[25] == 0x3E)  // 16000
        #expect(Array(bytes[44...]) == [1, 0, 0xFE, 0xFF, 0x2C, 0x01])
        #expect(WAVFile.sizes(seconds: 60, rate: 16000, channels: 1).base64 < 10_000_000)
        #expect(WAVFile.sizes(seconds: 60, rate: 48000, channels: 2).base64 > 10_000_000)
    }
}
