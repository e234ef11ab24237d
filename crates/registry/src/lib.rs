//! OCI distribution registry: content-addressed blobs, manifests, tags
