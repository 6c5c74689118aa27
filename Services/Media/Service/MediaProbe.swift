import CTalkMesh
import TalkMeshCore
import TalkMeshLibAV
import TalkMeshMessages

/// ProbeMedia: container, duration and every stream's parameters, without decoding.
public enum MediaProbe {
    public static func probe(path: String, size: Int64, flag: CancellationFlag) throws -> ProbeMediaResponse {
        let input = try MediaInput(path: path, flag: flag, invalid: .invalidVideo)
        var response = ProbeMediaResponse()
        response.container = input.containerName
        response.durationSec = input.declaredDuration ?? 0
        response.sizeBytes = size
        for (index, stream) in input.streams.enumerated() {
            let parameters = stream.pointee.codecpar.pointee
            var item = MediaStream()
            item.index = Int32(index)
            switch parameters.codec_type {
            case AVMEDIA_TYPE_VIDEO: item.type = "video"
            case AVMEDIA_TYPE_AUDIO: item.type = "audio"
            case AVMEDIA_TYPE_SUBTITLE: item.type = "subtitle"
            default: item.type = "data"
            }
            item.codec = String(cString: avcodec_get_name(parameters.codec_id))
            item.width = parameters.width
            item.height = parameters.height
            let rate = stream.pointee.avg_frame_rate
            item.frameRate = rate.den > 0 ? Double(rate.num) / Double(rate.den) : 0
            item.sampleRate = parameters.sample_rate
            item.channels = parameters.ch_layout.nb_channels
            if stream.pointee.duration > 0 {
                item.durationSec = Double(stream.pointee.duration) * Double(stream.pointee.time_base.num) / Double(stream.pointee.time_base.den)
            }
            response.streams.append(item)
        }
        return response
    }
}
