//! The edge proxy: listeners, handlers, routing, headers, load balancing
