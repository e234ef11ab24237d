pub mod apps;
pub mod config;
pub mod deploy;
pub mod server;
pub mod status;
