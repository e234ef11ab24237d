//! Builders: turn a source directory into an OCI image in the registry
