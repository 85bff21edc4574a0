"""Models: the registry on disk (`registry`), the runtimes that run an artifact
(`runtimes`), dynamic batching (`batching`, `worker.ModelWorker`) and the Ray Serve
deployment that hosts one version (`replica.ModelReplica`)."""
