//! The control plane: REST API, store, deploys, catalog stream
