/// RunPod's settings, read and checked by `RunPodClient.Configuration` from the environment;
/// the emulator reads the API key too.
extension Setting {
    public static let runPodAPIKey = Setting("RUNPOD_API_KEY", flag: nil, readBy: "Dispatcher, emulator",
                                             help: "sent as `Authorization: Bearer`; the emulator, when set, requires it")
    public static let runPod: [Setting] = [
        Setting("RUNPOD_ENDPOINT_ID", flag: nil, required: true, help: "the RunPod endpoint (required)"),
        runPodAPIKey,
        Setting("RUNPOD_BASE_URL", shown: "`https://api.runpod.ai/v2`", flag: nil, help: "RunPod's API root"),
        Setting("RUNPOD_VOLUME_PATH", shown: "— (such results fail)", flag: nil,
                help: "where a worker's network-volume `video_path` is mounted locally"),
    ]
}
