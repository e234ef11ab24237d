//! The host agent: durable machine state, images, drivers, networking
