"""The Kubernetes backend: `render` (every object a run creates, pure functions of the spec, shared with
`argus k8s render`), `crds` (the ToolEnvironment and ModelServing resources and their generated CRDs),
`cluster` (connection and preflight checks), and `backend.KubernetesBackend`."""
