"""Getting a model onto disk: everything PullModel, CancelDownload, PauseDownload,
ResumeDownload and ListSources set in motion. Imports point down this list:

    service.py     DownloadService: start, join, pause, cancel, resume; restores the queue
    pipeline.py    DownloadPipeline: what one job runs (manifest, plan, files, verify, READY)
    manifest.py    the manifest from the first endpoint that answers; plan.py what to transfer
    files.py       FileDownloader (one file, Range resumes, hashing while writing), PartialFile
    queue.py       DownloadQueue and DownloadJob; queue_file.py queue.json across restarts
    retry.py       the one retry loop: breaker, backoff, budget
    hub.py         HubClient over huggingface_hub (manifests, file streams, DEBUG request lines)
    sources.py     the configured endpoints and their circuit breakers
"""
